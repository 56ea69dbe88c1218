"""What an evaluation result depends on, stored with every result line so that resuming never mixes settings.

A result line of ``results.jsonl`` carries ``settings``: the model's identity, dtype, device type, frames,
generated tokens, video decoder, a digest of the prompt format and chat template, the tokenreduce and
transformers versions, a digest of the question's record, and the configuration's methods, retention and
options. A rerun counts a (sample, configuration) as done only when a line with exactly the current
settings exists; any other line is run again (and named, with what differs), and the report reads only
lines made with the current settings. Nothing here depends on the dataset format: every format's samples
and configurations get the same treatment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datasets import Sample

NOT_IN_DIGEST = ("source",)  # where a record was read: moving it in its file does not change the question


def jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, keys sorted, other objects their text), so that
    settings computed now compare equal to settings read from a result line."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_digest(sample: Sample) -> str:
    """The question as the model sees it: every Sample field (media by file name, so that moving the data
    folder keeps the results) except where it was read."""
    fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample) if f.name not in NOT_IN_DIGEST}
    fields = {k: v.name if isinstance(v, Path) else v for k, v in fields.items()}
    return digest(fields)


def model_identity(folder: Path) -> str:
    """A local checkpoint: its resolved folder and a digest of its ``config.json``."""
    config = folder / "config.json"
    text = config.read_bytes() if config.is_file() else b""
    return f"{folder.resolve()} (config.json {hashlib.sha256(text).hexdigest()[:12]})"


def versions() -> dict[str, str]:
    """The versions of the code that computes a result."""
    import transformers

    from .. import __version__

    return {"tokenreduce": __version__, "transformers": transformers.__version__}


@dataclass
class Expected:
    """The settings each (sample key, configuration name) result must carry to count as done: ``run``
    (shared by all), the sample's digest and the configuration's own settings (``{}`` for a record that
    stands for every configuration)."""

    run: dict[str, Any]
    samples: dict[str, str]
    configs: dict[str, dict[str, Any]]

    def __post_init__(self) -> None:
        self.run = jsonable(self.run)
        self.configs = {name: jsonable(c) for name, c in self.configs.items()}

    def of(self, key: Any, config: Any) -> dict[str, Any] | None:
        """The settings a line for ``(key, config)`` must carry; None if that pair is not part of this run."""
        if key not in self.samples or config not in self.configs:
            return None
        return {**self.run, "sample": self.samples[key], **self.configs[config]}

    def matches(self, rec: dict[str, Any]) -> bool:
        want = self.of(rec.get("key"), rec.get("config"))
        return want is not None and rec.get("settings") == want


def differences(old: Any, new: dict[str, Any]) -> list[str]:
    """What differs between a line's stored settings and the current ones, one phrase per setting."""
    if not isinstance(old, dict):
        return ["no settings recorded (written by an older tokenreduce)"]
    out = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        if name == "sample":
            out.append("the question's record (question, options, answer, media name or clip) changed")
        else:
            out.append(f"{name}: {json.dumps(old.get(name))} -> {json.dumps(new.get(name))}")
    return out


def describe_outdated(outdated: dict[tuple[str, str], Any], expected: Expected) -> str:
    """One line naming what differs in results made with other settings, most common first, with counts."""
    counts: Counter[str] = Counter()
    for (key, config), old in outdated.items():
        counts.update(differences(old, expected.of(key, config) or {}))
    return "; ".join(f"{what} ({n})" for what, n in counts.most_common())
