"""ComfyUI tier: the Train RepControlNet node and `python -m magic_portrait train` are one training (bit-identical
weights from the same data, seed and options), gradient checkpointing recomputes the UNet's blocks without changing
the result, and a dataset written by ComfyUI's own MakeTrainingDataset + SaveTrainingDataset trains."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tolerances as tol
import torch
from helpers import assert_same_snapshot, comfy_folders, model_snapshot
from safetensors import safe_open
from safetensors.torch import load_file

TRAIN = "MagicPortrait_TrainRepControlNet"
CKPT = "tiny_sd15.safetensors"
PROMPT = "a portrait photo"


def write_pairs(folder: Path, count: int, size: int = 64, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        cond = (torch.rand(size // 16, size // 16, 3, generator=g) > 0.5).float()
        cond = cond.repeat_interleave(16, 0).repeat_interleave(16, 1)
        image = 0.2 + 0.6 * cond.flip(-1)
        Image.fromarray((cond.numpy() * 255).astype("uint8")).save(folder / f"p{i}_condition.png")
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"p{i}.png")


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("training")
    tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    with comfy_folders(root):
        write_pairs(root / "input" / "pairs", 4)
        yield root


def cli(args: list[str], **kwargs) -> str:
    from magic_portrait import train_cli

    out, err = io.StringIO(), io.StringIO()
    code = train_cli.main(args, out=out, err=err, **kwargs)
    assert code == 0, out.getvalue() + err.getvalue()
    return out.getvalue()


def test_node_and_command_line_train_bit_identical_weights(comfy, workdir):
    """The node in a graph (CheckpointLoaderSimple -> CLIPTextEncode -> Train, through the executor, inference
    tensors and all) and the command line (ComfyUI's loaders called headless, two DataLoader worker processes)."""
    options = {"steps": 2, "batch_size": 1, "resolution": 64, "layers": "encoder_convs", "adapter_channels": 16,
               "seed": 3, "learning_rate": 1e-3, "checkpoint_every": 0}
    comfy.run_prompt({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "train": {"class_type": TRAIN, "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "positive": ["pos", 0], "dataset_folder": "pairs",
            "name": "from_node", "alpha": 0.5, "beta": 0.5, "condition_type": "landmarks", "resume": False,
            **options}},
    })
    cli(["--checkpoint", CKPT, "--models-dir", str(workdir / "models"), "--dataset", str(workdir / "input" / "pairs"),
         "--name", "from_cli", "--prompt", PROMPT, "--no-resume", "--num-workers", "2",
         *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    folder = workdir / "models" / "magic_repcontrolnet"
    node, line = (load_file(str(folder / f"{n}.safetensors")) for n in ("from_node", "from_cli"))
    assert sorted(node) == sorted(line) and any(k.startswith("modal.") for k in node)
    different = [k for k in node if not torch.equal(node[k], line[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    logs = [(folder / f"{n}_training" / "losses.jsonl").read_text() for n in ("from_node", "from_cli")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 2
    with safe_open(str(folder / "from_cli.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["training_step"] == "2" and meta["training_global_batch"] == "1"
    assert meta["training_data"].startswith("4 pairs of image + condition at 64px")


def _stub_vae():
    from train_worker import StubVAE

    return StubVAE()


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_weights(comfy, pack, tiny, tmp_path):
    from magic_core import train_data

    training = pack.nodes.repcontrolnet_training
    model = tiny.build_sd15_model(seed=4, full_blocks=False, model_channels=64)
    write_pairs(tmp_path / "pairs", 2)
    source = train_data.PairFolderSamples.from_folder(tmp_path / "pairs", 64)
    unet = model.model.diffusion_model
    block = next(m for m in unet.modules() if type(m).__name__ == "ResBlock")
    before = model_snapshot(model)
    results, calls = {}, {}
    for checkpointing in (False, True):
        count = [0]
        inner = type(block)._forward.__get__(block)

        def counted(*args, inner=inner, count=count):
            count[0] += 1
            return inner(*args)

        block._forward = counted
        try:
            results[checkpointing] = training.run_training(
                model, _stub_vae(), tiny.sd15_cond(4), source, steps=2, batch_size=2, preset="encoder_convs",
                adapter_channels=16, seed=1, optimizer="sgd", lr=0.05, grad_clip=None,
                gradient_checkpointing=checkpointing)
        finally:
            del block._forward
        calls[checkpointing] = count[0]
    assert calls == {False: 2, True: 4}, "with checkpointing each block runs again in the backward pass"
    assert not any("forward" in vars(m) for m in unet.modules()), "the blocks' forward is restored"
    assert_same_snapshot(before, model_snapshot(model))
    plain, checkpointed = results[False].weights, results[True].weights
    worst = max(float((plain.modal[k] - checkpointed.modal[k]).abs().max()) for k in plain.modal)
    # the same operations on the same inputs, computed a second time: at most rounding of the backward chain
    bound = 0.05 * tol.sampling_tol(torch.float32, 2 * tol.reduction_ops(unet), 1.0, 2)
    print(f"checkpointing vs not: max difference {worst:.3e} (bound {bound:.3e})")
    assert worst <= bound
    assert results[False].losses[0] == results[True].losses[0], "the forward pass is the same computation"


def test_a_dataset_from_comfyuis_own_dataset_nodes_trains(comfy, workdir, tiny):
    """LoadImageDataSetFromFolder -> MakeTrainingDataset -> SaveTrainingDataset (pickled shards in the output folder)
    with condition images beside them, read with torch.load(weights_only=True) by the command line."""
    import folder_paths
    from PIL import Image

    (workdir / "input" / "faces").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)).save(workdir / "input" / "faces" / f"f{i}.png")
    comfy.run_prompt({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "images": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "faces"}},
        "make": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["images", 0], "vae": ["ckpt", 2],
                                                                 "clip": ["ckpt", 1], "texts": PROMPT}},
        "save": {"class_type": "SaveTrainingDataset", "inputs": {"latents": ["make", 0], "conditioning": ["make", 1],
                                                                 "folder_name": "rcn_set", "shard_size": 2}},
    })
    dataset = Path(folder_paths.get_output_directory()) / "rcn_set"
    assert sorted(p.name for p in dataset.iterdir()) == ["metadata.json", "shard_0000.pkl", "shard_0001.pkl"]
    (dataset / "conditions").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (255 * (i % 2), 0, 255)).save(dataset / "conditions" / f"{i:06d}.png")

    def load_models(runtime):
        return tiny.build_sd15_model(seed=4, full_blocks=False, model_channels=64), None, tiny.sd15_cond(4)

    out = cli(["--dataset", "rcn_set", "--models-dir", str(workdir / "models"), "--name", "from_core_set",
               "--steps", "3", "--batch-size", "2", "--layers", "encoder_convs", "--adapter-channels", "16",
               "--num-workers", "1", "--no-resume"], load_models=load_models)
    assert "SaveTrainingDataset 'rcn_set': 3 pre-encoded samples in 2 shards" in out
    folder = workdir / "models" / "magic_repcontrolnet"
    log = [json.loads(line) for line in (folder / "from_core_set_training" / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] > 0 for e in log)


def test_workflows_saved_before_the_new_inputs_still_load_and_validate(comfy, workdir):
    """The Train node's newer inputs (gradient_accumulation, mixed_precision, gradient_checkpointing; then
    modality_schedule, modality_weights, clone_face_probability, face_loss_weight, magicid_crop) come last and are optional: a
    workflow saved before either (15 or 18 widget values) converts with their defaults, and an API prompt without
    them passes ComfyUI's validation. Apply RepControlNet's condition_modality / untrained_modality likewise."""
    import asyncio

    import execution

    import nodes as comfy_nodes
    from magic_portrait.workflow import ui_to_api

    repo = Path(__file__).resolve().parent.parent
    saved = json.loads((repo / "example_workflows" / "repcontrolnet_train.json").read_text())
    newest = [1, "no", False, "single", "skeleton=1, landmark=1", 0.0, 0.0, "random"]
    assert next(n for n in saved["nodes"] if n["type"] == TRAIN)["widgets_values"][-8:] == newest
    for cut in (5, 8):  # as the versions before saved it
        example = json.loads(json.dumps(saved))
        train = next(n for n in example["nodes"] if n["type"] == TRAIN)
        train["widgets_values"] = train["widgets_values"][:-cut]
        apply = next(n for n in example["nodes"] if n["type"] == "MagicPortrait_ApplyRepControlNet")
        assert apply["widgets_values"][-2:] == ["any", "error"]
        apply["widgets_values"] = apply["widgets_values"][:-2]
        warnings: list[str] = []
        prompt = ui_to_api(example, comfy_nodes.NODE_CLASS_MAPPINGS, warnings=warnings)
        inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == TRAIN)
        assert [inputs[k] for k in ("gradient_accumulation", "mixed_precision", "gradient_checkpointing",
                                    "modality_schedule", "modality_weights", "clone_face_probability",
                                    "face_loss_weight", "magicid_crop")] == newest
        assert inputs["resume"] is True and inputs["checkpoint_every"] == 100, "the old values keep their places"
        applied = next(n["inputs"] for n in prompt.values() if n["class_type"] == "MagicPortrait_ApplyRepControlNet")
        assert (applied["strength"], applied["condition_modality"], applied["untrained_modality"]) == (
            1.0, "any", "error")
    api = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "train": {"class_type": TRAIN, "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "positive": ["pos", 0], "dataset_folder": "pairs",
            "name": "old_prompt", "steps": 1, "learning_rate": 1e-4, "batch_size": 1, "resolution": 64,
            "layers": "encoder", "alpha": 0.5, "beta": 0.5, "adapter_channels": 16, "condition_type": "x",
            "seed": 0, "checkpoint_every": 0, "resume": False}},
    }
    valid = asyncio.run(execution.validate_prompt("old", api, None))
    assert valid[0], valid[1]
