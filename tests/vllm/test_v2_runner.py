"""The plugin under vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``, the default on CUDA), which cannot
run on CPU (it needs Triton and a GPU): its own multimodal classes, ``EncoderRunner`` (encode, gather a
step's embeddings) and ``MultiModalPruner`` (strip the channels, call ``recompute_mrope_positions``),
driven here on CPU with the plugin's models from an in-process CPU engine and the arguments V2 builds:
prompt token ids as an int32 tensor row, positions read from a ``[3, max_model_len]`` int32 row of
``RopeState`` (faked: V2 keeps it in pinned/UVA memory), ``(modality, item)`` encoder inputs of the
requests' multimodal features. ``tests/vllm/gpu`` runs whole engines on V2 on a GPU."""

from __future__ import annotations

import dataclasses
import gc
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm.version")  # not just "vllm": tests/vllm itself is a namespace package "vllm"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: the model is reachable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenreduce_vllm import scenarios  # noqa: E402

CPU = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", block_size=32)
MAX_MODEL_LEN = 128


def _record_features(model) -> None:
    """Keep each request's (prompt ids, multimodal features) as the runner hands them to the model."""
    original = model.get_mrope_input_positions
    model.v2_requests = []

    def record(input_tokens, mm_features):
        model.v2_requests.append((list(input_tokens), list(mm_features)))
        return original(input_tokens, mm_features)

    model.get_mrope_input_positions = record


@pytest.fixture(scope="module")
def qwen(model_dirs):
    """A CPU engine on the tiny Qwen2.5-VL reducing with ``encoder_batch`` "budget" and a 128-token
    context, its model, and the features of a short and a long (dense prompt > 128 tokens) request."""
    family = "qwen2_5_vl"
    llm = scenarios.engine(model_dirs[family], {"method": "evs", "retention": 0.5, "encoder_batch": "budget"},
                           **(CPU | {"max_model_len": MAX_MODEL_LEN}))
    llm.apply_model(_record_features)
    requests = [scenarios.request(family, ["image", "video"], seeds=[0, seed]) for seed in range(3)]
    requests.append(scenarios.request(family, ["video"], kwargs={"tokenreduce_retention": 0.25}, frames=16, size=112))
    for r in requests:  # one at a time: each request's features recorded once
        scenarios.run(llm, [r], max_tokens=1)
    model = llm.apply_model(lambda m: m)[0]
    del model.get_mrope_input_positions  # the class's own again
    yield SimpleNamespace(llm=llm, model=model, family=family, dir=model_dirs[family],
                          model_config=llm.llm_engine.vllm_config.model_config, requests=model.v2_requests)
    del llm, model
    gc.collect()


def test_v2_builds_the_pruner_for_reducing_models(qwen, model_dirs):
    from tokenreduce_vllm.runner_hook import wrap_v2
    from vllm.v1.worker.gpu.model_states import default
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    wrap_v2()  # what the plugin does on CUDA (on CPU it wraps the CPU runner only)
    pruner = default.maybe_create_mm_pruner(qwen.model_config, qwen.model, object(), object())
    assert isinstance(pruner, MultiModalPruner)
    plain = scenarios.engine(model_dirs["qwen2_vl"], None, **CPU)
    model, config = plain.apply_model(lambda m: m)[0], plain.llm_engine.vllm_config.model_config
    assert default.maybe_create_mm_pruner(config, model, object(), object()) is None  # vLLM's rule
    del plain, model
    gc.collect()


class _RopeRows:
    """``RopeState``'s per-request prefill rows as V2 uses them (int32 ``[3, max_model_len]``), refusing a
    write past a row's end where V2's own write would spill into the next request's row."""

    def __init__(self, max_model_len: int):
        self.rows = torch.zeros(3, max_model_len, dtype=torch.int32)
        self.delta = None

    def init(self, positions: torch.Tensor, delta: int) -> None:  # RopeState.init_prefill_positions
        assert positions.shape[1] <= self.rows.shape[1], "positions past max_model_len"
        self.rows[:, :positions.shape[1]] = positions
        self.delta = delta

    def read_prefill_positions(self, req_idx: int, length: int) -> torch.Tensor:
        return self.rows[:, :length]

    def update_prefill_positions(self, req_idx: int, positions: torch.Tensor, delta: int) -> None:
        assert positions.shape[1] <= self.rows.shape[1], "positions past max_model_len"
        self.rows[:, :positions.shape[1]].copy_(positions)
        self.delta = delta


