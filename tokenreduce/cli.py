"""The ``tokenreduce`` command line; each subcommand lives in ``tokenreduce/commands/``."""

from __future__ import annotations

import argparse
import os
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
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a pipe closed by its reader shows up inside this try
        return code
    except UsageError as err:
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left early (`tokenreduce methods | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit goes nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe


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
