"""The plugin in vLLM's offline engine (``vllm.LLM``, in-process, float32 on CPU): placeholder counts,
retention 1.0 equal to plain vLLM, the same kept tokens as the Hugging Face path, start-up errors."""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm.version")  # not just "vllm": tests/vllm itself is a namespace package "vllm"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: fast start, model reachable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenreduce_vllm.testing import FAMILIES, make_video, placeholder_ids, video_metadata  # noqa: E402

from tokenreduce.methods.pre_llm import reduce_video, video_token_count  # noqa: E402

METHODS = ("evs", "framefusion", "aim", "sms")
FRAMES, SIZE = 8, 56
RETENTION = 0.5
_RUNS: dict = {}


def _tags(family: str) -> tuple[str, str]:
    if family == "llava_onevision":
        return "<image>", "<video>"
    return "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def _requests(family: str) -> list[dict]:
    image_tag, video_tag = _tags(family)
    image = make_video(1, SIZE, seed=3)[0]
    from PIL import Image

    return [{"prompt": f"user: {image_tag} describe the image", "multi_modal_data": {"image": Image.fromarray(image)}},
            {"prompt": f"user: {video_tag} describe the video",
             "multi_modal_data": {"video": (make_video(FRAMES, SIZE), video_metadata(FRAMES))}}]


def _llm(model_dir, tokenreduce=None, **kwargs):
    from vllm import LLM

    extra = {"additional_config": {"tokenreduce": tokenreduce}} if tokenreduce is not None else {}
    options = dict(dtype="float32", max_model_len=2048, max_num_seqs=2, enforce_eager=True, seed=0,
                   limit_mm_per_prompt={"image": 1, "video": 1}, distributed_executor_backend="uni")
    return LLM(model=str(model_dir), tokenizer=str(model_dir), **(options | extra | kwargs))


