"""KV methods under shared use and bad input: per-request SemShare namespaces under a thread race, patch/unpatch
against concurrent forwards and concurrent patches, no reuse of another model's KV, KVStore validation."""

from __future__ import annotations

import copy
import random
import sys
import threading

import pytest
import torch
from test_kv import SIZES, generate, prompt, tiny_llm
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import tokenreduce
from tokenreduce.hooks import KV_ATTR
from tokenreduce.kv import KVStore
from tokenreduce.kv.fingerprint import fingerprint
from tokenreduce.kv.methods.semshare import mix_positions
from tokenreduce.kv.model import text_parts


class AuditedStore(KVStore):
    """A KVStore that logs every read and write with the thread that made it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.log: list[tuple] = []

    def best(self, namespace, model, signatures, max_distance):
        match = super().best(namespace, model, signatures, max_distance)
        self.log.append(("read", threading.current_thread().name, namespace, match))
        return match

    def add(self, namespace, model, signatures, keys, values):
        self.log.append(("add", threading.current_thread().name, namespace, signatures.clone()))
        return super().add(namespace, model, signatures, keys, values)


def signature(model, store, ids) -> torch.Tensor:
    with torch.no_grad():
        return store.signatures(mix_positions(text_parts(model).embed(ids)[0], 16.0))


def test_per_request_namespaces_survive_a_two_thread_race():
    """Two tenants share one patched model and store, each request in its own namespace block, started together
    for many rounds: every write lands in the writer's namespace, every read returns only the reader's own
    prompts, and a tenant's repeated prompt is reused from its own entry."""
    model = tiny_llm()
    store = AuditedStore()
    tokenreduce.patch(model, "semshare", store=store, retention=0.3)
    tenants, rounds = ("alice", "bob"), 20
    prompts = {t: [prompt(48, seed=100 * k + r) for r in range(rounds)] for k, t in enumerate(tenants)}
    own = {t: [signature(model, store, ids) for ids in prompts[t]] for t in tenants}
    barrier, errors = threading.Barrier(2), []

    def serve(tenant: str) -> None:
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                with tokenreduce.namespace(tenant):
                    generate(model, prompts[tenant][r], n=2)  # new prompt: stored
                    generate(model, prompts[tenant][0], n=2)  # the tenant's first prompt again: reused
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(t,), name=t) for t in tenants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    def is_own(tenant, sig):
        return any(torch.equal(sig, s) for s in own[tenant])

    reads = [e for e in store.log if e[0] == "read"]
    adds = [e for e in store.log if e[0] == "add"]
    assert len(adds) == 2 * rounds and len(reads) == 4 * rounds  # every new prompt stored once
    for _, thread, namespace, sig in adds:
        assert namespace == thread and is_own(thread, sig)
    for _, thread, namespace, match in reads:
        assert namespace == thread
        if match is not None:
            assert match.entry.namespace == thread and is_own(thread, match.entry.signatures)
    reused = [m for _, _, _, m in reads if m is not None and m.rate == 1.0]
    assert len(reused) >= 2 * (rounds - 1)  # each tenant's repeated prompt found its own entry
    assert store.namespaces() == {"alice": rounds, "bob": rounds}


def test_patch_wide_namespace_is_refused_with_the_per_request_way():
    model = tiny_llm()
    with pytest.raises(TypeError, match=r"tokenreduce\.namespace\(user_id\)"):
        tokenreduce.patch(model, "semshare", namespace="alice")
    assert not tokenreduce.is_patched(model)


def test_require_namespace():
    model = tiny_llm()
    store = KVStore()
    tokenreduce.patch(model, "semshare", store=store, require_namespace=True)
    with pytest.raises(ValueError, match="require_namespace"):
        generate(model, prompt(30))
    with tokenreduce.namespace("carol"):
        generate(model, prompt(30))
    assert store.namespaces() == {"carol": 1}
    with pytest.raises(ValueError, match="require_namespace"):
        tokenreduce.patch(model, "semshare", require_namespace="yes")


def test_namespace_blocks_nest_and_stay_in_their_thread():
    store = KVStore()
    model = tiny_llm()
    tokenreduce.patch(model, "semshare", store=store)
    with tokenreduce.namespace("outer"):
        with tokenreduce.namespace("inner"):
            generate(model, prompt(30, seed=1))
        other = threading.Thread(target=lambda: generate(model, prompt(30, seed=2)))  # no block there: default
        other.start()
        other.join()
        generate(model, prompt(30, seed=3))
    assert store.namespaces() == {"inner": 1, "default": 1, "outer": 1}


