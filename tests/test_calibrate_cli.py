"""``tokenreduce calibrate``: a real checkpoint folder and a real mp4 in, a usable profile out."""

from __future__ import annotations

import json

import pytest

import tokenreduce
from tokenreduce.cli import main
from tokenreduce.eval.tiny import save_tiny_checkpoint
from tokenreduce.video import write_demo_video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_calibrate_shortv_writes_a_profile_patch_accepts(tmp_path, checkpoint, capsys):
    write_demo_video(tmp_path / "a.mp4", num_frames=8, size=112, fps=4, motion="pan")
    write_demo_video(tmp_path / "b.mp4", num_frames=8, size=112, fps=4, motion="cuts")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"video": "a.mp4", "question": "What moves?"}) + "\n\n"
                    + json.dumps({"video": "b.mp4"}) + "\n")
    out = tmp_path / "profiles" / "shortv.json"
    assert main(["calibrate", "shortv", "--model", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--num-frames", "4"]) == 0
    profile = json.loads(out.read_text())
    assert profile["method"] == "shortv" and profile["samples"] == 2 and len(profile["layer_contribution"]) == 4
    assert "wrote" in capsys.readouterr().out
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    tokenreduce.patch(model, "shortv", profile=str(out), frozen_fraction=0.5)
    assert len(model._tokenreduce_engine.engines["hf"].frozen.layers) == 2


@pytest.mark.parametrize("argv, message", [
    (["fastv"], "a method without calibration; methods with a calibration: "),
    (["nope"], "unknown method; methods with a calibration: "),
    (["shortv", "--data", "{missing}"], "does not exist"),
    (["shortv", "--data", "{bad}"], "bad.jsonl:2 is not JSON"),
    (["shortv", "--data", "{nofield}"], "needs a 'video', 'image' or 'text' field"),
    (["shortv", "--data", "{novideo}"], "video file"),
])
def test_calibrate_usage_errors(tmp_path, checkpoint, capsys, argv, message):
    files = {"missing": tmp_path / "none.jsonl", "bad": tmp_path / "bad.jsonl", "nofield": tmp_path / "nf.jsonl",
             "novideo": tmp_path / "nv.jsonl"}
    files["bad"].write_text('{"video": "a.mp4"}\n{oops\n')
    files["nofield"].write_text('{"question": "?"}\n')
    files["novideo"].write_text('{"video": "gone.mp4"}\n')
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(files["novideo"])]
    code = main(["calibrate", *argv, "--model", str(checkpoint), "--out", str(tmp_path / "p.json")])
    assert code == 2 and message in capsys.readouterr().err