def _v2_prefill(model, model_config, tokens: list[int], features, step: int) -> tuple[torch.Tensor, int, list]:
    """One request's prefill through V2's classes in steps of ``step`` tokens: its positions row, delta
    and the kept indices of its videos."""
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    cache = EncoderCache()
    cache.add_request("r", features)
    encoder = EncoderRunner(model, max_num_tokens=256, hidden_size=model_config.get_inputs_embeds_size(),
                            encoder_cache=cache, dtype=torch.float32, device=torch.device("cpu"))
    rope = _RopeRows(MAX_MODEL_LEN)
    rope.init(*model.get_mrope_input_positions(tokens, features))
    pruner = MultiModalPruner(model, rope, cache, model_config.get_inputs_embeds_size())
    hashes, inputs = encoder.prepare_mm_inputs({"r": list(range(len(features)))})
    cache.encoder_outputs.update(zip(hashes, encoder.execute_mm_encoder(inputs), strict=True))
    kept = [i.cpu().tolist() for i in model.tokenreduce_last]
    all_ids = torch.tensor([tokens], dtype=torch.int32)
    for start in range(0, len(tokens), step):
        n = min(step, len(tokens) - start)
        batch = SimpleNamespace(req_ids=["r"], idx_mapping_np=np.array([0]), prefill_len_np=np.array([len(tokens)]),
                                num_computed_prefill_tokens_np=np.array([start]), num_scheduled_tokens=np.array([n]))
        embeds, _ = encoder.gather_mm_embeddings(["r"], n, np.array([n]), np.array([0, n]),
                                                 np.array([len(tokens)]), np.array([start]))
        if embeds:
            cleaned = pruner.recompute(embeds, batch, SimpleNamespace(all_token_ids=SimpleNamespace(gpu=all_ids)))
            assert all(e.shape[1] == model_config.get_inputs_embeds_size() for e in cleaned)
    return rope.rows[:, :len(tokens)].long(), rope.delta, kept


@pytest.mark.parametrize("step", [3, 8, 1000])
def test_v2_positions_in_any_steps(qwen, step):
    """V2's gather and pruner over chunked steps give the dense prompt's positions and delta, one
    column per token, also for a video whose dense prompt exceeds max_model_len (old code: vLLM's
    positions of ``max(N, offset + dense)`` columns, 78 for a 53-token prompt, past the row)."""
    for tokens, features in qwen.requests:
        positions, delta, kept = _v2_prefill(qwen.model, qwen.model_config, tokens, features, step)
        expected = scenarios.expected_positions(qwen.family, qwen.dir, tokens, kept,
                                                *((16, 112) if len(features) == 1 else (8, 56)))
        assert torch.equal(positions, expected)
        assert delta == int(expected.max()) + 1 - len(tokens)
    assert len(qwen.requests[-1][0]) <= MAX_MODEL_LEN < len(qwen.requests[-1][0]) - 32 + 128


def _tower_calls(qwen, inputs) -> list[int]:
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner

    calls: list[int] = []
    hook = qwen.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(len(kwargs["grid_thw"])), with_kwargs=True)
    try:
        encoder = EncoderRunner(qwen.model, max_num_tokens=256,
                                hidden_size=qwen.model_config.get_inputs_embeds_size(), encoder_cache=EncoderCache(),
                                dtype=torch.float32, device=torch.device("cpu"))
        outputs = encoder.execute_mm_encoder(inputs)
    finally:
        hook.remove()
    assert len(outputs) == len(inputs)
    return calls


def test_v2_encoder_batches_within_the_budget(qwen):
    """V2 sends a step's videos to ``embed_multimodal`` in one call; the model splits them: by vLLM's
    encoder budget with ``encoder_batch`` "budget" (computed from the engine's config on first use), one
    per call with "one" (old code: no budget under V2, so "budget" and "one" both sent every video at
    once)."""
    videos = [("video", features[1].data) for _, features in qwen.requests[:3]]  # three 4 x 2 x 2 videos
    model = qwen.model
    saved = model.tokenreduce, model.tokenreduce_encoder_budget
    try:
        model.tokenreduce_encoder_budget = None
        assert _tower_calls(qwen, videos) == [3]
        assert model.tokenreduce_encoder_budget >= 3 * 16  # vLLM's budget, from the engine's config
        model.tokenreduce_encoder_budget = 2 * 16
        assert _tower_calls(qwen, videos) == [2, 1]
        model.tokenreduce = dataclasses.replace(saved[0], encoder_batch="one")
        assert _tower_calls(qwen, videos) == [1, 1, 1]
    finally:
        model.tokenreduce, model.tokenreduce_encoder_budget = saved
