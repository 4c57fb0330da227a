"""Folders that node inputs name inside ComfyUI's input folder (training sets, photo folders, datasets).

On a shared server anyone who can queue a prompt sets these strings, so they must not reach other folders: an
absolute path (or ``~``) is refused unless the server opted in with MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1, and a
'..' part is always refused. Symlinks already inside the input folder are followed: whoever placed one there can read
its target anyway."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import folder_paths

from .common import NodeInputError

ALLOW_ABSOLUTE_DATASET_ENV = "MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET"


def allows_absolute_dataset() -> bool:
    """Whether the server opted in to absolute dataset paths (``MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1``)."""
    return os.environ.get(ALLOW_ABSOLUTE_DATASET_ENV, "").strip().lower() in ("1", "true", "yes")


def resolve_input_folder(node: str, input_name: str, value: str, *, example: str = "", fill_hint: str = "",
                         access: str = "read") -> Path:
    """The folder `value` names, relative to ComfyUI's input folder. `example` is named when the value is empty,
    `fill_hint` (e.g. "copy or link your pairs there") when it is absolute; `access` says what an opted-in server
    lets every prompt do with any folder ("read", "read and write")."""
    text = str(value).strip()
    input_dir = Path(folder_paths.get_input_directory())
    where = f"ComfyUI's input folder ({input_dir})"
    if not text:
        raise NodeInputError(node, input_name, f"is empty: name a folder inside {where}"
                             + (f", e.g. {example}" if example else ""))
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor or text.startswith("~"):
        if allows_absolute_dataset():
            return Path(text).expanduser()
        raise NodeInputError(node, input_name, f"'{text}' is an absolute path: name a folder inside {where} instead"
                             + (f" ({fill_hint})" if fill_hint else "") + f", or start the server with "
                             f"{ALLOW_ABSOLUTE_DATASET_ENV}=1 to allow absolute paths (only where everyone who can "
                             f"queue a prompt may {access} every folder the server can)")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise NodeInputError(node, input_name, f"'{text}' contains '..': the folder must be inside {where}")
    return input_dir / text
