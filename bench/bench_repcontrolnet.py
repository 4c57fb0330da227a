"""RepControlNet vs ControlNet: sampling time over the base model, and parameter counts, side by side in one run.

    python bench/bench_repcontrolnet.py [--channels 64] [--latent 32] [--steps 4] [--repeats 5]

Model: SD1.5's architecture (4 levels, channel_mult [1, 2, 4, 4], 2 res blocks, 16 attention layers, context 768),
narrowed (model_channels 64 instead of 320) and run on a small latent so it fits a CPU; random weights (timing does
not depend on them). Three models sample the same latent with cfg (cond + uncond):

- base: the plain model;
- merged: the base + a RepControlNet (encoder layers, the default preset) through Apply RepControlNet (weights merged
  through ComfyUI's weight patches, adapter on the first block's output);
- controlnet: the base + a ControlNet of the same architecture (ComfyUI's cldm.ControlNet built from the UNet's
  config, hint channels 3) applied through ComfyUI's own ControlNetApplyAdvanced node.

A fourth row times the base model again (a clone) as the noise floor of the measurement.
Runs are interleaved (base, merged, controlnet, base again, base, ...) and each model is loaded (weights patched) before its timer
starts, so the times are sampling only; the table shows medians. Run by hand, not by CI."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_controlnet(model, seed: int = 0):
    """A ControlNet with the UNet's architecture (as ComfyUI's loader builds one), every parameter initialised."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    from magic_portrait.tiny import init_weights_

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=comfy.model_management.unet_offload_device())
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_weights_(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def count(module_or_tensors) -> int:
    if isinstance(module_or_tensors, torch.nn.Module):
        return sum(p.numel() for p in module_or_tensors.parameters())
    return sum(t.numel() for t in module_or_tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="model_channels (SD1.5: 320)")
    parser.add_argument("--latent", type=int, default=16, help="latent side (SD1.5 at 512 px: 64)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--gpu", action="store_true", help="do not force the CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from magic_portrait import comfy_env

    runtime = comfy_env.boot(cpu=not args.gpu)
    import comfy.model_management
    import comfy.sample

    from magic_portrait import tiny
    from nodes import ControlNetApplyAdvanced

    pack = sys.modules[runtime.pack_module_name]
    R, core = pack.nodes.repcontrolnet, pack.magic_core.repcontrolnet

    base = tiny.build_sd15_model(seed=0, model_channels=args.channels, channel_mult=[1, 2, 4, 4], num_heads=8)
    weights = core.make_tiny_repcontrolnet(base, seed=0, hidden_channels=128, num_layers=3)
    side = args.latent * 8
    hint = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(0))
    merged, _ = R.apply_repcontrolnet(base, R.LoadedRepControlNet(weights, "bench"), hint, 1.0)
    controlnet = build_controlnet(base)
    positive, negative = tiny.sd15_cond(0), tiny.sd15_cond(1)
    with torch.inference_mode():
        cn_pos, cn_neg = ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint, 1.0, 0.0, 1.0)
    noise = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))
    runs = {"base": (base, positive, negative), "merged": (merged, positive, negative),
            "controlnet": (base, cn_pos, cn_neg), "base_again": (base.clone(), positive, negative)}

    def sample(name):
        model, pos, neg = runs[name]
        comfy.model_management.load_models_gpu([model])  # weight patching happens here, outside the timer
        started = time.perf_counter()
        with torch.inference_mode():
            comfy.sample.sample(model, noise, args.steps, 5.0, "euler", "normal", pos, neg, torch.zeros_like(noise),
                                disable_pbar=True, seed=0)
        return time.perf_counter() - started

    for name in runs:  # warm-up
        sample(name)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            times[name].append(sample(name))
    med = {name: statistics.median(v) for name, v in times.items()}

    unet_params = count(base.model.diffusion_model)
    cn_params = count(controlnet.control_model)
    n = weights.num_parameters()
    print(f"SD1.5 architecture (16 attention layers, channel_mult [1,2,4,4]), model_channels {args.channels} "
          f"(SD1.5: 320), latent {args.latent}x{args.latent}, {args.steps} euler steps, cfg 5 (cond+uncond), "
          f"device {comfy.model_management.get_torch_device()}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, medians")
    print(f"RepControlNet: {len(weights.layers)} merged layers ({n['modal'] / 1e6:.2f} M modal parameters, stored "
          f"in the file only) + adapter {n['adapter'] / 1e6:.2f} M (runs once per sampling run)")
    print()
    rows = [
        ("base", unet_params, med["base"]),
        ("base + RepControlNet (merged)", unet_params + n["adapter"], med["merged"]),
        ("base + ControlNet (ControlNetApplyAdvanced)", unet_params + cn_params, med["controlnet"]),
        ("base again (noise floor of this machine)", unet_params, med["base_again"]),
    ]
    print(f"| {'model':<44} | {'parameters at inference':>24} | {'sampling s':>10} | {'time / base':>11} |")
    print(f"|{'-' * 46}|{'-' * 26}:|{'-' * 11}:|{'-' * 12}:|")
    for label, params, seconds in rows:
        print(f"| {label:<44} | {params / 1e6:>22.2f} M | {seconds:>10.3f} | {seconds / med['base']:>11.3f} |")
    ratio = med["merged"] / med["base"]
    print()
    print(f"merged / base = {ratio:.3f} (goal <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'}); "
          f"controlnet / base = {med['controlnet'] / med['base']:.3f}")


if __name__ == "__main__":
    main()
