"""A synthetic needle-in-a-video task, written in the benchmarks' own formats so the harness runs on it.

Each video is a real H.264 clip of a camera panning over a scikit-image photograph
(``tokenreduce.video.write_demo_video``); one frame, at a random position, carries the answer:

- ``colour``: a large square of one colour (``"What colour is the square that appears briefly?"``);
- ``digit``: a large digit drawn on the frame;
- ``object``: the frame shows another real photograph (a cat, a cup of coffee, a rocket, an astronaut).

Questions are multiple choice (4 options; 5 for EgoSchema) with the correct option at a random
letter. On a random-weight model this checks the plumbing (decoding, prompting, scoring, resuming),
not accuracy: a model must really see the needle frame to answer, which only a trained model can.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..video import read_video, write_demo_video
from .datasets import FORMATS, LETTERS

KINDS = ("colour", "digit", "object")
COLOURS = {"red": (230, 25, 25), "green": (20, 200, 40), "blue": (30, 60, 235), "yellow": (250, 230, 20),
           "magenta": (230, 30, 220), "cyan": (20, 220, 230)}
OBJECTS = {"chelsea": "a cat", "coffee": "a cup of coffee", "rocket": "a rocket", "astronaut": "an astronaut"}
BACKGROUND = "hubble_deep_field"  # the panned photograph; none of the object needles
QUESTIONS = {"colour": "What colour is the square that appears briefly in the video?",
             "digit": "Which digit is shown briefly in the video?",
             "object": "Which object appears briefly in the video?"}


def _needle_frame(kind: str, answer: str, frame: np.ndarray, rng: random.Random) -> np.ndarray:
    size = frame.shape[0]
    out = frame.copy()
    if kind == "colour":
        side = size // 2
        top, left = rng.randrange(0, size - side), rng.randrange(0, size - side)
        out[top:top + side, left:left + side] = COLOURS[answer]
        return out
    from PIL import Image, ImageDraw, ImageFont

    if kind == "digit":
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=int(size * 0.7))
        draw.rectangle([size // 8, size // 16, size * 7 // 8, size * 15 // 16], fill=(255, 255, 255))
        draw.text((size // 2, size // 2), answer, fill=(0, 0, 0), font=font, anchor="mm")
        return np.asarray(img)
    import skimage.data

    photo = Image.fromarray(getattr(skimage.data, answer)())
    return np.asarray(photo.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_item(kind: str, index: int, num_options: int, rng: random.Random) -> dict[str, Any]:
    """Question, options (texts) and the correct option's index for one needle."""
    pool = {"colour": list(COLOURS), "digit": [str(d) for d in range(10)], "object": list(OBJECTS)}[kind]
    if num_options > len(pool):
        raise ValueError(f"needle kind {kind!r} has {len(pool)} answers, fewer than {num_options} options")
    choices = rng.sample(pool, num_options)
    answer = rng.randrange(num_options)
    texts = [OBJECTS[c] if kind == "object" else c for c in choices]
    return {"kind": kind, "id": f"{kind}_{index:03d}", "question": QUESTIONS[kind], "options": texts,
            "answer": answer, "needle": choices[answer]}


