"""The evaluation harness under changed settings and bad input (issue 14): resume never mixes settings,
duplicate ids are refused, malformed EgoSchema ids and clip bounds are reported per record, only regular
files are opened, annotation files cannot name media outside the media folder, an empty --methods is
refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from tokenreduce.cli import main
from tokenreduce.eval.datasets import Sample, read_dataset
from tokenreduce.eval.media import MediaError, load_visual
from tokenreduce.eval.needle import write_needle_dataset
from tokenreduce.eval.tiny import save_tiny_checkpoint
from tokenreduce.video import write_demo_video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("needle")
    return {fmt: write_needle_dataset(root / fmt, fmt, per_kind=1, kinds=("colour", "digit"), frames=4, size=56)
            for fmt in ("mvbench", "imageqa", "egoschema", "videomme")}


def _eval(checkpoint, fmt, path, out, *extra, code=0):
    assert main(["eval", "--model", str(checkpoint), "--format", fmt, "--data", str(path), "--out", str(out),
                 "--no-progress", *extra]) == code
    return json.loads((out / "report.json").read_text()) if code == 0 else None


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _within(seconds, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s exception, or its result; fails the test if it has not returned in time
    (a blocking open of a FIFO never returns)."""
    box = {}

    def call():
        try:
            box["value"] = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (handed to the test)
            box["value"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    return box["value"]


# --- resume: the settings each result was made with -------------------------------------------------------

def test_resume_reruns_results_made_with_other_settings_and_reports_only_current_ones(checkpoint, data, tmp_path,
                                                                                       capsys):
    base = ("--methods", "fastv", "--retentions", "0.5", "--limit", "1")
    four = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *base, "--frames", "4")
    assert four["counts"]["run"] == 2
    capsys.readouterr()

    two = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *base, "--frames", "2")
    assert two["counts"]["run"] == 2 and two["counts"]["skipped"] == 0 and two["counts"]["outdated"] == 2
    assert "frames: 4 -> 2 (2)" in capsys.readouterr().out
    assert two["configs"][0]["visual_in"] == four["configs"][0]["visual_in"] / 2  # 2 frames: half the tokens

    layer = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *base, "--frames", "2", "--option", "layer=1")
    assert layer["counts"]["run"] == 1 and layer["counts"]["skipped"] == 1  # dense has no option: still valid
    assert 'options: {} -> {"layer": 1} (1)' in capsys.readouterr().out

    back = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *base, "--frames", "4")
    assert back["counts"]["run"] == 0 and back["counts"]["skipped"] == 2  # the 4-frame lines are still there
    # the report reads the 4-frame results, not the latest lines of the file (2 frames, layer=1)
    assert [c["visual_in"] for c in back["configs"]] == [c["visual_in"] for c in four["configs"]]
    assert [c["kl"] for c in back["configs"]] == [c["kl"] for c in four["configs"]]
    results = _lines(tmp_path / "results.jsonl")
    assert all(r["settings"]["frames"] in (2, 4) and r["settings"]["model"] for r in results)
    assert {r["settings"]["tokenreduce"] for r in results} == {__import__("tokenreduce").__version__}


def test_results_of_an_older_version_or_another_model_are_run_again(checkpoint, data, tmp_path, capsys):
    args = ("--methods", "fastv", "--retentions", "0.5", "--limit", "1", "--frames", "2")
    _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *args)
    results = tmp_path / "results.jsonl"
    old = []
    for rec in _lines(results):  # as an older tokenreduce wrote them: no settings
        rec.pop("settings")
        old.append(json.dumps(rec))
    results.write_text("\n".join(old) + "\n")
    capsys.readouterr()
    report = _eval(checkpoint, "mvbench", data["mvbench"], tmp_path, *args)
    assert report["counts"]["outdated"] == 2 and report["counts"]["run"] == 2
    assert "no settings recorded" in capsys.readouterr().out

    other = tmp_path / "other-model"  # another checkpoint folder
    shutil.copytree(checkpoint, other)
    report = _eval(other, "mvbench", data["mvbench"], tmp_path, *args)
    assert report["counts"]["outdated"] == 2 and report["counts"]["skipped"] == 0
    assert "model:" in capsys.readouterr().out


