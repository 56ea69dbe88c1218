"""The plugin's settings: engine-wide from ``--additional-config '{"tokenreduce": {"method": ...,
"retention": ...}}'`` (checked when vLLM builds its config, at start-up), and per request from the
``tokenreduce_method`` / ``tokenreduce_retention`` keys of ``vllm_xargs`` or ``mm_processor_kwargs``
(checked when the request's media are processed, before it is scheduled)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from tokenreduce.methods import REGISTRY
from tokenreduce.methods.pre_llm import pre_llm_methods, pre_llm_spec

# vLLM architecture name -> the plugin's subclass that replaces it ("module:Class", imported lazily)
MODELS: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": "tokenreduce_vllm.qwen:Qwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "tokenreduce_vllm.qwen:Qwen2_5_VL",
    "LlavaOnevisionForConditionalGeneration": "tokenreduce_vllm.llava_onevision:LlavaOnevision",
}
# how a step's videos go through the vision tower: "budget" (batches whose dense token count fits the
# encoder budget, as a dense server batches), "one" (one video per call, as vLLM's V1 runner does when
# pruning), "auto" ("one" on CPUs, where per-video tower time grows with the batch, "budget" elsewhere)
ENCODER_BATCH = ("auto", "budget", "one")
CONFIG_KEY = "tokenreduce"
REQUEST_KEYS: tuple[str, ...] = ("tokenreduce_method", "tokenreduce_retention")
REQUEST_PREFIX = "tokenreduce_"
HF_CONFIG_ATTR = "tokenreduce_vllm"  # where the checked settings travel with the model's config


@dataclass(frozen=True)
class Settings:
    """What the plugin applies: a pre-LLM ``method`` keeping ``retention`` of each video's tokens, and
    (engine-wide) how the vision tower batches a step's videos (``ENCODER_BATCH``)."""

    method: str
    retention: float
    encoder_batch: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_tensor(self, videos: int) -> torch.Tensor:
        """``[videos, 2]`` int64: the method's index in ``pre_llm_methods()`` (their declared
        ``PreLLM.order``, the same in every process) and the retention's float64 bits, per video. This
        travels from the processor to ``embed_multimodal`` as a multimodal field; integers, because vLLM
        casts floating fields to the model's dtype (bf16 would change the retention, hence the count)."""
        bits = torch.tensor([self.retention], dtype=torch.float64).view(torch.int64)
        row = torch.cat([torch.tensor([pre_llm_methods().index(self.method)]), bits])
        return row.expand(videos, 2).clone()

    @classmethod
    def from_tensor(cls, row: torch.Tensor) -> Settings:
        """The settings of one video from its row of :meth:`to_tensor`."""
        return cls(method=pre_llm_methods()[int(row[0])], retention=float(row[1:2].view(torch.float64)))


def supported() -> str:
    """The methods vLLM can run: those declaring the ``PreLLM`` capability, with their default retention."""
    return ", ".join(f"{m} (retention in (0, 1], default {pre_llm_spec(m).default_retention})"
                     for m in pre_llm_methods())


def parse(raw: Any) -> Settings | None:
    """The ``tokenreduce`` entry of ``additional_config`` as Settings (None when absent). Raises
    ValueError naming the problem and the alternatives."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"--additional-config tokenreduce must be an object such as "
                         f'{{"method": "evs", "retention": 0.3}}, got {raw!r}')
    options = dict(raw)
    method = options.pop("method", None)
    if method is None:
        raise ValueError(f"--additional-config tokenreduce needs a 'method'; vLLM supports: {supported()}")
    if method not in pre_llm_methods():
        raise ValueError(_unknown_method(method))
    retention = options.pop("retention", pre_llm_spec(method).default_retention)
    encoder_batch = options.pop("encoder_batch", "auto")
    if encoder_batch not in ENCODER_BATCH:
        raise ValueError(f"tokenreduce encoder_batch must be one of {', '.join(ENCODER_BATCH)}, got {encoder_batch!r}")
    if options:
        needs_llm = _in_llm_options(method)
        raise ValueError(f"tokenreduce method {method!r} in vLLM takes 'retention' and 'encoder_batch'; unknown "
                         f"option(s) {', '.join(sorted(options))}{needs_llm}")
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0 < retention <= 1:
        raise ValueError(f"tokenreduce retention must be a number in (0, 1], got {retention!r}")
    return Settings(method=method, retention=float(retention), encoder_batch=encoder_batch)


def split_request(kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ours, rest)``: the ``tokenreduce_*`` keys of a request's processor kwargs and the others."""
    kwargs = dict(kwargs or {})
    ours = {k: v for k, v in kwargs.items() if k.startswith(REQUEST_PREFIX)}
    return ours, {k: v for k, v in kwargs.items() if k not in ours}


def for_request(default: Settings | None, kwargs: Any) -> Settings | None:
    """The settings of one request: ``default`` (the engine's) overridden by its ``tokenreduce_method``
    and ``tokenreduce_retention`` keys. Raises ValueError naming the problem."""
    ours, _ = split_request(kwargs)
    if not ours:
        return default
    if default is None:
        raise ValueError(f"this vLLM server runs without tokenreduce, so the request's {', '.join(sorted(ours))} "
                         f"cannot apply; start it with --additional-config "
                         f"'{{\"tokenreduce\": {{\"method\": \"evs\", \"retention\": 0.3}}}}' (or `tokenreduce "
                         f"serve --method ...`) to enable per-request settings")
    unknown = sorted(set(ours) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown per-request tokenreduce key(s) {', '.join(unknown)}; "
                         f"a request may set {', '.join(REQUEST_KEYS)}")
    raw = {"method": ours.get("tokenreduce_method", default.method),
           "retention": ours.get("tokenreduce_retention", default.retention), "encoder_batch": default.encoder_batch}
    return parse(raw)


def check_model(settings: Settings, architectures: list[str] | None, video_pruning_rate: float | None) -> None:
    """Refuse models the plugin does not serve and a second pruning rule on top of ours."""
    arch = (architectures or ["<none>"])[0]
    if arch not in MODELS:
        raise ValueError(f"tokenreduce in vLLM supports {', '.join(MODELS)}; this model is {arch}")
    if video_pruning_rate:
        raise ValueError("tokenreduce and vLLM's --video-pruning-rate both prune video tokens; use one of them "
                         "(tokenreduce's 'evs' method applies the same rule)")


def from_hf_config(hf_config: Any) -> Settings | None:
    """The checked settings the plugin attached to the model's Hugging Face config, if any."""
    raw = getattr(hf_config, HF_CONFIG_ATTR, None)
    return Settings(**raw) if raw else None


def _unknown_method(method: Any) -> str:
    if method in REGISTRY:
        stages = ", ".join(REGISTRY[method].stages)
        return (f"tokenreduce method {method!r} acts at stage(s) {stages}, inside the LLM's layers, which vLLM "
                f"cannot do (its scheduler fixes every prompt's token count before the forward); vLLM supports "
                f"the methods that act before the LLM: {supported()}")
    return f"unknown tokenreduce method {method!r}; vLLM supports: {supported()}"


def _in_llm_options(method: str) -> str:
    """What vLLM's form of ``method`` leaves out (its ``PreLLM.note``), said with unknown options."""
    note = pre_llm_spec(method).note
    return f" ({note})" if note else ""
