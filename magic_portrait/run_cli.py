"""The `run` and `make-tiny-checkpoint` commands of `python -m magic_portrait` (whose arguments __main__.py declares):
parsed arguments in, the runner's errors out as messages and exit codes (0 success, 1 workflow error, 2 usage
error). The work itself is runner.run_workflow and model_files.make_tiny_checkpoint, which tests and scripts call
directly.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from . import comfy_env
from .comfy_env import WorkflowError
from .model_files import make_tiny_checkpoint
from .run_errors import UsageError
from .runner import quiet_logging, run_workflow
from .workflow import WorkflowFormatError


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
    """`make-tiny-checkpoint` sub-command; returns the exit code."""
    try:
        if args.comfyui is not None and not (Path(args.comfyui) / "nodes.py").is_file():
            raise UsageError(f"--comfyui {args.comfyui}: not a ComfyUI folder (no nodes.py there)")
        with quiet_logging(args.verbose, sys.stderr):
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
