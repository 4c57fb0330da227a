"""ComfyUI tier: BDIA inversion in real graphs, through ComfyUI's prompt validation and executor on the tiny SD1.5
checkpoint (CheckpointLoaderSimple, CLIPTextEncode, LoadImage, VAEEncode): the node route (DDIM Invert, Sample
Inverted), the SAMPLER routes inside core SamplerCustom (the inversion SAMPLER with its paired reverse, and the
Inverted Latent Sampler given a bdia record), the one-node MagicStyle Portrait in bdia mode, and the schema's real
minimum of steps enforced by validation."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import comfy_folders
from PIL import Image
from skimage import data as skimage_data
from tolerances import float_tol

CKPT = "tiny_sd15.safetensors"
P = "MagicPortrait_"
STEPS = 6
SIZE = (128, 128)  # 16x16 latent
# process_in, the float64 result rounded to float32, process_out: the model calls repeat the inversion's exactly
ROUND_TRIP_TOL = float_tol(torch.float32, 3)


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("inversion_graphs")
    tiny_checkpoint(root / "models" / "checkpoints" / CKPT)
    with comfy_folders(root):
        Image.fromarray(skimage_data.astronaut()).resize(SIZE).save(root / "input" / "portrait.png")
        Image.fromarray(skimage_data.chelsea()).resize(SIZE).save(root / "input" / "style.png")
        yield root


def _custom(sampler, sigmas, latent_image) -> dict:
    return {"class_type": "SamplerCustom", "inputs": {
        "model": ["ckpt", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["text", 0],
        "negative": ["text", 0], "sampler": sampler, "sigmas": sigmas, "latent_image": latent_image}}


def _save(name: str, samples) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"inversion/{name}"}}


def _graph(steps: int = STEPS) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "load": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
        # node route
        "invert": {"class_type": P + "DDIMInvert", "inputs": {
            "model": ["ckpt", 0], "positive": ["text", 0], "latent": ["encode", 0], "scheduler": "normal",
            "steps": steps, "strength": 1.0, "mode": "bdia", "refine_iterations": 0, "edict_mix": 0.93, "cfg": 1.0,
            "measure_round_trip": True, "bdia_gamma": 1.0}},
        "back": {"class_type": P + "SampleInverted", "inputs": {
            "model": ["ckpt", 0], "inversion": ["invert", 1], "cfg": 1.0, "measure_error": True}},
        # SAMPLER pair route
        "sched": {"class_type": "BasicScheduler", "inputs": {
            "model": ["ckpt", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}},
        "pair": {"class_type": P + "InversionSampler", "inputs": {
            "mode": "bdia", "refine_iterations": 0, "bdia_gamma": 1.0}},
        "pair_invert": _custom(["pair", 0], ["sched", 0], ["encode", 0]),
        "pair_back": _custom(["pair", 1], ["sched", 0], ["pair_invert", 0]),
        # the record's SAMPLER route
        "record_sampler": {"class_type": P + "InvertedSampler", "inputs": {"inversion": ["invert", 1]}},
        "record_back": _custom(["record_sampler", 0], ["invert", 2], ["invert", 0]),
        "save_source": _save("source", ["encode", 0]),
        "save_back": _save("back", ["back", 0]),
        "save_pair": _save("pair", ["pair_back", 0]),
        "save_record": _save("record", ["record_back", 0]),
    }


def _latent(comfy, node_id: str) -> torch.Tensor:
    """The LATENT a node output, as the executor cached it."""
    return comfy.executor.caches.outputs.get(node_id).outputs[0][0]["samples"]


def _error(text: str, label: str) -> float:
    return float(re.search(label + r" \(relative RMS\) ([0-9.e+-]+)", text).group(1))


def test_bdia_round_trips_are_exact_through_the_executor(comfy, workdir, pack):
    inv = pack.magic_core.inversion
    outputs = comfy.run_prompt(_graph())
    source = _latent(comfy, "encode")
    invert_text = outputs["invert"]["text"][0]
    assert f"{STEPS - 1} steps, {STEPS - 1} model calls" in invert_text, invert_text
    assert _error(invert_text, "round-trip error") <= ROUND_TRIP_TOL
    assert _error(outputs["back"]["text"][0], "source") <= ROUND_TRIP_TOL
    for node_id in ("back", "pair_back", "record_back"):
        assert inv.relative_error(_latent(comfy, node_id), source) <= ROUND_TRIP_TOL, node_id
    # the inversion SAMPLER in SamplerCustom inverts exactly as the node does
    assert torch.equal(_latent(comfy, "pair_invert"), _latent(comfy, "invert"))


@pytest.mark.parametrize(("change", "message"), [
    ({"steps": 1}, r"smaller than min of 2: steps"),
    ({"strength": 0.0}, r"smaller than min of 0\.01: strength"),
    ({"strength": 1.5}, r"bigger than max of 1\.0: strength"),
    ({"mode": "bdia", "bdia_gamma": 0.2}, r"smaller than min of 0\.5: bdia_gamma"),
])
def test_values_outside_the_schema_are_refused_by_validation(comfy, workdir, change, message):
    """The schema's bounds are the only check of these inputs (DDIM Invert does not repeat them): ComfyUI's own
    validation refuses the prompt, naming the node and the input."""
    from magic_portrait.comfy_env import WorkflowError

    node_route = {k: v for k, v in _graph().items()
                  if k in ("ckpt", "text", "load", "encode", "invert", "back", "save_back")}
    node_route["invert"]["inputs"].update(change)
    with pytest.raises(WorkflowError, match=r"(?s)invert.*" + message):
        comfy.run_prompt(node_route)


def test_one_node_magicstyle_accepts_bdia(comfy, workdir, nodes):
    schema = nodes[P + "MagicStylePortrait"].define_schema()
    mode = next(i for i in schema.inputs if i.id == "inversion_mode")
    assert "bdia" in mode.options
    inputs = {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}
    inputs.update({"model": ["ckpt", 0], "vae": ["ckpt", 2], "content_image": ["content", 0],
                   "style_image": ["style", 0], "positive": ["text", 0], "steps": 3, "inversion_mode": "bdia",
                   "store_budget_mb": 256.0})
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "content": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "style": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
        "portrait": {"class_type": P + "MagicStylePortrait", "inputs": inputs},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["portrait", 0], "filename_prefix": "bdia_style"}},
    }
    outputs = comfy.run_prompt(prompt)
    assert outputs["save"]["images"], outputs
    image = comfy.executor.caches.outputs.get("portrait").outputs[0][0]
    assert image.shape == (1, *SIZE, 3) and torch.isfinite(image).all()
