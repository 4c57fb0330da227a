"""MagicStyle benchmark, measured side by side in one run (run by hand: python bench/bench_magicstyle.py).

On SD1.5's UNet architecture with random weights (by default exactly SD1.5's: model_channels 320, channel_mult
1,2,4,4, 8 heads, 16 attention layers; narrower with --width/--channel-mult for a quick run) at a 64x64 latent
(512x512 px):

- KV store bytes of the default layers (KV Feature Store default: decoder) for a 50-step schedule, storing the
  normalised hidden state n, against storing q, k and v (goal <= 0.34). Measured on an inversion of --steps steps
  (every stored tensor counted) and scaled per step to 50 steps; the store's own 50-step plan is printed next to it.
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

from magic_portrait import comfy_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px)")
    parser.add_argument("--width", type=int, default=320, help="model_channels (SD1.5: 320)")
    parser.add_argument("--channel-mult", default="1,2,4,4", help="channel multipliers per level (SD1.5: 1,2,4,4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (SD1.5: 8)")
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
    ms, ff, inv = pack.nodes.magicstyle, pack.magic_core.fusion, pack.magic_core.inversion
    common, inversion_nodes = pack.nodes.common, pack.nodes.inversion
    torch.set_grad_enabled(False)

    channel_mult = [int(m) for m in args.channel_mult.split(",")]
    model = tiny.build_sd15_model(seed=0, model_channels=args.width, channel_mult=channel_mult, num_heads=args.heads)
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    cond = tiny.sd15_cond(0)
    g = torch.Generator().manual_seed(0)
    z_c = torch.randn(1, 4, args.size, args.size, generator=g) * 4
    z_s = torch.randn(1, 4, args.size, args.size, generator=g) * 4
    sigmas = common.schedule(model, "normal", args.steps, 1.0)

    # ---- stores (default KV Feature Store settings: decoder layers, fp16, CPU)
    spec = ms.KVStoreSpec()
    stores = {}
    with torch.inference_mode():
        for name, z in (("content", z_c), ("style", z_s)):
            capturing, store = spec.begin(model=model, samples=z, sigmas=sigmas, node="bench")
            latent, *_ = inversion_nodes.run_inversion(capturing, cond, None, 1.0, z, sigmas, "ddim", 0, 0.93)
            spec.finish(store, node="bench")
            stores[name] = (store, latent)
    content, zt = stores["content"][0], stores["content"][1]
    style = stores["style"][0]
    per_step_n = content.nbytes / len(content.step_indices)
    per_step_qkv = content.qkv_equivalent_nbytes() / len(content.step_indices)
    plan50 = ms.kvs.KVStore(content.model_id, content.latent_shape, common.schedule(model, "normal", 50, 1.0),
                            content.family, content.layers)
    layers = ms.unet_attention_layers(model)
    tokens_channels = {}
    for k in content.layers:
        gh, gw = ms._grid(args.size, args.size, layers[k].level)
        tokens_channels[k] = (gh * gw, layers[k].channels)
    planned50 = plan50.planned_nbytes(1, tokens_channels)

    # ---- models to time
    params = ff.get_preset("magicstyle")
    fused, patches = ms.patch_model(model, params, "preset default", "", content, style, "bench")

    def shared_attention(q, k, v, extra):
        # StyleAligned: row 0 is the reference (plain attention); the other rows AdaIN their q/k toward the
        # reference's and attend over [K_ref ; K_self], [V_ref ; V_self]
        heads = extra["n_heads"]
        ref = ff.attention(q[:1], k[:1], v[:1], heads)
        sa = ff.fuse_for_preset(ff.get_preset("stylealigned"), q[1:], k[1:], v[1:], None, (q[:1], k[:1], v[:1]),
                                heads)
        return torch.cat([ref, sa], dim=0)

    # the same fusion through attn1 replaces (the route used when another pack's replace holds the slot): ComfyUI
    # projects the current pass's q/k/v first, and the stored states are projected to q, k and v separately
    replace_route = model.clone()
    for key, patch in patches.items():
        replace_route.set_model_attn1_replace(
            ms.FusionAttn1(key, patch.attn1, params, content, style, None, patch.steps, "bench"), *key)

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

    def run(m, x):
        sampler = comfy.samplers.KSAMPLER(inversion_nodes.reverse_sampler_function("ddim", 0.93))
        start = time.perf_counter()
        with torch.inference_mode():
            common.guided_run(m, cond, None, 1.0, x, sampler, descending)
        return time.perf_counter() - start

    variants = {"plain": (model, zt), "ffa": (fused, zt), "ffa_replace": (replace_route, zt),
                "ffa_inside_later": (inside_later, zt), "stylealigned": (aligned, batch2)}
    for variant in variants.values():  # warm-up: the first run of each pays for first-touch allocations
        run(*variant)
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):  # interleaved, order rotated each round: what ran before shifts a time here
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(*variants[name]))
    best = {k: min(v) for k, v in times.items()}
    print("all timings (s):", {k: [round(t, 2) for t in v] for k, v in times.items()})
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
    print(f"| store bytes, 50 steps, default layers (decoder, {n_layers} layers, fp16): n | "
          f"{per_step_n * 50 / 2**20:.1f} MiB (plan {planned50 / 2**20:.1f} MiB) | |")
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


if __name__ == "__main__":
    main()
