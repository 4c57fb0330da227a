"""RepControlNet training: the cost of torch.distributed, of gradient checkpointing, and of waiting for data, side
by side in one run.

    python bench/bench_training.py [--channels 64] [--latent 64] [--batch 2] [--steps 3] [--repeats 2] [--quick]

Model: SD1.5's architecture (4 levels, channel_mult [1, 2, 4, 4], 2 res blocks, 16 attention layers, 8 heads,
context 768) narrowed to --channels, random weights, float32 on the CPU; the default "encoder" layer preset and a
128-channel adapter are trained. Data: a SaveTrainingDataset folder (core's format: pickled shards of pre-encoded
latents and per-sample CLIP conditioning, read with torch.load(weights_only=True)) with condition images beside it,
written once for the run, read by one DataLoader worker process per rank.

Every variant trains in a fresh process, --steps timed optimizer steps after a warm-up step, global batch --batch
(latent 64 is SD1.5's 512 px):

- 1 rank x 2 threads: one process, torch.set_num_threads(2), batch = global batch;
- 2 ranks x 1 thread: `torch.distributed.run --standalone --nproc-per-node 2` (gloo), one thread each, batch per rank
  = global batch / 2 (DistributedDataParallel over the trained parameters);
- 1 rank x 2 threads with gradient checkpointing (every ResBlock and SpatialTransformer recomputed in backward);
- 1 rank x 1 thread, for reference: half its time per sample is what 2 ranks would take with no cost at all, so
  (1 rank x 1 thread / 2) / (2 ranks x 1 thread) is the data-parallel efficiency, whatever 2 threads in one process
  achieve (on a busy machine their OpenMP barriers wait for descheduled threads, which single-threaded ranks never do).

Time: seconds per sample over the timed steps (median over --repeats, variants interleaved). Memory: the training
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs once the model and data are set up;
glibc told to return freed memory at once, so RSS follows torch's CPU allocations; tracemalloc would not see them),
as the peak over that set-up state (activations, gradients, optimizer state, merged weights) and as the whole
process. Data wait: the share of each step's wall time spent in next(DataLoader) (the loop's own TrainStats).

Goals: 2 ranks x 1 thread at most 1.15x the time per sample of 1 rank x 2 threads; checkpointing's training-memory
peak at most 0.6x the plain one at most 1.4x its time; data wait under 5% with pre-encoded latents. Run by hand."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {
    "single": ("1 rank x 2 threads", {"threads": 2, "ranks": 1, "checkpointing": False}),
    "one_thread": ("1 rank x 1 thread (reference)", {"threads": 1, "ranks": 1, "checkpointing": False}),
    "ddp": ("2 ranks x 1 thread (gloo, DDP)", {"threads": 1, "ranks": 2, "checkpointing": False}),
    "checkpointed": ("1 rank x 2 threads, gradient checkpointing", {"threads": 2, "ranks": 1, "checkpointing": True}),
}
WARMUP = 1


def write_dataset(folder: Path, samples: int, latent: int, seed: int = 0) -> None:
    """A SaveTrainingDataset folder as ComfyUI writes it, plus conditions/NNNNNN.png."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    (folder / "conditions").mkdir(parents=True)
    shard_size = 16
    items = []
    for i in range(samples):
        items.append(({"samples": torch.randn(1, 4, latent, latent, generator=gen)},
                      [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen)}]]))
        pixels = (torch.rand(latent * 8, latent * 8, 3, generator=gen) > 0.5).to(torch.uint8) * 255
        Image.fromarray(pixels.numpy()).save(folder / "conditions" / f"{i:06d}.png")
    for shard in range(0, samples, shard_size):
        part = items[shard:shard + shard_size]
        with open(folder / f"shard_{shard // shard_size:04d}.pkl", "wb") as f:
            torch.save({"latents": [p[0] for p in part], "conditioning": [p[1] for p in part]}, f)
    (folder / "metadata.json").write_text(json.dumps(
        {"num_samples": samples, "num_shards": (samples + shard_size - 1) // shard_size, "shard_size": shard_size}))


def run_variant(args) -> dict | None:
    """One training run in this process (or this rank); rank 0 returns the figures."""
    import importlib

    from magic_portrait import comfy_env

    runtime = comfy_env.boot(cpu=True)
    torch.set_num_threads(args.threads)
    training = importlib.import_module(runtime.pack_module_name + ".nodes.repcontrolnet_training")
    train_data = importlib.import_module(runtime.pack_module_name + ".magic_core.train_data")
    train_dist = importlib.import_module(runtime.pack_module_name + ".magic_core.train_dist")
    from magic_portrait import tiny

    ctx = train_dist.DistContext.from_env(device="cpu")
    model = tiny.build_sd15_model(seed=0, model_channels=args.channels, channel_mult=[1, 2, 4, 4], num_heads=8)
    source = train_data.CoreDatasetSamples(args.dataset)
    batch = args.batch // ctx.world_size
    stamps = []
    import gc

    gc.collect()
    baseline = harness.resident_bytes()
    harness.reset_peak()
    result = training.run_training(
        model, None, tiny.sd15_cond(0), source, steps=WARMUP + args.steps, batch_size=batch, preset="encoder",
        adapter_channels=128, seed=0, gradient_checkpointing=args.checkpointing, num_workers=1, dist=ctx,
        on_progress=lambda step, loss: stamps.append(time.perf_counter()))
    peak = harness.peak_bytes()
    ctx.close()
    if not ctx.is_main:
        return None
    timed = stamps[-1] - stamps[WARMUP - 1]
    return {"seconds_per_sample": timed / (args.steps * args.batch), "training_peak": peak - baseline,
            "process_peak": peak, "data_wait_share": result.stats.data_wait_share, "world_size": ctx.world_size,
            "loss": result.losses[-1]}


def launch(name: str, args, dataset: Path) -> dict:
    options = VARIANTS[name][1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(options["threads"]))
    env.pop("WORLD_SIZE", None)
    child = [str(Path(__file__).resolve()), "--variant", name, "--dataset", str(dataset), "--threads",
             str(options["threads"]), "--channels", str(args.channels), "--batch", str(args.batch), "--steps",
             str(args.steps)] + (["--checkpointing"] if options["checkpointing"] else [])
    if options["ranks"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(options["ranks"]), *child]
    else:
        cmd = [sys.executable, *child]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603 (this script)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"variant {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="model_channels (SD1.5: 320)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: SD1.5 at 512 px)")
    parser.add_argument("--batch", type=int, default=2, help="global batch (even)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after a warm-up step)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 steps, latent 16: a smoke run")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        figures = run_variant(args)
        if figures is not None:
            print(json.dumps(figures), flush=True)
        return
    if args.quick:
        args.repeats, args.steps, args.latent = 1, 2, 16
    if args.batch % 2:
        raise SystemExit("--batch must be even (it is split over 2 ranks)")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "set"
        write_dataset(dataset, samples=max(32, args.batch * (WARMUP + args.steps)), latent=args.latent)
        order = list(VARIANTS)
        for repeat in range(args.repeats):
            for name in order[repeat % len(order):] + order[: repeat % len(order)]:
                runs[name].append(launch(name, args, dataset))
                print(f"  repeat {repeat + 1} {name}: {runs[name][-1]['seconds_per_sample']:.3f} s/sample",
                      file=sys.stderr, flush=True)

    def median(name, key):
        return statistics.median(r[key] for r in runs[name])

    base_time, base_mem = median("single", "seconds_per_sample"), median("single", "training_peak")
    print()
    print(f"Training (SD1.5 architecture, model_channels {args.channels}, latent {args.latent}x{args.latent}, "
          f"global batch {args.batch}, layer preset encoder, float32, CPU, {os.cpu_count()} cores; medians of "
          f"{args.repeats} interleaved runs of {args.steps} steps, each in a fresh process)")
    print()
    print("| variant | s / sample | time vs 1 rank x 2 threads | training memory peak | vs plain | process peak "
          "| data wait |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (label, _) in VARIANTS.items():
        t, m = median(name, "seconds_per_sample"), median(name, "training_peak")
        print(f"| {label} | {t:.3f} | {t / base_time:.3f} | {m / 2**20:.0f} MiB | {m / base_mem:.2f} | "
              f"{median(name, 'process_peak') / 2**20:.0f} MiB | {100 * median(name, 'data_wait_share'):.1f}% |")
    ddp = median("ddp", "seconds_per_sample") / base_time
    efficiency = median("one_thread", "seconds_per_sample") / 2 / median("ddp", "seconds_per_sample")
    ckpt_mem = median("checkpointed", "training_peak") / base_mem
    ckpt_time = median("checkpointed", "seconds_per_sample") / base_time
    wait = max(median(n, "data_wait_share") for n in VARIANTS)
    print()
    print(f"2 ranks x 1 thread / 1 rank x 2 threads: {ddp:.3f} (goal <= 1.15: {'met' if ddp <= 1.15 else 'NOT met'}); "
          f"data-parallel efficiency against 1 rank x 1 thread: {100 * efficiency:.0f}%")
    print(f"gradient checkpointing: memory {ckpt_mem:.2f} (goal <= 0.6), time {ckpt_time:.2f} (goal <= 1.4): "
          f"{'met' if ckpt_mem <= 0.6 and ckpt_time <= 1.4 else 'NOT met'}")
    print(f"data wait with pre-encoded latents: at most {100 * wait:.1f}% (goal < 5%: "
          f"{'met' if wait < 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