def test_a_changed_question_under_the_same_id_is_run_again(checkpoint, data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data["imageqa"].parent, root)
    file = root / data["imageqa"].name
    args = ("--methods", "fastv", "--retentions", "0.5")
    _eval(checkpoint, "imageqa", file, tmp_path / "out", *args)
    recs = [json.loads(line) for line in file.read_text().splitlines()]
    recs[0]["options"] = list(reversed(recs[0]["options"]))  # same id, other question
    file.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    capsys.readouterr()
    report = _eval(checkpoint, "imageqa", file, tmp_path / "out", *args)
    assert report["counts"] == {"run": 2, "skipped": 2, "outdated": 2, "failed_samples": 0, "failed_runs": 0}
    assert "the question's record" in capsys.readouterr().out


# --- datasets: duplicate ids, malformed records -----------------------------------------------------------

def test_duplicate_question_ids_are_refused_with_the_duplicates_named(checkpoint, data, tmp_path, capsys):
    file = tmp_path / "qa.jsonl"
    shutil.copytree(data["imageqa"].parent / "images", tmp_path / "images")
    recs = [json.loads(line) for line in data["imageqa"].read_text().splitlines()]
    recs.append({**recs[1], "id": recs[0]["id"], "question": "another question"})  # 3 questions, 2 ids
    file.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match=rf"'{recs[0]['id']}' \({file}:1, {file}:3\)"):
        read_dataset("imageqa", file)
    assert main(["eval", "--model", str(checkpoint), "--format", "imageqa", "--data", str(file),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "used more than once" in capsys.readouterr().err

    videomme = tmp_path / "Video-MME"
    shutil.copytree(data["videomme"].parent, videomme)
    test = videomme / "videomme" / "test.json"
    recs = json.loads(test.read_text())
    test.write_text(json.dumps(recs + [{**recs[0], "question": "a third question"}]))
    with pytest.raises(ValueError, match=rf"'{recs[0]['question_id']}' .*record 0, .*record 2"):
        read_dataset("videomme", videomme / "videomme")


def test_egoschema_ids_that_are_not_strings_are_skipped_and_named(data, tmp_path):
    root = tmp_path / "egoschema"
    shutil.copytree(data["egoschema"], root)
    questions = json.loads((root / "questions.json").read_text())
    bad = [{**questions[0], "q_uid": ["a", "list"]}, {**questions[0], "q_uid": {"an": "object"}}]
    (root / "questions.json").write_text(json.dumps(questions + bad))
    samples, problems = read_dataset("egoschema", root)
    assert len(samples) == 2
    assert len(problems) == 2
    assert "record 2" in problems[0] and "'q_uid' should be str, got list" in problems[0]
    assert "record 3" in problems[1] and "got dict" in problems[1]


def test_clip_bounds_are_checked_per_record(data, tmp_path):
    root = tmp_path / "mvbench"
    shutil.copytree(data["mvbench"], root)
    task = root / "json" / "needle_colour.json"
    good = json.loads(task.read_text())[0]
    bounds = [(0.1, 0.3), (0.3, 0.1), (0.2, 0.2), (math.nan, 1.0), (0.0, math.inf), (-1.0, 0.2), ("0.1", 0.3),
              (True, 0.3)]
    task.write_text(json.dumps([{**good, "start": s, "end": e} for s, e in bounds]))  # json writes NaN, Infinity
    samples, problems = read_dataset("mvbench", task)
    assert [(s.start, s.end) for s in samples] == [(0.1, 0.3)]
    assert len(problems) == 7
    assert all(f"record {i}" in p for i, p in enumerate(problems, 1))
    assert "before its end" in problems[0] and "before its end" in problems[1]
    assert "nan" in problems[2] and "inf" in problems[3] and "-1.0" in problems[4] and "'0.1'" in problems[5]


def test_clip_outside_the_video_or_frame_folder_is_a_media_error(tmp_path):
    video = write_demo_video(tmp_path / "v.mp4", num_frames=16, size=32, fps=8, motion="static")  # 0-1.875 s
    with pytest.raises(MediaError, match=r"clip 5-6 s holds no frame .*0-1.875 s"):
        load_visual(Sample("mvbench", "late", "t", "q", ["a", "b"], 0, video=video, start=5.0, end=6.0), 4)
    with pytest.raises(MediaError, match="holds no frame"):  # between two frames: nothing inside
        load_visual(Sample("mvbench", "gap", "t", "q", ["a", "b"], 0, video=video, start=0.01, end=0.1), 4)
    kind, frames, _ = load_visual(Sample("mvbench", "ok", "t", "q", ["a", "b"], 0, video=video, start=1.5,
                                         end=9.0), 4)  # overlapping the end: the frames inside
    assert frames.shape[0] == 4
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(folder / f"{i:05d}.png")
    with pytest.raises(MediaError, match=r"holds no frame .*6 frames at 3 fps"):
        load_visual(Sample("mvbench", "f", "t", "q", ["a", "b"], 0, video=folder, start=4.0, end=5.0,
                           frames_fps=3.0), 4)


# --- files: regular files only, media under the media folder ------------------------------------------------

def test_a_fifo_is_refused_not_opened(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    err = _within(20, load_visual, Sample("mlvu", "v", "t", "q", ["a", "b"], 0, video=fifo), 4)
    assert isinstance(err, MediaError) and "not a regular file" in str(err)
    image = tmp_path / "pipe.png"
    os.mkfifo(image)
    err = _within(20, load_visual, Sample("imageqa", "i", "t", "q", ["a", "b"], 0, image=image), 4)
    assert isinstance(err, MediaError) and "not a regular file" in str(err)
    annotations = tmp_path / "qa.jsonl"
    os.mkfifo(annotations)
    err = _within(20, read_dataset, "imageqa", annotations)
    assert isinstance(err, ValueError) and "not a regular file" in str(err)


def test_media_paths_outside_the_media_folder_need_the_flag(checkpoint, data, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    image = data["imageqa"].parent / "images" / "colour_000.png"
    shutil.copy(image, outside / "secret.png")
    root = tmp_path / "qa"
    root.mkdir()
    good = json.loads(data["imageqa"].read_text().splitlines()[0])
    file = root / "qa.jsonl"
    names = [str(outside / "secret.png"), "../elsewhere/secret.png", "images/../../elsewhere/secret.png", ""]
    file.write_text("\n".join(json.dumps({**good, "id": f"q{i}", "image": n}) for i, n in enumerate(names)) + "\n")
    samples, problems = read_dataset("imageqa", file)
    assert samples == [] and len(problems) == 4
    assert all("--allow-outside-media" in p for p in problems[:3]) and "'image'" in problems[3]
    samples, problems = read_dataset("imageqa", file, allow_outside_media=True)
    assert [s.image.resolve() for s in samples] == [(outside / "secret.png").resolve()] * 3 and len(problems) == 1

    mvbench = tmp_path / "mvbench"
    shutil.copytree(data["mvbench"], mvbench)
    task = mvbench / "json" / "needle_colour.json"
    rec = json.loads(task.read_text())[0]
    task.write_text(json.dumps([{**rec, "video": "../../../elsewhere/x.mp4"}, {**rec, "video": "/etc/hostname"}]))
    _, problems = read_dataset("mvbench", task)
    assert len(problems) == 2 and all("points outside the media folder" in p for p in problems)

    assert _eval(checkpoint, "imageqa", file, tmp_path / "out", code=2) is None
    assert "no usable questions" in capsys.readouterr().err
    report = _eval(checkpoint, "imageqa", file, tmp_path / "out", "--allow-outside-media", "--limit", "1",
                   "--methods", "fastv")
    assert report["configs"][0]["samples"] == 1 and report["failed_samples"] == 0


def test_symlinks_inside_the_media_folder_are_followed(data, tmp_path):
    root = tmp_path / "qa"
    root.mkdir()
    (root / "images").symlink_to(data["imageqa"].parent / "images")  # a user's own link to the real folder
    file = root / "qa.jsonl"
    shutil.copy(data["imageqa"], file)
    samples, problems = read_dataset("imageqa", file)
    assert problems == [] and len(samples) == 2
    assert load_visual(samples[0], 4)[0] == "image"


# --- command line -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("methods", [",", " , ,", ""])
def test_eval_with_no_method_is_refused(data, tmp_path, capsys, methods):
    assert main(["eval", "--tiny", "--data", str(data["mvbench"]), "--methods", methods, "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "names no method" in err and "framefusion" in err
    assert not (tmp_path / "results.jsonl").exists()


def test_an_unknown_video_backend_is_refused(data, tmp_path, capsys):
    assert main(["eval", "--tiny", "--data", str(data["mvbench"]), "--video-backend", "opencv"]) == 2
    err = capsys.readouterr().err
    assert "--video-backend" in err and "invalid choice" in err and "opencv" in err
