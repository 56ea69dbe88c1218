"""benchmarks/speed.py --quick runs end to end on CPU and reports every configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_every_configuration(tmp_path, capsys):
    speed = _load_speed()
    assert speed.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--retentions", "0.3",
                       "--decode-tokens", "2", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    assert "| dense |" in (tmp_path / "speed.md").read_text() and "| dense |" in capsys.readouterr().out
    rows, depth = report["rows"], report["header"]["num_layers"]
    assert depth == 4 and [r["method"] for r in rows] == ["dense", "framefusion", "fastv"]
    dense = rows[0]
    for r in rows:
        assert len(r["layer_tokens"]) == depth and r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0
    for r in rows[1:]:
        assert r["final_layer_tokens"] < dense["final_layer_tokens"]
        assert r["visual_tokens_kept"] < r["visual_tokens_in"] == dense["visual_tokens_in"]
        assert r["ideal_prefill_speedup"] > 1 and r["reduce_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--arch", "nope"], "available: qwen2-vl-7b"),
    (["--methods", "nope"], "available: "),
    (["--retentions", "1.5"], "retention must be a number in (0, 1]"),
])
def test_bad_options_exit_cleanly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_speed().main(["--quick", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
