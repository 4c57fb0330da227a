"""ComfyUI tier: Multi-ID Attention's region locality end to end, through ComfyUI's prompt validation and executor.

A prompt loads the tiny SD1.5 checkpoint, a FaceID IP-Adapter in SD1.5's key layout and the astronaut's identity
(insightface's code on a tiny stand-in pack), puts that identity in the left half of the picture with Add Identity
and Multi-ID Attention, and samples one KSampler step. A test-only node after it (registered in ComfyUI's node list
for this module) records what the first cross-attention layer (input block 1) outputs on its first call; the same
prompt without the identity records the plain layer. Both layers get the same input on that call, so the right
half's tokens must be bit-identical and the left half's must change."""

from __future__ import annotations

import numpy as np
import pytest
import tolerances as tol
import torch
from helpers import (
    MAGICID_CKPT,
    P,
    add_identity_inputs,
    comfy_folders,
    detect_nodes,
    faceid_embeds_nodes,
    registered_node,
    write_magicid_models,
)
from PIL import Image
from skimage import data as skimage_data

RECORDER = "MagicPortraitTest_RecordFirstAttn2"
FIRST_LAYER = ("input", 1, 0)  # block, number, transformer index
LATENT_SIDE = 16  # 128 px: the first layer's token grid is 16 x 16
RECORDED: dict[str, torch.Tensor] = {}


class _FirstCallRecorder:
    """attn2_output_patch: keeps the first output of FIRST_LAYER under `label` (later calls pass through)."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, n, extra_options):
        key = (extra_options["block"][0], extra_options["block"][1], extra_options["block_index"])
        if key == FIRST_LAYER and self.label not in RECORDED:
            RECORDED[self.label] = n.detach().float().cpu().clone()
        return n

    def __deepcopy__(self, memo):
        return self


class RecordFirstAttn2:
    """Test-only node: MODEL -> a clone whose first cross-attention layer's first output is recorded."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "run"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, label):
        clone = model.clone()
        clone.set_model_attn2_output_patch(_FirstCallRecorder(label))
        return (clone,)


@pytest.fixture(scope="module")
def workdir(comfy, tmp_path_factory, tiny_checkpoint, tiny_controlnet_file):
    root = tmp_path_factory.mktemp("mgmica_graphs")
    write_magicid_models(root / "models", tiny_checkpoint, tiny_controlnet_file, seed=13)
    with comfy_folders(root), registered_node(RECORDER, RecordFirstAttn2):
        Image.fromarray(skimage_data.astronaut()).save(root / "input" / "astronaut.png")
        yield root


def _graph(label: str, identity_box=None) -> dict:
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": MAGICID_CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "two people"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 8 * LATENT_SIDE, "height": 8 * LATENT_SIDE,
                                                               "batch_size": 1}},
    }
    model = ["ckpt", 0]
    if identity_box is not None:
        prompt["ref"] = {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}}
        prompt |= detect_nodes("analysis", "ref_faces", "ref")
        prompt |= faceid_embeds_nodes("embeds", "ref", "ref_faces")
        prompt["identity"] = {"class_type": P + "AddIdentity",
                              "inputs": add_identity_inputs("embeds", "astronaut", box=identity_box)}
        prompt["mgmica"] = {"class_type": P + "MultiIDAttention", "inputs": {
            "model": model, "identities": ["identity", 0], "weight": 1.0, "overlap": "exclusive",
            "uncond": "negative tokens", "layer_weights": "all = 1"}}
        model = ["mgmica", 0]
    prompt["record"] = {"class_type": RECORDER, "inputs": {"model": model, "label": label}}
    prompt["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["record", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["empty", 0],
        "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": label}}
    return prompt


def test_one_identity_in_the_left_half_leaves_the_right_half_of_the_first_layer_unchanged(comfy, workdir):
    RECORDED.clear()
    comfy.run_prompt(_graph("plain"))
    comfy.run_prompt(_graph("identity", identity_box=(0.0, 0.0, 0.5, 1.0)))
    plain, ours = RECORDED["plain"], RECORDED["identity"]
    assert plain.shape == ours.shape == (1, LATENT_SIDE * LATENT_SIDE, plain.shape[-1])
    grid = np.arange(LATENT_SIDE * LATENT_SIDE).reshape(LATENT_SIDE, LATENT_SIDE)  # tokens row-major over the grid
    left = torch.from_numpy(grid[:, : LATENT_SIDE // 2].reshape(-1))
    right = torch.from_numpy(grid[:, LATENT_SIDE // 2:].reshape(-1))
    assert torch.equal(ours[:, right], plain[:, right]), "the identity reached the right half"
    assert tol.differs(ours[:, left], plain[:, left]), "the identity did nothing in its own half"
    changed = (ours[0, left] - plain[0, left]).abs().amax(-1) > tol.effect_floor(plain)
    assert changed.float().mean() > 0.9  # every token of the box gets the identity term
