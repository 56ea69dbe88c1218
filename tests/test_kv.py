"""KV-cache methods on tiny random Llama / Qwen2 models and the language model of a tiny VLM."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tokenreduce
from tokenreduce.kv.cache import KVLayer
from tokenreduce.kv.methods.actqkv import ActQKV
from tokenreduce.kv.methods.scorer import ScorerMethod
from tokenreduce.kv.methods.semtoken import merge_plan
from tokenreduce.kv.scores import window_scores

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


def tiny_llm(family: str = "llama", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    return cls(config(**SIZES, attn_implementation=attn)).eval()


def cache_kw(model) -> str:
    """The cache keyword of this transformers version's forward (``cache`` from 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt(length: int = 60, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, mask=None, n=3):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def profile_for(model, ids):
    return tokenreduce.calibrate(model, "interlayer", [{"input_ids": ids}], threshold=0.01)


FULL = ("snapkv", "streamingllm", "actqkv", "semtoken", "interlayer")


CASES = [("llama", m) for m in FULL] + [("qwen2", "snapkv"), ("qwen2", "semtoken")]


@pytest.mark.parametrize("family,method", CASES)
def test_retention_one_equals_dense(family, method):
    model = tiny_llm(family)
    ids = prompt(100)
    seq, logits = generate(model, ids)
    options = {"profile": profile_for(model, ids[:, :40])} if method == "interlayer" else {}
    tokenreduce.patch(model, method, retention=1.0, **options)
    seq2, logits2 = generate(model, ids)
    assert torch.equal(seq, seq2)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,kept", [("snapkv", 32), ("streamingllm", 18), ("semtoken", 30)])
def test_kept_counts_and_bytes(method, kept):
    model = tiny_llm()
    ids = prompt(60)
    tokenreduce.patch(model, method, retention=0.3 if method != "semtoken" else 0.5)
    with torch.no_grad():
        model(ids)
    stats = tokenreduce.stats(model)
    assert stats.logical_length == 60
    assert stats.layer_entries == [kept] * 4  # snapkv keeps its 32-query window at least
    per_entry = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32
    assert stats.kv_bytes == 4 * kept * per_entry and stats.dense_kv_bytes == 4 * 60 * per_entry
    assert "KV entries per layer" in stats.summary()


def test_streamingllm_keeps_sinks_and_recent():
    model = tiny_llm()
    ids = prompt(50)
    tokenreduce.patch(model, "streamingllm", retention=0.4, sinks=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_kw(model): cache})
    expected = list(range(4)) + list(range(34, 50))
    for layer in cache.layers:
        assert layer.positions[0, 0].tolist() == expected


