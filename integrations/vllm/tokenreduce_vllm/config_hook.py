"""Check the settings when vLLM builds its config, and attach them to the model's config."""

from __future__ import annotations

import functools

from .settings import CONFIG_KEY, HF_CONFIG_ATTR, check_model, parse


def apply(vllm_config) -> None:
    """Parse and check ``additional_config["tokenreduce"]`` (ValueError on bad settings) and attach
    the result to the model's Hugging Face config, which vLLM hands to the multimodal processor and
    the model in every process (the processor sees no other part of the engine's config)."""
    extra = vllm_config.additional_config
    settings = parse(extra.get(CONFIG_KEY)) if isinstance(extra, dict) else None
    model_config = vllm_config.model_config
    if model_config is None or getattr(model_config, "is_submodel_config", False):
        return  # no model, or the text-stack view vLLM derives for a multimodal model's LLM
    if settings is not None:
        mm = model_config.multimodal_config
        check_model(settings, model_config.architectures, mm.video_pruning_rate if mm is not None else None)
    setattr(model_config.hf_config, HF_CONFIG_ATTR, settings.to_dict() if settings else None)


def install_config_hook() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.__post_init__
    if getattr(original, "_tokenreduce", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        apply(self)

    post_init._tokenreduce = True
    VllmConfig.__post_init__ = post_init
