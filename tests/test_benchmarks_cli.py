"""Every benchmark script runs as the README tells a user: ``python benchmarks/<script>.py ...`` from the
checkout, in a subprocess. Running a script puts ``benchmarks/`` first on ``sys.path``, so a script named
like an installed package (``kernels.py`` beside transformers >= 5.2x, which imports ``kernels``) breaks
every import of that package; importing the modules in-process, as other tests do, cannot see that."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def _env() -> dict[str, str]:
    """This checkout's tokenreduce first (an editable install may point at another one); one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(proc.args[1:])} exited {proc.returncode}:\n{err[-3000:]}"
    return out


def test_no_benchmark_script_shadows_an_installed_module():
    shadowing = [name for name in SCRIPTS if importlib.util.find_spec(name.removesuffix(".py")) is not None]
    assert shadowing == [], (f"benchmarks/{shadowing} would hide the installed module(s) of the same name from "
                             "every import made while the script runs; rename the script(s)")


def test_every_benchmark_script_answers_help():
    running = {name: _start(f"benchmarks/{name}", "--help") for name in SCRIPTS}  # in parallel
    for name, proc in running.items():
        out = _finish(proc)
        assert out.startswith("usage: "), f"{name} --help printed {out[:200]!r}"


@pytest.mark.slow
def test_quick_modes_of_speed_and_kernels(tmp_path):
    """The quick runs the README and gpu_session.sh give, both at once (vLLM's and kv.py's take minutes or
    need vLLM: integrations/vllm/run_tests.sh and ``make bench-kv`` run those)."""
    speed = _start("benchmarks/speed.py", "--quick", "--out", str(tmp_path / "speed"))
    kernels = _start("benchmarks/bench_kernels.py", "--quick", "--device", "cpu", "--repeats", "2",
                     "--out", str(tmp_path / "kernels"))
    _finish(speed)
    report = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert [r["method"] for r in report["rows"]][0] == "dense" and len(report["rows"]) > 1
    assert "| lsh_signatures |" in _finish(kernels)