def write_needle_dataset(folder: str | Path, fmt: str = "mvbench", *, per_kind: int = 4,
                         kinds: tuple[str, ...] = KINDS, frames: int = 16, size: int = 224, fps: int = 8,
                         seed: int = 0) -> Path:
    """Write ``per_kind`` needle questions of each kind in ``fmt``'s layout under ``folder``; return the path
    to give ``tokenreduce eval --format fmt --data PATH``. ``folder/needle_key.json`` records, per video
    (file stem), the correct option's text and which frame carries the needle."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown needle kinds {sorted(unknown)}; available: {', '.join(KINDS)}")
    if fmt == "egoschema" and "object" in kinds:
        kinds = tuple(k for k in kinds if k != "object")  # EgoSchema has 5 options; there are 4 object photos
    folder = Path(folder)
    rng = random.Random(seed)
    base = folder / "_background.mp4"
    write_demo_video(base, num_frames=frames, size=size, fps=fps, motion="pan", image=BACKGROUND)
    background = read_video(base)
    base.unlink()
    items = []
    for kind in kinds:
        for i in range(per_kind):
            item = make_item(kind, i, 5 if fmt == "egoschema" else 4, rng)
            video = background.copy()
            at = rng.randrange(frames)
            video[at] = _needle_frame(kind, item["needle"], video[at], rng)
            item.update(frames=video, needle_frame=at)
            items.append(item)
    key = {item["id"]: {"kind": item["kind"], "answer": item["options"][item["answer"]],
                        "needle_frame": item["needle_frame"], "frames": frames} for item in items}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "needle_key.json").write_text(json.dumps(key, indent=1) + "\n")
    return _WRITERS[fmt](folder, items, fps)


def _letters(item: dict[str, Any]) -> list[str]:
    return [f"{LETTERS[i]}. {t}" for i, t in enumerate(item["options"])]


def _write_videomme(folder: Path, items: list[dict], fps: int) -> Path:
    records = []
    for item in items:
        _write_mp4(folder / "data" / f"{item['id']}.mp4", item["frames"], fps)
        records.append({"video_id": item["id"], "duration": "short", "domain": "Synthetic",
                        "sub_category": "needle", "url": "", "videoID": item["id"],
                        "question_id": f"{item['id']}-1", "task_type": f"needle {item['kind']}",
                        "question": item["question"], "options": _letters(item),
                        "answer": LETTERS[item["answer"]]})
    path = folder / "videomme" / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return folder / "videomme"


def _write_tasks(folder: Path, items: list[dict], fps: int, stem: str, extra: dict[str, str]) -> Path:
    tasks: dict[str, list[dict]] = {}
    for item in items:
        task = stem.format(kind=item["kind"])
        name = f"{item['id']}.mp4"
        _write_mp4(folder / "video" / task / name, item["frames"], fps)
        rec = {"video": name, "question": item["question"], "candidates": item["options"],
               "answer": item["options"][item["answer"]]}
        rec.update({k: v.format(kind=item["kind"]) for k, v in extra.items()})
        tasks.setdefault(task, []).append(rec)
    (folder / "json").mkdir(parents=True, exist_ok=True)
    for task, recs in tasks.items():
        (folder / "json" / f"{task}.json").write_text(json.dumps(recs, indent=1))
    return folder


def _write_mvbench(folder: Path, items: list[dict], fps: int) -> Path:
    return _write_tasks(folder, items, fps, "needle_{kind}", {})


def _write_mlvu(folder: Path, items: list[dict], fps: int) -> Path:
    return _write_tasks(folder, items, fps, "2_needle_{kind}", {"question_type": "needle_{kind}"})


def _write_egoschema(folder: Path, items: list[dict], fps: int) -> Path:
    questions, answers = [], {}
    for item in items:
        _write_mp4(folder / "videos" / f"{item['id']}.mp4", item["frames"], fps)
        rec = {"q_uid": item["id"], "google_drive_id": "", "question": item["question"]}
        rec.update({f"option {i}": t for i, t in enumerate(item["options"])})
        questions.append(rec)
        answers[item["id"]] = item["answer"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "questions.json").write_text(json.dumps(questions, indent=1))
    (folder / "subset_answers.json").write_text(json.dumps(answers, indent=1))
    return folder


def _write_imageqa(folder: Path, items: list[dict], fps: int) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        name = f"images/{item['id']}.png"
        Image.fromarray(item["frames"][item["needle_frame"]]).save(folder / name)
        question = item["question"].replace("appears briefly in the video", "is in the image").replace(
            "is shown briefly in the video", "is shown in the image")
        lines.append(json.dumps({"id": item["id"], "image": name, "question": question, "options": item["options"],
                                 "answer": LETTERS[item["answer"]], "task": f"needle_{item['kind']}"}))
    path = folder / "needle.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


_WRITERS = {"videomme": _write_videomme, "mvbench": _write_mvbench, "mlvu": _write_mlvu,
            "egoschema": _write_egoschema, "imageqa": _write_imageqa}
