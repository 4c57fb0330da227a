"""Headless runner: execute a saved ComfyUI workflow in-process through ComfyUI's own validation and executor.

`python -m magic_portrait run WORKFLOW.json` is a thin argparse front (see __main__.py) over `run_workflow()`, which
tests and scripts can call directly. Exit codes: 0 success, 1 workflow error, 2 usage error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from . import comfy_env
from .comfy_env import WorkflowError
from .workflow import (
    UPLOAD_FLAGS,
    InputSpec,
    WorkflowFormatError,
    input_specs,
    is_api_format,
    is_ui_format,
    load_workflow_file,
    ui_to_api,
)

TINY_NOTE = (
    "NOTE: tiny random checkpoint: its outputs are noise. It exists to smoke-test workflows; real use needs a real "
    "SD1.5 checkpoint."
)
SUMMARY_NAME = "run_summary.json"

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


class UsageError(Exception):
    """Bad command-line use (exit code 2)."""


class MissingFileError(WorkflowError):
    """A model or input file the workflow names is not where ComfyUI looks for it."""


class UnsafePathError(WorkflowError):
    """A file name (from a workflow or the command line) that would make the runner write outside its folder."""


def contained_path(folder, name: str, what: str = "file") -> Path:
    """Where to write `name` inside `folder`, refusing any name that leads out of it: an absolute path, a '..'
    part, or a symlink already on disk that points elsewhere. Names come from workflows, which anyone can share,
    so a name must never pick the file that gets written. `folder` itself may be a symlink (models folders often
    are); sub-folders inside it ('SD1.5/model.safetensors') are fine. A file or folder that already exists there is
    returned as is, wherever a symlink takes it: callers reuse what exists and never write over it."""
    text = str(name)
    parts = PurePosixPath(text.replace("\\", "/")).parts  # a backslash separates folders on Windows
    root = Path(folder).resolve()
    reason = None
    if not text.strip() or text.strip() in (".", "/"):
        reason = "it is empty"
    elif PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor:
        reason = "it is an absolute path"
    elif ".." in parts:
        reason = "it contains '..'"
    elif (root / text).exists():
        return root / text
    else:
        target = (root / text).resolve()  # follows every symlink already on disk, dangling ones too
        if target == root or not target.is_relative_to(root):
            reason = f"it resolves to {target} through a symlink"
    if reason is not None:
        raise UnsafePathError(f"refusing to write {what} '{text}': {reason}, outside {root}; a name must stay "
                              f"inside its folder (sub-folders are fine)")
    return target


@dataclass
class RunResult:
    prompt: dict
    outputs: dict  # node id -> UI output dict
    files: list[Path]
    texts: list[dict]
    summary_path: Path | None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ loading


def load_workflow(source) -> tuple[dict, Path | None]:
    """(workflow data, its folder) from a path or an already loaded dict."""
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"workflow file not found: {path}")
    try:
        data = load_workflow_file(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    except WorkflowFormatError as exc:
        raise UsageError(str(exc)) from exc
    if not (is_ui_format(data) or is_api_format(data)):
        raise UsageError(f"{path} is neither a UI-format workflow (nodes/links) nor an API prompt")
    return data, path.resolve().parent


def to_api_prompt(data: dict, node_classes: dict, warnings: list[str]) -> dict:
    if is_api_format(data):
        prompt = json.loads(json.dumps(data))
        unknown = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in node_classes})
        if unknown:
            raise WorkflowFormatError(f"unknown node type(s), is a custom node pack missing?: {', '.join(unknown)}")
        return prompt
    return ui_to_api(data, node_classes, warnings=warnings)


# ------------------------------------------------------------------------------------------------ --set


def parse_set(text: str) -> tuple[str, str]:
    """'NODE.INPUT=VALUE' -> ('NODE.INPUT', 'VALUE'); the NODE/INPUT split is decided against the prompt."""
    target, sep, raw = text.partition("=")
    if not sep or "." not in target.strip(".") or not target.strip():
        raise UsageError(f"--set expects NODE.INPUT=VALUE (NODE: id, title or class type), got {text!r}")
    return target.strip(), raw


def _title(node: dict) -> str:
    return (node.get("_meta") or {}).get("title") or node["class_type"]


def _node_list(prompt: dict) -> str:
    return ", ".join(f"{nid} ({n['class_type']}" + (f" '{_title(n)}'" if _title(n) != n["class_type"] else "") + ")"
                     for nid, n in prompt.items())


def find_node(prompt: dict, ref: str, display_names: dict | None = None) -> str | None:
    """A prompt node id from a node id, title, class type or display name ("Load Checkpoint"); None if nothing
    matches; UsageError if ambiguous."""
    if ref in prompt:
        return ref
    display_names = display_names or {}
    for match in (
        lambda n: _title(n) == ref,
        lambda n: n["class_type"] == ref,
        lambda n: display_names.get(n["class_type"]) == ref,
        lambda n: _title(n).lower() == ref.lower(),
        lambda n: n["class_type"].lower() == ref.lower(),
        lambda n: str(display_names.get(n["class_type"], "")).lower() == ref.lower(),
    ):
        found = [nid for nid, n in prompt.items() if match(n)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(
                f"--set: '{ref}' matches several nodes: "
                + ", ".join(f"{nid} ({prompt[nid]['class_type']} '{_title(prompt[nid])}')" for nid in found)
                + "; use the node id"
            )
    return None


def _declared_inputs(class_type: str, node_classes: dict) -> dict[str, InputSpec]:
    cls = node_classes.get(class_type)
    if cls is None:
        return {}
    try:
        return {spec.name: spec for spec in input_specs(cls)}
    except WorkflowFormatError:
        return {}


def coerce_value(raw: str, spec: InputSpec | None) -> Any:
    """The value of a --set: JSON when it parses (numbers, booleans, null, lists) else the raw string; a STRING or
    COMBO input keeps the text as typed and a BOOLEAN also accepts true/false/yes/no/on/off/1/0 in any case."""
    kind = spec.type if spec is not None else None
    if kind == "BOOLEAN" and raw.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return raw.strip().lower() in ("true", "yes", "on", "1")
    if kind in ("STRING", "COMBO") and not (raw.startswith('"') and raw.endswith('"') and len(raw) >= 2):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, list) and not (len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)):
        return {"__value__": value}  # a list value, not a link
    return value


def apply_sets(prompt: dict, sets: list[str], node_classes: dict,
               display_names: dict | None = None) -> list[tuple[str, str, Any]]:
    """Apply --set overrides to an API prompt in place; returns [(node id, input, value)]."""
    applied = []
    for text in sets:
        target, raw = parse_set(text)
        resolved = None
        node_without_input = None
        # NODE may contain dots (titles) and INPUT too (dynamic inputs 'combo.sub'): try every split, left to right.
        parts = target.split(".")
        for i in range(1, len(parts)):
            node_ref, input_name = ".".join(parts[:i]), ".".join(parts[i:])
            node_id = find_node(prompt, node_ref, display_names)
            if node_id is None:
                continue
            declared = _declared_inputs(prompt[node_id]["class_type"], node_classes)
            known = list(dict.fromkeys([*declared, *prompt[node_id]["inputs"]]))
            if input_name in known:
                resolved = (node_id, input_name, declared.get(input_name))
                break
            if node_without_input is None:
                node_without_input = (node_id, input_name, known)
        if resolved is None and node_without_input is not None:
            node_id, input_name, known = node_without_input
            raise UsageError(
                f"--set {text!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input '{input_name}'; "
                f"its inputs: {', '.join(known) or '(none)'}"
            )
        if resolved is None:
            raise UsageError(f"--set {text!r}: no node '{parts[0]}' in the workflow (NODE is a node id, title or "
                             f"class type); nodes: {_node_list(prompt)}")
        node_id, input_name, spec = resolved
        value = coerce_value(raw, spec)
        prompt[node_id]["inputs"][input_name] = value
        applied.append((node_id, input_name, value))
    return applied


# ------------------------------------------------------------------------------------------------ files


def _upload_inputs(prompt: dict, node_classes: dict):
    """(node id, input name) of every file-upload COMBO (LoadImage 'image', LoadVideo 'file', ...) with a str value."""
    for node_id, node in prompt.items():
        for name, spec in _declared_inputs(node["class_type"], node_classes).items():
            if spec.type == "COMBO" and any(spec.options.get(flag) for flag in UPLOAD_FLAGS):
                if isinstance(node["inputs"].get(name), str):
                    yield node_id, name


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_input_files(prompt: dict, node_classes: dict, input_dir: Path, search_dirs: list[Path],
                      log=None) -> list[str]:
    """Copy files named by upload inputs (LoadImage 'image', ...) into `input_dir` when they are elsewhere: a path to
    an existing file (absolute or relative to the current folder), or a name found in one of `search_dirs`.
    The input then names the copy. Returns messages describing each copy."""
    input_dir = Path(input_dir).resolve()
    messages = []
    for node_id, name in list(_upload_inputs(prompt, node_classes)):
        value = prompt[node_id]["inputs"][name]
        if not value or value.endswith("]"):  # "file.png [output]" etc. are resolved by ComfyUI itself
            continue
        inside = (input_dir / value).resolve()
        if not Path(value).is_absolute() and inside.is_relative_to(input_dir) and inside.is_file():
            continue  # already in the input folder
        source = None
        for candidate in [Path(value).expanduser(), *(Path(d) / value for d in search_dirs)]:
            if candidate.is_file():
                source = candidate.resolve()
                break
        if source is None:
            continue
        target = contained_path(input_dir, source.name, "input file")
        if target.exists() and _file_digest(target) != _file_digest(source):
            target = contained_path(input_dir, f"{source.stem}-{_file_digest(source)[:8]}{source.suffix}",
                                    "input file")
        if not target.exists():
            input_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        prompt[node_id]["inputs"][name] = target.name
        messages.append(f"node {node_id} {name}: {source} -> {target}")
        if log is not None:
            print(f"input: node {node_id} '{name}' uses {source} (copied to {target})", file=log)
    return messages


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


def _folder_lists() -> dict[str, list]:
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
        for name, spec in _declared_inputs(node["class_type"], node_classes).items():
            value = node["inputs"].get(name)
            if spec.type != "COMBO" or not isinstance(value, str) or value in (spec.choices or []):
                continue
            entry = {"node": node_id, "class_type": node["class_type"], "input": name, "value": value}
            if any(spec.options.get(flag) for flag in UPLOAD_FLAGS):
                # LoadImage & co accept any existing file ("sub/x.png", "x.png [output]"), not only listed ones.
                if not folder_paths.exists_annotated_filepath(value):
                    missing.append({**entry, "kind": "input", "dirs": input_dirs})
                continue
            folder_lists = folder_lists or _folder_lists()
            folder = model_folder_for(node["class_type"], name, spec.choices or [], folder_lists)
            if folder is not None:
                missing.append({**entry, "kind": "model", "folder": folder,
                                "dirs": folder_paths.get_folder_paths(folder)})
    return missing


def named_model_files(prompt: dict, node_classes: dict) -> list[dict]:
    """Every model file the prompt's loaders name, there or not, as find_missing_files describes one (without
    'dirs'): what write_tiny_models takes to fill a models folder of its own, e.g. a separate server's."""
    folder_lists = _folder_lists()
    named = []
    for node_id, node in prompt.items():
        for name, spec in _declared_inputs(node["class_type"], node_classes).items():
            value = node["inputs"].get(name)
            if spec.type != "COMBO" or not isinstance(value, str) or any(spec.options.get(f) for f in UPLOAD_FLAGS):
                continue
            folder = model_folder_for(node["class_type"], name, spec.choices or [], folder_lists)
            if folder is not None:
                named.append({"node": node_id, "class_type": node["class_type"], "input": name, "value": value,
                              "kind": "model", "folder": folder})
    return named


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


