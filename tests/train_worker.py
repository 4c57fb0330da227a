"""A torchrun worker for tests/test_training_distributed.py (not a test module).

Runs `python -m magic_portrait train` (magic_portrait.train_cli.main: the CLI's own process group, signal handling,
messages and file writing) on a tiny in-memory SD1.5-architecture model instead of a checkpoint file, so a
multi-process run costs seconds. Besides the CLI's arguments (after ``--``) it takes:

  --writes DIR        record every file this process opens for writing, renames or removes (Python audit events)
                      into DIR/rank<RANK>.txt
  --die RANK:STEP     the process of that rank kills itself (SIGKILL) right after finishing that step
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_SEED = 12


class StubVAE:
    """A fixed linear 'VAE' (8x8 pixel patches -> 4 channels): training needs only encode()."""

    def __init__(self):
        import torch

        self.proj = torch.randn(4, 3 * 64, generator=torch.Generator().manual_seed(1)) / 8.0

    def encode(self, image):
        import torch

        x = torch.nn.functional.pixel_unshuffle(image.permute(0, 3, 1, 2), 8)
        return torch.einsum("oc,bchw->bohw", self.proj, x)


def load_tiny_models(runtime):
    from magic_portrait import tiny

    model = tiny.build_sd15_model(seed=MODEL_SEED, full_blocks=False, model_channels=64)
    return model, StubVAE(), tiny.sd15_cond(MODEL_SEED)


def record_writes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the life of the process)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            target, mode, flags = (list(args) + [None, None])[:3]
            wants = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & writing)
            if wants and isinstance(target, (str, bytes, os.PathLike)) and os.fspath(target) != os.fspath(path):
                log.write(f"open {os.fsdecode(target)}\n")
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
            log.write(f"{event} {os.fsdecode(args[1] if event == 'os.rename' else args[0])}\n")

    sys.addaudithook(hook)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes")
    parser.add_argument("--die")
    own, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    rank = int(os.environ.get("RANK", "0"))
    if own.writes:
        record_writes(Path(own.writes) / f"rank{rank}.txt")
    die_rank, die_step = (int(v) for v in own.die.split(":")) if own.die else (-1, -1)

    def on_progress(step, loss):
        if rank == die_rank and step == die_step:
            os.kill(os.getpid(), signal.SIGKILL)

    from magic_portrait import train_cli

    return train_cli.main(rest, on_progress=on_progress, load_models=load_tiny_models)


if __name__ == "__main__":
    sys.exit(main())
