"""The `run` and `make-tiny-checkpoint` commands of `python -m magic_portrait`: their arguments, and the glue that
turns the runner's errors into exit codes (0 success, 1 workflow error, 2 usage error). The work itself is
runner.run_workflow and model_files.make_tiny_checkpoint, which tests and scripts call directly.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from . import comfy_env
from .comfy_env import WorkflowError
from .model_files import make_tiny_checkpoint
from .run_errors import UsageError
from .runner import quiet_logging, run_workflow
from .workflow import WorkflowFormatError

RUN_EPILOG = """\
examples:
  python -m magic_portrait run example_workflows/portrait.json --models-dir ~/models
  python -m magic_portrait run wf.json --set 3.seed=42 --set "Load Image.image=me.png" --output-dir out
  python -m magic_portrait run wf.json --make-tiny-checkpoint      # smoke test without real weights (noise)

--set NODE.INPUT=VALUE: NODE is a node id ("5", or "12:3" inside a subgraph), its title, or its class type or
display name if unique; VALUE is read as JSON when it parses (42, 0.5, true) and as text otherwise (text inputs keep
it as typed); a file path given to an image input is copied into the input folder.
--make-tiny-checkpoint takes an optional NAME, so put it after WORKFLOW.json.
exit codes: 0 success, 1 workflow error (message on stderr), 2 usage error."""


def add_run_parser(commands) -> argparse.ArgumentParser:
    """The `run` sub-command on the argparse sub-parsers `commands`."""
    run = commands.add_parser(
        "run",
        help="execute a workflow saved by ComfyUI (UI or API format) in this process",
        description="Execute a workflow as the ComfyUI frontend saves it (or an API-format prompt) through ComfyUI's "
        "own validation and executor, without a server.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("workflow", metavar="WORKFLOW.json", help="workflow file (UI or API JSON, or a ComfyUI PNG)")
    run.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input (repeatable)")
    run.add_argument("--models-dir", metavar="DIR",
                     help="ComfyUI-style models folder (checkpoints/, controlnet/, ipadapter/, insightface/, ...) "
                          "searched before ComfyUI's own")
    run.add_argument("--output-dir", metavar="DIR", default="out", help="where outputs go (default: ./out)")
    run.add_argument("--input-dir", metavar="DIR",
                     help="ComfyUI input folder for LoadImage & co (default: a temporary folder; files the workflow "
                          "names are copied in from the current folder, the workflow's folder or ComfyUI's input/)")
    run.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder (default: $COMFYUI_PATH, ~/comfy/ComfyUI, or "
                                                       "the ComfyUI holding this pack)")
    run.add_argument("--gpu", action="store_true", help="use the GPU (default: CPU)")
    run.add_argument("--make-tiny-checkpoint", nargs="?", const="", metavar="NAME",
                     help="before running, write a tiny random SD1.5 checkpoint NAME (default: every missing checkpoint "
                          "the workflow names) into the models dir's checkpoints/; outputs are noise")
    run.add_argument("--verbose", "-v", action="store_true", help="show ComfyUI's log and tracebacks")
    return run


def add_tiny_checkpoint_parser(commands) -> argparse.ArgumentParser:
    """The `make-tiny-checkpoint` sub-command on the argparse sub-parsers `commands`."""
    tiny = commands.add_parser(
        "make-tiny-checkpoint",
        help="write a tiny random SD1.5 checkpoint (~300 MB) that CheckpointLoaderSimple loads",
        description="Write a tiny, seeded, random SD1.5 .safetensors checkpoint for smoke tests. Its outputs are "
        "noise: real use needs a real checkpoint.",
    )
    tiny.add_argument("path", metavar="PATH", help="file to write (.safetensors), or a folder")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder")
    tiny.add_argument("--verbose", "-v", action="store_true", help="show ComfyUI's log")
    return tiny


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
