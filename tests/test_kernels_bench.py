"""benchmarks/bench_kernels.py on small shapes: every kernel is measured against its reference, agrees with
it, and the JSON and markdown tables are written."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tokenreduce import kernels

pytestmark = pytest.mark.skipif(os.environ.get("TOKENREDUCE_KERNELS", "").strip().lower() in ("0", "off"),
                                reason="TOKENREDUCE_KERNELS=0 switches the kernels off")


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_covers_every_kernel(tmp_path):
    bench = load_benchmark()
    assert bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--batches", "1,2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    names = {row["kernel"].split(" ")[0] for row in data["rows"]}
    assert names == set(kernels.KERNELS)
    assert {row["batch"] for row in data["rows"]} == {1, 2}
    for row in data["rows"]:
        assert row["reference_ms"] > 0 and row["kernel_ms"] > 0
        assert row["max_abs_diff"] < 1e-5, row  # exact ops give 0; similarity/importance float32 rounding
    assert "| merge_compact | 1 |" in (tmp_path / "kernels.md").read_text()


def test_unknown_kernel_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        load_benchmark().main(["--quick", "--kernels", "merge"])
    assert "--kernels: unknown merge" in capsys.readouterr().err
