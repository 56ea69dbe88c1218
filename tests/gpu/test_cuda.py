"""GPU checks: skipped without CUDA. Same selections on GPU as on CPU, bf16 end to end."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.testing import make_frames, make_inputs, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_cuda_selection_matches_cpu(family):
    kept = []
    for device in ("cpu", "cuda"):
        model = tiny_model(family).to(device)
        inputs = {k: v.to(device) for k, v in make_inputs(model, videos=[make_frames(8)]).items()}
        tokenreduce.patch(model, "framefusion", retention=0.3)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept.append(tokenreduce.stats(model).kept_indices)
    assert kept[0] == kept[1]


def test_cuda_bf16_generate_and_timer():
    model = tiny_model("qwen2_vl", dtype=torch.bfloat16).to("cuda")
    inputs = make_inputs(model, videos=[make_frames(8)])
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).to("cuda") for k, v in inputs.items()}
    tokenreduce.patch(model, "fastv", retention=0.5)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    s = tokenreduce.stats(model)
    assert s.reduce_ms > 0 and s.visual_tokens_kept == [8]


def test_host_syncs_stay_one_per_reduction_step():
    """The hot path may read back only what a data-dependent length needs: one sync per layer that
    reduces, plus a few per prefill (the layout is built from input_ids on the host)."""
    import warnings

    model = tiny_model("qwen2_vl").to("cuda")
    inputs = {k: v.to("cuda") for k, v in make_inputs(model, videos=[make_frames(8)]).items()}

    def syncs() -> int:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    dense = syncs()
    tokenreduce.patch(model, "framefusion", retention=0.3)
    method = tokenreduce.FrameFusion(retention=0.3)
    acting = len(method.act_layers(model.config.text_config.num_hidden_layers))
    assert syncs() - dense <= acting + 4
