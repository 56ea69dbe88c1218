"""Check the settings when vLLM builds its config, and attach them to the model's config."""

from __future__ import annotations

import functools

from .settings import CONFIG_KEY, HF_CONFIG_ATTR, check_model, parse


def apply(vllm_config) -> None:
    """Parse and check ``additional_config["tokenreduce"]`` (ValueError on bad settings) and attach
    the result to the model's Hugging Face config, which vLLM hands to the multimodal processor and
    the model in every process (the processor sees no other part of the engine's config).

    Also installs the request hook: configs are built in the process that serves requests (the OpenAI
    server, or the offline ``LLM``), not in the engine's workers, which need none of it."""
    from .request_hook import install_request_hook

    install_request_hook()
    extra = vllm_config.additional_config
    settings = parse(extra.get(CONFIG_KEY)) if isinstance(extra, dict) else None
    model_config = vllm_config.model_config
    if model_config is None or getattr(model_config, "is_submodel_config", False):
        return  # no model, or the text-stack view vLLM derives for a multimodal model's LLM
    if settings is not None:
        mm = model_config.multimodal_config
        check_model(settings, model_config.architectures, mm.video_pruning_rate if mm is not None else None)
        _check_platform()
        if model_config.architectures[0] == "LlavaOnevisionForConditionalGeneration":
            from .llava_onevision import use_mrope_positions

            use_mrope_positions(model_config.hf_text_config)  # original 1-D positions through M-RoPE
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


def _check_platform() -> None:
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda_alike()):
        raise ValueError(f"tokenreduce in vLLM runs on CUDA/ROCm GPUs and CPUs (its position hook wraps their model "
                         f"runners); this platform is {current_platform.device_name}")
