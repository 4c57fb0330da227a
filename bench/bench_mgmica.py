"""MGMICA benchmark, measured side by side in one run (run by hand: python bench/bench_mgmica.py).

On SD1.5's UNet architecture with random weights (by default exactly SD1.5's: model_channels 320, channel_mult
1,2,4,4, 8 heads, 16 cross-attention layers; narrower with --width/--channel-mult for a quick run) at a 64x64 latent
(512x512 px), sampling --steps euler steps through ComfyUI's guider:

- plain: the unpatched model;
- MGMICA with 1, 2 and 4 identities in one Multi-ID Attention patch, each identity in its own face box (four faces
  in a row, each box 7% of the picture, as in a group photo), 16 ID tokens each (IP-Adapter plus-face's count),
  through an IP-Adapter file in SD1.5's key layout; and one identity over the whole picture (plain IP-Adapter);
- 4 chained single-identity masked patches, the way existing packs do it: one attn2 replace per layer holding four
  IP-Adapter attentions, each over every token, multiplied by its mask resized to the layer (IPAdapter_plus's
  Attn2Replace with four masked IPAdapter nodes).

Goal: 4 identities in one patch cost at most 1.10 times one identity. Each variant runs once to warm up, then
--repeats interleaved rounds with the order rotated; the best time is kept.

At SD1.5's size the identity attention is a small part of a sampling step, so a second table times one
cross-attention layer alone (the largest: 4096 tokens of 320 channels at 512 px, cond and uncond rows), where the
ways of computing it differ visibly (best of --layer-repeats calls, interleaved).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import harness  # noqa: E402

from magic_portrait import comfy_env  # noqa: E402

# four faces in a row, as in a group photo: each box 20% of the width and 35% of the height (7% of the picture)
FACES = tuple((0.04 + 0.24 * i, 0.2, 0.24 + 0.24 * i, 0.55) for i in range(4))
TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px)")
    harness.add_unet_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="euler steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-repeats", type=int, default=30)
    parser.add_argument("--layer-only", action="store_true", help="only the single-layer table")
    args = parser.parse_args()

    runtime = comfy_env.boot(cpu=True)
    import comfy.samplers
    import torch
    from comfy.ldm.modules.attention import optimized_attention

    from magic_portrait import tiny
    from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

    pack = runtime.pack
    patch_mod, runs = pack.nodes.mgmica_patch, pack.nodes.inversion_sampling
    ip, mg, reg = pack.magic_core.ipadapter, pack.magic_core.mgmica, pack.magic_core.regions
    torch.set_grad_enabled(False)

    model, channel_mult, n_params = harness.build_unet(args)
    layers = patch_mod.cross_attention_layers(model)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_ipadapter(Path(folder) / "bench-plus-face_sd15.safetensors", variant="plus-face",
                                    family="sd15", layer_inner_dims=[layer.inner_dim for layer in layers], seed=0)
        adapter = ip.load_ipadapter_file(path)
    g = torch.Generator().manual_seed(0)
    embeds = [patch_mod.IDEmbeds(adapter, torch.randn(1, TOKENS, 768, generator=g), torch.randn(1, TOKENS, 768,
                                                                                             generator=g), f"id{i}")
              for i in range(4)]
    identities = tuple(patch_mod.Identity(e, reg.Box(*box), 1.0, 0.0, 1.0, f"person {i}")
                       for i, (e, box) in enumerate(zip(embeds, FACES, strict=True)))

    def with_ids(ids):
        return patch_mod.apply_mgmica(model, ids, 1.0, "exclusive", "negative tokens", "all = 1", "bench")

    whole = (patch_mod.Identity(embeds[0], reg.Box(0.0, 0.0, 1.0, 1.0), 1.0, 0.0, 1.0, "whole picture"),)

    # ---- 4 chained masked single-identity attentions (IPAdapter_plus's way), one attn2 replace per layer
    order = ip.map_layers(adapter, [layer.key for layer in layers])
    weights = adapter.layer_weights()

    class ChainedMaskedIPAdapters:
        def __init__(self):
            self.calls = 0

        def __call__(self, q, k, v, extra):
            self.calls += 1
            heads = extra["n_heads"]
            out = optimized_attention(q, k, v, heads)
            key = (extra["block"][0], extra["block"][1], extra["block_index"])
            wk, wv = weights[order[key]]
            h, w = extra["activations_shape"][-2:]
            for emb, box in zip(embeds, FACES, strict=True):  # each "node" attends with every token
                k_ip = (emb.positive @ wk.float().T).to(q.dtype)
                v_ip = (emb.positive @ wv.float().T).to(q.dtype)
                mask = reg.box_on_grid(reg.Box(*box), h, w).to(q.device, q.dtype).unsqueeze(-1)
                out = out + mask * mg.attend(q, k_ip, v_ip, heads)
            return out

        def __deepcopy__(self, memo):
            return self

    chained_fn = ChainedMaskedIPAdapters()
    chained = model.clone()
    for layer in layers:
        chained.set_model_attn2_replace(chained_fn, *layer.key)

    cond = tiny.sd15_cond(0)
    x = torch.randn(1, 4, args.size, args.size, generator=g)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", args.steps).cpu()

    def run(m):
        start = time.perf_counter()
        with torch.inference_mode():
            runs.guided_run(m, cond, None, 1.0, x * sigmas[0], comfy.samplers.sampler_object("euler"), sigmas)
        return time.perf_counter() - start

    patches = {n: with_ids(identities[:n]) for n in (1, 2, 4)}
    patches["whole"] = with_ids(whole)
    layer_table(args, model, layers, patches, chained_fn, cond, torch)
    if args.layer_only:
        return
    variants = {"plain": model, "mgmica1": patches[1][0], "mgmica2": patches[2][0], "mgmica4": patches[4][0],
                "whole": patches["whole"][0], "chained4": chained}
    for m in variants.values():  # warm-up
        run(m)
    times = {name: [] for name in variants}
    for name in harness.rotated_rounds(variants, args.repeats):
        times[name].append(run(variants[name]))
    best = harness.best_times(times)
    assert all(len(p.calls) == len(layers) for _, p in patches.values()) and chained_fn.calls > 0

    print(f"MGMICA bench: SD1.5 UNet structure ({len(layers)} cross-attention layers), model_channels {args.width}, "
          f"channel_mult {channel_mult}, {args.heads} heads ({n_params / 1e6:.0f} M parameters), latent "
          f"{args.size}x{args.size} ({args.size * 8} px), {args.steps} euler steps, cfg 1, {TOKENS} ID tokens per "
          f"identity, identities in face boxes (7% of the picture each), best of {args.repeats}, CPU threads {torch.get_num_threads()}")
    print()
    print("| variant | sampling s | / plain | / MGMICA 1 identity | goal |")
    print("|---|--:|--:|--:|---|")
    rows = [("plain (unpatched)", "plain", ""), ("MGMICA, 1 identity (a face box)", "mgmica1", ""),
            ("MGMICA, 2 identities", "mgmica2", ""), ("MGMICA, 4 identities (one patch)", "mgmica4", "<= 1.10"),
            ("MGMICA, 1 identity over the whole picture", "whole", ""),
            ("4 chained masked single-identity patches", "chained4", "")]
    for label, key, goal in rows:
        print(f"| {label} | {best[key]:.2f} | {best[key] / best['plain']:.3f} | {best[key] / best['mgmica1']:.3f} | "
              f"{goal} |")


def layer_table(args, model, layers, patches, chained_fn, cond, torch) -> None:
    """One cross-attention layer at the latent's full resolution (output 9) timed alone, cond + uncond rows."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    size = args.size
    layer = next(x for x in layers if x.key == ("output", 9, 0))  # SD1.5: the decoder's full-resolution level
    key = layer.key
    attn2 = layer.attn2
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, size * size, layer.inner_dim, generator=g)
    context = torch.cat([cond[0][0], cond[0][0]]).to(hidden.dtype)
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0]))
    extra = {"block": key[:2], "block_index": key[2], "n_heads": attn2.heads, "dim_head": layer.inner_dim // attn2.heads,
             "attn_precision": None, "cond_or_uncond": [0, 1], "sigmas": sigma, "original_shape": [1, 4, size, size],
             "activations_shape": [1, layer.inner_dim, size, size]}

    def plain():
        return attn2(hidden, context=context)

    def with_patch(patch):
        def call():
            patch.capture(hidden, context, None, extra)
            return patch(attn2(hidden, context=context), extra)
        return call

    def chained():
        q, k, v = attn2.to_q(hidden), attn2.to_k(context), attn2.to_v(context)
        return attn2.to_out(chained_fn(q, k, v, extra))

    calls = {"plain": plain, "mgmica1": with_patch(patches[1][1]), "mgmica2": with_patch(patches[2][1]),
             "mgmica4": with_patch(patches[4][1]), "whole": with_patch(patches["whole"][1]), "chained4": chained}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        times = harness.time_rounds(calls, args.layer_repeats)
    best = {k: min(v) * 1000 for k, v in times.items()}
    extra_ms = {k: best[k] - best["plain"] for k in best}
    print(f"one cross-attention layer ({key[0]} {key[1]}: {size * size} tokens x {layer.inner_dim} channels, cond + "
          f"uncond rows, 77 text tokens, {TOKENS} ID tokens per identity), best of {args.layer_repeats}")
    print()
    print("| variant | ms per call | identity term (ms over plain attn2) | identity term / MGMICA 1 identity's |")
    print("|---|--:|--:|--:|")
    for label, name in (("plain attn2", "plain"), ("MGMICA, 1 identity (a face box)", "mgmica1"),
                        ("MGMICA, 2 identities", "mgmica2"), ("MGMICA, 4 identities (one patch)", "mgmica4"),
                        ("MGMICA, 1 identity over the whole picture", "whole"),
                        ("4 chained masked single-identity patches", "chained4")):
        ratio = "" if name == "plain" else f"{extra_ms[name] / extra_ms['mgmica1']:.2f}"
        print(f"| {label} | {best[name]:.2f} | {extra_ms[name]:.2f} | {ratio} |")
    print()


if __name__ == "__main__":
    main()
