"""MagicStyle benchmark, measured side by side in one run (run by hand: python bench/bench_magicstyle.py).

On SD1.5's UNet architecture with random weights (by default exactly SD1.5's: model_channels 320, channel_mult
1,2,4,4, 8 heads, 16 attention layers; narrower with --width/--channel-mult for a quick run) at a 64x64 latent
(512x512 px):

- KV store bytes of the decoder layers (the KV Feature Store's default before issue 13) for a 50-step schedule,
  storing the normalised hidden state n, against storing q, k and v (goal <= 0.34). Measured on an inversion of
  --steps steps (every stored tensor counted) and scaled per step to 50 steps; the store's own 50-step plan is
  printed next to it.
- KV store bytes of the magicstyle preset's plan (the KV Feature Store's default now: only the layers and steps the
  fusion reads) in fp16, int8 (per-token scale) and fp8_e4m3, against two q/k/v baselines in fp16: the decoder
  layers the old default kept, and the fused layers only (goal for int8 <= 1/6 of the first; against the second
  the per-row scales put it just above 1/6). All stores are filled by the same inversion of each image.
- The fused sample (magicstyle) made from an int8 / fp8 store against the one made from the fp16 store, relative
  RMS difference (goal for int8 <= 1%); fp16 against an fp32 store shows fp16's own share.
- Sampling time with Feature Fusion Attention (magicstyle preset) over plain sampling (goal <= 1.25), next to the
  same fusion through attn1 replaces (its route when another pack's replace held the slot first), the same fusion
  inside another pack's replace set after it (found when sampling starts; the content weight realised by repeating
  key groups) and the StyleAligned way: the reference image runs in the same batch (batch 2) with shared attention in every layer.
  All runs use the exact reverse DDIM sampler through ComfyUI's guider, cfg 1, the same --steps schedule; each
  variant runs once to warm up, then --repeats interleaved rounds with the order rotated; the best time is kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

from magic_portrait import comfy_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px)")
    harness.add_unet_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps timed (the store is scaled to 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comfy-attention", choices=["same", "sdpa", "default"], default="same",
                        help="same: ComfyUI's own attention uses FFA's attention kernel, so the ratio measures FFA's "
                        "overhead, not a kernel difference (ComfyUI's SDPA path is slower than FFA's at 4096 tokens "
                        "on CPU, which would make FFA look faster than plain); sdpa: ComfyUI's attention_pytorch; "
                        "default: what ComfyUI picks as booted here (comfy_env.boot turns on "
                        "--use-pytorch-cross-attention on CPU, so also attention_pytorch)")
    args = parser.parse_args()

    runtime = comfy_env.boot(cpu=True)
    import comfy.samplers
    import torch
    from comfy.ldm.modules import attention as comfy_attention

    ff = runtime.pack.magic_core.fusion
    default_kernel = getattr(comfy_attention.optimized_attention, "__name__", "?")
    if args.comfy_attention == "sdpa":  # bench-only switch, the same as ComfyUI's --use-pytorch-cross-attention
        comfy_attention.optimized_attention = comfy_attention.attention_pytorch
    elif args.comfy_attention == "same":  # bench-only: the unpatched layers use FFA's kernel too
        comfy_attention.optimized_attention = lambda q, k, v, heads, *a, **kw: ff.attention(q, k, v, heads)

    from magic_portrait import tiny

    pack = runtime.pack
    ff, inv, kvs = pack.magic_core.fusion, pack.magic_core.inversion, pack.magic_core.kv_store
    cap, ms = pack.nodes.magicstyle_capture, pack.nodes.magicstyle_patch
    runs, unet_layers = pack.nodes.inversion_sampling, pack.nodes.unet_layers
    torch.set_grad_enabled(False)

    model, channel_mult, n_params = harness.build_unet(args)
    cond = tiny.sd15_cond(0)
    g = torch.Generator().manual_seed(0)
    z_c = torch.randn(1, 4, args.size, args.size, generator=g) * 4
    z_s = torch.randn(1, 4, args.size, args.size, generator=g) * 4
    sigmas = runs.schedule(model, "normal", args.steps, 1.0)

    # ---- stores, all filled by one inversion per image: the decoder layers in fp16 (the KV Feature Store's default
    # before issue 13), and the magicstyle preset's plan (its default now) in fp32, fp16, int8 and fp8_e4m3
    specs = {"decoder": cap.KVStoreSpec(layers="decoder", start_percent=0.0, end_percent=1.0)}
    specs.update({fmt: cap.KVStoreSpec(dtype=fmt, fusion_preset="magicstyle")
                  for fmt in ("fp32", "fp16", "int8", "fp8_e4m3")})
    stores: dict[str, dict] = {}
    with torch.inference_mode():
        for image, z in (("content", z_c), ("style", z_s)):
            capturing, stores[image] = model, {}
            for name, spec in specs.items():
                capturing, stores[image][name] = spec.begin(model=capturing, samples=z, sigmas=sigmas, node="bench")
            latent, *_ = runs.run_inversion(capturing, cond, None, 1.0, z, sigmas, "ddim", 0, 0.93)
            for name, spec in specs.items():
                spec.finish(stores[image][name], node="bench")
            if image == "content":
                zt = latent
    content, style = stores["content"]["decoder"], stores["style"]["decoder"]
    steps_kept = len(content.step_indices)
    per_step_n = content.nbytes / steps_kept
    per_step_qkv = content.qkv_equivalent_nbytes() / steps_kept
    layers = unet_layers.unet_attention_layers(model)

    def planned50(store) -> int:
        tokens_channels = {}
        for k in store.layers:
            gh, gw = cap.token_grid(args.size, args.size, layers[k].level)
            tokens_channels[k] = (gh * gw, layers[k].channels)
        plan = kvs.KVStore(store.model_id, store.latent_shape, runs.schedule(model, "normal", 50, 1.0),
                           store.family, store.layers, dtype=store.dtype, start_percent=store.start_percent,
                           end_percent=store.end_percent)
        return plan.planned_nbytes(1, tokens_channels)

    mib50 = {name: store.nbytes / len(store.step_indices) * 50 / 2**20 for name, store in stores["content"].items()}
    plan16 = stores["content"]["fp16"]
    qkv_decoder50 = per_step_qkv * 50 / 2**20
    qkv_fused50 = plan16.qkv_equivalent_nbytes(dtype="fp16") / len(plan16.step_indices) * 50 / 2**20

    # ---- the fused sample from each store format (magicstyle preset), not timed
    params = ff.get_preset("magicstyle")
    fused_by_format, samples = {}, {}
    for fmt in ("fp32", "fp16", "int8", "fp8_e4m3"):
        fused_by_format[fmt], fmt_patches = ms.patch_model(model, params, "preset default", "",
                                                           stores["content"][fmt], stores["style"][fmt], "bench")
        assert set(fmt_patches) == set(stores["content"][fmt].layers)  # the plan kept exactly the fused layers
    fused, patches = ms.patch_model(model, params, "preset default", "", content, style, "bench")

    def shared_attention(q, k, v, extra):
        # StyleAligned: row 0 is the reference (plain attention); the other rows AdaIN their q/k toward the
        # reference's and attend over [K_ref ; K_self], [V_ref ; V_self]
        heads = extra["n_heads"]
        ref = ff.attention(q[:1], k[:1], v[:1], heads)
        q_sa, k_sa = ff.adain(q[1:], q[:1], dims=1), ff.adain(k[1:], k[:1], dims=1)
        sa = ff.FusionInputs(q_sa, [k[:1], k_sa], [v[:1], v[1:]], [1.0, 1.0]).attend(heads)
        return torch.cat([ref, sa], dim=0)

    # the same fusion through attn1 replaces (the route used when another pack's replace holds the slot): ComfyUI
    # projects the current pass's q/k/v first, and the stored states are projected to q, k and v separately
    replace_route = model.clone()
    for key, patch in patches.items():
        replace_route.set_model_attn1_replace(
            ms.LayerFusion(key, patch.attn1, params, content, style, None, patch.steps, "bench"), *key)

    # another pack's replace set on the fused layers after Feature Fusion Attention (SAG does this at middle 0): at
    # sampling start the fusion is put inside it; this one just computes ComfyUI's attention on what it gets
    def other_pack(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    inside_later = fused.clone()
    for key in patches:
        inside_later.set_model_attn1_replace(other_pack, *key)

    aligned = model.clone()
    for key in layers:
        aligned.set_model_attn1_replace(shared_attention, *key)
    batch2 = torch.cat([z_s, zt], dim=0)

    descending = inv.inversion_sigmas(sigmas).flip(0)

    def run(m, x, out=None):
        sampler = comfy.samplers.KSAMPLER(runs.reverse_sampler_function("ddim", 0.93))
        start = time.perf_counter()
        with torch.inference_mode():
            result = runs.guided_run(m, cond, None, 1.0, x, sampler, descending)
        if out is not None:
            out.append(result)
        return time.perf_counter() - start

    for fmt, m in fused_by_format.items():
        got = []
        run(m, zt, got)
        samples[fmt] = got[0].float()
    difference = {fmt: inv.relative_error(samples[fmt], samples["fp16"]) for fmt in ("int8", "fp8_e4m3")}
    difference["fp16 vs fp32"] = inv.relative_error(samples["fp16"], samples["fp32"])
    del fused_by_format, samples

    variants = {"plain": (model, zt), "ffa": (fused, zt), "ffa_replace": (replace_route, zt),
                "ffa_inside_later": (inside_later, zt), "stylealigned": (aligned, batch2)}
    for variant in variants.values():  # warm-up: the first run of each pays for first-touch allocations
        run(*variant)
    times = {name: [] for name in variants}
    for name in harness.rotated_rounds(variants, args.repeats):
        times[name].append(run(*variants[name]))
    best = harness.best_times(times)
    assert all(p.calls > 0 for p in patches.values())
    run(inside_later, zt)  # the last run's report: every layer fused inside the other pack's replace
    assert all(set(p.routes) == {f"inside {ms.describe_patch(other_pack)}"} for p in patches.values())
    kernel = {"same": "FFA's own kernel (magic_core.fusion.attention: torch SDPA, float32)",
              "sdpa": "ComfyUI's attention_pytorch (torch SDPA)",
              "default": f"ComfyUI's default on this machine ({default_kernel})"}[args.comfy_attention]

    n_layers = len(content.layers)
    print(f"MagicStyle bench: SD1.5 UNet structure (16 attention layers), model_channels {args.width}, channel_mult "
          f"{channel_mult}, {args.heads} heads ({n_params / 1e6:.0f} M parameters; SD1.5: 320, [1, 2, 4, 4], 8, 860 M), "
          f"latent {args.size}x{args.size} ({args.size * 8} px), {args.steps} steps timed, best of {args.repeats}, "
          f"CPU threads {torch.get_num_threads()}, ComfyUI attention: {args.comfy_attention}")
    print(f"attention kernel of the unpatched layers (and of plain sampling): {kernel}")
    print()
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| store bytes, 50 steps, decoder layers (the old default, {n_layers} layers, fp16): n | "
          f"{per_step_n * 50 / 2**20:.1f} MiB (plan {planned50(content) / 2**20:.1f} MiB) | |")
    print(f"| same, storing q/k/v | {per_step_qkv * 50 / 2**20:.1f} MiB | |")
    print(f"| n / q,k,v | {per_step_n / per_step_qkv:.3f} | <= 0.34 |")
    print(f"| plain sampling | {best['plain']:.2f} s | |")
    print(f"| FFA sampling (magicstyle: {len(patches)} layers, gamma {params.gamma}, w_c {params.content_weight}, "
          f"tau {params.tau}) | {best['ffa']:.2f} s | |")
    print(f"| FFA / plain | {best['ffa'] / best['plain']:.3f} | <= 1.25 |")
    print(f"| same fusion through attn1 replaces (used when another pack's replace holds the slot) / plain | "
          f"{best['ffa_replace'] / best['plain']:.3f} | |")
    print(f"| same fusion inside another pack's attn1 replace set after it (weights by repeated key groups) / "
          f"plain | {best['ffa_inside_later'] / best['plain']:.3f} | |")
    print(f"| StyleAligned way (reference in the batch, shared attention, 16 layers) | {best['stylealigned']:.2f} s "
          "| |")
    print(f"| StyleAligned / plain | {best['stylealigned'] / best['plain']:.3f} | |")
    print()
    n_fused = len(plan16.layers)
    print(f"Store of the magicstyle preset's plan (the KV Feature Store default: the {n_fused} fused layers "
          f"({ms.lay.format_layers(plan16.layers)}), steps {plan16.start_percent:g}-{plan16.end_percent:g}), one "
          "image, 50 steps, against q/k/v in fp16:")
    print()
    print("| store | MiB (50 steps) | / q,k,v fp16 of the decoder layers (old default) | / q,k,v fp16 of the fused "
          "layers | goal |")
    print("|---|--:|--:|--:|---|")
    print(f"| q/k/v fp16, decoder layers ({n_layers}) | {qkv_decoder50:.1f} | 1.000 | | |")
    print(f"| q/k/v fp16, fused layers ({n_fused}) | {qkv_fused50:.1f} | {qkv_fused50 / qkv_decoder50:.3f} | 1.000 "
          "| |")
    for fmt, what in (("fp32", "n fp32"), ("fp16", "n fp16"), ("int8", "n int8 + fp16 scale per token"),
                      ("fp8_e4m3", "n fp8_e4m3 + fp16 scale per token")):
        goal = "<= 1/6 (0.167) of the decoder q/k/v" if fmt == "int8" else ""
        plan_mib = planned50(stores["content"][fmt]) / 2**20
        print(f"| {what} | {mib50[fmt]:.1f} (plan {plan_mib:.1f}) | {mib50[fmt] / qkv_decoder50:.3f} | "
              f"{mib50[fmt] / qkv_fused50:.3f} | {goal} |")
    print()
    print(f"Fused sample (magicstyle, {args.steps} steps) from an 8-bit store against the fp16 store, relative RMS "
          "difference of the sampled latents:")
    print()
    print("| stores | relative difference | goal |")
    print("|---|--:|---|")
    print(f"| int8 vs fp16 | {difference['int8'] * 100:.3f}% | <= 1% |")
    print(f"| fp8_e4m3 vs fp16 | {difference['fp8_e4m3'] * 100:.3f}% | |")
    print(f"| fp16 vs fp32 (fp16's own share) | {difference['fp16 vs fp32'] * 100:.3f}% | |")


if __name__ == "__main__":
    main()