def _block_first_layer(model, started: threading.Event, release: threading.Event):
    def hook(module, args):
        started.set()
        assert release.wait(30)
    return model.model.layers[0].register_forward_pre_hook(hook)


@pytest.mark.parametrize("method", ["semshare", "snapkv"])
def test_patch_and_unpatch_refused_while_another_thread_runs_a_forward(method):
    model = tiny_llm()
    ids = prompt(40)
    _, dense = generate(model, ids)
    tokenreduce.patch(model, method, retention=1.0)
    started, release = threading.Event(), threading.Event()
    handle = _block_first_layer(model, started, release)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("logits", generate(model, ids)[1]))
    worker.start()
    try:
        assert started.wait(30)
        with pytest.raises(RuntimeError, match=r"while 1 forward/generate call\(s\) run on it"):
            tokenreduce.patch(model, "streamingllm")
        with pytest.raises(RuntimeError, match=r"while 1 forward/generate call\(s\) run on it"):
            tokenreduce.unpatch(model)
    finally:
        release.set()
        worker.join()
    handle.remove()
    torch.testing.assert_close(out["logits"], dense, atol=1e-5, rtol=0)  # the running request was not disturbed
    tokenreduce.patch(model, "streamingllm", retention=1.0)  # between requests: fine
    torch.testing.assert_close(generate(model, ids)[1], dense, atol=1e-5, rtol=0)


class Pause(LogitsProcessor):
    """Holds ``generate`` between two of its forwards (after the prefill's logits)."""

    def __init__(self, started: threading.Event, release: threading.Event) -> None:
        self.started, self.release = started, release

    def __call__(self, input_ids, scores):
        self.started.set()
        assert self.release.wait(30)
        return scores


def test_patch_refused_between_the_forwards_of_a_running_generate():
    """No forward is in flight while generate samples a token, but the request is not over: re-patching there
    would decode its cache under another method."""
    model = tiny_llm()
    ids = prompt(40)
    _, dense = generate(model, ids)
    tokenreduce.patch(model, "snapkv", retention=1.0)
    started, release = threading.Event(), threading.Event()
    out = {}

    def request() -> None:
        with torch.no_grad():
            out["result"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                           logits_processor=LogitsProcessorList([Pause(started, release)]),
                                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)

    worker = threading.Thread(target=request)
    worker.start()
    try:
        assert started.wait(30)
        with pytest.raises(RuntimeError, match="call"):
            tokenreduce.unpatch(model)
    finally:
        release.set()
        worker.join()
    torch.testing.assert_close(torch.stack(out["result"].logits, 1), dense, atol=1e-5, rtol=0)
    tokenreduce.unpatch(model)
    assert "generate" not in vars(model)  # the wrapper is gone with the patch


def test_forward_that_raised_does_not_block_patching():
    model = tiny_llm()
    tokenreduce.patch(model, "semshare")
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, prompt(20, batch=2))
    tokenreduce.unpatch(model)  # the failed forward is not counted as running


def test_concurrent_patch_calls_leave_a_working_model():
    """Threads patching and unpatching one model at once (no forwards): the model ends in a consistent state,
    every error is the clean 'not patched' one, and it unpatches to the dense model and patches again."""
    model = tiny_llm()
    ids = prompt(40)
    _, dense = generate(model, ids)
    original = model.config._attn_implementation
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                barrier.wait(timeout=60)
                try:
                    if rng.random() < 0.7:
                        tokenreduce.patch(model, rng.choice(["snapkv", "streamingllm", "semshare"]), retention=0.5)
                    else:
                        tokenreduce.unpatch(model)
                except ValueError as err:
                    if "not patched" not in str(err):
                        raise
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that the patch calls interleave
    try:
        threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    if tokenreduce.is_patched(model):
        tokenreduce.unpatch(model)
    assert model.config._attn_implementation == original
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not layer._forward_pre_hooks and not hasattr(layer.self_attn, KV_ATTR) for layer in model.model.layers)
    torch.testing.assert_close(generate(model, ids)[1], dense, atol=1e-5, rtol=0)
    tokenreduce.patch(model, "snapkv", retention=1.0)
    torch.testing.assert_close(generate(model, ids)[1], dense, atol=1e-5, rtol=0)


# another model's KV ----------------------------------------------------------------------------------------


def lora_like(model, layers=(0, 1, 2, 3), scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with a rank-2 delta on the k/v projections of ``layers`` (embeddings, config,
    class and path unchanged: a frozen-embedding LoRA fine-tune, merged)."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in layers:
            for proj in (tuned.model.layers[i].self_attn.k_proj, tuned.model.layers[i].self_attn.v_proj):
                out, inp = proj.weight.shape
                proj.weight += scale * torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)
    return tuned


