"""Readers for multiple-choice video and image QA in the benchmarks' published formats.

Each reader returns ``(samples, problems)``: every usable question as a :class:`Sample`, and one
message per record it could not use (a missing field, an answer that is not among the options, clip
bounds that are not ``0 <= start < end`` finite seconds), naming the file and the record, so a run goes on
with the rest and counts what it skipped. Two questions with the same id are refused (results are kept
per id, so one would silently replace the other). Media files are not opened here (a missing video is
found, and counted, when the run reaches it), but their paths are checked: a media name from an
annotation file must lie under the media folder (no absolute path, no ``..`` leaving it) unless
``allow_outside_media`` is set; symbolic links inside the media folder are followed (the user made them).

Formats (the field names of each benchmark's release):

- ``videomme``: Video-MME's ``videomme/test-00000-of-00001.parquet`` (or the same records as JSON /
  JSONL): ``videoID``, ``question_id``, ``task_type``, ``question``, ``options`` (``"A. ..."``),
  ``answer`` (a letter), ``duration``, ``domain``; videos ``<media>/<videoID>.mp4`` (media default:
  ``data/`` beside the ``videomme/`` folder).
- ``mvbench``: MVBench's ``json/<task>.json`` lists of ``video``, ``question``, ``candidates``,
  ``answer`` (the correct candidate's text), optional ``start``/``end`` seconds; videos under
  ``<media>/<the task's folder>/`` (media default: ``video/`` beside ``json/``), the published
  task-to-folder table below; a folder of frames (``tvqa``) is read as frames at 3 fps.
- ``mlvu``: MLVU's ``json/<n>_<task>.json`` lists of ``video``, ``question``, ``candidates``,
  ``answer`` (text), ``question_type``; videos ``<media>/<json stem>/<video>`` (media default: ``video/``).
- ``egoschema``: EgoSchema's ``questions.json`` (``q_uid``, ``question``, ``option 0`` .. ``option 4``)
  and ``subset_answers.json`` (``{q_uid: index}``); only answered questions are scored; videos
  ``<media>/<q_uid>.mp4`` (media default: ``videos/``).
- ``imageqa``: this project's JSONL, one object per line: ``id``, ``image`` (path, relative to the
  file), ``question``, ``options`` (list of texts), ``answer`` (a letter, an index or the option's
  text), optional ``task``.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase


class RecordError(ValueError):
    """A record that cannot become a Sample; the message names the field."""

# MVBench: task json -> (task name, video folder under video/, frames folder?) as published with the benchmark
MVBENCH_TASKS: dict[str, tuple[str, str, bool]] = {
    "action_sequence.json": ("Action Sequence", "star/Charades_v1_480", False),
    "action_prediction.json": ("Action Prediction", "star/Charades_v1_480", False),
    "action_antonym.json": ("Action Antonym", "ssv2_video", False),
    "fine_grained_action.json": ("Fine-grained Action", "Moments_in_Time_Raw/videos", False),
    "unexpected_action.json": ("Unexpected Action", "FunQA_test/test", False),
    "object_existence.json": ("Object Existence", "clevrer/video_validation", False),
    "object_interaction.json": ("Object Interaction", "star/Charades_v1_480", False),
    "object_shuffle.json": ("Object Shuffle", "perception/videos", False),
    "moving_direction.json": ("Moving Direction", "clevrer/video_validation", False),
    "action_localization.json": ("Action Localization", "sta/sta_video", False),
    "scene_transition.json": ("Scene Transition", "scene_qa/video", False),
    "action_count.json": ("Action Count", "perception/videos", False),
    "moving_count.json": ("Moving Count", "clevrer/video_validation", False),
    "moving_attribute.json": ("Moving Attribute", "clevrer/video_validation", False),
    "state_change.json": ("State Change", "perception/videos", False),
    "fine_grained_pose.json": ("Fine-grained Pose", "nturgbd", False),
    "character_order.json": ("Character Order", "perception/videos", False),
    "egocentric_navigation.json": ("Egocentric Navigation", "vlnqa", False),
    "episodic_reasoning.json": ("Episodic Reasoning", "tvqa/frames_fps3_hq", True),
    "counterfactual_inference.json": ("Counterfactual Inference", "clevrer/video_validation", False),
}
FRAMES_FOLDER_FPS = 3.0  # MVBench's tvqa frames are extracted at 3 fps


@dataclass
class Sample:
    """One multiple-choice question. ``answer`` indexes ``options``; exactly one of ``video``/``image``
    is set; ``start``/``end`` (seconds) bound the clip when the benchmark gives them."""

    benchmark: str
    id: str
    task: str
    question: str
    options: list[str]
    answer: int
    video: Path | None = None
    image: Path | None = None
    start: float | None = None
    end: float | None = None
    frames_fps: float | None = None  # set when ``video`` is a folder of frames
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the record was read (file and record), for messages

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            bound = getattr(self, name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                      or not math.isfinite(bound) or bound < 0):
                raise RecordError(f"clip {name} must be a finite number of seconds >= 0, got {bound!r}")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise RecordError(f"clip start ({self.start} s) must be before its end ({self.end} s)")

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]




Problems = list[str]
FORMATS = ("videomme", "mvbench", "mlvu", "egoschema", "imageqa")


def read_dataset(fmt: str, path: str | Path, media: str | Path | None = None, *, allow_outside_media: bool = False
                 ) -> tuple[list[Sample], Problems]:
    """Samples of ``path`` in format ``fmt`` (see the module docstring) and the records skipped, with why.
    ValueError if the format is unknown, ``path`` holds nothing of that format, or two questions share an id.
    ``allow_outside_media`` lets annotation files name media outside the media folder."""
    readers: dict[str, Callable[[Path, Path | None, bool], tuple[list[Sample], Problems]]] = {
        "videomme": read_videomme, "mvbench": read_mvbench, "mlvu": read_mlvu,
        "egoschema": read_egoschema, "imageqa": read_imageqa}
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; supported: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{fmt}: {path} does not exist")
    samples, problems = readers[fmt](path, Path(media) if media is not None else None, allow_outside_media)
    _refuse_duplicates(fmt, path, samples)
    return samples, problems


def _refuse_duplicates(fmt: str, path: Path, samples: list[Sample]) -> None:
    """ValueError naming every id used by more than one question, with where each was read."""
    seen: dict[str, list[str]] = {}
    for s in samples:
        seen.setdefault(s.id, []).append(s.source)
    dup = {sid: where for sid, where in seen.items() if len(where) > 1}
    if dup:
        shown = "; ".join(f"{sid!r} ({', '.join(where)})" for sid, where in list(dup.items())[:5])
        more = f"; and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise ValueError(f"{fmt}: {len(dup)} question id(s) in {path} are used more than once: {shown}{more}. "
                         "Results are kept per id, so each question needs its own: fix the annotation file")


# --- helpers ---------------------------------------------------------------------------------------------

def _regular(path: Path) -> Path:
    """``path`` if it is a regular file (reading a FIFO or device would block), else ValueError."""
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a folder, FIFO or device); give the annotation file")
    return path


def _load_json(path: Path) -> Any:
    _regular(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from err


def _jsonl(path: Path, problems: Problems) -> Iterable[tuple[int, Any]]:
    try:
        lines = _regular(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable text file: {err}") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{n}: not valid JSON ({err})")


def _records(path: Path, problems: Problems) -> Iterable[tuple[str, Any]]:
    """(where, record) pairs of a JSON list or JSONL file."""
    if path.suffix == ".jsonl":
        for n, rec in _jsonl(path, problems):
            yield f"{path}:{n}", rec
        return
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path} record {i}", rec


def _field(rec: Any, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(rec, dict):
        raise RecordError(f"is a {type(rec).__name__}, not an object")
    if name not in rec or rec[name] is None:
        raise RecordError(f"has no {name!r} field (fields: {', '.join(map(str, rec))})")
    value = rec[name]
    if not isinstance(value, kind):
        raise RecordError(f"field {name!r} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _options(value: Any) -> list[str]:
    """Option texts; lists such as ``["A. cat", "B. dog"]`` lose their letter prefixes."""
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(o, str) for o in value):
        raise RecordError(f"options must be a list of at least 2 strings, got {value!r}")
    if len(value) > len(LETTERS):
        raise RecordError(f"has {len(value)} options; at most {len(LETTERS)} are supported")
    prefixed = all(o[:2] in (f"{LETTERS[i]}.", f"{LETTERS[i]})") for i, o in enumerate(value))
    return [o[2:].strip() for o in value] if prefixed else [o.strip() for o in value]


def _answer_index(answer: Any, options: list[str]) -> int:
    """A letter (``"B"``, ``"(B)"``, ``"B. dog"``), an integer index, or an option's exact text."""
    if isinstance(answer, bool):
        raise RecordError(f"answer {answer!r} is neither a letter, an index nor an option")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return answer
        raise RecordError(f"answer index {answer} is out of range for {len(options)} options")
    if isinstance(answer, str):
        text = answer.strip()
        if text in options:
            return options.index(text)
        letter = text.strip("()")[:1]
        rest = text.strip("()")[1:]
        if letter in LETTERS[: len(options)] and (not rest or rest[0] in ".):"):
            return LETTERS.index(letter)
    raise RecordError(f"answer {answer!r} is neither a letter, an index nor one of the options {options}")


