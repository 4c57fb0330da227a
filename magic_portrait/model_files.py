"""Model files a workflow names: the folder each belongs to, the ones ComfyUI cannot see, and tiny random
stand-ins written for them (`--make-tiny-checkpoint`), so a workflow can be smoke-tested without real weights.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from .input_staging import contained_path
from .run_errors import UsageError
from .workflow import UPLOAD_FLAGS, declared_inputs

TINY_NOTE = (
    "NOTE: tiny random checkpoint: its outputs are noise. It exists to smoke-test workflows; real use needs a real "
    "SD1.5 checkpoint."
)

# Core loaders whose option list may include more than the folder's files (VAELoader adds taesd, ...).
KNOWN_MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("MagicPortrait_LoadRepControlNet", "repcontrolnet_name"): "magic_repcontrolnet",
    ("MagicPortrait_LoadIPAdapter", "ipadapter_file"): "ipadapter",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("unCLIPCheckpointLoader", "ckpt_name"): "checkpoints",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("DiffControlNetLoader", "control_net_name"): "controlnet",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("StyleModelLoader", "style_model_name"): "style_models",
    ("GLIGENLoader", "gligen_name"): "gligen",
    ("HypernetworkLoader", "hypernetwork_name"): "hypernetworks",
    ("PhotoMakerLoader", "photomaker_model_name"): "photomaker",
}
# Fallback by input name when the option list does not identify the folder (e.g. both are empty).
MODEL_INPUT_NAMES = {
    "ckpt_name": "checkpoints",
    "control_net_name": "controlnet",
    "vae_name": "vae",
    "lora_name": "loras",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "upscale_model_name": "upscale_models",
    "ipadapter_file": "ipadapter",
}


def model_folder_for(class_type: str, input_name: str, choices: list, folder_lists: dict[str, list]) -> str | None:
    """The folder_paths folder a loader's COMBO lists (None if it is not a model list)."""
    known = KNOWN_MODEL_INPUTS.get((class_type, input_name))
    if known and known in folder_lists:
        return known
    choice_set = set(choices)
    equal = [name for name, files in folder_lists.items() if files and set(files) == choice_set]
    if equal:
        return equal[0]
    overlap = [(len(set(files)), name) for name, files in folder_lists.items() if files and set(files) <= choice_set]
    if overlap:
        return max(overlap)[1]
    hinted = MODEL_INPUT_NAMES.get(input_name)
    if hinted and hinted in folder_lists:
        return hinted
    # Last resort for loaders of other packs: 'repcontrolnet_name' -> 'magic_repcontrolnet', 'ipadapter_file' -> ...
    if "load" not in class_type.lower() or not all("." in str(c) for c in choices):
        return None
    stem = input_name.lower()
    for tail in ("_name", "_file", "_model", "_path"):
        stem = stem.removesuffix(tail)
    if stem in folder_lists:
        return stem
    containing = sorted((name for name in folder_lists if len(stem) >= 4 and stem in name), key=len)
    return containing[0] if containing else None


def _model_folder_lists() -> dict[str, list]:
    """Every model folder type's file list (what model_folder_for matches option lists against)."""
    import folder_paths

    lists = {}
    for name in folder_paths.folder_names_and_paths:
        if name not in ("custom_nodes", "configs"):
            try:
                lists[name] = list(folder_paths.get_filename_list(name))
            except Exception:  # a broken extra path must not hide the real problem
                lists[name] = []
    return lists


def find_missing_files(prompt: dict, node_classes: dict, input_dirs: list | None = None) -> list[dict]:
    """Model files (COMBO inputs listing a model folder) and input files (upload COMBOs) the prompt names that
    ComfyUI cannot see: that is how its validation fails for them, with a less helpful message.
    `input_dirs`: the folders to name for a missing input file (default: ComfyUI's input folder)."""
    import folder_paths

    input_dirs = [str(d) for d in input_dirs] if input_dirs else [folder_paths.get_input_directory()]
    folder_lists: dict[str, list] = {}
    missing = []
    for node_id, node in prompt.items():
        for name, spec in declared_inputs(node["class_type"], node_classes).items():
            value = node["inputs"].get(name)
            if spec.type != "COMBO" or not isinstance(value, str) or value in (spec.choices or []):
                continue
            entry = {"node": node_id, "class_type": node["class_type"], "input": name, "value": value}
            if any(spec.options.get(flag) for flag in UPLOAD_FLAGS):
                # LoadImage & co accept any existing file ("sub/x.png", "x.png [output]"), not only listed ones.
                if not folder_paths.exists_annotated_filepath(value):
                    missing.append({**entry, "kind": "input", "dirs": input_dirs})
                continue
            folder_lists = folder_lists or _model_folder_lists()
            folder = model_folder_for(node["class_type"], name, spec.choices or [], folder_lists)
            if folder is not None:
                missing.append({**entry, "kind": "model", "folder": folder,
                                "dirs": folder_paths.get_folder_paths(folder)})
    return missing


