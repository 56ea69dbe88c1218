"""``tokenreduce serve MODEL --method M --retention R [vLLM options]``: vLLM's OpenAI-compatible server
with the tokenreduce plugin's settings (``integrations/vllm``), every other option passed to vLLM."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys

from .common import UsageError, option

SERVER = "vllm.entrypoints.openai.api_server"


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "serve",
        help="serve a model with vLLM and token reduction before the LLM (needs vLLM: pip install 'tokenreduce[vllm]')",
        description=(
            "Start vLLM's OpenAI-compatible server (python -m " + SERVER + ", in this Python) for MODEL with "
            "the tokenreduce vLLM plugin set by --additional-config '{\"tokenreduce\": {...}}'. Methods: those "
            "that act before the LLM (evs, framefusion's merge stage, aim's merging, sms's first round); the "
            "placeholder count of each video is "
            "fixed from --retention. Every option not listed here goes to vLLM unchanged, e.g. "
            "'tokenreduce serve Qwen/Qwen2.5-VL-7B-Instruct --method evs --retention 0.3 --tensor-parallel-size 2 "
            "--port 8000'."))
    cmd.add_argument("model", help="model name or local directory, as for 'vllm serve'")
    _own_options(cmd)
    cmd.add_argument("vllm_args", nargs=argparse.REMAINDER, help="options passed to vLLM unchanged")
    cmd.set_defaults(run=run_serve)


def _own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, help="pre-LLM method: evs, framefusion, aim or sms (required)")
    parser.add_argument("--retention", type=float, default=None,
                        help="fraction of each video's tokens kept, in (0, 1] (default 0.3)")
    parser.add_argument("--encoder-batch", choices=("auto", "budget", "one"), default=None,
                        help="how a step's videos go through the vision tower: budget (batched within vLLM's "
                             "encoder budget), one (one per call), auto (one on CPUs, budget on GPUs; default)")
    parser.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                        help="another method option (repeatable); vLLM refuses options it cannot apply")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")


def command(args: argparse.Namespace) -> list[str]:
    """The server command line: our options taken out of the pass-through, the settings checked."""
    own = argparse.ArgumentParser(add_help=False)
    _own_options(own)
    extra, passthrough = own.parse_known_args(args.vllm_args)
    for name in ("method", "retention", "encoder_batch", "dry_run"):
        if getattr(extra, name) not in (None, False):
            setattr(args, name, getattr(extra, name))
    args.option = args.option + extra.option
    if args.method is None:
        raise UsageError("--method is required: evs, framefusion, aim or sms (the methods that act before the LLM)")
    settings = {"method": args.method}
    if args.retention is not None:
        settings["retention"] = args.retention
    if args.encoder_batch is not None:
        settings["encoder_batch"] = args.encoder_batch
    settings.update(dict(args.option))
    _check_plugin()
    from tokenreduce_vllm.settings import parse

    try:
        parse(settings)
    except ValueError as err:
        raise UsageError(str(err)) from err
    config = _merge_additional_config(passthrough, settings)
    return [sys.executable, "-m", SERVER, "--model", args.model, "--additional-config", json.dumps(config),
            *passthrough]


def _vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None when it is installed."""
    if importlib.util.find_spec("vllm") is None:
        return (f"vLLM is not installed in this Python ({sys.executable}); install it with "
                f"\"pip install 'tokenreduce[vllm]'\" (CPU-only machines: integrations/vllm/setup_env.sh)")
    return None


def _check_plugin() -> None:
    """The plugin checks the settings (pure Python, no vLLM needed) and applies them in vLLM."""
    if importlib.util.find_spec("tokenreduce_vllm") is None:
        raise UsageError("the tokenreduce vLLM plugin (module tokenreduce_vllm) is missing from this install "
                         "(without it vLLM would ignore the settings); reinstall with "
                         "\"pip install 'tokenreduce[vllm]'\"")


def _merge_additional_config(passthrough: list[str], settings: dict) -> dict:
    """Fold a user's own ``--additional-config JSON`` into ours (and out of the pass-through)."""
    config: dict = {}
    for i, arg in enumerate(list(passthrough)):
        if arg == "--additional-config" or arg.startswith("--additional-config="):
            value = arg.partition("=")[2] if "=" in arg else (passthrough[i + 1] if i + 1 < len(passthrough) else "")
            try:
                config = json.loads(value)
            except json.JSONDecodeError as err:
                raise UsageError(f"--additional-config is not JSON: {err}") from err
            del passthrough[i:i + (1 if "=" in arg else 2)]
            break
    if not isinstance(config, dict) or "tokenreduce" in config:
        raise UsageError("give the tokenreduce settings with --method/--retention/--option, not inside "
                         "--additional-config (which must be a JSON object)")
    return {**config, "tokenreduce": settings}


def run_serve(args: argparse.Namespace) -> int:
    """Exec vLLM's server in this interpreter (or print the command with --dry-run). The arguments are
    checked first, so a dry run reports bad settings (and prints a good command) without vLLM too."""
    cmd = command(args)
    missing = _vllm_missing()
    if args.dry_run:
        print(shlex.join(cmd))
        if missing:
            print(f"tokenreduce serve: note: {missing}", file=sys.stderr)
        return 0
    if missing:
        raise UsageError(missing)
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached
