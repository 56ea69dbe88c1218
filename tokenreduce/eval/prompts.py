"""Multiple-choice prompts through a model's own processor and chat template, and answer extraction.

The question is asked as the video benchmarks' common evaluation prompt does (options as
``A. text`` lines, "answer with the option's letter"); the answer is read two ways:

- **logits** (the reported accuracy): the next-token logits after the prompt, compared across the
  option letters only (each letter's score is the best of its single-token spellings, ``"A"`` and
  ``" A"``). Robust (no parsing) and cheap (one forward, no decoding).
- **generated text** (with ``--max-new-tokens``): greedy decoding, then the first standalone option
  letter in the text (``"B"``, ``"(B)"``, ``"B."``, ``"Answer: B"``); None if there is none.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from .datasets import LETTERS, Sample
from .fingerprint import digest

INSTRUCTION = {
    "video": "Select the best answer to the following multiple-choice question based on the video.",
    "image": "Select the best answer to the following multiple-choice question based on the image.",
}


def question_text(sample: Sample, kind: str) -> str:
    letters = LETTERS[: len(sample.options)]
    lines = [INSTRUCTION[kind], sample.question.strip()]
    lines += [f"{letter}. {text}" for letter, text in zip(letters, sample.options, strict=True)]
    lines.append(f"Answer with the option's letter ({', '.join(letters)}) from the given choices directly.")
    return "\n".join(lines)


def parse_letter(text: str, num_options: int) -> str | None:
    """The first standalone option letter in generated ``text``."""
    allowed = LETTERS[:num_options]
    match = re.search(rf"(?<![A-Za-z])([{allowed}])(?![A-Za-z])", text)
    return match[1] if match else None


class ChatPrompter:
    """Builds model inputs for a Sample with ``processor`` and maps logits to option letters."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._letter_ids = [self._single_tokens(letter) for letter in LETTERS]

    def _single_tokens(self, letter: str) -> list[int]:
        ids = set()
        for spelling in (letter, f" {letter}"):
            enc = self.tokenizer.encode(spelling, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
        return sorted(ids)

    def inputs(self, sample: Sample, kind: str, visual: np.ndarray, fps: float) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text",
                                                                  "text": question_text(sample, kind)}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if kind == "image":
            out = self.processor(text=[prompt], images=[visual], return_tensors="pt")
        else:  # frames are already sampled: tell the processor their rate (Qwen models use the timing)
            metadata = {"total_num_frames": len(visual), "fps": fps, "frames_indices": list(range(len(visual)))}
            out = self.processor(text=[prompt], videos=[visual], video_metadata=[metadata], do_sample_frames=False,
                                 return_tensors="pt")
        return dict(out)

    def fingerprint(self) -> str:
        """A digest of everything that shapes the prompt and the scoring: the instructions, the question
        layout (rendered for a probe question), the processor's and tokenizer's chat templates and the
        option letters' token ids. A change to any of them changes the results' settings."""
        probe = Sample("probe", "probe", "probe", "Which?", ["first", "second"], 0)
        return digest({"layout": {kind: question_text(probe, kind) for kind in INSTRUCTION},
                       "templates": [getattr(self.processor, "chat_template", None),
                                     getattr(self.tokenizer, "chat_template", None)],
                       "letters": self._letter_ids})

    def letter_scores(self, logits: torch.Tensor, num_options: int) -> list[float]:
        """Per option letter, the best next-token logit among its single-token spellings."""
        scores = []
        for letter, ids in zip(LETTERS[:num_options], self._letter_ids, strict=False):
            if not ids:
                raise ValueError(f"the tokenizer has no single token for option letter {letter!r}; "
                                 "use --max-new-tokens to read answers from generated text")
            scores.append(float(logits[ids].max()))
        return scores

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
