"""Shared helpers for the ComfyUI tier: run V3 nodes directly the way the executor would, snapshot models."""

from __future__ import annotations

import copy

import torch


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
