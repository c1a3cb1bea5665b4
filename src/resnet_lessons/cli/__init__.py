"""The ``resnet-lessons`` command line: a thin face over the library.

Exit codes: 0 success, 2 usage error (argparse, bad values included), 1 failure with a one-line message
(a traceback only with ``--debug``). What it promises (README, "What the command line promises"): no file
is overwritten without ``--force``; one run per output folder (an OS lock); every file is written
atomically and never through a symbolic link; a failed run leaves no empty folder behind.

Each command has an ``add_<command>`` function that adds its subparser and sets ``handler`` to the
``run_<command>`` function that runs it:

- :mod:`.training`: ``train`` and ``finetune``, which write a run folder (:mod:`.runs`);
- :mod:`.inference`: ``evaluate`` and ``predict``;
- :mod:`.exporting`: ``export``;
- :mod:`.summary`: ``data``;
- :mod:`.common`: the error, argument types, flags and loading they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .common import CommandError
from .exporting import add_export
from .inference import add_evaluate, add_predict
from .summary import add_data_command
from .training import add_finetune, add_train

COMMANDS = (add_data_command, add_evaluate, add_export, add_finetune, add_predict, add_train)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-lessons",
        description="Train, fine-tune, evaluate and export ResNets on CIFAR-10 or your own image folders.",
    )
    parser.add_argument("--version", action="version", version=f"resnet-lessons {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2 if args.command is None and argv else 0
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("resnet-lessons: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback on request
        if args.debug:
            raise
        print(f"resnet-lessons {args.command}: error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)


__all__ = ["CommandError", "build_parser", "main"]
