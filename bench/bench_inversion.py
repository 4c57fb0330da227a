"""Inversion benchmark: reconstruction error and time of each mode against the flip-sigmas + Euler route that
existing packs use, and inversion time per step over sampling time per step, measured side by side in one run.

    python bench/bench_inversion.py [--steps 20] [--size 32] [--channels 64] [--repeats 3]

Model: SD1.5 architecture (16 attention layers, 4 levels, 2 res blocks) with few channels and random weights, so
errors are those of a non-denoising network: compare modes with each other, not with published figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="latent height/width (64 = 512 px)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from magic_portrait import comfy_env

    runtime = comfy_env.boot()
    import torch
    from comfy_extras.nodes_custom_sampler import BasicScheduler, FlipSigmas, KSamplerSelect, SamplerCustom
    from helpers import latent, node_classes, run_node

    from magic_portrait import tiny

    inv = runtime.pack.magic_core.inversion
    nodes = node_classes(runtime.pack)
    model = tiny.build_sd15_model(seed=0, model_channels=args.channels)
    cond = tiny.sd15_cond(0)
    lat = latent(0, height=args.size, width=args.size)
    source = lat["samples"]
    steps = args.steps

    sigmas = run_node(BasicScheduler, model=model, scheduler="normal", steps=steps, denoise=1.0).result[0]
    flipped = run_node(FlipSigmas, sigmas=sigmas).result[0]
    euler = run_node(KSamplerSelect, sampler_name="euler").result[0]

    def custom(sampler, sig, start):
        return run_node(SamplerCustom, model=model, add_noise=False, noise_seed=0, cfg=1.0, positive=cond,
                        negative=cond, sampler=sampler, sigmas=sig, latent_image={"samples": start}).result[0]["samples"]

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

    routes = {
        "flip sigmas + euler (existing packs)": (flip_euler, steps),
        "ddim": (ours("ddim", 0), steps - 1),
        "fixed_point k=3": (ours("fixed_point", 3), steps - 1),
        "edict": (ours("edict", 0), steps - 1),
    }
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
    print(f"\nSD1.5 architecture, model_channels {args.channels}, latent {args.size}x{args.size}, {steps} steps, "
          f"best of {args.repeats} interleaved, torch threads {torch.get_num_threads()}")
    print(f"plain sampling (core euler): {sample_step * 1000:.1f} ms/step\n")
    print("| route | inversion time (s) | time/step over sampling time/step | round-trip error (relative RMS) |")
    print("|---|---|---|---|")
    for name, (_route, n_steps) in routes.items():
        total = min(timings[name])
        print(f"| {name} | {total:.2f} | {total / n_steps / sample_step:.3f} | {errors[name]:.3e} |")


if __name__ == "__main__":
    main()
