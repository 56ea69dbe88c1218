"""SemShareKV and KVStore: reuse that reproduces dense outputs, real savings, namespaces, memory bound, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from test_kv import generate, prompt, tiny_llm

import tokenreduce
from tokenreduce.kv import KVStore
from tokenreduce.kv.model import rotate, text_parts


def rows_seen(model) -> list[int]:
    seen: list[int] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    return seen


def test_identical_prompt_reuses_most_and_matches_dense():
    model = tiny_llm()
    ids = prompt(80)
    seq, logits = generate(model, ids)
    store = KVStore()
    tokenreduce.patch(model, "semshare", store=store, retention=0.3)
    first_seq, first = generate(model, ids)  # nothing to reuse yet: dense, then stored
    assert tokenreduce.stats(model).reuse_rate == 0.0 and len(store) == 1
    seen = rows_seen(model)
    again_seq, again = generate(model, ids)
    stats = tokenreduce.stats(model)
    assert stats.reuse_rate > 0.3 and stats.notes["match_rate"] == 1.0  # 4 layers, 2 run in full
    assert stats.computed_rows[:2] == [80, 80] and stats.computed_rows == seen[:4]  # skipped rows never ran
    assert stats.computed_rows[2] >= stats.computed_rows[3] and stats.computed_rows[3] < 80
    assert len(store) == 1  # an approximate prompt is not stored again
    assert torch.equal(seq, first_seq) and torch.equal(seq, again_seq)
    torch.testing.assert_close(again, logits, atol=1e-4, rtol=0)


def test_retention_one_is_dense():
    model = tiny_llm()
    ids = prompt(50)
    _, logits = generate(model, ids)
    tokenreduce.patch(model, "semshare", retention=1.0)
    generate(model, ids)
    _, again = generate(model, ids)
    assert tokenreduce.stats(model).reuse_rate == 0.0
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)


def test_similar_prompt_partial_reuse():
    model = tiny_llm()
    ids = prompt(80)
    other = ids.clone()
    other[0, 30:40] = prompt(10, seed=5)
    tokenreduce.patch(model, "semshare", retention=0.3)
    generate(model, ids)
    generate(model, other)
    stats = tokenreduce.stats(model)
    assert 0.8 <= stats.notes["match_rate"] < 1.0 and stats.reuse_rate > 0.2
    assert stats.computed_rows[-1] >= 10  # the ten changed tokens are recomputed in every layer


def test_reused_and_recomputed_entries_are_placed_right():
    """After the check layer (1), the next layer's recomputed rows hold exactly the dense KV (their inputs are
    exact) and every other row holds the matched reference token's KV, keys re-rotated to the new position."""
    model = tiny_llm()
    ids = prompt(80)
    other = torch.cat([prompt(3, seed=9), ids[:, :77]], 1)  # shifted by 3 positions: re-rotation matters
    kw = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        dense = __import__("transformers").DynamicCache(config=model.config)
        model(other, **{kw: dense})
        ref = __import__("transformers").DynamicCache(config=model.config)
        model(ids, **{kw: ref})
        tokenreduce.patch(model, "semshare", retention=0.3, max_distance=0.3)
        model(ids)  # stored
        cache = __import__("transformers").DynamicCache(config=model.config)
        model(other, **{kw: cache})
    plan = model._tokenreduce_engine.engines["kv"].fwd.memo["semshare"]
    rows = plan.rows[2]
    assert 0 < len(rows) < 80
    torch.testing.assert_close(cache.layers[2].keys[:, :, rows], dense.layers[2].keys[:, :, rows], atol=1e-5, rtol=0)
    rest = torch.tensor([i for i in range(80) if i not in set(rows.tolist())])
    want = rotate(ref.layers[2].keys[:, :, plan.index[rest]], (rest - plan.index[rest])[None],
                  text_parts(model).rotary.inv_freq)
    torch.testing.assert_close(cache.layers[2].keys[:, :, rest], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.layers[2].values[:, :, rest], ref.layers[2].values[:, :, plan.index[rest]])
    assert (plan.index[3:] == torch.arange(77)).float().mean() > 0.9  # shifted tokens found their originals


