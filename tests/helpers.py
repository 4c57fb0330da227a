"""Shared helpers for the ComfyUI tier: run V3 nodes directly the way the executor would, snapshot models."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch


@contextlib.contextmanager
def comfy_folders(root: Path):
    """ComfyUI booted on `root`/models, `root`/input (created) and `root`/output for a module's graphs; ComfyUI's
    previous input and output folders come back afterwards, since every module shares one booted ComfyUI."""
    import folder_paths

    from magic_portrait import comfy_env

    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    runtime = comfy_env.boot(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output")
    # The executor keeps node instances between prompts, and SaveImage/SaveLatent read the output folder when they
    # are made: a fresh executor, so no save node of another module's prompt writes into that module's folder.
    runtime.executor = None
    (root / "input").mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        folder_paths.set_input_directory(old_in)
        folder_paths.set_output_directory(old_out)
        runtime.executor = None


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


def cached_outputs(comfy, node_id: str) -> list:
    """A node's outputs (one value per output slot) as the executor cached them after the last prompt: the objects
    themselves (float tensors, MODELs, records), not what a save node wrote."""
    entry = comfy.executor.caches.outputs.get(node_id)
    assert entry is not None, f"node {node_id} has no cached output (was it in the prompt, and did it run?)"
    return [value[0] if len(value) == 1 else value for value in entry.outputs]


@contextlib.contextmanager
def registered_node(node_id: str, cls):
    """A test-only node class in ComfyUI's registry while the block runs, so prompts can use it (validation and
    executor treat it like any installed node); removed afterwards."""
    import nodes

    assert node_id not in nodes.NODE_CLASS_MAPPINGS, node_id
    nodes.NODE_CLASS_MAPPINGS[node_id] = cls
    nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] = node_id
    try:
        yield cls
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(node_id, None)


# ------------------------------------------------------------------------------- one node through the executor
_OBJECTS: dict[str, object] = {}  # objects handed to a prompt by key (read once by the object node)
_OBJECT_NODE = "MagicPortraitTest_Object_"  # + the IO type it outputs
SINK_NODE = "MagicPortraitTest_Sink"
WIDGET_VALUE_TYPES = (bool, int, float, str)
_counter = iter(range(10**9))


def _object_node(io_type: str):
    class ObjectNode:
        """Test-only: outputs a Python object this process handed to the prompt (a MODEL, CONDITIONING, store ...)."""

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
            return {"required": {"key": ("STRING", {"default": ""})}}

        RETURN_TYPES = (io_type,)
        FUNCTION = "get"
        CATEGORY = "testing"

        def get(self, key):
            return (_OBJECTS.pop(key),)

    return ObjectNode


def object_node(value, io_type: str) -> dict:
    """A prompt entry for a test-only node that outputs `value` (of ComfyUI type `io_type`, e.g. "MODEL"): for graphs
    that start from an object built in the test (the in-memory tiny models) instead of a loader node."""
    import nodes

    source = _OBJECT_NODE + io_type
    if source not in nodes.NODE_CLASS_MAPPINGS:
        nodes.NODE_CLASS_MAPPINGS[source] = _object_node(io_type)
    key = f"object_{next(_counter)}"
    _OBJECTS[key] = value
    return {"class_type": source, "inputs": {"key": key}}


class _Sink:
    """Test-only output node: takes any outputs, so the node under test runs and its outputs stay in the cache."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {}, "optional": {f"value_{i}": ("*",) for i in range(16)}}

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def take(self, **values):
        return {}


@dataclass
class GraphRun:
    """What run_in_graph gives back: the node's outputs (from the executor's cache) and its UI outputs."""

    result: tuple
    ui: dict  # {"text": [...], ...} as the executor reports it


def run_in_graph(node, **inputs) -> GraphRun:
    """Run one node (ours or core; a node id or its class) as a server runs a prompt: ComfyUI's prompt validation
    (types, min/max, combo options) and executor (caching, inference mode, V3 execution, UI outputs). Widget values
    go into the prompt as they are; every other input (a MODEL, a CONDITIONING, a store, a tensor) comes from a
    test-only node that outputs the given object; None inputs are left out. The outputs are the objects the node
    returned (read from the executor's cache). Raises comfy_env.WorkflowError as the run would fail."""
    import nodes
    from magic_portrait import comfy_env

    comfy = comfy_env.boot()  # the ComfyUI this process booted (idempotent)
    if isinstance(node, str):
        node_type = node
    elif hasattr(node, "define_schema"):  # V3: its node id (a module imported twice still has the same id)
        node_type = node.define_schema().node_id
    else:
        node_type = next(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                         if v is node or (v.__name__ == node.__name__ and v.__module__ == node.__module__))
    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    declared = {name: spec for section in ("required", "optional")
                for name, spec in (cls.INPUT_TYPES().get(section) or {}).items()}
    prompt, keys = {}, []
    node_inputs = {}
    for name, value in inputs.items():
        if value is None:
            continue
        if name not in declared:
            raise KeyError(f"{node_type} has no input {name!r}")
        io_type = declared[name][0]
        if isinstance(value, WIDGET_VALUE_TYPES) and (isinstance(io_type, list) or io_type in (
                "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
            node_inputs[name] = value
            continue
        prompt[f"in_{name}"] = object_node(value, str(io_type))
        keys.append(prompt[f"in_{name}"]["inputs"]["key"])
        node_inputs[name] = [f"in_{name}", 0]
    nodes.NODE_CLASS_MAPPINGS.setdefault(SINK_NODE, _Sink)
    prompt["node"] = {"class_type": node_type, "inputs": node_inputs}
    outputs = len(cls.RETURN_TYPES)
    prompt["sink"] = {"class_type": SINK_NODE, "inputs": {f"value_{i}": ["node", i] for i in range(outputs)}}
    if not outputs:
        del prompt["sink"]
    try:
        ui = comfy.run_prompt(prompt).get("node", {})
    finally:
        for key in keys:
            _OBJECTS.pop(key, None)
    return GraphRun(tuple(cached_outputs(comfy, "node")) if outputs else (), ui)


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
            "combine": "average", "image_crop": "auto", "face_margin": 0.2, "shortcut_scale": 1.0}},
    }


def add_identity_inputs(embeds: str, label: str, box=(0.0, 0.0, 1.0, 1.0), previous: str | None = None) -> dict:
    """Add Identity's inputs for `embeds` in a box (fractions of the picture), appended to `previous`'s list."""
    inputs = {"id_embeds": [embeds, 0], "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mask_index": 0,
              "box_left": box[0], "box_top": box[1], "box_right": box[2], "box_bottom": box[3], "label": label}
    if previous:
        inputs["identities"] = [previous, 0]
    return inputs
