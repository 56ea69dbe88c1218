"""The visual engine under shared use and bad batches: several threads on one patched model, patch and
unpatch racing calls, right-padded batches."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import video_inputs

import tokenreduce
from tokenreduce.testing import make_frames, make_inputs, tiny_model

# one method per kind of per-call state: merges (framefusion), attention scores (fastv), frozen layers on
# deepstack (shortv on Qwen3-VL), a vision-tower probe (visionzip), vision-tower rewrites (static, tome-vision)
THREADED = [("qwen2_vl", "framefusion", {"retention": 0.3}), ("llava_onevision", "fastv", {"retention": 0.5}),
            ("qwen3_vl", "shortv", {"layers": (1, 2)}), ("qwen2_5_vl", "visionzip", {"retention": 0.5}),
            ("qwen2_vl", "static", {}), ("llava_next_video", "tome-vision", {"retention": 0.5})]


def _prompts(model, n: int = 4) -> list[dict]:
    """``n`` prompts of different lengths (frames and question tokens), so rows never line up by chance."""
    frames = 8 if model.config.model_type == "llava_next_video" else None  # its processor stacks one shape
    return [make_inputs(model, videos=[make_frames(frames or (4 if i % 2 else 8), seed=i, static=i == 3)],
                        text_lens=[3 + 2 * i], seed=i) for i in range(n)]


def _run_threads(work, n: int) -> list[BaseException]:
    """``work(i)`` in ``n`` threads started together; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("family, name, options", THREADED)
def test_threads_on_one_patched_model_give_what_each_gives_alone(family, name, options):
    model = tiny_model(family)
    tokenreduce.patch(model, name, **options)
    prompts = _prompts(model)
    alone, stats = [], []
    with torch.no_grad():
        for inputs in prompts:
            alone.append(model(**inputs).logits[:, -1])
            stats.append(tokenreduce.stats(model))
    assert len({s.layer_tokens[-1] for s in stats}) > 1 or name in ("static", "tome-vision", "shortv")

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(6):
                out = model(**prompts[i]).logits[:, -1]
                torch.testing.assert_close(out, alone[i], atol=1e-5, rtol=0)
                mine = tokenreduce.stats(model)  # this thread's last prefill, not another thread's
                assert mine.sequence_length == stats[i].sequence_length
                assert mine.layer_tokens == stats[i].layer_tokens

    assert _run_threads(work, len(prompts)) == []


def test_frozen_rows_follow_each_prefill_in_turn():
    """ShortV's active rows are cached per prefill state: a new prefill (whose state may take a freed
    one's memory) never reuses the previous prompt's rows."""
    model = tokenreduce.patch(tiny_model("qwen3_vl"), "shortv", layers=(1, 2))
    prompts = _prompts(model, 2)
    with torch.no_grad():
        first = [model(**p).logits[:, -1] for p in prompts]
        for _ in range(3):
            for inputs, expected in zip(prompts, first, strict=True):
                torch.testing.assert_close(model(**inputs).logits[:, -1], expected, atol=1e-5, rtol=0)


def test_threads_generate_on_one_patched_model():
    model = tiny_model("llava_onevision")
    tokenreduce.patch(model, "framefusion", retention=0.3)
    prompts = _prompts(model)
    with torch.no_grad():
        alone = [model.generate(**p, max_new_tokens=4, do_sample=False) for p in prompts]

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model.generate(**prompts[i], max_new_tokens=4, do_sample=False), alone[i])

    assert _run_threads(work, len(prompts)) == []


def test_stats_from_another_thread_reports_the_last_prefill():
    """The streamer pattern: generate in a worker thread, read stats in the main thread."""
    model = tokenreduce.patch(tiny_model("qwen2_vl"), "framefusion", retention=0.3)
    inputs = video_inputs(model)
    worker = threading.Thread(target=lambda: model.generate(**inputs, max_new_tokens=2, do_sample=False))
    worker.start()
    worker.join()
    assert tokenreduce.stats(model).sequence_length == inputs["input_ids"].shape[1]


def _hold_a_forward(model, inputs):
    """Start a forward in another thread and hold it inside LLM layer 1 until released."""
    inside, release, errors = threading.Event(), threading.Event(), []

    def wait(*_):
        inside.set()
        release.wait(30)

    handle = model.model.language_model.layers[1].register_forward_pre_hook(wait)

    def run():
        try:
            with torch.no_grad():
                model(**inputs)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    assert inside.wait(30)
    return worker, release, handle, errors


def test_unpatch_and_repatch_refuse_while_another_thread_runs_a_forward():
    model = tokenreduce.patch(tiny_model("qwen2_vl"), "framefusion", retention=0.3)
    inputs = video_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    worker, release, handle, errors = _hold_a_forward(model, inputs)
    try:
        with pytest.raises(RuntimeError, match=r"while 1 forward/generate call"):
            tokenreduce.unpatch(model)
        with pytest.raises(RuntimeError, match="cannot unpatch or re-patch"):
            tokenreduce.patch(model, "fastv", retention=0.5)
        assert tokenreduce.is_patched(model)
    finally:
        release.set()
        worker.join()
        handle.remove()
    assert errors == []
    assert tokenreduce.stats(model).layer_tokens[-1] < inputs["input_ids"].shape[1]  # the forward ran reduced
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)
    tokenreduce.unpatch(model)  # idle now
    assert model.config.text_config._attn_implementation == "sdpa"


def test_patch_and_unpatch_racing_in_threads_leave_a_clean_model():
    model = tiny_model("qwen2_vl")
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    def work(i: int) -> None:
        for _ in range(20):
            tokenreduce.patch(model, "fastv" if i % 2 else "framefusion", retention=0.5)

    assert _run_threads(work, 4) == []
    tokenreduce.unpatch(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__


def _right_padded(batch: dict) -> dict:
    """The left-padded ``batch`` with each sample's padding moved to its end."""
    out = dict(batch)
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.stack([row.roll(-pad) for row, pad in zip(batch[key], pads, strict=True)])
    return out


@pytest.mark.parametrize("family, name, options", [("qwen2_vl", "framefusion", {"retention": 0.3}),
                                                    ("qwen3_vl", "fastv", {"retention": 0.5}),
                                                    ("llava_onevision", "shortv", {"layers": (1,)})])
def test_right_padded_batches_are_refused(family, name, options):
    model = tokenreduce.patch(tiny_model(family), name, **options)
    batch = video_inputs(model, n=2, text_lens=[4, 11])
    right = _right_padded(batch)
    with torch.no_grad(), pytest.raises(ValueError, match="padding_side = 'left'"):
        model(**right)
    with torch.no_grad(), pytest.raises(ValueError, match="right-padded"):
        model.generate(**right, max_new_tokens=2, do_sample=False)
    with torch.no_grad():  # the left-padded batch still runs, and a following call is not affected
        model(**batch)
    assert tokenreduce.stats(model).sequence_length == batch["input_ids"].shape[1]


def test_right_padded_text_only_batches_run_as_dense():
    """Nothing is reduced without visual tokens, so the patched model answers exactly as the dense one."""
    model = tiny_model("qwen2_vl")
    batch = _right_padded(make_inputs(model, text_lens=[4, 9]))
    with torch.no_grad():
        dense = model(**batch).logits
        tokenreduce.patch(model, "framefusion", retention=0.3)
        torch.testing.assert_close(model(**batch).logits, dense)
