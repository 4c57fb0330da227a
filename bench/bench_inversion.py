"""Inversion benchmark, three tables from one run, every route measured side by side:

1. Time: each mode's inversion time per step over plain sampling's and over plain ddim's (goal for bdia <= 1.05),
   against the flip-sigmas + Euler route existing packs use, on an SD1.5-architecture UNet with random weights
   (its round-trip errors are a non-denoising network's: compare modes with each other only).
2. Accuracy: each route's round-trip error through ComfyUI's own sampling path (CFGGuider, KSAMPLER, SamplerCustom)
   with an analytic denoiser: the exact posterior mean of a Gaussian image prior behind a real ModelPatcher
   (``magic_portrait.analytic_model``). Its probability-flow ODE is solved in closed form, so the figures are each
   mode's own discretisation error (and the inverted latent's distance from the exact ODE solution), never a random
   network's. Goal for bdia: <= 1e-4 relative in fp32.
3. Stability: bdia's round trip with the denoiser evaluated in fp32, fp16 and bf16, states kept in float64 (what the
   nodes do) or in float32, over 50+ steps, and how gamma < 1 grows the inversion.

    python bench/bench_inversion.py [--steps 20] [--size 32] [--channels 64] [--repeats 5]
                                    [--analytic-steps 50] [--stability-steps 50 200]
    python bench/bench_inversion.py --quick   # a smoke run: few steps and repeats
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MODES = [("ddim", 0), ("fixed_point", 3), ("edict", 0), ("bdia", 0)]
FLIP = "flip sigmas + euler (existing packs)"


def label(mode: str, k: int) -> str:
    return f"{mode} k={k}" if mode == "fixed_point" else mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="schedule steps of the timing table")
    parser.add_argument("--size", type=int, default=32, help="latent height/width (64 = 512 px)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--analytic-steps", type=int, default=50)
    parser.add_argument("--stability-steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 2 repeats, 16x16, stability 50")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.size, args.analytic_steps, args.stability_steps = 6, 2, 16, 50, [50]

    from magic_portrait import comfy_env

    runtime = comfy_env.boot()
    import torch

    from magic_portrait import tiny

    context = {"torch": torch, "runtime": runtime, "tiny": tiny, "args": args}
    timing_table(context)
    accuracy_table(context)
    stability_table(context)


# ------------------------------------------------------------------------------------------------------ 1. timing
def core_routes(model, cond, steps: int):
    """ComfyUI's own pieces for an inversion route: the normal schedule, its flip, Euler, and SamplerCustom (add_noise
    off, cfg 1) as ``custom(sampler, sigmas, start_samples) -> samples``."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler, FlipSigmas, KSamplerSelect, SamplerCustom
    from helpers import run_node

    sigmas = run_node(BasicScheduler, model=model, scheduler="normal", steps=steps, denoise=1.0).result[0]
    flipped = run_node(FlipSigmas, sigmas=sigmas).result[0]
    euler = run_node(KSamplerSelect, sampler_name="euler").result[0]

    def custom(sampler, sig, start):
        return run_node(SamplerCustom, model=model, add_noise=False, noise_seed=0, cfg=1.0, positive=cond,
                        negative=cond, sampler=sampler, sigmas=sig, latent_image={"samples": start}).result[0]["samples"]

    return sigmas, flipped, euler, custom