def format_missing(missing: list[dict]) -> str:
    lines = []
    for m in missing:
        dirs = ", ".join(d + ("" if os.path.isdir(d) else " (does not exist)") for d in m["dirs"])
        what = "model file" if m["kind"] == "model" else "input file"
        lines.append(f"missing {what} '{m['value']}' for node {m['node']} ({m['class_type']}) input '{m['input']}'; "
                     f"looked in: {dirs}")
    if any(m["kind"] == "model" for m in missing):
        lines.append("hint: put the file in one of those folders, or pass --models-dir DIR (a ComfyUI-style models "
                     "folder: checkpoints/, controlnet/, loras/, vae/, ipadapter/, insightface/, ...)")
    if any(m["kind"] == "model" and m["folder"] == "checkpoints" for m in missing):
        lines.append("hint: to smoke-test the workflow without real weights, add --make-tiny-checkpoint (writes a tiny "
                     "random SD1.5 checkpoint under the requested name; its outputs are noise)")
    if any(m["kind"] == "input" for m in missing):
        lines.append("hint: pass the file's path, e.g. --set NODE.image=/path/to/photo.png, or --input-dir DIR")
    return "\n".join(lines)


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def make_tiny_checkpoint(path, seed: int = 0, log=None) -> Path:
    """Write a tiny random SD1.5 checkpoint to `path` (a folder gets tiny_sd15.safetensors). A .ckpt/.pt/.pth/.bin
    name gets a torch file {"state_dict": ...}, which is how ComfyUI reads those."""
    from .tiny import write_tiny_sd15_checkpoint

    raw = str(path)
    path = Path(path)
    if path.is_dir() or raw.endswith(("/", os.sep)) or not path.suffix:  # a folder
        path = path / "tiny_sd15.safetensors"
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".sft", *TORCH_SUFFIXES):
        raise UsageError(f"tiny checkpoint name must end in .safetensors (or .ckpt/.pt/.pth/.bin): {path.name}")
    started = time.time()
    _write_as(path, lambda p: write_tiny_sd15_checkpoint(p, seed=seed), container="state_dict")
    written = path
    if log is not None:
        size = written.stat().st_size / 2**20
        print(f"wrote tiny SD1.5 checkpoint {written} ({size:.0f} MiB, {time.time() - started:.1f} s)", file=log)
        print(TINY_NOTE, file=log)
    return written


def tiny_checkpoints_in(prompt: dict) -> list[str]:
    """Checkpoints the prompt loads that are tiny random ones (their safetensors metadata says so)."""
    import folder_paths

    found = []
    for node in prompt.values():
        for (class_type, name), folder in KNOWN_MODEL_INPUTS.items():
            value = node["inputs"].get(name)
            if node["class_type"] != class_type or folder != "checkpoints" or not isinstance(value, str):
                continue
            path = folder_paths.get_full_path(folder, value)
            if path and path.lower().endswith((".safetensors", ".sft")):
                with contextlib.suppress(Exception):
                    from safetensors import safe_open

                    with safe_open(path, framework="pt") as handle:
                        if "magic_portrait.tiny" in (handle.metadata() or {}):
                            found.append(value)
    return found


def write_tiny_models(models_dir, models: list[dict], *, checkpoint_name: str = "", insightface_packs=(),
                      runtime=None, log=None) -> list[Path]:
    """Write tiny checkpoints into `models_dir`/checkpoints, then stand-ins made for the first of them (all noise)
    for the other model files in `models` (entries as find_missing_files describes them): RepControlNet files,
    ControlNets, CLIP vision models, IP-Adapters, and the insightface packs named. Files already there are kept.

    `checkpoint_name`: the one checkpoint to write ("" = every checkpoint in `models`). Every target is checked to
    stay inside its folder before anything is written (UnsafePathError). Returns the paths written."""
    models_dir = Path(models_dir)
    models = [m for m in models if m.get("kind", "model") == "model"]
    names = [checkpoint_name] if checkpoint_name else sorted({m["value"] for m in models
                                                              if m["folder"] == "checkpoints"})
    if not names:
        print("--make-tiny-checkpoint: the workflow names no missing checkpoint; nothing written", file=log)
        return []

    def where(m: dict | None, kind: str = "model file") -> str:
        return kind if m is None else f"{kind} for node {m['node']} ({m['class_type']}) input '{m['input']}'"

    named_checkpoints = {m["value"]: m for m in models if m["folder"] == "checkpoints"}
    checkpoints = [contained_path(models_dir / "checkpoints", name, where(named_checkpoints.get(name), "checkpoint"))
                   for name in names]
    unique = {(m["folder"], m["value"]): m for m in models if m["folder"] != "checkpoints"}
    stand_ins = [] if runtime is None else [
        (folder, contained_path(models_dir / folder, name, where(m))) for (folder, name), m in sorted(unique.items())
    ]
    packs = [] if runtime is None else [
        contained_path(models_dir / "insightface" / "models", pack, "insightface pack")
        for pack in sorted(set(insightface_packs))
    ]
    written = []
    for target in checkpoints:
        if target.exists():
            print(f"tiny checkpoint: {target} already exists, reused", file=log)
            print(TINY_NOTE, file=log)
            continue
        written.append(make_tiny_checkpoint(target, seed=0, log=log))
    for folder, target in stand_ins:
        if target.exists():
            continue
        made = write_tiny_stand_in(folder, target, checkpoints[0], runtime)
        if made:
            written.append(target)
            print(f"wrote tiny {made} {target} for {names[0]} (noise, for smoke runs)", file=log)
    for target in packs:
        if target.exists():
            continue
        from .tiny_insightface import write_tiny_insightface_pack

        write_tiny_insightface_pack(target, layout="buffalo_l" if target.name == "buffalo_l" else "antelopev2")
        written.append(target)
        print(f"wrote tiny insightface stand-in pack {target} (noise, for smoke runs)", file=log)
    return written


