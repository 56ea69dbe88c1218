"""``tokenreduce serve``: the vLLM command it builds and its clear errors (no vLLM start; runs in both
environments: without vLLM the presence checks are faked and the plugin's settings module is loaded from
integrations/vllm)."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from tokenreduce.cli import main

PLUGIN = Path(__file__).resolve().parents[2] / "integrations" / "vllm"


@pytest.fixture
def installed(monkeypatch):
    """Pretend vLLM and the plugin are installed; the plugin's settings module is pure Python."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("vllm", "tokenreduce_vllm") else real(name, *a))


def _dry_run(capsys, *argv: str) -> list[str]:
    assert main(["serve", *argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_command_passes_vllm_options_through(installed, capsys):
    cmd = _dry_run(capsys, "Qwen/Qwen2.5-VL-7B-Instruct", "--tensor-parallel-size", "2", "--method", "evs",
                   "--retention", "0.25", "--port", "8000", "--additional-config", '{"other": 1}')
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen2.5-VL-7B-Instruct"]
    config = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert config == {"other": 1, "tokenreduce": {"method": "evs", "retention": 0.25}}
    assert cmd.count("--additional-config") == 1
    assert cmd[-4:] == ["--tensor-parallel-size", "2", "--port", "8000"]
    cmd = _dry_run(capsys, "M", "--method", "evs", "--encoder-batch", "budget")
    config = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert config == {"tokenreduce": {"method": "evs", "encoder_batch": "budget"}}


@pytest.mark.parametrize(("argv", "message"), [
    (["M", "--method", "fastv"], "inside the LLM's layers"),
    (["M", "--method", "nosuch"], "unknown tokenreduce method 'nosuch'"),
    (["M", "--method", "evs", "--retention", "1.5"], "retention must be a number in (0, 1]"),
    (["M", "--method", "framefusion", "--option", "merge_layers=2"], "unknown option(s) merge_layers"),
    (["M", "--retention", "0.3"], "--method is required"),
    (["M", "--method", "evs", "--additional-config", '{"tokenreduce": {}}'], "not inside --additional-config"),
])
def test_bad_settings(installed, capsys, argv, message):
    assert main(["serve", *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_without_vllm(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["serve", "M", "--method", "evs"]) == 2
    assert "vLLM is not installed in this Python" in capsys.readouterr().err


@pytest.fixture
def without_vllm(monkeypatch):
    """vLLM absent; the plugin's settings module (pure Python) present."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else object() if name == "tokenreduce_vllm"
                        else real(name, *a))


def test_dry_run_without_vllm_checks_the_arguments_first(without_vllm, capsys):
    assert main(["serve", "M", "--method", "fastv", "--dry-run"]) == 2
    assert "inside the LLM's layers" in capsys.readouterr().err
    cmd = _dry_run(capsys, "M", "--method", "evs", "--retention", "0.25")  # a good command is still printed
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"tokenreduce": {"method": "evs",
                                                                                  "retention": 0.25}}
    assert main(["serve", "M", "--method", "evs", "--dry-run"]) == 0
    assert "vLLM is not installed in this Python" in capsys.readouterr().err  # said, not refused


def test_distribution_ships_the_plugin():
    """``pip install tokenreduce[vllm]`` is all a server needs: the tokenreduce distribution carries the
    plugin module and registers it with vLLM's ``vllm.general_plugins`` entry point."""
    from importlib.metadata import distribution

    plugins = [e for e in distribution("tokenreduce").entry_points if e.group == "vllm.general_plugins"]
    assert [(e.name, e.value) for e in plugins] == [("tokenreduce", "tokenreduce_vllm:register")]
    spec = importlib.util.find_spec("tokenreduce_vllm")
    assert spec is not None and Path(spec.origin).parent == PLUGIN / "tokenreduce_vllm"