def run(model_dirs, family: str, tokenreduce: dict | None) -> list[dict]:
    """Greedy 4-token generations of the image and the video request (cached per configuration)."""
    key = (family, None if tokenreduce is None else tuple(sorted(tokenreduce.items())))
    if key not in _RUNS:
        from vllm import SamplingParams

        llm = _llm(model_dirs[family], tokenreduce)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)
        results = []
        for request in _requests(family):
            out = llm.generate([request], params, use_tqdm=False)[0]
            kept = llm.apply_model(lambda m: [i.cpu().tolist() for i in getattr(m, "tokenreduce_last", [])])[0]
            results.append({"prompt": list(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
                            "logprobs": [next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs],
                            "kept": kept})
        del llm
        gc.collect()
        _RUNS[key] = results
    return _RUNS[key]


def _grid(family: str) -> tuple[int, int]:
    """(frames, cells) of the test video in the model's token grid."""
    if family == "llava_onevision":
        return FRAMES, 4  # 56 px SigLIP (4 x 4 patches) pooled by 2
    return FRAMES // 2, (SIZE // 28) ** 2  # temporal patch 2; 14 px patches merged 2 x 2


# one method per family keeps the suite short; both methods run every family in the tests below
@pytest.mark.parametrize(("family", "method"), [("qwen2_vl", "framefusion"), ("qwen2_5_vl", "evs"),
                                                ("llava_onevision", "framefusion")])
def test_retention_one_equals_plain_vllm(model_dirs, family, method):
    dense = run(model_dirs, family, None)
    same = run(model_dirs, family, {"method": method, "retention": 1.0})
    for d, s in zip(dense, same, strict=True):
        assert s["prompt"] == d["prompt"]
        assert s["tokens"] == d["tokens"]
        assert torch.allclose(torch.tensor(s["logprobs"]), torch.tensor(d["logprobs"]), atol=1e-5)
    frames, cells = _grid(family)
    assert same[1]["kept"] == [list(range(frames * cells))]  # the reduction did run, and kept everything


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_reduced_placeholders(model_dirs, family, method):
    image_id, video_id = placeholder_ids(model_dirs[family])
    dense = run(model_dirs, family, None)
    reduced = run(model_dirs, family, {"method": method, "retention": RETENTION})
    frames, cells = _grid(family)
    newline = 1 if family == "llava_onevision" else 0
    assert dense[1]["prompt"].count(video_id) == frames * cells + newline
    expected = video_token_count(method, frames, cells, RETENTION)
    assert expected < frames * cells
    assert reduced[1]["prompt"].count(video_id) == expected + newline
    assert len(reduced[1]["prompt"]) == len(dense[1]["prompt"]) - (frames * cells - expected)
    assert len(reduced[1]["kept"][0]) == expected and len(reduced[1]["tokens"]) == 4
    # images pass through: same placeholders and the same outputs as plain vLLM
    assert reduced[0]["prompt"] == dense[0]["prompt"] and reduced[0]["prompt"].count(image_id) > 0
    assert reduced[0]["tokens"] == dense[0]["tokens"]


def _hf_video_embeds(model_dir, family: str) -> torch.Tensor:
    """The same video through transformers' processor and vision tower: ``[frames, cells, dim]``."""
    import transformers as T

    model = T.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = T.AutoProcessor.from_pretrained(model_dir)
    frames = make_video(FRAMES, SIZE)
    kwargs = {}
    if family == "qwen2_5_vl":
        meta = video_metadata(FRAMES)
        kwargs["video_metadata"] = [T.video_utils.VideoMetadata(
            total_num_frames=FRAMES, fps=meta["fps"], duration=meta["duration"], frames_indices=meta["frames_indices"])]
    inputs = processor(text=[f"user: {_tags(family)[1]} describe the video"], videos=[frames], do_sample_frames=False,
                       return_tensors="pt", **kwargs)
    with torch.no_grad():
        if family == "llava_onevision":
            out = model.model.get_video_features(inputs["pixel_values_videos"], vision_feature_layer=-1,
                                                 vision_feature_select_strategy="full").pooler_output
            embeds = out.reshape(-1, out.shape[-1])[:-1]  # drop the trailing newline
        else:
            out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
            embeds = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    frames_, cells = _grid(family)
    return embeds.reshape(frames_, cells, -1), model, inputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_same_tokens_as_hugging_face(model_dirs, family, method):
    """vLLM keeps exactly the tokens that the same function keeps on transformers' own embeddings of the
    same video; for ``evs`` and ``aim`` also those that ``tokenreduce.patch(model, method)`` keeps inside a
    HF forward (AIM without its in-LLM pruning)."""
    reduced = run(model_dirs, family, {"method": method, "retention": RETENTION})
    embeds, model, inputs = _hf_video_embeds(model_dirs[family], family)
    index, _ = reduce_video(method, embeds, RETENTION)
    assert reduced[1]["kept"] == [index.tolist()]
    if method in ("evs", "aim"):  # the HF methods whose pre-LLM stage has its count fixed by the retention
        import tokenreduce

        _, video_id = placeholder_ids(model_dirs[family])
        tokenreduce.patch(model, method, retention=RETENTION, **({"prune": False} if method == "aim" else {}))
        with torch.no_grad():
            model(**inputs)
        video_rows = (inputs["input_ids"][0] == video_id).nonzero().flatten()
        if family == "llava_onevision":
            video_rows = video_rows[:-1]  # the newline row is never reduced
        kept_rows = torch.as_tensor(tokenreduce.stats(model).kept_indices[0][0])
        hf_index = torch.isin(video_rows, kept_rows).nonzero().flatten()
        assert hf_index.tolist() == index.tolist()


def _record_positions(model) -> None:
    """Record the positions of every forward of the LLM's first layer in ``model.tokenreduce_positions_seen``."""
    model.tokenreduce_positions_seen = []
    model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: model.tokenreduce_positions_seen.append(args[0].cpu().clone()), with_kwargs=True)


@pytest.mark.parametrize("chunk", [None, 8])
def test_llava_onevision_original_positions(model_dirs, chunk):
    """LLaVA-OneVision (1-D RoPE) through M-RoPE with equal rows: the kept video tokens sit at their
    dense-prompt positions, the newline and the text after the video too, and generation continues from
    the dense prompt's end, also when chunked prefill splits the video (``chunk`` tokens per step)."""
    from vllm import SamplingParams

    extra = {"max_num_batched_tokens": chunk, "enable_chunked_prefill": True} if chunk else {}
    llm = _llm(model_dirs["llava_onevision"], {"method": "evs", "retention": RETENTION}, **extra)
    llm.apply_model(_record_positions)
    out = llm.generate([_video_request("llava_onevision")], SamplingParams(max_tokens=3, temperature=0.0),
                       use_tqdm=False)[0]
    kept = llm.apply_model(lambda m: m.tokenreduce_last[0].cpu())[0]
    seen = llm.apply_model(lambda m: m.tokenreduce_positions_seen)[0]
    del llm
    gc.collect()
    rows = torch.cat(seen, dim=-1)
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
    ids = list(out.prompt_token_ids)
    _, video_id = placeholder_ids(model_dirs["llava_onevision"])
    start, frames, cells = ids.index(video_id), *_grid("llava_onevision")
    dense = frames * cells + 1
    assert ids.count(video_id) == len(kept) + 1
    expected = torch.cat([torch.arange(start), start + kept, torch.tensor([start + dense - 1]),
                          start + dense + torch.arange(len(ids) - start - len(kept) - 1)])
    prompt = rows[0, :len(ids)]
    assert torch.equal(prompt, expected)
    assert rows[0, len(ids):].tolist() == [start + dense + len(ids) - start - len(kept) - 1 + i for i in range(2)]
    if chunk:
        assert len(seen) > 3  # the prompt did go through in several steps