@pytest.mark.parametrize("method", ["streamingllm", "snapkv"])
def test_decode_continues_from_original_positions(method):
    """Decoding on the compressed cache equals decoding on a hand-made cache of the kept entries with the
    original positions given explicitly; the dense model at the shortened length would differ."""
    model = tiny_llm()
    ids = prompt(80)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        kw = cache_kw(model)
        dense = DynamicCache(config=model.config)
        model(ids, **{kw: dense})
        tokenreduce.patch(model, method, retention=0.3)
        cache = DynamicCache(config=model.config)
        model(ids, **{kw: cache})
        kept = [layer.positions.expand(1, 2, -1).clone() for layer in cache.layers]
        got = model(nxt, **{kw: cache}).logits
        tokenreduce.unpatch(model)
        manual, shifted = DynamicCache(), DynamicCache()
        for i, pos in enumerate(kept):
            idx = pos[..., None].expand(-1, -1, -1, 16)
            for c in (manual, shifted):
                c.update(dense.layers[i].keys.gather(2, idx), dense.layers[i].values.gather(2, idx), i)
        want = model(nxt, **{kw: manual}, position_ids=torch.tensor([[80]])).logits
        wrong = model(nxt, **{kw: shifted}).logits  # positions from the physical length
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "semtoken"])
def test_batch_equals_singles(method):
    model = tiny_llm()
    long, short = prompt(120, seed=1), prompt(100, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 20, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    tokenreduce.patch(model, method, retention=0.3)
    _, batch = generate(model, ids, mask)
    _, one = generate(model, long)
    _, two = generate(model, short)
    torch.testing.assert_close(batch[0], one[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch[1], two[0], atol=1e-4, rtol=0)


def test_unpatch_restores():
    model = tiny_llm()
    ids = prompt(60)
    seq, logits = generate(model, ids)
    tokenreduce.patch(model, "snapkv", retention=0.2)
    seq2, _ = generate(model, ids)
    tokenreduce.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(hasattr(layer.self_attn, "_tokenreduce_kv") for layer in model.model.layers)
    seq3, logits3 = generate(model, ids)
    assert torch.equal(seq, seq3)
    torch.testing.assert_close(logits3, logits, atol=0, rtol=0)


def test_eager_and_sdpa_agree():
    ids = prompt(70)
    out = []
    for attn in ("sdpa", "eager"):
        model = tiny_llm(attn=attn)
        tokenreduce.patch(model, "snapkv", retention=0.3, window=8)
        out.append(generate(model, ids)[1])
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)


def test_window_scores_match_eager_attention():
    model = tiny_llm(attn="eager")
    ids = prompt(40)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    scores = window_scores(q, k, 8, 0.25, None)
    logits = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    logits = logits.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(logits, -1)[:, :, -8:].reshape(1, 2, 16, 40).sum(2)
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
    assert out.attentions is not None


def test_actqkv_retrieves_blocks_and_all_blocks_is_dense():
    model = tiny_llm()
    ids = prompt(150)
    _, dense = generate(model, ids)
    tokenreduce.patch(model, "actqkv", retention=0.3, block=8, sinks=4, window=16)
    generate(model, ids, n=3)
    stats = tokenreduce.stats(model)
    nb = math.ceil((150 - 16 - 4) / 8)
    attended = stats.notes["attended_per_layer"]  # sinks + k blocks + window + 2 decoded tokens
    assert all(4 + 8 + 16 + 2 <= a < 4 + 8 * nb + 16 + 2 and (a - 22) % 8 == 0 for a in attended)

    class AllBlocks(ActQKV, register=False):
        def _cutoffs(self, fwd):
            for i in fwd.full:
                fwd.cache.layers[i].state["k"] = fwd.cache.layers[i].state["block_keys"].shape[2]

    tokenreduce.patch(model, AllBlocks(retention=0.3, block=8, sinks=4, window=16))
    _, every = generate(model, ids)
    torch.testing.assert_close(every, dense, atol=1e-4, rtol=0)


def test_interlayer_profile_and_sharing():
    model = tiny_llm()
    ids = prompt(120)
    profile = profile_for(model, ids[:, :50])
    assert profile["method"] == "interlayer" and profile["architecture"] == "LlamaForCausalLM"
    assert profile["num_layers"] == 4 and sorted(sum(profile["groups"], [])) == [0, 1, 2, 3]
    with torch.no_grad():  # zero queries: uniform attention, so sharing the owner's logits is exact
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    _, dense = generate(model, ids)
    tokenreduce.patch(model, "interlayer", profile={**profile, "groups": [[0, 1, 2, 3]]}, retention=0.3, sinks=4)
    _, shared = generate(model, ids)
    torch.testing.assert_close(shared, dense, atol=1e-5, rtol=0)
    stats = tokenreduce.stats(model)
    assert stats.layer_entries[0] == 120 + 2 and all(e == 36 + 2 for e in stats.layer_entries[1:])
    assert stats.kv_bytes < stats.dense_kv_bytes


def test_semtoken_merge_plan():
    emb = torch.randn(1, 20, 8)
    emb[0, 8:14] = emb[0, 8]  # a redundant run
    joins = merge_plan(emb, torch.ones(1, 20, dtype=torch.bool), 0.75, 0, 0.0, 4)
    assert int(joins.sum()) == 5 and joins[0, 9:14].all()
    assert not joins[0, :5].any() and not joins[0, -1]


def test_vlm_language_model():
    from tokenreduce.testing import make_inputs, tiny_model

    model = tiny_model("qwen2_vl")
    inputs = make_inputs(model, text_lens=[60])
    with torch.no_grad():
        dense = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        tokenreduce.patch(model, "snapkv", retention=1.0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), dense)
        tokenreduce.patch(model, "streamingllm", retention=0.5)
        model(**inputs)
    assert tokenreduce.stats(model).layer_entries == [math.ceil(0.5 * 64)] * 4
    with pytest.raises(TypeError, match="text LLMs"):
        tokenreduce.patch(model, "semtoken")


