"""``tokenreduce methods``: the registered methods, their options and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from ..methods import REGISTRY


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("methods", help="list the registered methods with their options and defaults",
                              description="List the registered methods with their options and defaults.")
    cmd.set_defaults(run=run_methods)


def run_methods(args: argparse.Namespace) -> int:
    """Print every registered method, its description and its options with their defaults."""
    for name, cls in REGISTRY.items():
        print(f"{name} (acts at: {', '.join(cls.stages)}): {cls.description}")
        try:
            defaults = cls().options()  # after validation, so derived defaults (e.g. a budget) show
        except ValueError:  # a method that needs an argument (a calibration profile) shows its raw defaults
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for field in dataclasses.fields(cls):
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            print(f"    {field.name}: {kind} = {defaults[field.name]!r}")
    print("\nPass options as 'tokenreduce demo --method NAME --option KEY=VALUE' or "
          "'tokenreduce.patch(model, NAME, KEY=VALUE)'.")
    return 0
