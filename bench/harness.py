"""What the benchmarks share: the options of an SD1.5-shaped random UNet, timing rounds in rotated order, and the
process's memory figures from /proc. The scripts run as `python bench/NAME.py`, which puts bench/ first on sys.path,
so they import this as `harness`."""

from __future__ import annotations

import time
from pathlib import Path

_KIB = 1024


def add_unet_arguments(parser) -> None:
    """--width, --channel-mult and --heads: SD1.5's UNet by default, narrower for a quick run."""
    parser.add_argument("--width", type=int, default=320, help="model_channels (SD1.5: 320)")
    parser.add_argument("--channel-mult", default="1,2,4,4", help="channel multipliers per level (SD1.5: 1,2,4,4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (SD1.5: 8)")


def build_unet(args):
    """The random-weight SD1.5-layout model those options describe (ComfyUI must be booted): (model, channel_mult,
    UNet parameter count)."""
    from magic_portrait import tiny

    channel_mult = [int(m) for m in args.channel_mult.split(",")]
    model = tiny.build_sd15_model(seed=0, model_channels=args.width, channel_mult=channel_mult, num_heads=args.heads)
    return model, channel_mult, sum(p.numel() for p in model.model.diffusion_model.parameters())


def rotated_rounds(names, rounds: int):
    """Each name once per round, the order rotated every round: on a shared CPU what ran just before shifts a time,
    so no variant always follows the same one."""
    names = list(names)
    for round_index in range(rounds):
        shift = round_index % len(names)
        yield from names[shift:] + names[:shift]


def time_rounds(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds each call took in each of `rounds` rotated rounds."""
    times = {name: [] for name in calls}
    for name in rotated_rounds(calls, rounds):
        start = time.perf_counter()
        calls[name]()
        times[name].append(time.perf_counter() - start)
    return times


def best_times(times: dict[str, list[float]]) -> dict[str, float]:
    """Print every timing and return each variant's best (its least disturbed run)."""
    print("all timings (s):", {name: [round(t, 2) for t in values] for name, values in times.items()})
    return {name: min(values) for name, values in times.items()}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_bytes() -> int:
    return _proc_status_kib("VmRSS") * _KIB


def peak_bytes() -> int:
    """The resident set's high-water mark since the start or the last reset_peak()."""
    return _proc_status_kib("VmHWM") * _KIB


def reset_peak() -> None:
    """Set the high-water mark to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