def _collect(where: str, make: Callable[[], Sample], samples: list[Sample], problems: Problems) -> None:
    try:
        sample = make()
    except RecordError as err:
        problems.append(f"{where}: {err}")
        return
    sample.source = where
    samples.append(sample)


def _media(folder: Path, name: Any, field: str, allow_outside: bool) -> Path:
    """``folder / name`` for a media name read from an annotation file. Unless ``allow_outside``, the name
    must stay inside ``folder``: an absolute path or ``..`` leaving it is a RecordError (an annotation file
    from elsewhere could otherwise make the run open any file on the machine)."""
    if not isinstance(name, str) or not name.strip():
        raise RecordError(f"field {field!r} should name a media file, got {name!r}")
    if not allow_outside:
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
            raise RecordError(f"field {field!r} = {name!r} points outside the media folder {folder}; media paths in "
                              "annotation files must lie under it (pass --allow-outside-media to allow this)")
    return folder / name


# --- Video-MME -------------------------------------------------------------------------------------------

def read_videomme(path: Path, media: Path | None, allow_outside: bool = False) -> tuple[list[Sample], Problems]:
    files = sorted(path.glob("**/*.parquet")) + sorted(path.glob("**/*.json*")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"videomme: no .parquet or .json file under {path}")
    root = path if path.is_dir() else path.parent
    if root.name == "videomme":
        root = root.parent
    media = media or root / "data"
    samples: list[Sample] = []
    problems: Problems = []
    for file in files:
        rows = _parquet(file) if file.suffix == ".parquet" else _records(file, problems)
        for where, rec in rows:
            def make(rec: Any = rec) -> Sample:
                options = _options(_field(rec, "options", (list, tuple, object)))
                vid = _field(rec, "videoID")
                return Sample("videomme", str(_field(rec, "question_id")), str(_field(rec, "task_type")),
                              _field(rec, "question"), options, _answer_index(_field(rec, "answer"), options),
                              video=_video_file(media, vid, "videoID", allow_outside),
                              meta={k: rec[k] for k in ("duration", "domain", "sub_category") if k in rec})
            _collect(where, make, samples, problems)
    return samples, problems


