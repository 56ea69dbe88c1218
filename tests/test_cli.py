"""The tokenreduce command line: methods, demo outputs and clean usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import video_inputs

import tokenreduce
from tokenreduce.cli import main
from tokenreduce.testing import tiny_model
from tokenreduce.video import read_video


def test_methods_lists_methods_and_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "framefusion (acts at: embed, layer):" in out and "fastv (acts at: layer):" in out
    assert "retention: float | None = 0.3" in out and "layer: int = 2" in out


def test_output_into_a_closed_pipe_ends_quietly():
    """`tokenreduce methods | head -1` when `head` has already left: every write meets a closed pipe. The
    command must stop with the shell's code for it (141), not print a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "tokenreduce", "methods"], stdout=write,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write)
    err = done.stderr.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert done.returncode == 141


def test_demo_writes_video_pictures_and_numbers(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert read_video(tmp_path / "demo.mp4").shape == (16, 224, 224, 3)
    for name in ("kept_patches.png", "layer_tokens.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "demo.json").read_text())
    assert 0 < report["visual_tokens_kept"] < report["visual_tokens_in"]
    layers = report["layer_tokens"]
    assert layers["reduced"][-1] < layers["dense"][-1] == report["sequence_length"]
    assert all(1 <= len(report["generated"][run]) <= 8 for run in ("dense", "reduced"))  # EOS may stop early
    out = capsys.readouterr().out
    assert "visual tokens" in out and "time to first token" in out and "match" in out


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'; available: "),
    (["--option", "bogus=1"], "no option(s) ['bogus']"),
    (["--option", "cost=0.3"], "either retention or cost"),
    (["--option", "retention"], "expected KEY=VALUE"),
    (["--size", "101"], "even"),
])
def test_demo_usage_errors_exit_2_without_traceback(tmp_path, capsys, argv, message):
    assert main(["demo", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_kv_methods_before_running(tmp_path, capsys):
    assert main(["demo", "--method", "snapkv", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "compresses the KV cache" in err and "framefusion" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before writing or loading anything


def test_demo_method_without_retention_gets_no_default_retention(tmp_path, capsys):
    model = tiny_model("qwen2_vl")  # the demo's default tiny model
    profile = tmp_path / "shortv.json"
    tokenreduce.save_profile(tokenreduce.calibrate(model, "shortv", [video_inputs(model)], progress=False), profile)
    assert main(["demo", "--method", "shortv", "--option", f"profile={profile}", "--repeat", "1", "--frames", "4",
                 "--size", "112", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["method"] == "shortv" and "retention" not in report["options"]
    assert main(["demo", "--method", "shortv", "--retention", "0.5", "--out", str(tmp_path)]) == 2
    assert "retention" in capsys.readouterr().err  # given explicitly, it is still refused by name


def test_demo_bad_model_folder_and_unwritable_out_are_one_line_errors(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("")
    assert main(["demo", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--model {folder}: cannot load" in err and "Traceback" not in err and len(err.splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'out'}: cannot write there" in err and len(err.splitlines()) == 1
