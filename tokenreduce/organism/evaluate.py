"""Scoring the organism: its test split as evaluation samples, a prompter that reads the answer word's
logit (the runner's interface), Wilson intervals, and a dense accuracy check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..eval.datasets import Sample
from ..eval.fingerprint import digest
from .data import FRAMES, OPTIONS, SPLITS, TASKS, Item, render, test_items, write_frames

CHANCE = {task: 1 / len(OPTIONS[task]) for task in TASKS}


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (better than the normal one near 0 and 1 and for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def samples(folder: Path, per_task: int) -> list[Sample]:
    """The test split as evaluation samples (frames written once as PNG folders under ``folder``)."""
    items = test_items(per_task)
    where = write_frames(items, folder)
    out = []
    for item in items:
        q = item.questions[0]
        out.append(Sample("organism", item.id, q.task, q.text, list(q.options), q.options.index(q.answer),
                          video=where[item.id], frames_fps=float(FRAMES)))
    return out


class WordPrompter:
    """The organism's prompt ("<video>\\nQuestion: ...\\nAnswer:") through its processor, and per option the
    next-token logit of the option word (each option is one token, " word"). Same interface as
    ``tokenreduce.eval.prompts.ChatPrompter``, so ``tokenreduce.eval.runner.evaluate`` runs it unchanged."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._words: dict[str, int] = {}
        self._options: list[str] = []

    def word_id(self, word: str) -> int:
        if word not in self._words:
            ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"option {word!r} is not one token for this tokenizer")
            self._words[word] = ids[0]
        return self._words[word]

    def inputs(self, sample: Sample, kind: str, visual: np.ndarray, fps: float) -> dict[str, torch.Tensor]:
        """The sample's model inputs; also remembers its option words, which :meth:`letter_scores` (called
        by the runner with the option count only, after this, for the same sample) scores."""
        self._options = list(sample.options)
        return prompt_inputs(self.processor, sample.question, visual)

    def letter_scores(self, logits: torch.Tensor, num_options: int) -> list[float]:
        """Per option of the last sample given to :meth:`inputs`, its word's next-token logit."""
        if len(self._options) != num_options:
            raise ValueError(f"letter_scores for {num_options} options after inputs for {len(self._options)}")
        return self.option_scores(logits, self._options)

    def fingerprint(self) -> str:
        """A digest of what shapes the prompt and the scoring (the processor's and tokenizer's chat templates,
        the prompt rendered for a probe question), so results made under another template are run again."""
        probe = prompt_text(self.processor, "Which?")
        return digest({"prompt": probe, "templates": [getattr(self.processor, "chat_template", None),
                                                      getattr(self.tokenizer, "chat_template", None)]})

    def option_scores(self, logits: torch.Tensor, options: list[str]) -> list[float]:
        return [float(logits[self.word_id(w)]) for w in options]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def prompt_text(processor: Any, question: str) -> str:
    """The organism's chat prompt for ``question`` about one video."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_inputs(processor: Any, question: str, frames: np.ndarray) -> dict[str, torch.Tensor]:
    return dict(processor(text=[prompt_text(processor, question)], videos=[frames], return_tensors="pt"))


@torch.inference_mode()
def answer(model: nn.Module, processor: Any, item: Item) -> bool:
    """Whether the model's highest-scoring option word is the answer to ``item``'s first question."""
    q = item.questions[0]
    logits = model(**prompt_inputs(processor, q.text, render(item.video))).logits[0, -1]
    prompter = WordPrompter(processor)
    scores = prompter.option_scores(logits, list(q.options))
    return q.options[int(np.argmax(scores))] == q.answer


def dense_accuracy(model: nn.Module, processor: Any, per_task: int, items: list[Item] | None = None,
                   split: str = "test") -> dict[str, tuple[int, int, float, float, float]]:
    """Per task (hits, questions, Wilson low, Wilson high, chance) on ``split`` (test or validation), or on
    ``items``."""
    items = items if items is not None else test_items(per_task, SPLITS[split])
    tally: dict[str, list[int]] = {}
    for item in items:
        tally.setdefault(item.questions[0].task, []).append(int(answer(model, processor, item)))
    return {t: (sum(v), len(v), *wilson(sum(v), len(v)), CHANCE[t]) for t, v in tally.items()}
