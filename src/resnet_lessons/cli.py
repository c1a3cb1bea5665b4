"""The ``resnet-lessons`` command line: a thin face over the library.

Exit codes: 0 success, 2 usage error (argparse), 1 failure with a one-line message (a traceback only
with ``--debug``). Each subcommand registers itself with ``_add_<name>`` and runs in ``_run_<name>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from . import __version__


class CommandError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- subcommands -------------------------------------------------------------------------------
# Each _add_* function adds one subparser and sets ``handler`` to its _run_* function.


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-lessons",
        description="Train, fine-tune, evaluate and export ResNets on CIFAR-10 or your own image folders.",
    )
    parser.add_argument("--version", action="version", version=f"resnet-lessons {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_add_") and callable(value):
            value(commands)
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