def _record_tower_calls(model) -> None:
    """Count the videos of every vision-tower call in ``model.tokenreduce_calls``."""
    model.tokenreduce_calls = []
    model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: model.tokenreduce_calls.append(len(kwargs["grid_thw"])), with_kwargs=True)


def _take_calls(model) -> list[int]:
    calls = list(model.tokenreduce_calls)
    model.tokenreduce_calls.clear()
    return calls


@pytest.mark.parametrize(("family", "encoder_batch"), [("qwen2_vl", "budget"), ("qwen2_5_vl", "budget"),
                                                      ("qwen2_5_vl", "auto")])
def test_videos_of_a_step_encode_together(model_dirs, family, encoder_batch):
    """vLLM's V1 runner encodes videos one at a time when pruning is on; with ``encoder_batch`` "budget"
    ours batches a step's videos in chunks whose dense token count fits vLLM's encoder budget, with the
    outputs of one request at a time. "auto" on a CPU keeps one video per tower call."""
    from vllm import SamplingParams

    video_tag = _tags(family)[1]

    def request(seed: int, uuid: str) -> dict:  # a new uuid is a new encoder-cache entry: the tower runs again
        return {"prompt": f"user: {video_tag} describe the video", "multi_modal_uuids": {"video": [uuid]},
                "multi_modal_data": {"video": (make_video(FRAMES, SIZE, seed=seed), video_metadata(FRAMES))}}

    requests = [request(seed, f"together-{seed}") for seed in range(6)]
    settings = {"method": "evs", "retention": RETENTION, "encoder_batch": encoder_batch}
    llm = _llm(model_dirs[family], settings, max_num_seqs=4)
    llm.apply_model(_record_tower_calls)
    frames, cells = _grid(family)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)
    together = llm.generate(requests[:3], params, use_tqdm=False)
    budget = llm.apply_model(lambda m: m.tokenreduce_encoder_budget)[0]  # vLLM's, computed on first use
    if encoder_batch == "auto":  # this is a CPU
        assert budget is None and llm.apply_model(_take_calls)[0] == [1, 1, 1]
        return
    assert budget >= 3 * frames * cells
    assert llm.apply_model(_take_calls)[0] == [3]
    llm.apply_model(lambda m: setattr(m, "tokenreduce_encoder_budget", 2 * frames * cells))
    together += llm.generate(requests[3:], params, use_tqdm=False)
    assert llm.apply_model(_take_calls)[0] == [2, 1]
    for seed, out in enumerate(together):
        alone = llm.generate([request(seed, f"alone-{seed}")], params, use_tqdm=False)[0]
        assert alone.prompt_token_ids == out.prompt_token_ids
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
        assert torch.allclose(torch.tensor([next(iter(lp.values())).logprob for lp in alone.outputs[0].logprobs]),
                              torch.tensor([next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs]),
                              atol=1e-5)
    assert llm.apply_model(_take_calls)[0] == [1] * 6
    del llm
    gc.collect()