# ------------------------------------------------------------------------------------------------ progress


class ProgressPrinter:
    """Prints which node runs and its step progress to `stream`, one line per node (steps in place on a TTY)."""

    def __init__(self, prompt: dict, node_classes: dict, stream=None, steps: bool = True):
        self.prompt = prompt
        self.steps = steps
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = len(_needed_nodes(prompt, node_classes)) or len(prompt)
        self.count = 0
        self.quarter: dict[str, tuple[int, float | None]] = {}
        self.open_line = False

    def _node(self, node_id) -> str:
        node = self.prompt.get(str(node_id))
        if node is None:
            return f"node {node_id}"
        title = _title(node)
        return f"{node['class_type']} (node {node_id}" + (f", '{title}'" if title != node["class_type"] else "") + ")"

    def finish(self):
        """End an open step line (call after the run)."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def __call__(self, event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            self.finish()
            self.count += 1
            print(f"[{self.count}/{self.total}] {self._node(data['node'])}", file=self.stream, flush=True)
        elif event == "execution_cached" and data.get("nodes"):
            self.finish()
            print(f"cached: {len(data['nodes'])} node(s) reuse earlier results", file=self.stream, flush=True)
        elif event == "progress" and self.steps:
            value, total, node_id = data.get("value"), data.get("max"), data.get("node")
            if not total or total <= 1 or value is None:
                return
            text = f"    step {int(value)}/{int(total)}"
            if self.tty:
                self.stream.write("\r" + text)
                self.open_line = value < total
                if not self.open_line:
                    self.stream.write("\n")
                self.stream.flush()
                return
            # Off a terminal: about four lines per node (each quarter), never the same step twice in a row.
            key = str(node_id)
            quarter = int(4 * value / total)
            last_quarter, last_value = self.quarter.get(key, (0, None))
            if value != last_value and (quarter > last_quarter or value >= total or last_value is None):
                self.quarter[key] = (quarter, value)
                print(text, file=self.stream, flush=True)
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self.finish()


def _needed_nodes(prompt: dict, node_classes: dict) -> set[str]:
    """Nodes that output nodes depend on (what the executor will run, cache aside)."""
    outputs = [nid for nid, n in prompt.items()
               if getattr(node_classes.get(n["class_type"]), "OUTPUT_NODE", False) is True]
    seen, stack = set(), list(outputs)
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        for value in prompt[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                stack.append(value[0])
    return seen


# ------------------------------------------------------------------------------------------------ outputs


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    state = {}
    if folder.is_dir():
        for root, _dirs, files in os.walk(folder):
            for name in files:
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    st = path.stat()
                    state[str(path)] = (st.st_mtime_ns, st.st_size)
    return state


def _texts(prompt: dict, outputs: dict) -> list[dict]:
    found = []
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key, value in ui.items():
            items = value if isinstance(value, (list, tuple)) else [value]
            if items and all(isinstance(v, (str, int, float, bool)) for v in items):
                node = prompt.get(node_id, {})
                found.append({"node": node_id, "class_type": node.get("class_type"), "key": key,
                              "text": "\n".join(str(v) for v in items)})
    return found


# ------------------------------------------------------------------------------------------------ logging


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _quiet_logging(verbose: bool, log):
    """Non-verbose: hold back ComfyUI's warnings (e.g. optional audio nodes failing to import) and say how many."""
    if verbose:
        root = logging.getLogger()
        if not root.handlers:
            logging.basicConfig(stream=log, format="%(levelname)s %(name)s: %(message)s")
        root.setLevel(logging.INFO)
        yield
        return
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    collector = _Collect()
    root.handlers[:] = [collector]
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1] if saved[1] != logging.NOTSET else logging.WARNING)
        if collector.records and log is not None:
            print(f"ComfyUI logged {len(collector.records)} warning(s) while loading (shown with --verbose)", file=log)