def stored_then_reused(first, second, ids, store=None, **options) -> tuple[float, torch.Tensor]:
    """Store ``ids`` computed by ``first``, then run ``second`` on it with the same store: its match rate
    and logits."""
    store = store or KVStore()
    tokenreduce.patch(first, "semshare", store=store, retention=0.3, **options)
    generate(first, ids)
    tokenreduce.patch(second, "semshare", store=store, retention=0.3, **options)
    _, logits = generate(second, ids)
    return tokenreduce.stats(second).notes["match_rate"], logits


def test_fine_tune_with_the_base_embeddings_does_not_reuse_the_base_kv():
    base = tiny_llm()
    tuned = lora_like(base)
    ids = prompt(80)
    _, dense = generate(tuned, ids)
    assert torch.equal(base.model.embed_tokens.weight, tuned.model.embed_tokens.weight)
    assert base.config.to_dict() == tuned.config.to_dict()
    rate, logits = stored_then_reused(base, tuned, ids)
    assert rate == 0.0 and tokenreduce.stats(tuned).reuse_rate == 0.0
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=0)


def test_changed_rope_theta_does_not_reuse():
    base = tiny_llm()
    other = LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation="sdpa",
                                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})).eval()
    other.load_state_dict(base.state_dict())
    ids = prompt(80)
    _, dense = generate(other, ids)
    rate, logits = stored_then_reused(base, other, ids)
    assert rate == 0.0
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=0)


def test_same_weights_reuse_and_model_id_overrides():
    base = tiny_llm()
    twin = copy.deepcopy(base)  # equal weights, another object: same fingerprint, so reuse
    tuned = lora_like(base, seed=2)
    ids = prompt(80)
    assert stored_then_reused(base, twin, ids)[0] == 1.0
    assert stored_then_reused(base, tuned, ids, model_id="my-model")[0] == 1.0  # the caller vouched
    with pytest.raises(ValueError, match="model_id"):
        tokenreduce.patch(base, "semshare", model_id="")


def test_fingerprint_sees_one_changed_projection_and_dtype():
    base = tiny_llm()
    key = fingerprint(text_parts(base))
    assert fingerprint(text_parts(copy.deepcopy(base))) == key
    assert fingerprint(text_parts(lora_like(base, layers=(3,), scale=1e-3))) != key  # one v/k pair, small delta
    assert fingerprint(text_parts(copy.deepcopy(base).to(torch.bfloat16))) != key
    tokenreduce.patch(base, "semshare")  # patching changes the attention backend, not the fingerprint
    assert fingerprint(text_parts(base)) == key


def test_offloaded_weights_ask_for_a_model_id():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation="sdpa"))
    with pytest.raises(ValueError, match="model_id"):
        tokenreduce.patch(model, "semshare")
    assert not tokenreduce.is_patched(model) and model.config._attn_implementation == "sdpa"
    tokenreduce.patch(model, "semshare", model_id="llama-offloaded")  # named: no fingerprint needed


# KVStore validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,message", [("nope", "not a torch device"), ("meta", "holds no data"),
                                            (object(), "not a torch device")])
def test_kvstore_bad_device_fails_at_construction(device, message):
    with pytest.raises(ValueError, match=message):
        KVStore(device=device)


def test_kvstore_unavailable_device_fails_at_construction():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="not usable on this machine"):
        KVStore(device="cuda")
    assert KVStore(device="cpu").device == "cpu"


def test_stats_are_per_request_thread():
    """A request's thread reads its own prefill's statistics even when another request ran in between."""
    model = tiny_llm()
    tokenreduce.patch(model, "snapkv", retention=0.5)
    first_done, second_done, seen = threading.Event(), threading.Event(), {}

    def request(name: str, length: int, before: threading.Event | None, after: threading.Event) -> None:
        if before is not None:
            assert before.wait(30)
        generate(model, prompt(length), n=2)
        after.set()
        if name == "first":
            assert second_done.wait(30)  # the other request's prefill ran after this one's
        seen[name] = tokenreduce.stats(model).logical_length

    threads = [threading.Thread(target=request, args=("first", 40, None, first_done)),
               threading.Thread(target=request, args=("second", 70, first_done, second_done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"first": 41, "second": 71}  # the prompt and one decoded token (the last is not cached yet)
    assert tokenreduce.stats(model).logical_length == 71  # a thread that ran none: the latest request's
