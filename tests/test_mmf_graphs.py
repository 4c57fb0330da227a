"""ComfyUI tier: MagicID's training half through ComfyUI's validation and executor on a tiny SD1.5 checkpoint and the
shipped MagicID photo set (built with the offline dlib back-end into the input folder): Train RepControlNet with an
MMF schedule (the loss log says S, L, S, L), the node and `python -m magic_portrait train` as one training with a
random schedule, Clone Face Tuning and the face-weighted loss on (bit-identical weights), and Apply RepControlNet
with each modality and the merged one, reporting the file's modalities and refusing (or warning about) others."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import comfy_folders, saved_latent
from oracles import merged_state
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_training import write_pairs

from magic_core import face_backends as fb
from magic_core import magicid_build as mb
from magic_core import magicid_dataset as md
from magic_portrait.comfy_env import WorkflowError

P = "MagicPortrait_"
TRAIN, LOAD, APPLY = P + "TrainRepControlNet", P + "LoadRepControlNet", P + "ApplyRepControlNet"
CKPT = "tiny_sd15.safetensors"
PROMPT = "a group photo"
REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "example_workflows" / "magic_portrait_magicid_photos"
OPTIONS = {"batch_size": 1, "resolution": 64, "layers": "encoder_convs", "adapter_channels": 16, "seed": 3,
           "learning_rate": 1e-3, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("mmf_graphs")
    tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    with comfy_folders(root):
        mb.build_dataset(mb.folder_photos(PHOTOS), root / "input" / "mid", fb.DlibAnalyzer("hog"), md.BuildSettings())
        # the condition images Apply gets, as a user would load them (LoadImage lists the input folder's top level)
        dataset = md.MagicIDDataset(root / "input" / "mid")
        sample = dataset[dataset.names().index("group_duo")]
        for modality in ("skeleton", "landmark", "merged"):
            Image.fromarray(np.ascontiguousarray(sample.condition(modality))).save(root / "input" / f"duo_{modality}.png")
        write_pairs(root / "input" / "pairs_only", 2)
        yield root


def train_prompt(name: str, steps: int, **inputs) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "train": {"class_type": TRAIN, "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "positive": ["pos", 0], "dataset_folder": "mid",
            "name": name, "steps": steps, "alpha": 0.5, "beta": 0.5, "condition_type": "magicid", "resume": False,
            **OPTIONS, **inputs}},
    }


def training_log(workdir: Path, name: str) -> list[dict]:
    path = workdir / "models" / "magic_repcontrolnet" / f"{name}_training" / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def file_metadata(workdir: Path, name: str) -> dict:
    with safe_open(str(workdir / "models" / "magic_repcontrolnet" / f"{name}.safetensors"), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def alternate_file(comfy, workdir) -> str:
    out = comfy.run_prompt(train_prompt("mmf_alt", 4, modality_schedule="alternate"))
    return out["train"]["text"][0]


def test_the_node_trains_mmf_alternate_and_the_loss_log_says_s_l_s_l(workdir, alternate_file):
    log = training_log(workdir, "mmf_alt")
    assert [e["condition"] for e in log] == ["skeleton", "landmark", "skeleton", "landmark"]
    assert [sorted(k for k in e if k.endswith("_running")) for e in log][1:] == [
        ["loss_landmark_running", "loss_skeleton_running"]] * 3
    assert log[2]["loss_skeleton_running"] == pytest.approx((log[0]["loss"] + log[2]["loss"]) / 2, rel=1e-12)
    meta = file_metadata(workdir, "mmf_alt")
    assert meta["trained_modalities"] == "skeleton,landmark"
    assert meta["training_conditions"] == "alternate: skeleton, landmark, ..."
    assert meta["training_data"] == "MagicID dataset 'mid': 6 samples at 64px, random crop"
    assert "modalities skeleton,landmark (alternate: skeleton, landmark, ...)" in alternate_file
    assert "MagicID dataset 'mid': 6 samples" in alternate_file


def test_node_and_command_line_are_one_training_with_random_mmf_and_clone_face_tuning(comfy, workdir):
    """The node (executor, inference tensors, in-process data) and the command line (ComfyUI's loaders headless, two
    DataLoader worker processes) with a random schedule, Clone Face Tuning and the face-weighted loss: the same
    weights bit for bit and the same loss log (modalities and running losses included)."""
    from magic_portrait import train_cli

    mmf_options = {"modality_schedule": "random", "modality_weights": "skeleton=1, landmark=1, merged=1",
                   "clone_face_probability": 0.5, "face_loss_weight": 2.0}
    comfy.run_prompt(train_prompt("cft_node", 3, **mmf_options))
    args = ["--checkpoint", CKPT, "--models-dir", str(workdir / "models"), "--dataset", str(workdir / "input" / "mid"),
            "--name", "cft_cli", "--prompt", PROMPT, "--no-resume", "--num-workers", "2", "--steps", "3",
            "--condition-type", "magicid",
            *[a for k, v in {**OPTIONS, **mmf_options}.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    out, err = io.StringIO(), io.StringIO()
    assert train_cli.main(args, out=out, err=err) == 0, out.getvalue() + err.getvalue()
    assert "Clone Face Tuning p=0.5; face-weighted loss x3" in out.getvalue()
    folder = workdir / "models" / "magic_repcontrolnet"
    node, line = (load_file(str(folder / f"{n}.safetensors")) for n in ("cft_node", "cft_cli"))
    assert sorted(node) == sorted(line)
    different = [k for k in node if not torch.equal(node[k], line[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert training_log(workdir, "cft_node") == training_log(workdir, "cft_cli")
    assert file_metadata(workdir, "cft_cli")["trained_modalities"] == "skeleton,landmark,merged"
    err = io.StringIO()
    assert train_cli.main([*args[:args.index("--name") + 1], "bad_cli", "--modality-schedule", "random",
                           "--modality-weights", "skeleton=-1"], out=io.StringIO(), err=err) == 2
    assert "--modality-weights: the weight of 'skeleton' must be a number >= 0" in err.getvalue()
    err = io.StringIO()  # the flag the node's input names (the error says which option, not the text)
    assert train_cli.main([*args[:args.index("--name") + 1], "bad_cli", "--modality-schedule", "random",
                           "--modality-weights", "pose=1"], out=io.StringIO(), err=err) == 2
    assert "--modality-weights: unknown modality 'pose'" in err.getvalue()
    with pytest.raises(WorkflowError, match=rf"{TRAIN}.*input 'modality_weights'.*unknown modality 'pose'"):
        comfy.run_prompt(train_prompt("bad", 1, modality_schedule="random", modality_weights="pose=1"))
    with pytest.raises(WorkflowError, match=rf"{TRAIN}.*input 'clone_face_probability'.*needs a MagicID dataset"):
        comfy.run_prompt(train_prompt("bad", 1, dataset_folder="pairs_only", clone_face_probability=0.5))


def apply_prompt(file: str, image: str, modality: str, policy: str = "error", strength: float = 1.0) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "load": {"class_type": LOAD, "inputs": {"repcontrolnet_name": f"{file}.safetensors"}},
        "image": {"class_type": "LoadImage", "inputs": {"image": image}},
        "apply": {"class_type": APPLY, "inputs": {"model": ["ckpt", 0], "repcontrolnet": ["load", 0],
                                                  "image": ["image", 0], "strength": strength, "merge_weights": True,
                                                  "condition_modality": modality, "untrained_modality": policy}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": f"mmf_{image}"}},
    }


def test_the_trained_file_applies_with_each_modality_and_merged(comfy, workdir, alternate_file):
    latents = {}
    for modality in ("skeleton", "landmark", "merged"):
        out = comfy.run_prompt(apply_prompt("mmf_alt", f"duo_{modality}.png", modality))
        text = out["apply"]["text"][0]
        assert text == (f"mmf_alt.safetensors: trained on skeleton, landmark (alternate: skeleton, landmark, ...); "
                        f"condition: {modality}")
        latents[modality] = saved_latent(workdir, out)
    base = saved_latent(workdir, comfy.run_prompt(apply_prompt("mmf_alt", "duo_merged.png", "any", strength=0.0)))
    for modality, latent in latents.items():
        assert torch.isfinite(latent).all()
        assert not torch.equal(latent, base), f"{modality}: the control changes the result"
    assert not torch.equal(latents["skeleton"], latents["landmark"]), "the condition image steers the adapter"


def test_apply_refuses_or_warns_about_an_untrained_modality(comfy, workdir):
    comfy.run_prompt(train_prompt("mmf_landmark", 1))  # single on a MagicID dataset: its landmarks
    assert file_metadata(workdir, "mmf_landmark")["trained_modalities"] == "landmark"
    for modality in ("skeleton", "merged"):
        with pytest.raises(WorkflowError, match=rf"{APPLY}.*input 'condition_modality'.*a {modality} image but "
                           r"mmf_landmark\.safetensors was trained on landmark only"):
            comfy.run_prompt(apply_prompt("mmf_landmark", f"duo_{modality}.png", modality))
    out = comfy.run_prompt(apply_prompt("mmf_landmark", "duo_skeleton.png", "skeleton", policy="warn"))
    assert "WARNING: the condition is a skeleton image but mmf_landmark.safetensors was trained on landmark only" in \
        out["apply"]["text"][0]
    out = comfy.run_prompt(apply_prompt("mmf_landmark", "duo_landmark.png", "landmark"))
    assert out["apply"]["text"][0].endswith("condition: landmark")


def test_mmf_training_through_the_executor_lowers_the_loss_of_both_modalities(comfy, pack, workdir):
    """A tiny SD1.5 overfits the six shipped samples: after MMF alternate through the executor, the epsilon loss of
    each modality on fixed (noise, sigma) draws, with the file's modal weights and adapter merged as Apply merges
    them, is below the base model's (the file's own start: init_weights_from_base)."""
    from helpers import cached_outputs

    mmf, train_data, rcn = pack.magic_core.mmf, pack.magic_core.train_data, pack.magic_core.repcontrolnet
    context_from, make_unet_forward = pack.nodes.repcontrolnet_training.context_from, \
        pack.nodes.repcontrolnet_training.make_unet_forward

    comfy.run_prompt(train_prompt("mmf_falls", 24, modality_schedule="alternate", batch_size=2, learning_rate=3e-3,
                                  magicid_crop="center"))
    model, _, vae = cached_outputs(comfy, "ckpt")
    (positive,) = cached_outputs(comfy, "pos")
    trained = rcn.load_repcontrolnet(workdir / "models" / "magic_repcontrolnet" / "mmf_falls.safetensors")
    source = mmf.MagicIDSource(workdir / "input" / "mid", 64, crop="center")
    with torch.inference_mode(False), torch.enable_grad():
        forward = make_unet_forward(model)
        unet = model.model.diffusion_model.state_dict()
        start = rcn.init_weights_from_base(unet, trained.layers, adapter_config=trained.adapter_config)
        latent_format = model.get_model_object("latent_format")

        def eval_loss(weights, modality):
            batch = train_data.collate([source.load(train_data.SampleRef(i, i, 0, 0, modality, 0))
                                        for i in range(len(source))])
            with torch.no_grad():
                latents = latent_format.process_in(vae.encode(batch["image"].permute(0, 2, 3, 1)).float())
                context = context_from(model, positive, latents.shape[0], tuple(latents.shape[-2:]), "cpu")
                params, adapter = merged_state(weights, unet), weights.build_adapter()
                features = adapter(batch["condition"], latent_hw=tuple(latents.shape[-2:]))
                g, total = torch.Generator().manual_seed(99), 0.0
                for sigma in (0.5, 2.0, 6.0):
                    noise = torch.randn(latents.shape, generator=g)
                    x = latents + sigma * noise
                    d = forward(params, x, torch.full((latents.shape[0],), sigma), context, features)
                    total += float((((x - d) / sigma - noise) ** 2).mean())
            return total

        for modality in ("skeleton", "landmark"):
            before, after = eval_loss(start, modality), eval_loss(trained, modality)
            print(f"{modality}: base {before:.4f}, trained {after:.4f}")
            assert after < 0.9 * before, (modality, before, after)
