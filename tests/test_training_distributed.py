"""Distributed RepControlNet training on the CPU (gloo): 2 processes started by torchrun against 1 process.

Every multi-process run is `python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train_worker.py`,
i.e. `python -m magic_portrait train` (its process group, signals, messages, rank-0 writing) on a tiny in-memory
SD1.5-architecture model (magic_portrait/tiny.py). The optimizer is plain SGD without clipping: its update is linear
in the gradient, so a gradient scaled wrongly across ranks (summed instead of averaged, a rank's share counted
twice) moves the weights; Adam and clipping would hide exactly that (both are invariant to the gradient's scale).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tolerances as tol
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "train_worker.py"
STEPS, LR, PAIRS = 4, 0.05, 4


def _write_pairs(folder: Path, count: int, size: int = 64) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    for i in range(count):
        cond = (torch.rand(size // 16, size // 16, 3, generator=g) > 0.5).float()
        cond = cond.repeat_interleave(16, 0).repeat_interleave(16, 1)
        image = 0.2 + 0.6 * cond.flip(-1)  # the image is a function of the condition
        Image.fromarray((cond.numpy() * 255).astype("uint8")).save(folder / f"pair{i}_condition.png")
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"pair{i}.png")


def cli_args(data: Path, models: Path, name: str, *, batch: int, steps: int = STEPS, workers: int = 1) -> list[str]:
    return ["--dataset", str(data), "--models-dir", str(models), "--name", name, "--steps", str(steps),
            "--batch-size", str(batch), "--resolution", "64", "--layers", "encoder_convs", "--adapter-channels", "16",
            "--checkpoint-every", "2", "--keep-checkpoints", "0", "--optimizer", "sgd", "--learning-rate", str(LR),
            "--grad-clip", "0", "--num-workers", str(workers), "--seed", "5"]


def torchrun(args: list[str], writes: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.1", str(WORKER), "--writes", str(writes), *extra, "--", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(args: list[str]) -> int:
    import io

    from train_worker import load_tiny_models

    from magic_portrait import train_cli

    out, err = io.StringIO(), io.StringIO()
    code = train_cli.main(args, load_models=load_tiny_models, out=out, err=err)
    assert code == 0, out.getvalue() + err.getvalue()
    return code


def weights_tol(tiny, reference: dict, start: dict, steps: int) -> float:
    """Two SGD runs on the same samples and noise whose gradients differ only in summation order (micro-batches
    split over ranks, the all-reduce): each step's gradient carries float_tol of its chain (the UNet forward and
    backward: twice its reduction ops, plus the sum over the batch's latent positions) on the gradient's magnitude
    (bounded by the weights' total move over lr), the steps add up (sampling_tol), and the update of each weight
    rounds once per step on its own magnitude."""
    from train_worker import MODEL_SEED

    unet = tiny.build_sd15_model(seed=MODEL_SEED, full_blocks=False, model_channels=64).model.diffusion_model
    ops = 2 * tol.reduction_ops(unet) + 2 * 8 * 8
    grad_magnitude = max(float((reference[k] - start[k]).abs().max()) for k in reference) / LR
    return (LR * tol.sampling_tol(torch.float32, ops, grad_magnitude, steps)
            + tol.float_tol(torch.float32, steps, tol.magnitude(*reference.values())))


def trained(models: Path, name: str) -> dict:
    return {k: v for k, v in load_file(str(models / "magic_repcontrolnet" / f"{name}.safetensors")).items()
            if k.startswith(("modal.", "adapter."))}


def initial_weights(tiny, reference: dict) -> dict:
    """What training starts from: W_m = W (alpha = beta = 0.5) and the adapter as seeded (its last conv zero)."""
    from train_worker import MODEL_SEED

    from magic_core.repcontrolnet import ConditionAdapter

    unet = tiny.build_sd15_model(seed=MODEL_SEED, full_blocks=False, model_channels=64).model.diffusion_model.state_dict()
    adapter = ConditionAdapter(out_channels=64, hidden_channels=16, seed=5).state_dict()
    return {k: (unet[k[len("modal."):]] if k.startswith("modal.") else adapter[k[len("adapter."):]]).float()
            for k in reference}


def checkpoint_weights(folder: Path, step: int) -> dict:
    path = folder / f"repcontrolnet_step{step:07d}.safetensors"
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("modal.", "adapter."))}


@pytest.fixture(scope="module")
def runs(comfy, tmp_path_factory):
    """One torchrun launch of 2 processes (batch 1 each, a checkpoint every 2 steps) whose rank 1 kills itself after
    step 3, and one process with the same global batch of 2 (in this process) to step 4."""
    root = tmp_path_factory.mktemp("ddp")
    data, models = root / "data", root / "models"
    _write_pairs(data, PAIRS)
    crash = torchrun(cli_args(data, models, "two", batch=1, steps=8), root / "writes", "--die", "1:3")
    in_process(cli_args(data, models, "one", batch=2, workers=0))
    folders = {n: models / "magic_repcontrolnet" / f"{n}_training" for n in ("one", "two")}
    yield {"root": root, "data": data, "models": models, "crash": crash, "folders": folders}
    shutil.rmtree(root, ignore_errors=True)


def test_two_processes_train_what_one_process_with_the_same_global_batch_trains(runs, tiny):
    one, two = (checkpoint_weights(runs["folders"][n], 2) for n in ("one", "two"))
    start = initial_weights(tiny, one)
    bound = weights_tol(tiny, one, start, steps=2)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"2 processes vs 1 after 2 steps: max difference {worst:.3e}, bound {bound:.3e}, largest move {moved:.3e}")
    assert moved > 100 * bound, "training must move the weights far beyond the comparison's bound"
    assert worst <= bound
    logs = {n: [json.loads(line) for line in (runs["folders"][n] / "losses.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [e["step"] for e in logs["two"]] == [1, 2, 3], "one line per step: rank 0 alone logs"
    # the loss is the global batch's mean on any world size: the same samples and noise, rounding apart
    for a, b in zip(logs["one"][:3], logs["two"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= tol.float_tol(torch.float32, 2 * 8 * 8 * 4, a["loss"]) + bound


def test_only_rank_zero_writes(runs):
    models, writes = runs["models"], runs["root"] / "writes"
    written = {r: [line.split(" ", 1)[1] for line in (writes / f"rank{r}.txt").read_text().splitlines()]
               for r in (0, 1)}
    inside = {r: [p for p in paths if Path(p).resolve().is_relative_to(models.resolve())]
              for r, paths in written.items()}
    assert not inside[1], f"rank 1 wrote {inside[1][:5]}"
    folder = runs["folders"]["two"]
    assert str((folder / "repcontrolnet_step0000002.safetensors").resolve()) in {
        str(Path(p).resolve()) for p in inside[0]}, "the audit hook saw rank 0 write the checkpoint"
    assert any(p.endswith("losses.jsonl") for p in inside[0])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"repcontrolnet_step0000002{ext}" for ext in (".json", ".optim.safetensors", ".safetensors")]
        + ["losses.jsonl"]), "one complete checkpoint, no temporary files left"


def test_a_killed_rank_stops_the_run_naming_the_rank_and_the_last_checkpoint(runs):
    crash = runs["crash"]
    output = crash.stdout + crash.stderr
    assert crash.returncode != 0
    last = runs["folders"]["two"] / "repcontrolnet_step0000002.json"
    messages = [line for line in output.splitlines() if "magic_portrait train: [rank 0]" in line]
    assert messages, output[-4000:]
    print(messages[0])
    assert "rank 1 is gone" in messages[0] and str(last) in messages[0] and "step 4" in messages[0]
    from magic_core.repcontrolnet_train import find_latest_checkpoint

    assert find_latest_checkpoint(last.parent) == str(last), "the step-2 checkpoint is the last complete one"


def test_one_process_resumes_a_two_process_checkpoint(runs, tiny):
    """The 2-process run's step-2 checkpoint, resumed by 1 process (batch 2) to step 4, gives what 1 process
    trained uninterrupted: a map-style dataset hands every step the same samples and noise on any world size."""
    data, models = runs["data"], runs["models"]
    in_process(cli_args(data, models, "two", batch=2, workers=0))
    resumed, one = trained(models, "two"), trained(models, "one")
    bound = weights_tol(tiny, one, initial_weights(tiny, one), steps=STEPS)
    worst = max(float((resumed[k] - one[k]).abs().max()) for k in one)
    print(f"2-process checkpoint resumed on 1 process vs 1 process throughout: max difference {worst:.3e}, "
          f"bound {bound:.3e}")
    assert worst <= bound
    log = [json.loads(line) for line in (runs["folders"]["two"] / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
