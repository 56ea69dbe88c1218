"""The evaluation loop: every sample under dense and each configuration, resumable, failures counted.

Results go to a JSONL file, one line per (sample, configuration), appended and flushed as they
come, each with the settings it was made with (:mod:`.fingerprint`); a rerun with the same file skips
what is done with the same settings (failed samples, and results made with other settings, are run
again). Dense runs first for every sample: its last-token logits and generated tokens are what the
reduced runs' agreement is measured against (recomputed in memory when resuming).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import api
from ..methods import REGISTRY
from ..timing import Clock
from ..video import video_backend
from .datasets import LETTERS, Sample
from .fingerprint import Expected, describe_outdated, sample_digest, versions
from .media import MediaError, load_visual
from .metrics import agreement
from .prompts import ChatPrompter, parse_letter

DENSE = "dense"
ANY_CONFIG = "*"  # an error record for every configuration of a sample (its media, or dense, failed)


@dataclass(frozen=True)
class Config:
    """A way to run the model: dense, or ``methods`` (composed in order) with ``options``."""

    name: str
    methods: tuple[str, ...] = ()
    retention: float | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def patch(self, model: torch.nn.Module) -> None:
        opts = dict(self.options)
        if self.retention is not None:
            opts["retention"] = self.retention
        api.patch(model, list(self.methods), **opts)  # each option goes to the listed methods that have it

    def settings(self) -> dict[str, Any]:
        """What this configuration contributes to a result's settings."""
        return {"methods": list(self.methods), "retention": self.retention, "options": dict(self.options)}


def make_configs(methods: Iterable[str], retentions: Iterable[float | None], options: dict[str, Any] | None = None
                 ) -> list[Config]:
    """Dense, then each method spec (``name`` or ``a+b`` to compose) at each retention. A composition
    none of whose methods has a ``retention`` option runs once, with its own budget."""
    options = dict(options or {})
    out = [Config(DENSE)]
    for spec in methods:
        names = tuple(n.strip().lower() for n in spec.split("+") if n.strip())
        unknown = [n for n in names if n not in REGISTRY]
        if not names or unknown:
            raise ValueError(f"unknown method(s) {unknown or [spec]} in {spec!r}; available: {', '.join(REGISTRY)}")
        has_retention = any("retention" in REGISTRY[n].__dataclass_fields__ for n in names)
        label = "+".join(names)
        for r in retentions if has_retention else [None]:
            out.append(Config(label if r is None else f"{label}@{r:g}", names, r, options))
    return out