class _DropExecutorErrors(logging.Filter):
    """ComfyUI's executor logs validation failures and node exceptions (with tracebacks) at ERROR level; the runner
    reports both itself (tracebacks with --verbose), so without --verbose these duplicates are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and os.path.basename(record.pathname) == "execution.py")


@contextlib.contextmanager
def _executor_logging(verbose: bool):
    if verbose:
        yield
        return
    root = logging.getLogger()
    drop = _DropExecutorErrors()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ------------------------------------------------------------------------------------------------ main entry


def run_workflow(
    workflow,
    *,
    sets: list[str] = (),
    models_dir=None,
    output_dir="out",
    input_dir=None,
    comfyui=None,
    gpu: bool = False,
    make_tiny_checkpoint_name: str | None = None,
    verbose: bool = False,
    log=None,
    out=None,
) -> RunResult:
    """Run a workflow (path or loaded dict; UI or API format) in this process through ComfyUI.

    `make_tiny_checkpoint_name`: "" = a tiny checkpoint for every missing checkpoint the workflow names, or a file
    name; written into `models_dir`/checkpoints (a temporary models folder when models_dir is None).
    Raises UsageError, WorkflowFormatError or WorkflowError (MissingFileError for absent models/inputs).
    """
    log = log if log is not None else sys.stderr
    out = out if out is not None else sys.stdout
    started = time.time()
    data, workflow_dir = load_workflow(workflow)
    if comfyui is not None and not (Path(comfyui) / "nodes.py").is_file():
        raise UsageError(f"--comfyui {comfyui}: not a ComfyUI folder (no nodes.py there)")
    output_dir = Path(output_dir).resolve()
    cleanup: list[Path] = []
    try:
        with _quiet_logging(verbose, log):
            try:
                runtime = comfy_env.boot(Path(comfyui) if comfyui else None, cpu=not gpu, quiet=not verbose)
            except FileNotFoundError as exc:
                raise UsageError(str(exc)) from exc
        import comfy.utils
        import folder_paths

        import nodes

        saved_dirs = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
                      folder_paths.get_temp_directory())
        comfy_input_dir = Path(saved_dirs[1])
        if input_dir is None:
            input_dir = Path(tempfile.mkdtemp(prefix="magic_portrait_input_")).resolve()
            cleanup.append(input_dir)
        if make_tiny_checkpoint_name is not None and models_dir is None:
            models_dir = Path(tempfile.mkdtemp(prefix="magic_portrait_models_"))
            cleanup.append(models_dir)
            print(f"models: temporary folder {models_dir} (removed after the run; pass --models-dir to keep files)",
                  file=log)
        input_dir = Path(input_dir).resolve()
        comfy_env.boot(models_dir=models_dir, output_dir=output_dir, input_dir=input_dir,
                       temp_dir=output_dir / "previews")
        progress_enabled = comfy.utils.PROGRESS_BAR_ENABLED
        try:
            node_classes = nodes.NODE_CLASS_MAPPINGS
            warnings: list[str] = []
            prompt = to_api_prompt(data, node_classes, warnings)
            for warning in warnings:
                print(f"warning: {warning}", file=log)
            for node_id, name, value in apply_sets(prompt, list(sets), node_classes,
                                                   getattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", None)):
                print(f"set: node {node_id} ({prompt[node_id]['class_type']}) {name} = {value!r}", file=log)
            search = list(dict.fromkeys(d for d in (Path.cwd(), workflow_dir, comfy_input_dir) if d is not None))
            stage_input_files(prompt, node_classes, input_dir, search, log=log)

            looked = ([] if input_dir in cleanup else [input_dir]) + search
            missing = find_missing_files(prompt, node_classes, looked)
            if make_tiny_checkpoint_name is not None:
                write_tiny_models(models_dir, missing, checkpoint_name=make_tiny_checkpoint_name,
                                  insightface_packs=_missing_insightface_packs(prompt, runtime), runtime=runtime,
                                  log=log)
                folder_paths.filename_list_cache.clear()
                missing = find_missing_files(prompt, node_classes, looked)
            if missing:
                raise MissingFileError(format_missing(missing))

            before = _snapshot(output_dir)
            printer = ProgressPrinter(prompt, node_classes, log, steps=not verbose)  # verbose: tqdm shows steps
            comfy.utils.PROGRESS_BAR_ENABLED = verbose  # tqdm bars only in verbose mode; we print steps ourselves
            runtime.executor = None  # a run is a fresh run: no results cached from earlier prompts in this process
            # Like the frontend, give SaveImage the UI workflow to embed, so outputs open again in ComfyUI.
            extra = {"extra_pnginfo": {"workflow": data}} if is_ui_format(data) else None
            with _executor_logging(verbose):
                outputs = runtime.run_prompt(prompt, listener=printer, extra_data=extra)
            printer.finish()
            after = _snapshot(output_dir)
            files = sorted(Path(p) for p, state in after.items() if before.get(p) != state)
            result = RunResult(prompt=prompt, outputs=outputs, files=files, texts=_texts(prompt, outputs),
                               summary_path=output_dir / SUMMARY_NAME, warnings=warnings,
                               seconds=time.time() - started)
            _write_summary(result, None if isinstance(workflow, dict) else str(Path(workflow).resolve()), runtime,
                           output_dir)
            _print_summary(result, output_dir, out)
            tiny = tiny_checkpoints_in(prompt)
            if tiny:
                print(f"{TINY_NOTE} (used: {', '.join(tiny)})", file=log)
            return result
        finally:
            comfy.utils.PROGRESS_BAR_ENABLED = progress_enabled
            folder_paths.set_output_directory(saved_dirs[0])
            folder_paths.set_input_directory(saved_dirs[1])
            folder_paths.set_temp_directory(saved_dirs[2])
    finally:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def write_tiny_models(models_dir, models: list[dict], *, checkpoint_name: str = "", insightface_packs=(),
                      runtime=None, log=None) -> list[Path]:
    """Write tiny checkpoints into `models_dir`/checkpoints, then stand-ins made for the first of them (all noise)
    for the other model files in `models` (find_missing_files / named_model_files entries): RepControlNet files,
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
        made = _write_tiny_stand_in(folder, target, checkpoints[0], runtime)
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