def _video_request(family: str, kwargs: dict | None = None, seed: int = 0) -> dict:
    request = {"prompt": f"user: {_tags(family)[1]} describe the video",
               "multi_modal_data": {"video": (make_video(FRAMES, SIZE, seed=seed), video_metadata(FRAMES))}}
    return request | ({"mm_processor_kwargs": kwargs} if kwargs else {})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_per_request_settings(model_dirs, family):
    """A request's ``tokenreduce_method`` / ``tokenreduce_retention`` override the engine's for its videos
    only: placeholder count, kept tokens and outputs as an engine started with those settings; requests of
    different settings share a step; a request may not keep more than the server; bad keys fail."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)
    _, video_id = placeholder_ids(model_dirs[family])
    frames, cells = _grid(family)
    newline = 1 if family == "llava_onevision" else 0
    embeds, _, _ = _hf_video_embeds(model_dirs[family], family)
    # encoder_batch "budget": the three videos go through the tower in one call (on a CPU "auto" is "one")
    llm = _llm(model_dirs[family], {"method": "evs", "retention": RETENTION, "encoder_batch": "budget"},
               max_num_seqs=4)
    low = {"tokenreduce_retention": RETENTION / 2}
    other = {"tokenreduce_method": "framefusion"}
    outs = llm.generate([_video_request(family, low), _video_request(family), _video_request(family, other)], params,
                        use_tqdm=False)
    kept = llm.apply_model(lambda m: [i.cpu().tolist() for i in m.tokenreduce_last])[0]
    assert len(kept) == 3  # one tower call: three settings side by side
    for out, index, (method, retention) in zip(outs, kept, [("evs", RETENTION / 2), ("evs", RETENTION),
                                                           ("framefusion", RETENTION)], strict=True):
        count = video_token_count(method, frames, cells, retention)
        assert out.prompt_token_ids.count(video_id) == count + newline
        assert index == reduce_video(method, embeds, retention)[0].tolist()
    assert len(set(len(o.prompt_token_ids) for o in outs[:2])) == 2
    started = run(model_dirs, family, {"method": "framefusion", "retention": RETENTION})[1]
    assert list(outs[2].prompt_token_ids) == started["prompt"]
    assert list(outs[2].outputs[0].token_ids) == started["tokens"]
    assert torch.allclose(torch.tensor([next(iter(lp.values())).logprob for lp in outs[2].outputs[0].logprobs]),
                          torch.tensor(started["logprobs"]), atol=1e-5)
    for kwargs, message in [({"tokenreduce_retention": 0.9}, "more than the server's"),
                            ({"tokenreduce_retention": 0}, "retention must be a number in (0, 1]"),
                            ({"tokenreduce_retention": "half"}, "retention must be a number in (0, 1]"),
                            ({"tokenreduce_method": "fastv"}, "inside the LLM's layers"),
                            ({"tokenreduce_keep": 3}, "unknown per-request tokenreduce key(s) tokenreduce_keep")]:
        with pytest.raises(ValueError, match=_escape(message)):
            llm.generate([_video_request(family, kwargs, seed=1)], params, use_tqdm=False)
    del llm
    gc.collect()


def test_per_request_settings_need_a_reducing_server(model_dirs):
    llm = _llm(model_dirs["qwen2_vl"])
    with pytest.raises(ValueError, match="runs without tokenreduce"):
        llm.generate([_video_request("qwen2_vl", {"tokenreduce_retention": 0.3})], use_tqdm=False)
    del llm
    gc.collect()


BAD = [
    ({"method": "nosuch"}, "unknown tokenreduce method 'nosuch'; vLLM supports: evs"),
    ({"method": "fastv", "retention": 0.5}, "inside the LLM's layers"),
    ({"method": "evs", "retention": 0}, "retention must be a number in (0, 1]"),
    ({"method": "evs", "retention": 1.5}, "retention must be a number in (0, 1]"),
    ({"method": "framefusion", "retention": 0.3, "cost": 0.3}, "unknown option(s) cost"),
    ({"method": "evs", "encoder_batch": "all"}, "encoder_batch must be one of auto, budget, one"),
    ({"retention": 0.3}, "needs a 'method'"),
    ("evs", "must be an object"),
]


@pytest.mark.parametrize(("settings", "message"), BAD)
def test_bad_settings_fail_at_startup(model_dirs, settings, message):
    with pytest.raises(Exception, match=_escape(message)):
        _llm(model_dirs["qwen2_vl"], settings)


def test_second_pruning_rule_refused(model_dirs):
    with pytest.raises(Exception, match="--video-pruning-rate both prune"):
        _llm(model_dirs["qwen2_5_vl"], {"method": "evs", "retention": 0.5}, video_pruning_rate=0.5)


def test_unsupported_model_refused(tmp_path):
    import transformers as T
    from tokenreduce_vllm.testing import make_tokenizer

    tok, ids = make_tokenizer([])
    config = T.Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    T.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="tokenreduce in vLLM supports Qwen2VLForConditionalGeneration.*this model is "
                                        "Qwen2ForCausalLM"):
        _llm(tmp_path, {"method": "evs", "retention": 0.5})


def _escape(text: str) -> str:
    import re

    return re.escape(text)
