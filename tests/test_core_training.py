"""Core-tier tests for the training loop and its data (no ComfyUI): start, resume, checkpoints, the global batch
and its split, weighted losses, the condition choice, the sample order over ranks and epochs, core's
SaveTrainingDataset shards, tar shards, mixed precision."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import tolerances as tol
import torch
import torch.nn.functional as F
from oracles import merged_state
from safetensors.torch import load_file, save
from torch import nn

from magic_core import train_data, train_streams
from magic_core.repcontrolnet import add_features, init_weights_from_base
from magic_core.repcontrolnet_train import (
    LOSS_LOG,
    PREVIOUS_RUN,
    atomic_write,
    find_latest_checkpoint,
    list_checkpoints,
    train_repcontrolnet,
)

LAT, CH, HW = 4, 8, 8
ADAPTER = {"out_channels": CH, "hidden_channels": 8, "num_layers": 1}
LAYERS = ["body", "conv_out"]
SIGMAS = torch.linspace(0.3, 1.5, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyUNet(nn.Module):
    """conv_in (adapter features are added to its output), a body conv, conv_out; returns x - sigma * eps."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv_in = nn.Conv2d(LAT, CH, 3, padding=1)
        self.body = nn.Conv2d(CH, CH, 3, padding=1)
        self.conv_out = nn.Conv2d(CH, LAT, 3, padding=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * (fan_in**-0.5 if p.ndim > 1 else 0.1))
        self.requires_grad_(False)

    def forward(self, x, sigma, features):
        s = sigma.view(-1, 1, 1, 1)
        h = add_features(self.conv_in(x / torch.sqrt(s * s + 1)), features)
        return x - s * self.conv_out(F.silu(self.body(F.silu(h))))


def toy_forward(net: ToyUNet):
    def forward(merged, x, sigma, context, features):
        return torch.func.functional_call(net, merged, (x, sigma, features), strict=False)

    return forward


