"""The headless runner's errors. `python -m magic_portrait run` exits with 2 for a UsageError and 1 for a
WorkflowError (which MissingFileError and UnsafePathError are), so callers can tell bad use from a failed run."""

from __future__ import annotations

from .comfy_env import WorkflowError


class UsageError(Exception):
    """Bad command-line use (exit code 2)."""


class MissingFileError(WorkflowError):
    """A model or input file the workflow names is not where ComfyUI looks for it."""


class UnsafePathError(WorkflowError):
    """A file name (from a workflow or the command line) that would make the runner write outside its folder."""
