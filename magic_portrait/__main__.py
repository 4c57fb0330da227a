"""Command line: `python -m magic_portrait run WORKFLOW.json ...`, `python -m magic_portrait train ...` (also under
torchrun) and `python -m magic_portrait make-tiny-checkpoint`."""

from __future__ import annotations

import argparse
import sys

from .run_cli import add_run_parser, add_tiny_checkpoint_parser, cli_make_tiny_checkpoint, cli_run
from .train_cli import add_parser as add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m magic_portrait",
        description="Magic Portrait tools: run ComfyUI workflows headless, train a RepControlNet (one process or "
        "torchrun), write tiny test checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    add_run_parser(commands)
    add_train_parser(commands)
    add_tiny_checkpoint_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with code 2
    if args.command == "run":
        return cli_run(args)
    if args.command == "train":
        from .train_cli import cli_train

        return cli_train(args)
    return cli_make_tiny_checkpoint(args)


if __name__ == "__main__":
    sys.exit(main())