def _parquet(file: Path) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(f"reading {file} needs pyarrow (pip install pyarrow), or give the same records as "
                         ".json/.jsonl") from err
    for i, rec in enumerate(pq.read_table(_regular(file)).to_pylist()):
        yield f"{file} row {i}", rec


def _video_file(folder: Path, stem: str, field: str, allow_outside: bool) -> Path:
    """``folder/stem`` with its extension (``.mp4`` unless another file of that stem exists)."""
    path = _media(folder, stem, field, allow_outside)
    if path.suffix:
        return path
    for ext in (".mp4", ".mkv", ".webm", ".avi", ".mov"):
        if path.with_name(f"{path.name}{ext}").exists():
            return path.with_name(f"{path.name}{ext}")
    return path.with_name(f"{path.name}.mp4")


# --- MVBench and MLVU ------------------------------------------------------------------------------------

def _task_files(path: Path, fmt: str) -> tuple[list[Path], Path]:
    """The task json files and the benchmark root (the folder holding ``json/``)."""
    if path.is_file():
        files = [path]
    else:
        folder = path / "json" if (path / "json").is_dir() else path
        files = sorted(folder.glob("*.json"))
    if not files:
        raise ValueError(f"{fmt}: no task .json files in {path} (expected json/<task>.json)")
    root = files[0].parent.parent if files[0].parent.name == "json" else files[0].parent
    return files, root


