"""The `tinystories` command: argument parsing only.

Each sub-command lives in its own module under `tinystories/cli/` with two functions:
`register(subparsers)` adds its parser and sets `func=run`; `run(args) -> int` calls library code.
What several commands share (the model argument) is in `tinystories.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tinystories.errors import UserError

# Module names under tinystories.cli, in the order `--help` lists them.
COMMAND_MODULES = [
    "data",
    "train",
    "generate",
    "evaluate",
    "serve",
    "export",
    "presets",
    "inspect",
    "demo",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a command line it cannot parse gives one line on stderr (what is wrong and where
    the command's --help is) and exit code 2, like every other bad input; sub-command parsers are
    made of this class too."""

    def error(self, message: str):
        self.exit(2, f"tinystories: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="tinystories",
        description="Train small GPT-style language models on TinyStories, then sample, evaluate, serve and export them.",
    )
    from tinystories import __version__

    parser.add_argument("--version", action="version", version=f"tinystories {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tinystories.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"tinystories.cli.{name}":
                continue  # stage not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"tinystories: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as error:  # a path the user gave that cannot be read or written (permissions, a folder, ...)
        where = f"{error.filename}: " if error.filename else ""
        print(f"tinystories: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinystories: interrupted", file=sys.stderr)
        return 130


def _quiet_broken_pipe() -> int:
    """The reader went away (e.g. `| head`): stop quietly, as other command-line tools do."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141
