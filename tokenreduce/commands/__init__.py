"""The ``tokenreduce`` subcommands, one module each. A module here that defines
``register(subparsers)`` is a command; :func:`register_all` finds them all, so adding a command
means adding a file. Modules import their heavy dependencies inside their run functions, so that
``tokenreduce --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register_all(commands: argparse._SubParsersAction) -> None:
    """Add every command module's subparser, in alphabetical order of the modules."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(commands)
