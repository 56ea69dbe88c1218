"""Procedural video questions from real photographs (scikit-image), for the trained organism.

A video is 8 frames of 112 x 112 px: a virtual camera (still, panning left or right, zooming in)
looks at one photograph, or at two with a hard cut between them; a saturated square flashes in
1-3 single, non-adjacent frames. Five kinds of multiple-choice question, each answered with one
word from a fixed option set (chance = 1 / options):

========  ====================================  ============================  ======
task      question                              options                       chance
========  ====================================  ============================  ======
scene     What is in the video?                 the 8 photographs' names      1/8
order     What is shown first? / ... last?      the 8 names (two photos, cut)  1/8
event     What colour is the square?            red, green, blue, yellow      1/4
motion    How does the camera move?             still, left, right, zoom      1/4
count     How many times does the square flash?  one, two, three               1/3
========  ====================================  ============================  ======

``event`` test questions use videos whose square shows in only 1 of the 8 frames: what a
reduction that merges or prunes small, brief content loses. The train and test splits draw from
disjoint random streams (camera paths, cut frames, squares' frames, places, sizes and colours); the
photographs are shared (scene identity is about knowing them). Training videos carry one question of
every applicable kind (scene or both order questions, event, motion, count), so the visual tokens are
paid once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

FRAMES = 8  # 16 was the plan; 8 halves every sample's cost on the shared 2-core machine
SIZE = 112
PHOTOS = {"astronaut": "astronaut", "coffee": "coffee", "cat": "chelsea", "rocket": "rocket",
          "galaxy": "hubble_deep_field", "cells": "immunohistochemistry", "eye": "retina", "man": "camera"}
COLOURS = {"red": (235, 20, 20), "green": (20, 205, 30), "blue": (25, 50, 245), "yellow": (245, 225, 15)}
MOTIONS = ("still", "left", "right", "zoom")
COUNTS = ("one", "two", "three")
TASKS = ("scene", "order", "event", "motion", "count")
OPTIONS = {"scene": tuple(PHOTOS), "order": tuple(PHOTOS), "event": tuple(COLOURS), "motion": MOTIONS,
           "count": COUNTS}
QUESTIONS = {"scene": "What is in the video?", "first": "What is shown first?", "last": "What is shown last?",
             "event": "What colour is the square?", "motion": "How does the camera move?",
             "count": "How many times does the square flash?"}
SPLITS = {"train": 1, "test": 2, "validation": 3}  # seeds of disjoint random streams


@dataclass(frozen=True)
class Video:
    """Everything that determines one video's frames (rendered by :func:`render`)."""

    photos: tuple[str, ...]            # one, or two with a hard cut at ``cut``
    cut: int | None
    motion: str
    colour: str
    flashes: tuple[int, ...]           # frames showing the square
    boxes: tuple[tuple[int, int, int], ...]  # (x, y, side) of the square in each flash, pixels
    paths: tuple[tuple[tuple[float, float, float], ...], ...]  # per photo, per frame (cx, cy, half-width) in [0, 1]


@dataclass(frozen=True)
class Question:
    task: str
    text: str
    answer: str

    @property
    def options(self) -> tuple[str, ...]:
        return OPTIONS[self.task]


@dataclass
class Item:
    """A video with its questions (several in training; one per test item)."""

    id: str
    video: Video
    questions: list[Question] = field(default_factory=list)


@cache
def photo(name: str) -> torch.Tensor:
    """The scikit-image photograph called ``name`` (a key of PHOTOS) as float RGB ``[3, H, W]`` in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, PHOTOS[name])()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255


def _camera(rng: np.random.Generator, motion: str, aspect: float) -> tuple[tuple[float, float, float], ...]:
    """Per frame (cx, cy, half-width), in units of the photo's shorter side, for ``motion``.
    ``aspect``: the photo's width / height (>= or <= 1)."""
    w_units, h_units = max(aspect, 1.0), max(1 / aspect, 1.0)  # photo size in shorter-side units
    t = np.linspace(0, 1, FRAMES)
    if motion == "zoom":
        s0, s1 = rng.uniform(0.44, 0.5), rng.uniform(0.2, 0.25)
        cx, cy = rng.uniform(s0, w_units - s0), rng.uniform(s0, h_units - s0)
        return tuple((cx, cy, s0 + (s1 - s0) * k) for k in t)
    s = rng.uniform(0.26, 0.3)
    cy = rng.uniform(s, h_units - s)
    if motion == "still":
        cx = rng.uniform(s, w_units - s)
        return tuple((cx, cy, s) for _ in t)
    room = w_units - 2 * s
    shift = rng.uniform(0.75, 1.0) * room
    start = rng.uniform(s, w_units - s - shift)
    xs = start + shift * t if motion == "right" else start + shift * (1 - t)
    return tuple((float(x), cy, s) for x in xs)


def make_video(rng: np.random.Generator, photos: tuple[str, ...], motion: str, colour: str, flashes: int
               ) -> Video:
    """A random :class:`Video` with the given content (cut frame, camera paths, square frames and boxes)."""
    cut = int(rng.integers(2, 7)) if len(photos) == 2 else None
    paths = []
    for name in photos:
        img = photo(name)
        paths.append(_camera(rng, motion, img.shape[2] / img.shape[1]))
    frames: list[int] = []
    while len(frames) < flashes:  # non-adjacent frames: each flash is a separate appearance
        f = int(rng.integers(0, FRAMES))
        if all(abs(f - g) > 1 for g in frames):
            frames.append(f)
    boxes = []
    for _ in frames:
        side = int(rng.integers(30, 41))
        boxes.append((int(rng.integers(0, SIZE - side + 1)), int(rng.integers(0, SIZE - side + 1)), side))
    return Video(tuple(photos), cut, motion, colour, tuple(sorted(frames)), tuple(boxes), tuple(paths))