def timing_table(ctx) -> None:
    torch, runtime, tiny, args = ctx["torch"], ctx["runtime"], ctx["tiny"], ctx["args"]
    from helpers import latent, node_classes, run_node

    inv = runtime.pack.magic_core.inversion
    nodes = node_classes(runtime.pack)
    model = tiny.build_sd15_model(seed=0, model_channels=args.channels)
    cond = tiny.sd15_cond(0)
    lat = latent(0, height=args.size, width=args.size)
    source = lat["samples"]
    steps = args.steps
    sigmas, flipped, euler, custom = core_routes(model, cond, steps)

    def flip_euler():
        inverted = custom(euler, flipped, source)
        return inverted, lambda: custom(euler, sigmas, inverted)

    def ours(mode, k):
        def run():
            out = run_node(nodes["MagicPortrait_DDIMInvert"], model=model, positive=cond, latent=lat, scheduler="normal",
                           steps=steps, strength=1.0, mode=mode, refine_iterations=k, edict_mix=0.93, cfg=1.0,
                           measure_round_trip=False)
            record = out.result[1]
            return out.result[0]["samples"], lambda: run_node(
                nodes["MagicPortrait_SampleInverted"], model=model, inversion=record, cfg=1.0, measure_error=False
            ).result[0]["samples"]
        return run

    routes = {FLIP: (flip_euler, steps)}
    routes.update({label(mode, k): (ours(mode, k), steps - 1) for mode, k in MODES})
    timings = {name: [] for name in routes}
    sample_times = []
    errors = {}
    custom(euler, sigmas, source)  # warm-up
    names = ["sampling", *routes]
    for repeat in range(args.repeats):
        # rotate the order every repeat: what ran just before a route measurably changes its time on this CPU
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            started = time.perf_counter()
            if name == "sampling":
                custom(euler, sigmas, source)
                sample_times.append(time.perf_counter() - started)
                continue
            _inverted, reconstruct = routes[name][0]()
            timings[name].append(time.perf_counter() - started)
            errors[name] = inv.relative_error(reconstruct(), source)

    # best of the interleaved repeats: the least-disturbed run of each route (the machine may be shared)
    sample_step = min(sample_times) / steps
    ddim_step = min(timings["ddim"]) / (steps - 1)
    print(f"\n## 1. Time: SD1.5 architecture, random weights, model_channels {args.channels}, latent "
          f"{args.size}x{args.size}, {steps} steps, best of {args.repeats} interleaved, torch threads "
          f"{torch.get_num_threads()}")
    print(f"plain sampling (core euler): {sample_step * 1000:.1f} ms/step\n")
    print("| route | inversion time (s) | time/step over sampling's | time/step over ddim's | round-trip error "
          "(random UNet) |")
    print("|---|---|---|---|---|")
    for name, (_route, n_steps) in routes.items():
        total = min(timings[name])
        print(f"| {name} | {total:.2f} | {total / n_steps / sample_step:.3f} | {total / n_steps / ddim_step:.3f} | "
              f"{errors[name]:.3e} |")
    print(f"\nbdia time/step over ddim's: {min(timings['bdia']) / min(timings['ddim']):.3f} (goal <= 1.05)")


# ---------------------------------------------------------------------------------------------------- 2. accuracy
def analytic_setup(ctx, seed: int = 1):
    tiny = ctx["tiny"]
    from magic_portrait.analytic_model import analytic_model, clean_latent, prior_for

    base = tiny.build_sd15_model(seed=0)
    prior = prior_for(base, (16, 16), seed=seed)
    return base, prior, clean_latent(base, prior, seed=seed + 1), analytic_model


def accuracy_table(ctx) -> None:
    runtime, tiny, args = ctx["runtime"], ctx["tiny"], ctx["args"]
    from helpers import node_classes, run_node

    inv = runtime.pack.magic_core.inversion
    nodes = node_classes(runtime.pack)
    base, prior, lat, analytic_model = analytic_setup(ctx)
    model = analytic_model(base, prior)
    counter = model.model_options["model_function_wrapper"]
    process_in = base.get_model_object("latent_format").process_in
    cond = tiny.sd15_cond(1)
    x0 = process_in(lat["samples"])
    steps = args.analytic_steps
    sigmas, flipped, euler, custom = core_routes(model, cond, steps)

    rows = []
    counter.calls = 0
    inverted = custom(euler, flipped, lat["samples"])
    calls_in = counter.calls
    back = custom(euler, sigmas, inverted)
    exact = prior.flow(x0, float(flipped[0]), float(flipped[-1]))
    rows.append((FLIP, steps, calls_in, counter.calls - calls_in, inv.relative_error(back, lat["samples"]),
                 inv.relative_error(process_in(inverted), exact)))
    for mode, k in MODES:
        counter.calls = 0
        out = run_node(nodes["MagicPortrait_DDIMInvert"], model=model, positive=cond, latent=lat, scheduler="normal",
                       steps=steps, strength=1.0, mode=mode, refine_iterations=k, edict_mix=0.93, cfg=1.0,
                       measure_round_trip=False)
        record = out.result[1]
        calls_in = counter.calls
        back = run_node(nodes["MagicPortrait_SampleInverted"], model=model, inversion=record, cfg=1.0,
                        measure_error=False).result[0]["samples"]
        exact = prior.flow(x0, float(record.sigmas[0]), float(record.sigmas[-1]))
        rows.append((label(mode, k), len(record.sigmas) - 1, calls_in, counter.calls - calls_in,
                     inv.relative_error(back, lat["samples"]), inv.relative_error(process_in(out.result[0]["samples"]),
                                                                                  exact)))
    print(f"\n## 2. Accuracy: analytic Gaussian-prior denoiser through ComfyUI's sampling path, fp32, {steps}-step "
          "normal schedule, latent 16x16 (relative RMS errors)\n")
    print("| route | inversion steps | model calls (invert + back) | round-trip error | inverted latent vs exact "
          "ODE solution |")
    print("|---|---|---|---|---|")
    for name, n, calls_in, calls_back, round_trip, ode in rows:
        print(f"| {name} | {n} | {calls_in} + {calls_back} | {round_trip:.3e} | {ode:.3e} |")
    bdia = next(r for r in rows if r[0] == "bdia")[4]
    print(f"\nbdia round-trip error: {bdia:.3e} (goal <= 1e-4 in fp32)")


