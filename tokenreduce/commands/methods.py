"""``tokenreduce methods``: the registered methods, their options and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from ..methods import REGISTRY
from ..methods.capabilities import pre_llm_of


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("methods", help="list the registered methods with their options and defaults",
                              description="List the registered methods with their options and defaults.")
    cmd.add_argument("--markdown", action="store_true",
                     help="print the README's method table (one row per method) instead")
    cmd.set_defaults(run=run_methods)


def methods_table() -> str:
    """The README's method table, one row per registered method: its name, the stages it acts at,
    whether the vLLM plugin serves it (the ``PreLLM`` capability) and its description."""
    rows = ["| method | acts at | vLLM | what it does |", "| --- | --- | --- | --- |"]
    for name, cls in REGISTRY.items():
        vllm = "yes" if pre_llm_of(cls) is not None else ""
        rows.append(f"| `{name}` | {', '.join(cls.stages)} | {vllm} | {cls.description} |")
    return "\n".join(rows)


def run_methods(args: argparse.Namespace) -> int:
    """Print every registered method, its description and its options with their defaults (or, with
    ``--markdown``, the README's method table)."""
    if args.markdown:
        print(methods_table())
        return 0
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
