"""RepControlNet vs ControlNet: sampling time over the base model, parameter counts, and the memory the merge costs,
side by side in one run.

    python bench/bench_repcontrolnet.py [--channels 64] [--latent 16] [--steps 10] [--repeats 7]
                                        [--memory-channels 128] [--skip-timing] [--skip-memory]

Model: SD1.5's architecture (4 levels, channel_mult [1, 2, 4, 4], 2 res blocks, 16 attention layers, context 768),
narrowed (model_channels 64 instead of 320) and run on a small latent so it fits a CPU; random weights (timing does
not depend on them). Three models sample the same latent with cfg (cond + uncond):

- base: the plain model;
- merged: the base + a RepControlNet (encoder layers, the default preset) through Apply RepControlNet (weights merged
  through ComfyUI's weight patches, adapter on the first block's output);
- controlnet: the base + a ControlNet of the same architecture (ComfyUI's cldm.ControlNet built from the UNet's
  config, hint channels 3) applied through ComfyUI's own ControlNetApplyAdvanced node.

A fourth row times the base model again (a clone) as the noise floor of the measurement.
Runs are interleaved (base, merged, controlnet, base again, base, ...) and each model is loaded (weights patched) before
its timer starts, so the times are sampling only; the table shows medians.

Memory: each route runs in a fresh process (same model at --memory-channels, float32 on the CPU, the RepControlNet's
modal layers in float32 as training writes them), which reads its resident set (VmRSS) and high-water mark (VmHWM,
reset through /proc/self/clear_refs before each phase; Linux only) around Apply and around loading the patched model
(where ComfyUI patches the weights), with glibc told to return freed tensors to the system at once
(MALLOC_MMAP_THRESHOLD_), so RSS follows torch's CPU allocations; tracemalloc would not see them. Figures are extra
bytes over the state before Apply (base model and RepControlNet loaded), as a fraction of the modal layers' size in
the model (the tensors the merge rewrites):

- new route: Apply adds weight-adapter patches; the merge is computed in place when ComfyUI patches each weight;
- new route, LoRA before Apply: the same with a LoRA on the model first (the increment of those keys is computed
  from the unpatched weight at the start of their patch chain and held until the merge's turn);
- old route: Apply computed a full-size difference ((alpha - 1) * W + beta * W_m) per modal tensor and added them as
  'diff' patches (what Apply did before issue #13);
- ComfyUI's own: a patch that returns the weight unchanged on the same keys: what ComfyUI's patching costs for any
  weight patch (on the CPU it keeps the original for unpatch and installs a patched copy: 100% of the patched layers;
  on a GPU the original stays in RAM and only the patched copy goes to VRAM). The last column is a route's load peak
  beyond this.

Goal: Apply and the merge (beyond ComfyUI's own patching) <= 5% of the modal layers. Run by hand, not by CI."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
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


def timing(args) -> None:
    from magic_portrait import comfy_env

    runtime = comfy_env.boot(cpu=not args.gpu)
    import comfy.model_management
    import comfy.sample

    from magic_portrait import tiny
    from nodes import ControlNetApplyAdvanced

    R = sys.modules[runtime.pack_module_name].nodes.repcontrolnet

    base = tiny.build_sd15_model(seed=0, model_channels=args.channels, channel_mult=[1, 2, 4, 4], num_heads=8)
    weights = tiny.make_tiny_repcontrolnet(base, seed=0, hidden_channels=128, num_layers=3)
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


# ---------------------------------------------------------------------------------------------------------- memory

MEMORY_ROUTES = {
    "new": "new route (patch computed when ComfyUI patches)",
    "new_lora": "new route, LoRA before Apply",
    "old": "old route (a difference per layer)",
    "comfyui": "ComfyUI's own patching (no-op patch)",
}


def old_route_patches(model, weights, strength: float) -> None:
    """What Apply did before issue #13: a full-size (alpha - 1) * W + beta * W_m per modal tensor, as 'diff' patches."""
    state = model.model.diffusion_model.state_dict()
    diffs = {}
    for key, modal in weights.modal.items():
        alpha, beta = weights.coefficients(key.rsplit(".", 1)[0])
        base = state[key].detach().to(device=modal.device, dtype=torch.float32)
        diffs["diffusion_model." + key] = ((alpha - 1.0) * base + beta * modal.to(torch.float32)).to(state[key].dtype)
    model.add_patches({k: (d,) for k, d in diffs.items()}, strength)