def render(video: Video) -> np.ndarray:
    """The video's frames, uint8 ``[8, 112, 112, 3]`` (bilinear camera crops via ``grid_sample``)."""
    out = torch.empty(FRAMES, 3, SIZE, SIZE)
    for p, name in enumerate(video.photos):
        img = photo(name)
        h, w = img.shape[1:]
        short = min(h, w)
        idx = [f for f in range(FRAMES) if video.cut is None or (f < video.cut) == (p == 0)]
        theta = torch.zeros(len(idx), 2, 3)
        for row, f in enumerate(idx):  # output [-1, 1] -> input [-1, 1]: x_in = sx * x_out + tx
            cx, cy, half = video.paths[p][f]
            theta[row, 0, 0] = 2 * half * short / w
            theta[row, 1, 1] = 2 * half * short / h
            theta[row, 0, 2] = 2 * cx * short / w - 1
            theta[row, 1, 2] = 2 * cy * short / h - 1
        grid = torch.nn.functional.affine_grid(theta, [len(idx), 3, SIZE, SIZE], align_corners=False)
        out[idx] = torch.nn.functional.grid_sample(img.expand(len(idx), -1, -1, -1), grid, mode="bilinear",
                                                   align_corners=False)
    frames = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()
    rgb = np.array(COLOURS[video.colour], dtype=np.uint8)
    for f, (x, y, side) in zip(video.flashes, video.boxes, strict=True):
        frames[f, y:y + side, x:x + side] = rgb
    return frames


def _questions(video: Video) -> list[Question]:
    """One question of every kind that applies to ``video`` (training)."""
    if video.cut is None:
        qs = [Question("scene", QUESTIONS["scene"], video.photos[0])]
    else:  # both: twice the order answers for one video's cost, and "first" and "last" contrasted
        qs = [Question("order", QUESTIONS["first"], video.photos[0]),
              Question("order", QUESTIONS["last"], video.photos[1])]
    qs += [Question("event", QUESTIONS["event"], video.colour),
           Question("motion", QUESTIONS["motion"], video.motion),
           Question("count", QUESTIONS["count"], COUNTS[len(video.flashes) - 1])]
    return qs


def train_items(n: int, seed: int = SPLITS["train"]) -> list[Item]:
    """``n`` training videos, half with one photo, half with a cut; all attributes random."""
    items = []
    names = list(PHOTOS)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = 1 + i % 2
        photos = tuple(names[j] for j in rng.choice(len(names), size=k, replace=False))
        video = make_video(rng, photos, MOTIONS[rng.integers(4)], list(COLOURS)[rng.integers(4)],
                           int(rng.integers(1, len(COUNTS) + 1)))
        items.append(Item(f"train{i}", video, _questions(video)))
    return items


def test_items(per_task: int, seed: int = SPLITS["test"]) -> list[Item]:
    """``per_task`` single-question test videos per task, the asked attribute balanced over its options
    (scene: photo; order: first/last and photo; event: colour, square in 1 frame; motion; count).
    ``seed=SPLITS["validation"]`` gives the validation split, built alike: training choices (which run,
    which settings) are made on it, never on the test split."""
    names, colours = list(PHOTOS), list(COLOURS)
    items = []
    for t, task in enumerate(TASKS):
        for i in range(per_task):
            rng = np.random.default_rng([seed, t, i])
            motion, colour = MOTIONS[rng.integers(4)], colours[rng.integers(4)]
            flashes = int(rng.integers(1, len(COUNTS) + 1))
            if task == "scene":
                photos = (names[i % len(names)],)
            else:
                photos = tuple(names[j] for j in rng.choice(len(names), size=2 if task == "order" else 1,
                                                             replace=False))
            if task == "event":
                colour, flashes = colours[i % 4], 1
            elif task == "motion":
                motion = MOTIONS[i % 4]
            elif task == "count":
                flashes = 1 + i % len(COUNTS)
            video = make_video(rng, photos, motion, colour, flashes)
            if task == "scene":
                q = Question("scene", QUESTIONS["scene"], photos[0])
            elif task == "order":
                which = ("first", "last")[i % 2]
                q = Question("order", QUESTIONS[which], photos[i % 2])
            elif task == "event":
                q = Question("event", QUESTIONS["event"], colour)
            elif task == "motion":
                q = Question("motion", QUESTIONS["motion"], motion)
            else:
                q = Question("count", QUESTIONS["count"], COUNTS[flashes - 1])
            items.append(Item(f"{task}{i}", video, [q]))
    return items


def write_frames(items: list[Item], folder: Path) -> dict[str, Path]:
    """Each item's frames as lossless PNG files ``folder/<id>/00.png`` ... (the eval reads them back);
    frames already written are kept. Returns item id -> its folder."""
    from PIL import Image

    out = {}
    for item in items:
        where = folder / item.id
        if not (where / f"{FRAMES - 1:02d}.png").is_file():
            where.mkdir(parents=True, exist_ok=True)
            for f, frame in enumerate(render(item.video)):
                Image.fromarray(frame).save(where / f"{f:02d}.png")
        out[item.id] = where
    return out