def read_mvbench(path: Path, media: Path | None, allow_outside: bool = False) -> tuple[list[Sample], Problems]:
    files, root = _task_files(path, "mvbench")
    media = media or root / "video"
    samples: list[Sample] = []
    problems: Problems = []
    for file in files:
        task, folder, frames = MVBENCH_TASKS.get(file.name, (file.stem, file.stem, False))
        for where, rec in _records(file, problems):
            def make(rec: Any = rec, where: str = where, file: Path = file, task: str = task, folder: str = folder,
                     frames: bool = frames) -> Sample:
                options = _options(_field(rec, "candidates", list))
                video = _media(media / folder, _field(rec, "video"), "video", allow_outside)
                bounds = [rec.get(k) for k in ("start", "end")]
                return Sample("mvbench", f"{file.stem}/{where.rsplit(' ', 1)[-1]}", task, _field(rec, "question"),
                              options, _answer_index(_field(rec, "answer"), options), video=video,
                              start=bounds[0], end=bounds[1], frames_fps=FRAMES_FOLDER_FPS if frames else None)
            _collect(where, make, samples, problems)
    return samples, problems


def read_mlvu(path: Path, media: Path | None, allow_outside: bool = False) -> tuple[list[Sample], Problems]:
    files, root = _task_files(path, "mlvu")
    media = media or root / "video"
    samples: list[Sample] = []
    problems: Problems = []
    for file in files:
        for where, rec in _records(file, problems):
            def make(rec: Any = rec, where: str = where, file: Path = file) -> Sample:
                options = _options(_field(rec, "candidates", list))
                task = _field(rec, "question_type")
                return Sample("mlvu", f"{file.stem}/{where.rsplit(' ', 1)[-1]}", task, _field(rec, "question"),
                              options, _answer_index(_field(rec, "answer"), options),
                              video=_media(media / file.stem, _field(rec, "video"), "video", allow_outside),
                              meta={"duration": rec["duration"]} if "duration" in rec else {})
            _collect(where, make, samples, problems)
    return samples, problems


# --- EgoSchema -------------------------------------------------------------------------------------------

def read_egoschema(path: Path, media: Path | None, allow_outside: bool = False) -> tuple[list[Sample], Problems]:
    folder = path if path.is_dir() else path.parent
    questions = path if path.is_file() else folder / "questions.json"
    answers_file = folder / "subset_answers.json"
    for f in (questions, answers_file):
        if not f.is_file():
            raise ValueError(f"egoschema: {f} not found (need questions.json and subset_answers.json)")
    answers = _load_json(answers_file)
    if not isinstance(answers, dict):
        raise ValueError(f"{answers_file} must map q_uid to the answer's index")
    media = media or folder / "videos"
    samples: list[Sample] = []
    problems: Problems = []
    unanswered = 0
    for where, rec in _records(questions, problems):
        uid = rec.get("q_uid") if isinstance(rec, dict) else None
        if isinstance(uid, str) and uid not in answers:
            unanswered += 1  # outside the public subset: no answer to score against
            continue

        def make(rec: Any = rec) -> Sample:
            uid = _field(rec, "q_uid")
            options = [_field(rec, f"option {i}") for i in range(5)]
            return Sample("egoschema", uid, "egoschema", _field(rec, "question"), options,
                          _answer_index(answers[uid], options), video=_video_file(media, uid, "q_uid", allow_outside))
        _collect(where, make, samples, problems)
    if unanswered:
        problems.append(f"{questions}: {unanswered} questions have no answer in {answers_file.name} (not scored)")
    return samples, problems


# --- image QA JSONL --------------------------------------------------------------------------------------

def read_imageqa(path: Path, media: Path | None, allow_outside: bool = False) -> tuple[list[Sample], Problems]:
    if path.is_dir():
        raise ValueError(f"imageqa: give the .jsonl file, not the folder {path}")
    media = media or path.parent
    samples: list[Sample] = []
    problems: Problems = []
    for n, rec in _jsonl(path, problems):
        def make(rec: Any = rec, n: int = n) -> Sample:
            options = _options(_field(rec, "options", list))
            sid = str(rec.get("id", n)) if isinstance(rec, dict) else str(n)
            return Sample("imageqa", sid, str(rec.get("task", "imageqa")), _field(rec, "question"), options,
                          _answer_index(_field(rec, "answer", (str, int)), options),
                          image=_media(media, _field(rec, "image"), "image", allow_outside))
        _collect(f"{path}:{n}", make, samples, problems)
    return samples, problems