def measure_memory_route(route: str, channels: int) -> dict:
    """One route in this (fresh) process: extra bytes over the state before Apply, at Apply and at model load."""
    from magic_portrait import comfy_env

    runtime = comfy_env.boot(cpu=True)
    import comfy.model_management
    import comfy.sd
    import comfy.weight_adapter

    from magic_portrait import tiny

    torch.set_num_threads(1)
    R = sys.modules[runtime.pack_module_name].nodes.repcontrolnet

    class Unchanged(comfy.weight_adapter.WeightAdapterBase):
        name = "bench_unchanged"

        def calculate_weight(self, weight, *args, **kwargs):
            return weight

    base = tiny.build_sd15_model(seed=0, model_channels=channels, channel_mult=[1, 2, 4, 4], num_heads=8)
    weights = tiny.make_tiny_repcontrolnet(base, seed=0)
    loaded = R.LoadedRepControlNet(weights, "bench")
    state = base.model.diffusion_model.state_dict()
    modal_bytes = sum(state[k].numel() * state[k].element_size() for k in weights.modal)
    largest = max(state[k].numel() * state[k].element_size() for k in weights.modal)
    model = base
    if route == "new_lora":  # a rank-8 LoRA (LoraLoader's way) on every merged weight, applied before Apply
        g = torch.Generator().manual_seed(0)
        lora = {}
        for key in (k for k in weights.modal if k.endswith(".weight")):
            shape = state[key].shape
            name = "diffusion_model." + key[: -len(".weight")]
            lora[name + ".lora_down.weight"] = torch.randn(8, *shape[1:], generator=g) / shape[1:].numel()
            lora[name + ".lora_up.weight"] = torch.randn(shape[0], 8, *([1] * (len(shape) - 2)), generator=g) * 0.01
        model = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    gc.collect()
    start = harness.resident_bytes()
    harness.reset_peak()
    with torch.inference_mode():
        if route in ("new", "new_lora"):
            patched, _ = R.apply_repcontrolnet(model, loaded, hint, 1.0)
        elif route == "old":
            patched, _ = R.apply_repcontrolnet(model, loaded, hint, 1.0, merge_weights=False)
            old_route_patches(patched, weights, 1.0)
        else:
            patched = model.clone()
            patched.add_patches(dict.fromkeys(("diffusion_model." + k for k in weights.modal), Unchanged()), 1.0)
    apply_peak = harness.peak_bytes() - start
    gc.collect()
    apply_held = harness.resident_bytes() - start
    harness.reset_peak()
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patched])  # ComfyUI patches the weights here
    load_peak = harness.peak_bytes() - start
    gc.collect()
    load_held = harness.resident_bytes() - start
    return {"route": route, "modal_bytes": modal_bytes, "largest_layer_bytes": largest, "apply_peak": apply_peak,
            "apply_held": apply_held, "load_peak": load_peak, "load_held": load_held}


def memory_table(args) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    results = {}
    for route in MEMORY_ROUTES:
        done = subprocess.run(  # noqa: S603 (this very script, fixed arguments)
            [sys.executable, str(Path(__file__).resolve()), "--memory-route", route,
             "--memory-channels", str(args.memory_channels)],
            env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise SystemExit(f"memory route {route} failed:\n{done.stderr[-3000:]}")
        results[route] = json.loads(lines[-1])
    modal = results["new"]["modal_bytes"]
    own = results["comfyui"]["load_peak"]

    def cell(value: int) -> str:
        return f"{value / 2**20:.1f} MiB {100 * value / modal:5.1f}%".rjust(21)

    print()
    print(f"Memory (SD1.5 architecture, model_channels {args.memory_channels}, float32, CPU): modal layers "
          f"{modal / 2**20:.1f} MiB in the model (largest one {100 * results['new']['largest_layer_bytes'] / modal:.1f}%"
          "); extra resident memory over the state before Apply, each route in a fresh process, % of the modal layers")
    print()
    header = ("route", "Apply: peak", "held after Apply", "load (merge): peak", "held while loaded",
              "load peak - ComfyUI's")
    print(f"| {header[0]:<48} | " + " | ".join(f"{h:>21}" for h in header[1:]) + " |")
    print(f"|{'-' * 50}|" + "|".join("-" * 22 + ":" for _ in header[1:]) + "|")
    for route, label in MEMORY_ROUTES.items():
        r = results[route]
        beyond = "" if route == "comfyui" else cell(r["load_peak"] - own)
        print(f"| {label:<48} | {cell(r['apply_peak'])} | {cell(r['apply_held'])} | {cell(r['load_peak'])} | "
              f"{cell(r['load_held'])} | {beyond:>21} |")
    new, old = results["new"], results["old"]
    worst = max(new["apply_peak"], new["load_peak"] - own) / modal
    print()
    print(f"new route: Apply peak {100 * new['apply_peak'] / modal:.1f}%, merge beyond ComfyUI's own patching "
          f"{100 * (new['load_peak'] - own) / modal:.1f}% of the modal layers (goal <= 5%: "
          f"{'met' if worst <= 0.05 else 'NOT met'}); old route: Apply peak {100 * old['apply_peak'] / modal:.1f}%, "
          f"held {100 * old['apply_held'] / modal:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="model_channels of the timing runs (SD1.5: 320)")
    parser.add_argument("--latent", type=int, default=16, help="latent side (SD1.5 at 512 px: 64)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--gpu", action="store_true", help="do not force the CPU (timing only)")
    parser.add_argument("--memory-channels", type=int, default=128,
                        help="model_channels of the memory runs (128: ~200 MiB of modal layers)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-route", choices=list(MEMORY_ROUTES), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.memory_route:
        print(json.dumps(measure_memory_route(args.memory_route, args.memory_channels)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_timing:
        timing(args)
    if not args.skip_memory:
        memory_table(args)


if __name__ == "__main__":
    main()
