"""Command line: `python -m magic_portrait run WORKFLOW.json ...`, `python -m magic_portrait train ...` (also under
torchrun) and `python -m magic_portrait make-tiny-checkpoint`."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m magic_portrait",
        description="Magic Portrait tools: run ComfyUI workflows headless, train a RepControlNet (one process or "
        "torchrun), write tiny test checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

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

    from .train_cli import add_parser as add_train_parser

    add_train_parser(commands)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with code 2
    from .run_cli import cli_make_tiny_checkpoint, cli_run

    if args.command == "run":
        return cli_run(args)
    if args.command == "train":
        from .train_cli import cli_train

        return cli_train(args)
    return cli_make_tiny_checkpoint(args)


if __name__ == "__main__":
    sys.exit(main())
