"""The evaluation harness end to end on a tiny random Qwen2-VL with a real (offline-built) processor, on a
tiny needle dataset written in every supported format; resume, failures, malformed records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenreduce.cli import main
from tokenreduce.eval.datasets import FORMATS, RecordError, _answer_index, _options, read_dataset
from tokenreduce.eval.metrics import agreement
from tokenreduce.eval.needle import write_needle_dataset
from tokenreduce.eval.prompts import parse_letter
from tokenreduce.eval.runner import make_configs
from tokenreduce.eval.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("needle")
    return {fmt: write_needle_dataset(root / fmt, fmt, per_kind=1, kinds=("colour", "digit"), frames=4, size=56)
            for fmt in FORMATS}


def _eval(checkpoint, fmt, path, out, *extra):
    code = main(["eval", "--model", str(checkpoint), "--format", fmt, "--data", str(path), "--frames", "4",
                 "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_give_the_answers_the_needle_writer_meant(data, fmt):
    samples, problems = read_dataset(fmt, data[fmt])
    assert problems == []
    folder = data[fmt] if data[fmt].is_dir() else data[fmt].parent
    folder = folder.parent if folder.name == "videomme" else folder
    key = json.loads((folder / "needle_key.json").read_text())
    assert len(samples) == len(key) == 2
    for s in samples:
        media = s.video or s.image
        assert media.is_file()
        assert s.options[s.answer] == key[media.stem]["answer"]
        assert len(s.options) == (5 if fmt == "egoschema" else 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_end_to_end(checkpoint, data, fmt, tmp_path):
    report = _eval(checkpoint, fmt, data[fmt], tmp_path, "--methods", "framefusion", "--retentions", "1,0.5",
                   "--limit", "1")
    dense, same, half = report["configs"]
    assert [c["config"] for c in report["configs"]] == ["dense", "framefusion@1", "framefusion@0.5"]
    assert dense["samples"] == same["samples"] == half["samples"] == 1
    assert report["failed_samples"] == report["failed_runs"] == 0
    # retention 1.0 is the identity: same distribution, same answers, same accuracy
    assert same["kl"] < 1e-6 and same["top1_agree"] == 1.0 and same["answer_agree"] == 1.0 and same["delta"] == 0
    assert same["kept_fraction"] == 1.0
    assert half["kept_fraction"] == pytest.approx(0.5, abs=0.13)
    assert half["visual_in"] == dense["visual_in"] > 0
    results = [r for r in _lines(tmp_path / "results.jsonl") if r["config"] == "dense"]
    assert dense["accuracy"] == float(results[0]["correct"])
    assert all(r["pred"] == "ABCDE"[max(range(len(r["letter_scores"])), key=r["letter_scores"].__getitem__)]
               for r in results)
    for name in ("report.md", "accuracy_retention.png", "accuracy_prefill.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_resume_skips_done_and_reruns_cut_lines(checkpoint, data, tmp_path):
    args = ("--methods", "fastv", "--retentions", "0.5", "--max-new-tokens", "2")
    _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *args, "--limit", "1")
    results = tmp_path / "results.jsonl"
    assert len(_lines(results)) == 2  # one sample: dense, fastv@0.5
    with results.open("a") as f:  # an interrupted write: half a line
        f.write('{"key": "mvbench:needle_digit/0", "config": "dense", "pr')
    report = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *args)
    assert report["counts"] == {"run": 2, "skipped": 2, "outdated": 0, "failed_samples": 0, "failed_runs": 0}
    assert report["configs"][1]["gen_match"] is not None
    again = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *args)
    assert again["counts"]["run"] == 0 and again["counts"]["skipped"] == 4
    assert [c["accuracy"] for c in again["configs"]] == [c["accuracy"] for c in report["configs"]]


def test_failures_and_malformed_records_are_named_counted_and_skipped(checkpoint, data, tmp_path):
    root = tmp_path / "mvbench"
    shutil.copytree(data["mvbench"], root)
    task = root / "json" / "needle_colour.json"
    good = json.loads(task.read_text())
    (root / "video" / "needle_colour" / "broken.mp4").write_bytes(b"not a video at all")
    bad = [{**good[0], "video": "missing.mp4"}, {**good[0], "video": "broken.mp4"},
           {"video": "x.mp4", "question": "q", "candidates": ["a", "b"]},
           {**good[0], "answer": "not an option"}, ["not", "an", "object"]]
    task.write_text(json.dumps(good + bad))
    report = _eval(checkpoint, "mvbench", root, tmp_path / "out", "--retentions", "0.5")
    assert report["skipped_records"] == 3
    assert any("needle_colour.json record 3" in p and "'answer'" in p for p in report["problems"])
    assert any("record 4" in p and "not an option" in p for p in report["problems"])
    assert report["failed_samples"] == 2
    assert any("missing.mp4" in f and "not found" in f for f in report["failures"])
    assert any("broken.mp4" in f for f in report["failures"])
    assert report["configs"][0]["samples"] == 2 and report["configs"][0]["failed"] == 2


def test_bad_command_lines_name_the_problem(checkpoint, data, tmp_path, capsys):
    assert main(["eval", "--tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--tiny", "--data", str(data["mvbench"]), "--methods", "nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(data["mvbench"]),
                 "--out", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_configs_compose_and_name_methods():
    from tokenreduce.commands.eval import FORMATS as CLI_FORMATS  # kept import-light, must not drift

    assert CLI_FORMATS == FORMATS
    configs = make_configs(["framefusion", "fastv+framefusion"], [0.3, 0.5], {"last_queries": 2})
    assert [c.name for c in configs] == ["dense", "framefusion@0.3", "framefusion@0.5", "fastv+framefusion@0.3",
                                         "fastv+framefusion@0.5"]
    assert configs[3].methods == ("fastv", "framefusion") and configs[3].options == {"last_queries": 2}
    with pytest.raises(ValueError, match="nosuch"):
        make_configs(["nosuch"], [0.3])


def test_answers_options_and_letters():
    options = _options(["A. red", "B. green", "C. blue"])
    assert options == ["red", "green", "blue"]
    assert [_answer_index(a, options) for a in ("B", "(C)", "A. red", 1, "blue")] == [1, 2, 0, 1, 2]
    for bad in ("D", "purple", 3, True):
        with pytest.raises(RecordError):
            _answer_index(bad, options)
    assert parse_letter("The answer is (B).", 4) == "B"
    assert parse_letter("C", 4) == "C" and parse_letter("Answer: D. blue", 4) == "D"
    assert parse_letter("I think so", 4) is None  # "I" is a word, not an option letter here


def test_agreement_metrics():
    a = torch.tensor([2.0, 1.0, 0.0])
    assert agreement(a, a) == {"top1_agree": True, "kl": 0.0}
    other = agreement(a, torch.tensor([0.0, 1.0, 2.0]))
    assert not other["top1_agree"] and other["kl"] > 0.5


def test_clip_bounds_and_frame_folders_sample_inside_the_bounds(tmp_path):
    import numpy as np
    from PIL import Image

    from tokenreduce.eval.datasets import Sample
    from tokenreduce.eval.media import MediaError, load_visual
    from tokenreduce.video import read_video, write_demo_video

    path = write_demo_video(tmp_path / "v.mp4", num_frames=16, size=56, fps=8, motion="static")
    every = read_video(path)
    sample = Sample("mvbench", "x", "t", "q", ["a", "b"], 0, video=path, start=1.0, end=1.9)
    kind, frames, fps = load_visual(sample, 4)
    assert kind == "video" and np.array_equal(frames, every[[8, 10, 13, 15]])  # frames 8..15 lie in [1, 1.9] s
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(folder / f"{i:05d}.jpg", quality=100)
    sample = Sample("mvbench", "y", "t", "q", ["a", "b"], 0, video=folder, start=1.0, end=2.0, frames_fps=3.0)
    _, frames, _ = load_visual(sample, 4)
    assert [round(f.mean() / 20) for f in frames] == [3, 4, 5, 6]  # frames 3..6 at 3 fps
    with pytest.raises(MediaError, match="nothere.mp4"):
        load_visual(Sample("mlvu", "z", "t", "q", ["a", "b"], 0, video=tmp_path / "nothere.mp4"), 4)
