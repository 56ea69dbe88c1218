"""Fixtures of the vLLM plugin's tests (run in the vLLM environment: integrations/vllm/run_tests.sh).
Nothing here imports vLLM: in the main environment the test modules skip on ``importorskip("vllm.version")``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random-weight Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision saved for vLLM, by family name."""
    from tokenreduce_vllm.testing import FAMILIES, make_model

    root = tmp_path_factory.mktemp("vllm_models")
    return {family: make_model(root, family) for family in FAMILIES}
