"""Shared helpers for the ComfyUI tier: run V3 nodes directly the way the executor would, snapshot models."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch


@contextlib.contextmanager
def comfy_folders(root: Path):
    """ComfyUI booted on `root`/models, `root`/input (created) and `root`/output for a module's graphs; ComfyUI's
    previous input and output folders come back afterwards, since every module shares one booted ComfyUI."""
    import folder_paths

    from magic_portrait import comfy_env

    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    comfy_env.boot(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output")
    (root / "input").mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        folder_paths.set_input_directory(old_in)
        folder_paths.set_output_directory(old_out)


def text_to_image_nodes(ckpt: str, positive: str, width: int, height: int, *, bust_cache: bool = False):
    """API-prompt nodes "ckpt", "pos", "neg" ("blurry"), "empty" for a text-to-image graph, and the latent to sample.
    bust_cache sends the latent through LatentMultiply x1, so a KSampler runs again on a MODEL the executor cached."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": positive}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
    }
    if not bust_cache:
        return prompt, ["empty", 0]
    prompt["same"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["empty", 0], "multiplier": 1.0}}
    return prompt, ["same", 0]


def saved_latent(workdir: Path, outputs: dict, node: str = "save") -> torch.Tensor:
    """The latent a SaveLatent node `node` wrote into `workdir`/output, from the prompt's executor outputs."""
    import safetensors.torch

    info = outputs[node]["latents"][0]
    return safetensors.torch.load_file(str(workdir / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


def node_classes(pack) -> dict:
    return {cls.define_schema().node_id: cls for cls in pack.nodes.NODE_LIST}


class _V1Output:
    def __init__(self, result):
        self.result = result


def run_node(cls, **inputs):
    """Execute a node class (V3 or V1, ours or core) under inference mode, as the executor does; returns an object
    whose `.result` is the output tuple (a V3 NodeOutput as is)."""
    with torch.inference_mode():
        if not hasattr(cls, "define_schema"):  # V1 node
            return _V1Output(getattr(cls(), cls.FUNCTION)(**inputs))
        return cls.execute(**inputs)


def latent(seed=0, batch=1, height=16, width=16, channels=4, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, channels, height, width, generator=g) * scale}


def model_snapshot(model) -> dict:
    """Everything about a ModelPatcher that patching a clone must leave alone."""
    return {
        "model_options": repr(copy.copy(model.model_options)),
        "transformer_options": repr(model.model_options.get("transformer_options", {})),
        "patches": {k: len(v) for k, v in model.patches.items()},
        "object_patches": sorted(model.object_patches),
        "weights": {k: v.detach().clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:4]},
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    for key in ("model_options", "transformer_options", "patches", "object_patches"):
        assert before[key] == after[key], key
    for name, tensor in before["weights"].items():
        assert torch.equal(tensor, after["weights"][name]), name


# --------------------------------------------------------------------------------------- MagicID graphs (shared)
P = "MagicPortrait_"
MAGICID_CKPT = "tiny_sd15.safetensors"
MAGICID_CONTROLNET = "tiny_openpose_sd15.safetensors"
MAGICID_FACEID = "tiny-faceid_sd15.safetensors"


def write_magicid_models(models, tiny_checkpoint, tiny_controlnet_file, seed: int) -> None:
    """What MagicID graphs load, under `models`: the tiny checkpoint, a ControlNet for it, a FaceID IP-Adapter in
    SD1.5's key layout for it (16 layers of width 320) and an insightface stand-in pack (antelopev2)."""
    from magic_portrait.tiny_insightface import write_tiny_insightface_pack
    from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

    tiny_checkpoint(models / "checkpoints" / MAGICID_CKPT)
    tiny_controlnet_file(models / "controlnet" / MAGICID_CONTROLNET)
    write_tiny_ipadapter(models / "ipadapter" / MAGICID_FACEID, variant="faceid", family="sd15",
                         layer_inner_dims=[320] * 16, seed=seed)
    write_tiny_insightface_pack(models / "insightface" / "models" / "antelopev2", seed=0)


def detect_nodes(analysis: str, detect: str, image_node: str, backend: str = "insightface",
                 if_no_face: str = "error") -> dict:
    """Prompt nodes: a Face Analysis Loader (`analysis`) and Detect Faces (`detect`) on `image_node`'s image."""
    return {
        analysis: {"class_type": P + "FaceAnalysisLoader", "inputs": {
            "backend": backend, "insightface_pack": "antelopev2", "providers": "cpu", "dlib_detector": "hog"}},
        detect: {"class_type": P + "DetectFaces", "inputs": {
            "face_analysis": [analysis, 0], "image": [image_node, 0], "det_size": 640, "score_threshold": 0.5,
            "min_size": 0, "max_faces": 0, "retry_smaller": True, "if_no_face": if_no_face}},
    }


def faceid_embeds_nodes(embeds: str, image_node: str, faces_node: str) -> dict:
    """Prompt nodes: the tiny FaceID IP-Adapter loaded and ID Embeds (`embeds`) of the faces on `image_node`."""
    return {
        "ipadapter": {"class_type": P + "LoadIPAdapter", "inputs": {"ipadapter_file": MAGICID_FACEID,
                                                                      "variant": "auto (from the file)"}},
        embeds: {"class_type": P + "IDEmbeds", "inputs": {
            "ipadapter": ["ipadapter", 0], "images": [image_node, 0], "faces": [faces_node, 0], "face_index": 0,
            "combine": "average", "image_crop": "auto", "face_margin": 0.4, "shortcut_scale": 1.0}},
    }


def add_identity_inputs(embeds: str, label: str, box=(0.0, 0.0, 1.0, 1.0), previous: str | None = None) -> dict:
    """Add Identity's inputs for `embeds` in a box (fractions of the picture), appended to `previous`'s list."""
    inputs = {"id_embeds": [embeds, 0], "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mask_index": 0,
              "box_left": box[0], "box_top": box[1], "box_right": box[2], "box_bottom": box[3], "label": label}
    if previous:
        inputs["identities"] = [previous, 0]
    return inputs