# What a tiny IP-Adapter is made for: the tiny SD1.5 checkpoint (16 cross-attention layers of width 320) and the
# CLIP vision stand-in (ViT-L layout: hidden size 1024, image_embeds 768).
TINY_CLIP_HIDDEN, TINY_CLIP_EMBEDS = 1024, 768


def ipadapter_variant_for_name(name: str) -> str:
    """The IP-Adapter variant a file name announces (how the public files are named)."""
    low = name.lower().replace("_", "-")
    for marker, variant in (("faceid-plusv2", "faceid-plusv2"), ("faceid-plus", "faceid-plus"),
                            ("faceid-portrait", "faceid-portrait"), ("faceid", "faceid"), ("plus-face", "plus-face"),
                            ("full-face", "full-face"), ("plus", "plus")):
        if marker in low:
            return variant
    return "base"


def write_tiny_stand_in(folder: str, target: Path, checkpoint: Path, runtime) -> str | None:
    """One tiny model file of `folder`'s kind at `target`; returns what it is, or None for kinds it cannot make."""
    from . import tiny
    from .tiny_ipadapter import write_tiny_ipadapter

    if folder == "magic_repcontrolnet":
        tiny.write_tiny_repcontrolnet(target, str(checkpoint), seed=0)
        return "RepControlNet"
    if folder == "controlnet":
        _write_as(target, lambda p: tiny.write_tiny_sd15_controlnet(p, seed=0))
        return "SD1.5 ControlNet"
    if folder == "clip_vision":
        _write_as(target, lambda p: tiny.write_clip_vision_vitl(p, seed=0))
        return "CLIP vision (ViT-L layout, 580 MiB: the smallest ComfyUI's CLIPVisionLoader recognises)"
    if folder == "ipadapter":
        variant = ipadapter_variant_for_name(target.name)
        write_tiny_ipadapter(target, variant=variant, family="sd15", layer_inner_dims=[320] * 16,
                             clip_hidden_dim=TINY_CLIP_HIDDEN, clip_embed_dim=TINY_CLIP_EMBEDS, seed=0,
                             fmt="safetensors" if target.suffix.lower() == ".safetensors" else "bin")
        return f"IP-Adapter ({variant})"
    return None


def _write_as(target: Path, write, container: str | None = None) -> None:
    """Write a safetensors file at `target`, or for a .pth/.pt/.ckpt/.bin name a torch file of the same tensors
    (a plain state dict, or {container: state dict}, which is how ComfyUI reads checkpoints in that form)."""
    if target.suffix.lower() not in TORCH_SUFFIXES:
        write(target)
        return
    import torch
    from safetensors.torch import load_file

    staging = target.with_name(target.name + ".safetensors.tmp")
    try:
        write(staging)
        state = load_file(str(staging))
        torch.save(state if container is None else {container: state}, str(target))
    finally:
        staging.unlink(missing_ok=True)


def named_insightface_packs(prompt: dict, runtime) -> list[str]:
    """The insightface packs the prompt's Face Analysis Loaders use (backend insightface)."""
    faces = runtime.pack.nodes.faces
    packs = []
    for node in prompt.values():
        inputs = node.get("inputs", {})
        if node.get("class_type") == "MagicPortrait_FaceAnalysisLoader" and inputs.get("backend") == faces.INSIGHTFACE:
            pack = inputs.get("insightface_pack")
            if isinstance(pack, str):
                packs.append(pack)
    return sorted(set(packs))


def missing_insightface_packs(prompt: dict, runtime) -> list[str]:
    """The packs of named_insightface_packs that no insightface root holds yet."""
    roots = runtime.pack.nodes.faces.insightface_roots()
    return [pack for pack in named_insightface_packs(prompt, runtime)
            if not any((root / "models" / pack).exists() for root in roots)]
