"""The example workflows' inputs, put where their nodes find them.

Opening a template copies nothing, and LoadImage lists only the top-level files of ComfyUI's input folder, so an
example whose images stay in the pack fails validation ("Invalid image file"); the training example reads a folder
of image/condition pairs under the input folder. When ComfyUI loads the pack, each image beside the example
workflows, and each file of each folder beside them (the bundled training set), is copied to the input folder
unless a file of that name is already there. The names carry the pack's prefix, so a user's own files and folders
are never touched, and a file already there is never overwritten."""

from __future__ import annotations

import filecmp
import logging
import shutil
from pathlib import Path

import folder_paths

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
PREFIX = "magic_portrait_"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
log = logging.getLogger(__name__)


def example_inputs() -> list[Path]:
    """The shipped inputs: images and folders (training sets) beside the example workflows, prefixed names only."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.name.startswith(PREFIX)
                  and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES))


def _copy_missing(source: Path, target: Path) -> bool:
    """Copy one file unless `target` exists (a differing one is kept and logged); True when copied."""
    if target.exists():
        if not filecmp.cmp(source, target, shallow=False):
            log.warning("Magic Portrait: %s differs from the example's file; the examples will use it as is", target)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return True


def install_example_inputs(input_dir: str | Path | None = None) -> list[Path]:
    """Copy missing example inputs into `input_dir` (ComfyUI's input folder by default); returns the top-level
    entries that received a copy (an image, or a folder when any of its files was copied). Never raises: a read-only
    or missing folder is logged, the pack still loads."""
    target_dir = Path(input_dir or folder_paths.get_input_directory())
    copied = []
    for source in example_inputs():
        target = target_dir / source.name
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        try:
            results = [_copy_missing(f, target / f.relative_to(source) if source.is_dir() else target)
                       for f in files]
        except OSError as err:
            log.warning("Magic Portrait: could not copy example input %s to %s (%s); copy it there by hand to run the "
                        "example workflows", source.name, target_dir, err)
            continue
        if any(results):
            copied.append(target)
    if copied:
        log.info("Magic Portrait: copied %d example input(s) to %s", len(copied), target_dir)
    return copied
