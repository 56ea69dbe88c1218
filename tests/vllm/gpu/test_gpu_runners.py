"""The serving-default scenarios of ``tests/vllm/test_serving_defaults.py`` on a GPU, forced onto vLLM's
V1 model runner and onto Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=0/1``; V2 is the default on CUDA
when Triton imports), with GPU defaults: block size 16, and either float32 eager (positions recorded and
compared with the dense prompt's, logprobs to 1e-3) or bfloat16 with vLLM's default compilation and CUDA
graphs (no hooks run inside graphs: outputs only, the first step's top-5 logprobs to 0.05, since bf16
may flip a near-tie of the random tiny model later). Run these first on a machine with vLLM and a GPU:
``pytest tests/vllm/gpu``. They skip without CUDA or vLLM."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm.version")  # not just "vllm": tests/vllm itself is a namespace package "vllm"
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (and a CUDA build of vLLM)", allow_module_level=True)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: the model is reachable
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce_vllm import scenarios  # noqa: E402
from tokenreduce_vllm.testing import FAMILIES  # noqa: E402

# engine options and the scenarios.Check fields (scenarios run in fresh processes: JSON-able)
PROFILES = {
    "fp32-eager": ({"dtype": "float32", "enforce_eager": True, "block_size": 16, "gpu_memory_utilization": 0.3},
                   {"atol": 1e-3}),
    "bf16-graphs": ({"dtype": "bfloat16", "block_size": 16, "gpu_memory_utilization": 0.3},
                    {"atol": 0.05, "tokens": False, "positions": False}),
}


@pytest.fixture(params=["0", "1"], ids=["v1", "v2"])
def runner(request, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", request.param)
    return request.param


def _no_problems(problems: list[str]) -> None:
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hit_past_the_video(model_dirs, family, profile, runner):
    options, check = PROFILES[profile]
    _no_problems(scenarios.isolated("prefix_cache", model_dirs[family], family, options, check=check))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_boundaries_around_media(model_dirs, family, profile, runner):
    options, check = PROFILES[profile]
    _no_problems(scenarios.isolated("chunk_boundaries", model_dirs[family], family, options, check=check))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_first_block_different_videos(model_dirs, family, profile, runner):
    options, check = PROFILES[profile]
    _no_problems(scenarios.isolated("shared_prefix", model_dirs[family], family, options, block_size=16, check=check))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_dense_prompt_beyond_max_model_len(model_dirs, family, profile, runner):
    options, check = PROFILES[profile]
    _no_problems(scenarios.isolated("long_video", model_dirs[family], family, options, check=check))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
def test_three_retentions_in_one_batch_with_prefix_caching(model_dirs, family, profile, runner):
    options, check = PROFILES[profile]
    _no_problems(scenarios.isolated("mixed_retentions", model_dirs[family], family, options, check=check))


def test_v2_is_the_runner(model_dirs, monkeypatch):
    """With ``VLLM_USE_V2_MODEL_RUNNER=1`` the engine does run V2 (so the tests above cover it), and the
    plugin's pruner is in place there."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    llm = scenarios.engine(model_dirs["qwen2_5_vl"], **PROFILES["fp32-eager"][0])
    kinds = llm.collective_rpc(lambda wrapper: _runner_kind(getattr(wrapper, "worker", wrapper).model_runner))
    assert kinds[0] == ("vllm.v1.worker.gpu.model_runner", "MultiModalPruner")
    del llm


def _runner_kind(runner) -> tuple[str, str]:
    return type(runner).__module__, type(runner.model_state.mm_pruner).__name__
