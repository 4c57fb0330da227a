"""Input files for a run: the files a workflow's upload inputs (LoadImage 'image', ...) name are copied into the
run's input folder, and every name that decides where a file is written is held inside its folder
(`contained_path`), because workflows are shared and a name in one must never choose what gets overwritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from .run_errors import UnsafePathError
from .workflow import UPLOAD_FLAGS, declared_inputs


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


def _upload_inputs(prompt: dict, node_classes: dict):
    """(node id, input name) of every file-upload COMBO (LoadImage 'image', LoadVideo 'file', ...) with a str value."""
    for node_id, node in prompt.items():
        for name, spec in declared_inputs(node["class_type"], node_classes).items():
            if spec.type == "COMBO" and any(spec.options.get(flag) for flag in UPLOAD_FLAGS):
                if isinstance(node["inputs"].get(name), str):
                    yield node_id, name


def stage_input_files(prompt: dict, node_classes: dict, input_dir: Path, search_dirs: list[Path],
                      log=None) -> list[str]:
    """Copy files named by upload inputs (LoadImage 'image', ...) into `input_dir` when they are elsewhere: a path to
    an existing file (absolute or relative to the current folder), or a name found in one of `search_dirs`.
    The input then names the copy. Returns messages describing each copy."""
    # The pack's one chunked file hash; imported here, not at the top, so `--help` stays fast (it pulls in cv2).
    from magic_core.magicid_build import file_sha256

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
        if target.exists() and file_sha256(target) != file_sha256(source):
            target = contained_path(input_dir, f"{source.stem}-{file_sha256(source)[:8]}{source.suffix}",
                                    "input file")
        if not target.exists():
            input_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        prompt[node_id]["inputs"][name] = target.name
        messages.append(f"node {node_id} {name}: {source} -> {target}")
        if log is not None:
            print(f"input: node {node_id} '{name}' uses {source} (copied to {target})", file=log)
    return messages