# -------------------------------------------------------------------------------------------------- 3. stability
def stability_table(ctx) -> None:
    torch, runtime, args = ctx["torch"], ctx["runtime"], ctx["args"]
    import comfy.samplers

    inv = runtime.pack.magic_core.inversion
    inversion_nodes = runtime.pack.nodes.inversion
    guided_run = runtime.pack.nodes.inversion_sampling.guided_run
    schedule = runtime.pack.nodes.inversion_sampling.schedule
    base, prior, lat, analytic_model = analytic_setup(ctx, seed=3)
    cond = ctx["tiny"].sd15_cond(3)
    samples = lat["samples"]
    process_in = base.get_model_object("latent_format").process_in
    x0 = process_in(samples)

    def round_trip(model, steps, gamma, state_dtype):
        sigmas = schedule(model, "normal", steps, 1.0)
        log = inv.BoundaryLog()
        forward = inversion_nodes.inversion_sampler_function("bdia", 0, 0.93, bdia_gamma=gamma, boundary_log=log,
                                                             state_dtype=state_dtype)
        reverse = inversion_nodes.reverse_sampler_function("bdia", 0.93, bdia_gamma=gamma, boundaries=log,
                                                           state_dtype=state_dtype)
        ascending = inv.inversion_sigmas(sigmas)
        try:
            inverted = guided_run(model, cond, None, 1.0, samples, comfy.samplers.KSAMPLER(forward), ascending)
        except inv.DivergenceError:
            return float("inf"), float("inf")
        back = guided_run(model, cond, None, 1.0, inverted, comfy.samplers.KSAMPLER(reverse), ascending.flip(0))
        ratio = inv.divergence_ratio(x0, process_in(inverted), float(ascending[-1]))
        return inv.relative_error(back, samples), ratio

    dtypes = [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
    print("\n## 3. Stability: bdia round trip (relative RMS) through ComfyUI with the analytic denoiser evaluated in "
          "each dtype; states in float64 (the nodes) or float32\n")
    print("| steps | model dtype | states float64 | states float32 |")
    print("|---|---|---|---|")
    for steps in args.stability_steps:
        for name, dtype in dtypes:
            model = analytic_model(base, prior.with_dtype(dtype))
            wide, _ = round_trip(model, steps, 1.0, torch.float64)
            narrow, _ = round_trip(model, steps, 1.0, torch.float32)
            print(f"| {steps} | {name} | {wide:.3e} | {narrow:.3e} |")
    print("\n| steps | gamma | round trip (fp32, states float64) | inverted latent RMS over the source noised to "
          "the top sigma |")
    print("|---|---|---|---|")
    model = analytic_model(base, prior)
    for steps in args.stability_steps:
        for gamma in (1.0, 0.95, 0.9, 0.5):
            error, ratio = round_trip(model, steps, gamma, torch.float64)
            if ratio == float("inf"):
                print(f"| {steps} | {gamma} | refused | diverged (DivergenceError) |")
            else:
                print(f"| {steps} | {gamma} | {error:.3e} | {ratio:.3g} |")


if __name__ == "__main__":
    main()