@dataclass
class RunSettings:
    """How every sample is run. ``model`` identifies the model in the results' settings (a resumed run with
    another model reruns); ``video_backend`` is the decoder (None: decord if installed, else PyAV)."""

    num_frames: int = 8
    max_new_tokens: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    model: str = ""
    video_backend: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The settings shared by every result of the run (see :mod:`.fingerprint`)."""
        return {"model": self.model, "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "frames": self.num_frames, "max_new_tokens": self.max_new_tokens,
                "video_backend": video_backend(self.video_backend), **versions()}


def expected_settings(samples: list[Sample], configs: list[Config], settings: RunSettings,
                      prompter: ChatPrompter) -> Expected:
    """The settings every (sample, configuration) result of this run carries."""
    return Expected({**settings.fingerprint(), "prompt": prompter.fingerprint()},
                    {sample_key(s): sample_digest(s) for s in samples},
                    {ANY_CONFIG: {}, **{c.name: c.settings() for c in configs}})


def load_done(path: Path, expected: Expected) -> tuple[set[tuple[str, str]], dict[tuple[str, str], Any]]:
    """(sample key, config) pairs with a result in ``path`` made with the expected settings, and the stored
    settings of the pairs whose only results were made with other settings (to be run again)."""
    done: set[tuple[str, str]] = set()
    other: dict[tuple[str, str], Any] = {}
    if not path.exists():
        return done, other
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that pair reruns
        if not isinstance(rec, dict) or "error" in rec or expected.of(rec.get("key"), rec.get("config")) is None:
            continue
        pair = (rec["key"], rec["config"])
        if expected.matches(rec):
            done.add(pair)
        else:
            other[pair] = rec.get("settings")
    return done, {pair: old for pair, old in other.items() if pair not in done}


def sample_key(sample: Sample) -> str:
    return f"{sample.benchmark}:{sample.id}"


def evaluate(model: torch.nn.Module, prompter: ChatPrompter, samples: list[Sample], configs: list[Config],
             out: Path, settings: RunSettings, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every sample under every config, appending results to ``out`` (JSONL). Returns counts:
    ``run`` (new results), ``skipped`` (done before with the same settings), ``outdated`` (results in ``out``
    made with other settings, run again), ``failed_samples`` (media or the dense run failed: the sample is
    lost) and ``failed_runs`` (one configuration failed on a sample; the others ran)."""
    if not configs or configs[0].name != DENSE:
        raise ValueError("the first configuration must be dense (the reference for agreement)")
    expected = expected_settings(samples, configs, settings, prompter)
    done, outdated = load_done(out, expected)
    if outdated:
        log(f"{len(outdated)} results in {out} were made with other settings and are run again "
            f"(their lines stay; the report uses only the current settings): {describe_outdated(outdated, expected)}")
    counts = {"run": 0, "skipped": 0, "outdated": len(outdated), "failed_samples": 0, "failed_runs": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("a") as sink:  # an interrupted run left half a line: end it, so new lines stay whole
            sink.write("\n")
    clock = Clock(settings.device)
    with out.open("a") as sink, tqdm(samples, desc="eval", unit="sample", disable=not progress) as bar:

        def fail(sample: Sample, config: str, message: str) -> None:
            log(f"failed: {message}")
            key = sample_key(sample)
            sink.write(json.dumps({"key": key, "benchmark": sample.benchmark, "task": sample.task,
                                   "config": config, "error": message,
                                   "settings": expected.of(key, config)}) + "\n")
            sink.flush()

        for sample in bar:
            key = sample_key(sample)
            todo = [c for c in configs if (key, c.name) not in done]
            counts["skipped"] += len(configs) - len(todo)
            if not todo:
                continue
            try:
                kind, visual, fps = load_visual(sample, settings.num_frames, settings.video_backend)
                inputs = _to_device(prompter.inputs(sample, kind, visual, fps), settings)
            except (MediaError, ValueError, TypeError) as err:  # processor errors on odd media are ValueErrors
                counts["failed_samples"] += 1
                fail(sample, ANY_CONFIG, str(err))
                continue
            dense = None
            for config in configs:  # dense first, even when done: the reference for agreement
                if config not in todo and config.name != DENSE:
                    continue
                try:
                    rec, logits, gen = _run_one(model, prompter, sample, config, inputs, settings, clock, dense)
                except (ValueError, TypeError, RuntimeError) as err:
                    where = f"{sample.benchmark} sample {sample.id} under {config.name}: {err}"
                    if config.name == DENSE:  # no reference: the sample is lost
                        counts["failed_samples"] += 1
                        fail(sample, ANY_CONFIG, where)
                        break
                    counts["failed_runs"] += 1
                    fail(sample, config.name, where)
                    continue
                if config.name == DENSE:
                    dense = (logits, gen)
                if config in todo:
                    rec.update(key=key, frames=len(visual) if kind == "video" else 1,
                               settings=expected.of(key, config.name))
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    counts["run"] += 1
            bar.set_postfix(failed=counts["failed_samples"] + counts["failed_runs"])
    return counts


def _to_device(inputs: dict[str, torch.Tensor], settings: RunSettings) -> dict[str, torch.Tensor]:
    return {k: v.to(settings.device, settings.dtype) if k.startswith("pixel_values") else v.to(settings.device)
            for k, v in inputs.items()}


def _visual_in(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    ids = inputs["input_ids"][0]
    tokens = [getattr(model.config, n, None) for n in ("image_token_id", "video_token_id", "image_token_index",
                                                         "video_token_index")]
    return int(sum((ids == t).sum() for t in {t for t in tokens if t is not None}))


@torch.inference_mode()
def _run_one(model: torch.nn.Module, prompter: ChatPrompter, sample: Sample, config: Config,
             inputs: dict[str, torch.Tensor], settings: RunSettings, clock: Clock,
             dense: tuple[torch.Tensor, list[int] | None] | None) -> tuple[dict[str, Any], torch.Tensor, Any]:
    start = clock.now()
    if config.name != DENSE:
        config.patch(model)
    try:
        t0 = clock.now()
        logits = model(**inputs).logits[0, -1].float().cpu()
        prefill_ms = clock.now() - t0
        length = inputs["input_ids"].shape[1]
        if config.name == DENSE:
            visual_in = visual_kept = _visual_in(model, inputs)
            layer_rows = float(length)
        else:
            stats = api.stats(model)
            visual_in, visual_kept = stats.visual_tokens_in[0], stats.visual_tokens_kept[0]
            layer_rows = sum(stats.layer_tokens) / len(stats.layer_tokens) if stats.layer_tokens else float(length)
        gen_ids = None
        if settings.max_new_tokens:
            seq = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)
            gen_ids = seq[0, inputs["input_ids"].shape[1]:].tolist()
    finally:
        if config.name != DENSE:
            api.unpatch(model)
    sample_ms = clock.now() - start
    scores = prompter.letter_scores(logits, len(sample.options))
    pred = LETTERS[int(np.argmax(scores))]
    rec: dict[str, Any] = {
        "benchmark": sample.benchmark, "id": sample.id, "task": sample.task, "config": config.name,
        "methods": list(config.methods), "retention": config.retention, "answer": sample.answer_letter,
        "pred": pred, "correct": pred == sample.answer_letter, "letter_scores": scores,
        "visual_in": visual_in, "visual_kept": visual_kept, "prompt_tokens": length, "mean_layer_rows": layer_rows,
        "prefill_ms": prefill_ms, "sample_ms": sample_ms,
    }
    if gen_ids is not None:
        text = prompter.decode(gen_ids)
        gen_pred = parse_letter(text, len(sample.options))
        rec.update(generated=text, generated_ids=gen_ids, gen_pred=gen_pred,
                   gen_correct=gen_pred == sample.answer_letter)
    if dense is not None:
        rec.update(agreement(dense[0], logits))
        if gen_ids is not None and dense[1] is not None:
            rec["gen_match"] = gen_ids == dense[1]
    return rec, logits, gen_ids