def _write_tiny_stand_in(folder: str, target: Path, checkpoint: Path, runtime) -> str | None:
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


def _missing_insightface_packs(prompt: dict, runtime) -> list[str]:
    roots = runtime.pack.nodes.faces.insightface_roots()
    return [pack for pack in named_insightface_packs(prompt, runtime)
            if not any((root / "models" / pack).exists() for root in roots)]


def _write_summary(result: RunResult, workflow: str | None, runtime, output_dir: Path) -> None:
    nodes_out = {
        node_id: {"class_type": result.prompt.get(node_id, {}).get("class_type"),
                  "title": _title(result.prompt[node_id]) if node_id in result.prompt else None, "ui": ui}
        for node_id, ui in result.outputs.items()
    }
    summary = {
        "workflow": workflow,
        "comfyui": str(runtime.root),
        "seconds": round(result.seconds, 3),
        "outputs": nodes_out,
        "files": [str(p) for p in result.files],
        "texts": result.texts,
        "warnings": result.warnings,
        "prompt": result.prompt,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    result.summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def _print_summary(result: RunResult, output_dir: Path, out) -> None:
    print(f"done in {result.seconds:.1f} s; {len(result.files)} file(s) written to {output_dir}:", file=out)
    for path in result.files:
        print(f"  {path}", file=out)
    if result.texts:
        print("text outputs:", file=out)
        for text in result.texts:
            body = text["text"].replace("\n", "\n      ")
            print(f"  node {text['node']} ({text['class_type']}) {text['key']}: {body}", file=out)
    print(f"summary: {result.summary_path}", file=out)


# ------------------------------------------------------------------------------------------------ CLI glue


def cli_run(args) -> int:
    """`run` sub-command; returns the exit code."""
    try:
        run_workflow(
            args.workflow,
            sets=args.set or [],
            models_dir=args.models_dir,
            output_dir=args.output_dir,
            input_dir=args.input_dir,
            comfyui=args.comfyui,
            gpu=args.gpu,
            make_tiny_checkpoint_name=args.make_tiny_checkpoint,
            verbose=args.verbose,
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (WorkflowError, WorkflowFormatError) as exc:
        print(f"workflow error: {exc}", file=sys.stderr)
        if args.verbose:
            print(getattr(exc, "traceback", None) or traceback.format_exc(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is still a failed run: one line unless --verbose
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        else:
            print("(run with --verbose for the traceback)", file=sys.stderr)
        return 1
    return 0


def cli_make_tiny_checkpoint(args) -> int:
    try:
        if args.comfyui is not None and not (Path(args.comfyui) / "nodes.py").is_file():
            raise UsageError(f"--comfyui {args.comfyui}: not a ComfyUI folder (no nodes.py there)")
        with _quiet_logging(args.verbose, sys.stderr):
            try:
                comfy_env.boot(Path(args.comfyui) if args.comfyui else None, cpu=True)
            except FileNotFoundError as exc:
                raise UsageError(str(exc)) from exc
        path = make_tiny_checkpoint(args.path, seed=args.seed, log=sys.stderr)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