def test_errors():
    model = tiny_llm()
    for bad in (dict(retention=0), dict(retention=1.5), dict(window=0)):
        with pytest.raises(ValueError):
            tokenreduce.patch(model, "snapkv", **bad)
    with pytest.raises(ValueError, match="kernel must be odd"):
        tokenreduce.patch(model, "snapkv", kernel=4)
    with pytest.raises(TypeError, match="no option"):
        tokenreduce.patch(model, "streamingllm", window=3)
    with pytest.raises(ValueError, match="calibration profile"):
        tokenreduce.patch(model, "interlayer")
    with pytest.raises(ValueError, match="calibrated on X"):
        tokenreduce.patch(model, "interlayer", profile={"method": "interlayer", "num_layers": 4,
                                                        "architecture": "X", "groups": [[0, 1]]})
    small = LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_hidden_layers": 2}, attn_implementation="sdpa"))
    with pytest.raises(ValueError, match="this model has 2 LLM layers"):
        tokenreduce.patch(small, "interlayer", profile=profile_for(model, prompt(20)))
    with pytest.raises(TypeError, match="decoder LLM"):
        tokenreduce.patch(torch.nn.Linear(2, 2), "snapkv")
    flash = tiny_llm(attn="sdpa")
    flash.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa' or 'eager"):
        tokenreduce.patch(flash, "snapkv")
    assert not tokenreduce.is_patched(flash)
    with pytest.raises(ValueError, match="labels"):
        tokenreduce.patch(model, "semtoken")
        model(prompt(30), labels=prompt(30))


def test_kv_layer_is_a_dynamic_layer():
    model = tiny_llm()
    tokenreduce.patch(model, "streamingllm", retention=0.5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(40), **{cache_kw(model): cache})
    layer = cache.layers[0]
    assert isinstance(layer, KVLayer) and layer.get_seq_length() == 40 and layer.keys.shape[2] == 20
    cache.crop(-5)
    assert layer.get_seq_length() == 35 and layer.keys.shape[2] == 15


def test_positional_arguments():
    model = tiny_llm()
    ids = prompt(40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        dense = model(ids, mask).logits
        tokenreduce.patch(model, "streamingllm", retention=1.0)
        assert torch.equal(model(ids, mask).logits, dense)


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_other_families(family):
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config, cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (GemmaConfig, GemmaForCausalLM)
    torch.manual_seed(0)
    model = cls(config(**SIZES, head_dim=16, attn_implementation="sdpa")).eval()
    ids = prompt(60)
    seq, logits = generate(model, ids)
    for method in ("snapkv", "semtoken"):
        tokenreduce.patch(model, method, retention=1.0)
        seq2, logits2 = generate(model, ids)
        torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)
    tokenreduce.patch(model, "streamingllm", retention=0.5)
    generate(model, ids)
    assert tokenreduce.stats(model).layer_entries == [30 + 2] * 4


def test_a_scorer_method_writes_only_its_score():
    """ScorerMethod does budget, padding and top-k: a recency score alone is StreamingLLM without sinks."""

    class Recent(ScorerMethod, register=False):
        name = "recent"

        def score(self, fwd, call, valid):
            return torch.arange(valid.shape[1], dtype=torch.float32).expand(valid.shape[0], 1, -1)

    model, ids = tiny_llm(), prompt(60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: never kept, not counted in the budget
    tokenreduce.patch(model, "streamingllm", retention=0.3, sinks=0)
    seq, logits = generate(model, ids, mask)
    reference = tokenreduce.stats(model).layer_entries
    tokenreduce.patch(model, Recent(retention=0.3))
    seq2, logits2 = generate(model, ids, mask)
    assert tokenreduce.stats(model).layer_entries == reference == [18 + 2] * 4  # 18 prompt entries + 2 decoded
    assert torch.equal(seq, seq2) and torch.equal(logits, logits2)
