"""The example workflows' input images, put where LoadImage finds them.

Opening a template copies nothing, and LoadImage lists only the top-level files of ComfyUI's input folder, so an
example whose images stay in the pack fails validation ("Invalid image file"). When ComfyUI loads the pack, each
image beside the example workflows is copied to the input folder unless a file of that name is already there (the
names carry the pack's prefix, so a user's own files are never touched)."""

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
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name.startswith(PREFIX))


def install_example_inputs(input_dir: str | Path | None = None) -> list[Path]:
    """Copy missing example images into `input_dir` (ComfyUI's input folder by default); returns the copies made.
    Never raises: a read-only or missing folder is logged, the pack still loads."""
    target_dir = Path(input_dir or folder_paths.get_input_directory())
    copied = []
    for source in example_inputs():
        target = target_dir / source.name
        try:
            if target.exists():
                if not filecmp.cmp(source, target, shallow=False):
                    log.warning("Magic Portrait: %s differs from the example's image; the examples will use it as is",
                                target)
                continue
            target_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(target)
        except OSError as err:
            log.warning("Magic Portrait: could not copy example input %s to %s (%s); copy it there by hand to run the "
                        "example workflows", source.name, target_dir, err)
    if copied:
        log.info("Magic Portrait: copied %d example input image(s) to %s", len(copied), target_dir)
    return copied