def test_no_cross_namespace_reuse():
    model = tiny_llm()
    ids = prompt(60)
    store = KVStore()
    tokenreduce.patch(model, "semshare", store=store, retention=0.3)
    with tokenreduce.namespace("alice"):
        generate(model, ids)
    with tokenreduce.namespace("bob"):
        generate(model, ids)
    stats = tokenreduce.stats(model)
    assert stats.reuse_rate == 0.0 and stats.notes["match_rate"] == 0.0
    assert store.namespaces() == {"alice": 1, "bob": 1}
    sig = store.signatures(torch.randn(5, 64))
    assert store.best("carol", "any", sig, 128) is None
    with tokenreduce.namespace("alice"):
        generate(model, ids)
    assert tokenreduce.stats(model).reuse_rate > 0.3


def test_rerotation_moves_keys_to_the_new_position():
    model = tiny_llm()
    parts = text_parts(model)
    k = torch.randn(1, 2, 10, 16)
    pos = torch.arange(10)[None]

    def rope(x, p):
        cos, sin = parts.rotary(x, p)
        half = x.shape[-1] // 2
        return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    moved = rotate(rope(k, pos), torch.full((1, 10), 7), parts.rotary.inv_freq)
    torch.testing.assert_close(moved, rope(k, pos + 7), atol=1e-5, rtol=0)


def _add(store: KVStore, ns: str, length: int, seed: int) -> bool:
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, length, 16, generator=g) for _ in range(4)]
    return store.add(ns, "m", store.signatures(torch.randn(length, 64, generator=g)), kv[:2], kv[2:])


def test_store_memory_bound_and_eviction():
    store = KVStore(max_bytes=60_000)
    for i in range(50):
        assert _add(store, f"ns{i % 3}", 20 + i % 7, i)
        assert store.bytes_used <= 60_000
    assert 0 < len(store) < 50
    assert not _add(store, "ns0", 2000, 99)  # larger than the whole bound: refused
    lru = KVStore(max_bytes=3 * 21_200)
    for i in range(3):
        _add(lru, "a", 40, i)
    first = lru._entries[0]
    lru.best("a", "m", first.signatures, 0)  # touch the oldest: LRU keeps it
    _add(lru, "a", 40, 9)
    assert first in lru._entries and len(lru) == 3
    fifo = KVStore(max_bytes=3 * 21_200, eviction="fifo")
    for i in range(3):
        _add(fifo, "a", 40, i)
    oldest = fifo._entries[0]
    fifo.best("a", "m", oldest.signatures, 0)
    _add(fifo, "a", 40, 9)
    assert oldest not in fifo._entries
    with pytest.raises(ValueError):
        KVStore(eviction="random")
    with pytest.raises(ValueError):
        KVStore(max_bytes=0)


def test_store_threads_never_exceed_bound():
    store = KVStore(max_bytes=100_000)
    peaks, errors = [], []

    def work(t: int) -> None:
        try:
            for i in range(25):
                _add(store, f"t{t % 2}", 10 + (i * 7) % 30, t * 100 + i)
                peaks.append(store.bytes_used)
                store.best(f"t{t % 2}", "m", store.signatures(torch.randn(8, 64)), 40)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and max(peaks) <= 100_000
    assert store.bytes_used == sum(e.nbytes for e in store._entries)


def test_threaded_requests_share_one_model():
    model = tiny_llm()
    prompts = [prompt(40, seed=s) for s in range(4)]
    dense = [generate(model, p)[1] for p in prompts]
    store = KVStore()
    tokenreduce.patch(model, "semshare", store=store, retention=0.3)
    for p in prompts:
        generate(model, p)
    out: dict[int, torch.Tensor] = {}

    def request(i: int) -> None:
        out[i] = generate(model, prompts[i])[1]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        torch.testing.assert_close(out[i], dense[i], atol=1e-4, rtol=0)


def test_semshare_errors():
    model = tiny_llm()
    with pytest.raises(ValueError, match="KVStore"):
        tokenreduce.patch(model, "semshare", store={})
    with pytest.raises(ValueError, match="namespace"), tokenreduce.namespace(""):
        pass
    with pytest.raises(ValueError, match="max_distance"):
        tokenreduce.patch(model, "semshare", max_distance=0.9)
    tokenreduce.patch(model, "semshare")
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, prompt(20, batch=2))
