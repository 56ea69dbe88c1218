"""The ``tokenreduce`` command line; each subcommand lives in ``tokenreduce/commands/``."""

from __future__ import annotations

import argparse
import sys

from .commands import register_all
from .commands.common import UsageError


def main(argv: list[str] | None = None) -> int:
    """Run the ``tokenreduce`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or an argparse usage error (2, message already printed)
        return int(done.code or 0)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per command module."""
    parser = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Training-free token reduction for Hugging Face video, image and long-context LLMs.",
        epilog="Run 'tokenreduce COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_all(commands)
    return parser