def toy_samples(n: int = 6, seed: int = 11, weights: bool = False) -> list[dict]:
    """Latents that depend on the condition image: x0 = a fixed 1x1 map of the 8x8-pooled condition."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(LAT, 3, 1, 1, generator=gen)
    out = []
    for i in range(n):
        cond = (torch.rand(3, 4, 4, generator=gen) > 0.5).float()
        cond = F.interpolate(cond[None], size=(HW * 8, HW * 8), mode="nearest")[0]
        sample = {"key": f"s{i}", "latent": F.conv2d(F.avg_pool2d(cond[None] * 2 - 1, 8), mix)[0], "condition": cond}
        if weights:
            sample["loss_weight"] = 0.25 + torch.rand(1, HW * 8, HW * 8, generator=gen)
        out.append(sample)
    return out


def train(net, samples, **kw):
    kw = {"steps": 6, "lr": 5e-3, "adapter_config": ADAPTER, "seed": 7, "sigmas": SIGMAS, **kw}
    return train_repcontrolnet(toy_forward(net), net.state_dict(), LAYERS, samples, **kw)


def modal_diff(a, b) -> float:
    keys = set(a.modal) | {"adapter"}
    worst = max(float((a.modal[k] - b.modal[k]).abs().max()) for k in a.modal)
    worst = max(worst, *(float((a.adapter_state[k] - b.adapter_state[k]).abs().max()) for k in a.adapter_state))
    assert keys
    return worst


def eval_loss(net, weights, samples) -> float:
    """Epsilon MSE of the merged toy net + adapter at fixed sigma and noise."""
    merged = merged_state(weights, net.state_dict())
    adapter = weights.build_adapter()
    gen = torch.Generator().manual_seed(99)
    x0 = torch.stack([s["latent"] for s in samples])
    cond = torch.stack([s["condition"] for s in samples])
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.full((x0.shape[0],), 0.8)
    with torch.no_grad():
        d = toy_forward(net)(merged, x0 + 0.8 * noise, sigma, None, adapter(cond, latent_hw=(HW, HW)))
    return float((((x0 + 0.8 * noise) - d) / 0.8 - noise).pow(2).mean())


# ------------------------------------------------------------------------------------------------------ the loop


def test_training_starts_at_the_base_and_lowers_the_loss(tmp_path):
    net, samples = ToyUNet(), toy_samples()
    start = init_weights_from_base(net.state_dict(), LAYERS, adapter_config=ADAPTER, seed=7)
    for k, v in merged_state(start, net.state_dict()).items():
        assert torch.equal(v, net.state_dict()[k]), "training must start exactly at the base model"
    seen = []
    result = train(net, samples, steps=40, lr=2e-2, batch_size=2, on_progress=lambda s, v: seen.append((s, v)),
                   checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0)
    assert [s for s, _ in seen] == list(range(1, 41)) and [v for _, v in seen] == result.losses
    before, after = eval_loss(net, start, samples), eval_loss(net, result.weights, samples)
    assert after < 0.8 * before, (before, after)
    assert result.weights.build_adapter()(samples[0]["condition"][None]).abs().max() > 0, "the adapter learned"
    assert result.weights.metadata["training_step"] == "40"
    assert result.weights.metadata["training_global_batch"] == "2"
    assert "6 samples" in result.weights.metadata["training_data"]
    assert [json.loads(line)["step"] for line in (tmp_path / "ckpt" / LOSS_LOG).read_text().splitlines()] == list(
        range(1, 41))
    assert result.stats.steps == 40 and result.stats.samples == 80 and 0 <= result.stats.data_wait_share < 1


def test_resume_continues_bit_for_bit_and_checkpoints_are_complete(tmp_path):
    net, samples = ToyUNet(), toy_samples()
    full = train(net, samples, steps=12, batch_size=2, checkpoint_dir=tmp_path / "a", checkpoint_every=5,
                 keep_checkpoints=0)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(
        [f"repcontrolnet_step{s:07d}{ext}" for s in (5, 10, 12) for ext in (".json", ".optim.safetensors",
                                                                              ".safetensors")] + [LOSS_LOG])
    train(net, samples, steps=5, batch_size=2, checkpoint_dir=tmp_path / "b", checkpoint_every=5)
    ckpt = find_latest_checkpoint(tmp_path / "b")
    assert ckpt.endswith("repcontrolnet_step0000005.json")
    state = json.loads(Path(ckpt).read_text())
    assert state["step"] == 5 and state["data"] == {"kind": "map", "samples": 6, "position": 10}
    optim = load_file(str(tmp_path / "b" / state["optimizer_file"]))
    assert any(k.endswith(".exp_avg_sq") for k in optim) and optim["training.losses"].shape == (5,)

    seen = []
    resumed = train(net, samples, steps=12, batch_size=2, checkpoint_dir=tmp_path / "b", checkpoint_every=5,
                    resume_from=tmp_path / "b", on_progress=lambda s, v: seen.append(s))
    assert seen == list(range(6, 13)) and resumed.step == 12 and resumed.resumed_from == ckpt
    assert resumed.losses == full.losses, "same seed and data order: the same curve, bit for bit"
    assert modal_diff(resumed.weights, full.weights) == 0.0
    log = [json.loads(line) for line in (tmp_path / "b" / LOSS_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 13)) and [e["loss"] for e in log] == full.losses
    with pytest.raises(ValueError, match="its layers"):
        train_repcontrolnet(toy_forward(net), net.state_dict(), LAYERS[:1], samples, steps=12,
                            adapter_config=ADAPTER, seed=7, sigmas=SIGMAS, resume_from=ckpt)


def test_how_the_global_batch_is_split_does_not_change_training():
    """SGD (linear in the gradient) on one global batch of 4, as 1x4, 2 micro-batches of 2, and 4 of 1, with and
    without per-pixel loss weights: the loss is the weighted mean over the whole global batch, so the runs agree to
    rounding (each step's gradient is summed in another grouping)."""
    net = ToyUNet()
    for weighted in (False, True):
        samples = toy_samples(8, weights=weighted)
        runs = [train(net, samples, optimizer="sgd", lr=0.05, steps=4, batch_size=b, grad_accumulation=4 // b)
                for b in (4, 2, 1)]
        start = init_weights_from_base(net.state_dict(), LAYERS, adapter_config=ADAPTER, seed=7)
        moved = modal_diff(runs[0].weights, start)
        ops = tol.reduction_ops(net) * 2 + 4 * HW * HW
        bound = 0.05 * tol.sampling_tol(torch.float32, ops, moved / 0.05, 4) + tol.float_tol(torch.float32, 4, 2.0)
        assert moved > 100 * bound
        for other in runs[1:]:
            assert modal_diff(other.weights, runs[0].weights) <= bound
            for a, b in zip(other.losses, runs[0].losses, strict=True):
                assert abs(a - b) <= tol.float_tol(torch.float32, ops, a) + bound


def test_the_weighted_loss_is_the_weighted_mean_of_the_formula():
    """Step 1's logged loss against the objective written out in plain torch: the model is exactly the base net with
    a zero adapter, the sigma and noise of slot k of step 0 come from train_data.generator(seed, "noise", 0, k)."""
    net, samples = ToyUNet(), toy_samples(4, weights=True)
    result = train(net, samples, steps=1, batch_size=2, grad_accumulation=2, shuffle=False)
    x0 = torch.stack([s["latent"] for s in samples])
    w = F.adaptive_avg_pool2d(torch.stack([s["loss_weight"] for s in samples]), (HW, HW))
    terms, weights = [], []
    for k in range(4):
        g = train_data.generator(7, "noise", 0, k)
        sigma = SIGMAS[int(torch.randint(SIGMAS.numel(), (1,), generator=g))]
        noise = torch.randn(x0.shape[1:], generator=g)
        x = x0[k] + sigma * noise
        with torch.no_grad():
            eps = (x[None] - net(x[None], sigma.view(1), torch.zeros(1, CH, HW, HW))) / sigma
        terms.append((w[k] * (eps[0] - noise) ** 2).sum())
        weights.append(w[k].expand(LAT, HW, HW).sum())
    expected = float(sum(terms) / sum(weights))
    assert abs(result.losses[0] - expected) <= tol.float_tol(torch.float32, tol.reduction_ops(net) + 4 * LAT * HW * HW,
                                                             expected)
    plain = train(net, [{k: v for k, v in s.items() if k != "loss_weight"} for s in samples], steps=1, batch_size=4,
                  shuffle=False)
    assert abs(plain.losses[0] - expected) > 1e-3 * expected, "the weights change the loss"


class RecordingSource(train_data.SampleSource):
    """Two condition images per sample ("a": zeros, "b": ones); records what the loop asked for."""

    def __init__(self, samples):
        self.samples, self.asked = samples, []

    def __len__(self):
        return len(self.samples)

    def load(self, ref):
        self.asked.append((ref.step, ref.condition))
        sample = dict(self.samples[ref.index])
        sample["condition"] = torch.full_like(sample["condition"], 0.0 if ref.condition == "a" else 1.0)
        return sample


def test_the_condition_choice_picks_each_steps_modality_and_the_log_records_it(tmp_path):
    def alternate(seed, step):
        return "a" if step % 2 == 0 else "b"

    alternate.description = "alternate a/b"
    net, source = ToyUNet(), RecordingSource(toy_samples(4))
    result = train(net, source, steps=4, batch_size=2, condition_choice=alternate, checkpoint_dir=tmp_path,
                   log_extra=lambda step: {"phase": "warmup" if step < 2 else "main"})
    assert sorted(set(source.asked)) == [(0, "a"), (1, "b"), (2, "a"), (3, "b")]
    assert all(n == 2 for n in (sum(1 for a in source.asked if a[0] == s) for s in range(4)))
    log = [json.loads(line) for line in (tmp_path / LOSS_LOG).read_text().splitlines()]
    assert [(e["condition"], e["phase"]) for e in log] == [("a", "warmup"), ("b", "warmup"), ("a", "main"),
                                                            ("b", "main")]
    assert result.weights.metadata["training_conditions"] == "alternate a/b"
    with pytest.raises(ValueError, match="has no 'landmark' condition"):
        train(net, toy_samples(2), steps=1, condition_choice=lambda seed, step: "landmark")


def test_fresh_start_sets_the_previous_run_aside_and_old_checkpoints_are_pruned(tmp_path):
    net, samples = ToyUNet(), toy_samples()
    train(net, samples, steps=6, checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]
    train(net, samples, steps=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2], "the later steps of the old run are gone"
    assert [s for s, _ in list_checkpoints(tmp_path / PREVIOUS_RUN)] == [5, 6]
    assert len((tmp_path / LOSS_LOG).read_text().splitlines()) == 2


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def dies_halfway(tmp):
        Path(tmp).write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, dies_halfway)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]

    # a run that dies while writing its second checkpoint keeps the first, complete and found
    net, samples = ToyUNet(), toy_samples()
    calls = []

    def progress(step, loss):
        calls.append(step)

    import magic_core.repcontrolnet_train as loop

    original = loop.save_weights_atomic

    def failing_save(path, weights):
        if "0000004" in str(path):
            return atomic_write(path, dies_halfway)
        return original(path, weights)

    loop.save_weights_atomic = failing_save
    try:
        with pytest.raises(OSError, match="disk full"):
            train(net, samples, steps=6, checkpoint_dir=tmp_path / "run", checkpoint_every=2, on_progress=progress)
    finally:
        loop.save_weights_atomic = original
    assert find_latest_checkpoint(tmp_path / "run").endswith("repcontrolnet_step0000002.json")
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]
    resumed = train(net, samples, steps=3, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run")
    assert resumed.resumed_from.endswith("0000002.json") and resumed.step == 3


def test_mixed_precision_bf16_trains_and_fp16_keeps_its_gradient_scaler_across_resume(tmp_path):
    net, samples = ToyUNet(), toy_samples()
    calls = {}

    def recording_forward(precision):
        inner = toy_forward(net)

        def forward(merged, x, sigma, context, features):
            out = inner(merged, x, sigma, context, features)
            calls.setdefault(precision, []).append((
                torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                {k: v.detach().clone() for k, v in merged.items()}, x.detach().clone(), sigma.detach().clone(),
                [f.detach().clone() for f in features] if isinstance(features, list | tuple) else features.detach().clone(),
                out.detach().clone()))
            return out

        return forward

    kw = {"steps": 1, "batch_size": 2, "lr": 5e-3, "adapter_config": ADAPTER, "seed": 7, "sigmas": SIGMAS}
    fp32 = train_repcontrolnet(recording_forward("no"), net.state_dict(), LAYERS, samples, **kw)
    bf16 = train_repcontrolnet(recording_forward("bf16"), net.state_dict(), LAYERS, samples, **kw,
                               mixed_precision="bf16")
    # a bf16 bound over the whole step would be O(loss) (float_tol refuses it); instead the exact invariant: the
    # loop's forward is the network under CPU bf16 autocast, bit for bit, and the float32 run has no autocast
    assert [c[0] for c in calls["no"]] == [False] * len(calls["no"])
    assert calls["bf16"] and all(c[0] == torch.bfloat16 for c in calls["bf16"])
    for _, merged, x, sigma, features, out in calls["bf16"]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            again = torch.func.functional_call(net, merged, (x, sigma, features), strict=False)
        assert torch.equal(again, out)
        with torch.no_grad():
            in_fp32 = torch.func.functional_call(net, merged, (x, sigma, features), strict=False)
        assert not torch.equal(in_fp32, out), "bf16 autocast rounds the network's products"
    assert all(math.isfinite(v) for v in bf16.losses) and bf16.losses[0] != fp32.losses[0]
    assert all(v.dtype == torch.float32 for v in bf16.weights.modal.values()), "trained weights stay float32"
    fp16 = train(net, samples, steps=2, batch_size=2, mixed_precision="fp16", checkpoint_dir=tmp_path,
                 checkpoint_every=2)
    state = json.loads(Path(find_latest_checkpoint(tmp_path)).read_text())
    assert state["grad_scaler"]["scale"] > 1 and state["mixed_precision"] == "fp16"
    more = train(net, samples, steps=4, batch_size=2, mixed_precision="fp16", checkpoint_dir=tmp_path,
                 resume_from=tmp_path)
    assert more.losses[:2] == fp16.losses and all(torch.isfinite(torch.tensor(more.losses)))


# --------------------------------------------------------------------------------------------------- the order


def test_every_rank_reads_a_disjoint_part_of_each_epoch_and_the_split_does_not_change_the_samples():
    source = train_data.InMemorySamples(toy_samples(7))

    def plan(world, rank, batch, accumulation, start_step=0, start_position=None):
        layout = train_data.BatchLayout(world, rank, batch, accumulation)
        return train_data.MapPlan(source, layout, seed=3, start_step=start_step, steps=6,
                                  start_position=start_step * layout.global_batch if start_position is None
                                  else start_position)

    def per_step(plans):
        out = {}
        for p in plans:
            for refs in p:
                for r in refs:
                    out.setdefault(r.step, set()).add((r.slot, r.position, r.index))
        return out

    one = per_step([plan(1, 0, 4, 1)])
    assert per_step([plan(2, r, 1, 2) for r in (0, 1)]) == one
    assert per_step([plan(4, r, 1, 1) for r in range(4)]) == one
    assert per_step([plan(1, 0, 1, 4)]) == one
    ranks = [[r for refs in plan(2, rank, 2, 1) for r in refs] for rank in (0, 1)]
    assert not {r.position for r in ranks[0]} & {r.position for r in ranks[1]}
    by_epoch = {}
    for r in ranks[0] + ranks[1]:
        by_epoch.setdefault(r.position // 7, []).append(r.index)
    assert sorted(by_epoch[0]) == list(range(7)) and sorted(by_epoch[1]) == list(range(7)), "each sample once"
    assert by_epoch[0] != by_epoch[1][: len(by_epoch[0])] or len(by_epoch[0]) < 2, "epochs are shuffled anew"
    # a resumed plan continues the very stream
    resumed = per_step([plan(1, 0, 4, 1, start_step=3)])
    assert all(resumed[s] == one[s] for s in range(3, 6))


# --------------------------------------------------------------------------------------------------- core shards


def write_core_dataset(folder: Path, n: int = 5, shard_size: int = 2, seed: int = 0) -> list[dict]:
    """Shards exactly as ComfyUI's SaveTrainingDataset writes them (torch.save of lists of latent dicts and
    conditioning lists), metadata.json, and one condition image per sample in conditions/."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    (folder / "conditions").mkdir()
    samples = []
    for i in range(n):
        samples.append({"latent": torch.randn(1, LAT, HW, HW, generator=gen),
                        "cond": [[torch.randn(1, 77, 16, generator=gen), {"pooled_output": torch.randn(1, 16)}]]})
        image = (torch.rand(HW * 8, HW * 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(image).save(folder / "conditions" / f"{i:06d}.png")
    for shard in range((n + shard_size - 1) // shard_size):
        part = samples[shard * shard_size:(shard + 1) * shard_size]
        with open(folder / f"shard_{shard:04d}.pkl", "wb") as f:
            torch.save({"latents": [{"samples": s["latent"]} for s in part],
                        "conditioning": [s["cond"] for s in part]}, f)
    (folder / "metadata.json").write_text(json.dumps({"num_samples": n, "num_shards": shard + 1,
                                                      "shard_size": shard_size}))
    return samples


class NotATensor:
    def __reduce__(self):
        return (print, ("a pickle may run code",))


def test_savetrainingdataset_shards_are_read_safely_with_their_conditions(tmp_path):
    written = write_core_dataset(tmp_path / "ds")
    source = train_data.open_dataset(tmp_path / "ds", None)
    assert isinstance(source, train_data.CoreDatasetSamples) and len(source) == 5 and source.sizes == [2, 2, 1]
    for i in (0, 3, 4):
        sample = source.load(train_data.SampleRef(i, i, 0, 0, train_data.CONDITION, 0))
        assert torch.equal(sample["latent"], written[i]["latent"][0])
        assert torch.equal(sample["conditioning"][0][0], written[i]["cond"][0][0])
        assert sample["condition"].shape == (3, HW * 8, HW * 8)
    order = source.epoch_order(1, 0, True)
    assert sorted(order.tolist()) == list(range(5))
    shards = [source.locate(int(i))[0] for i in order]
    assert sum(a != b for a, b in zip(shards[:-1], shards[1:], strict=True)) == 2, "each shard read in one go"
    with pytest.raises(ValueError, match="no 'landmark' condition image"):
        source.load(train_data.SampleRef(1, 1, 0, 0, "landmark", 0))
    with open(tmp_path / "ds" / "shard_0001.pkl", "wb") as f:
        torch.save({"latents": [NotATensor()], "conditioning": []}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        train_data.CoreDatasetSamples(tmp_path / "ds").load(train_data.SampleRef(2, 2, 0, 0, "condition", 0))


def test_training_on_pre_encoded_latents_through_worker_processes_gives_the_in_process_result(tmp_path):
    write_core_dataset(tmp_path / "ds", n=6, shard_size=4)
    net = ToyUNet()

    def prepare(batch, step):  # what the ComfyUI side does: latents as they are, a context per sample
        return {**batch, "context": [c[0][0] for c in batch["conditioning"]]}

    runs = [train(net, train_data.CoreDatasetSamples(tmp_path / "ds"), steps=4, batch_size=2, prepare_batch=prepare,
                  num_workers=workers) for workers in (0, 2)]
    assert runs[0].losses == runs[1].losses and modal_diff(runs[0].weights, runs[1].weights) == 0.0


# ----------------------------------------------------------------------------------------------------- tar shards


def write_tars(folder: Path, shards: int = 3, per_shard: int = 3, seed: int = 0) -> list[str]:
    """webdataset-layout tars: KEY.png + KEY.condition.png (+ KEY.landmark.png), one sample with a latent instead."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    keys = []

    def png(t):
        buf = io.BytesIO()
        Image.fromarray((t * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s}/{j:04d}"
                keys.append(key)
                files = {"condition.png": png(torch.rand(3, HW * 8, HW * 8, generator=gen)),
                         "landmark.png": png(torch.rand(3, HW * 8, HW * 8, generator=gen))}
                if j == 1:
                    files["latent.safetensors"] = save({"latent": torch.randn(LAT, HW, HW, generator=gen)})
                else:
                    files["png"] = png(torch.rand(3, HW * 8, HW * 8, generator=gen))
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def stream_keys(source, world, rank, *, micro, batch=1, position=None, workers=0, choice=None):
    layout = train_data.BatchLayout(world, rank, batch, 1)
    batches, plan = train_data.make_loader(source, layout, seed=5, start_step=0, steps=micro,
                                           resume={"stream": position} if position else None,
                                           condition_choice=choice, num_workers=workers)
    out = [next(batches) for _ in range(micro)]
    return [k for b in out for k in b["key"]], out, plan


def test_tar_shards_stream_disjointly_per_rank_in_worker_processes_and_resume_on_another_world_size(tmp_path):
    keys = write_tars(tmp_path / "tars")
    source = train_data.open_dataset(str(tmp_path / "tars" / "shard-{0000..0002}.tar"), None)
    assert isinstance(source, train_streams.TarShards) and len(source) == 3
    # one epoch of 9 samples: rank 0 reads 2 shards (6 samples), rank 1 one shard (3), disjoint
    r0, _, _ = stream_keys(source, 2, 0, micro=6)
    r1, _, _ = stream_keys(source, 2, 1, micro=3)
    assert sorted(r0 + r1) == sorted(keys)
    # worker processes decode their own micro-batches; the order and content do not change
    a, batches_a, _ = stream_keys(source, 2, 0, micro=6, batch=1, workers=0, choice=lambda s, t: "landmark")
    b, batches_b, _ = stream_keys(source, 2, 0, micro=6, batch=1, workers=2, choice=lambda s, t: "landmark")
    assert a == b and all(torch.equal(x["condition"], y["condition"]) for x, y in zip(batches_a, batches_b,
                                                                                     strict=True))
    assert any("latent" in x for x in batches_a) and any("image" in x for x in batches_a)
    # rank 0 stops after 4 samples, rank 1 after 2 (the step-aligned state a checkpoint saves) ...
    states = []
    for rank, count in ((0, 4), (1, 2)):
        _, got, plan = stream_keys(source, 2, rank, micro=count)
        states.append(plan.position_after(got[-1]["_where"][-1]))
    read = set(stream_keys(source, 2, 0, micro=4)[0]) | set(stream_keys(source, 2, 1, micro=2)[0])
    # ... and 1 or 3 processes read exactly the rest of the epoch, then a new epoch
    for world in (1, 3):
        dealt = train_streams.redistribute_streams(states, num_shards=3, seed=5, old_world=2, new_world=world,
                                                shuffle=True)
        rest = []
        for rank in range(world):
            count = sum(1 for item in dealt[rank]["items"] for _ in source.iter_shard(*item))
            rest += stream_keys(source, world, rank, micro=count, position=dealt[rank])[0]
        assert sorted(rest) == sorted(set(keys) - read) and len(rest) == len(set(rest))
    with pytest.raises(ValueError, match="at least as many shards as there are ranks"):
        stream_keys(source, 4, 0, micro=1)


def test_training_on_tar_shards_resumes_bit_for_bit(tmp_path):
    write_tars(tmp_path / "tars", shards=2, per_shard=4)
    net = ToyUNet()
    latent_only = train_streams.TarShards(str(tmp_path / "tars"))

    def prepare(batch, step):  # stands in for the VAE: pooled pixels as the latent
        if "image" in batch:
            encoded = F.avg_pool2d(batch["image"], 8)
            encoded = torch.cat([encoded, encoded[:, :1]], dim=1)
            return {**batch, "latent": encoded}
        return batch

    full = train(net, latent_only, steps=6, prepare_batch=prepare)
    train(net, latent_only, steps=3, prepare_batch=prepare, checkpoint_dir=tmp_path / "c", checkpoint_every=3)
    state = json.loads(Path(find_latest_checkpoint(tmp_path / "c")).read_text())
    assert state["data"]["kind"] == "stream" and state["data"]["ranks"][0]["items"]
    resumed = train(net, latent_only, steps=6, prepare_batch=prepare, checkpoint_dir=tmp_path / "c",
                    resume_from=tmp_path / "c")
    assert resumed.losses == full.losses and modal_diff(resumed.weights, full.weights) == 0.0


def test_pair_folders_name_their_modalities_and_loss_weights(tmp_path):
    """NAME.png + NAME_condition.png (the node's layout), NAME_<key>.png for more modalities (keys may hold '_'),
    NAME_loss_weight.png as a per-pixel loss weight; an image without a condition is left out."""
    from PIL import Image

    for name in ("a.png", "a_condition.png", "a_landmark.png", "a_face_mask.png", "a_loss_weight.png", "b.jpg",
                 "b_skeleton.png", "c.png"):
        Image.new("RGB" if "weight" not in name else "L", (16, 16), 200).save(tmp_path / name)
    found = {s["key"]: s for s in train_data.find_pair_samples(tmp_path)}
    assert sorted(found) == ["a", "b"]
    assert sorted(found["a"]["conditions"]) == ["condition", "face_mask", "landmark"]
    assert found["a"]["loss_weight"].name == "a_loss_weight.png" and "loss_weight" not in found["b"]
    assert [(i.name, c.name) for i, c in train_data.find_pairs(tmp_path)] == [("a.png", "a_condition.png")]
    source = train_data.PairFolderSamples(list(found.values()), 8)
    sample = source.load(train_data.SampleRef(0, 0, 0, 0, "landmark", 0))
    assert sample["condition"].shape == (3, 8, 8) and sample["loss_weight"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="has no 'landmark' condition image.*b_landmark.png"):
        source.load(train_data.SampleRef(1, 1, 0, 0, "landmark", 0))
