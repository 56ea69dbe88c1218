"""Kernel benchmark: every compiled op (csrc/, torch.ops.tokenreduce) against its torch reference.

    python benchmarks/bench_kernels.py --device cuda --out results/kernels  # 64 frames x 169 x 3584, batch 1 and 8
    python benchmarks/bench_kernels.py --device cpu --out results/kernels-cpu
    python benchmarks/bench_kernels.py --quick                         # small shapes: a smoke test

Shapes are those of one reduction step of a 7B video LLM at 64 frames (Qwen2-VL-7B / LLaVA-Video-7B:
hidden 3584, 28 query heads and 4 key heads of 128, 169 tokens a frame, a 100-token prompt), with
realistic merges (about half the tokens of each frame nearly repeat the previous frame's) and a 30%
compaction. For each op and batch size, reference and kernel run interleaved on the same inputs;
the table gives their median times, the speed-up, the kernel's achieved bandwidth (the bytes an
ideal implementation must move: inputs read once, outputs written once) as a fraction of this
device's measured copy bandwidth (a large ``clone``), and how far the outputs differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenreduce import kernels  # noqa: E402
from tokenreduce.ops import compaction_index, same_cell_predecessor  # noqa: E402
from tokenreduce.ops.compact import compact_kv_reference, take_rows_reference  # noqa: E402
from tokenreduce.ops.importance import last_query_importance_reference  # noqa: E402
from tokenreduce.ops.lsh import hamming_top1_reference, lsh_planes, lsh_signatures_reference  # noqa: E402
from tokenreduce.ops.merge import (  # noqa: E402
    fold_into_heads_reference,
    merge_compact_reference,
    weighted_merge_reference,
)
from tokenreduce.ops.similarity import similar_predecessors_reference  # noqa: E402

FULL = dict(frames=64, cells=169, text=100, hidden=3584, heads=28, kv_heads=4, head_dim=128, layers=28, bits=128)
QUICK = dict(frames=4, cells=16, text=8, hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2, bits=70)


@dataclass
class Row:
    kernel: str
    batch: int
    dtype: str
    reference_ms: float
    kernel_ms: float
    speedup: float
    gbytes: float  # ideal traffic of one call
    kernel_gbps: float
    copy_fraction: float  # kernel bandwidth / measured copy bandwidth
    max_abs_diff: float  # 0.0: identical


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock milliseconds of one call (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def compare(reference: Callable[[], object], kernel: Callable[[], object], device: torch.device,
            repeats: int) -> tuple[float, float]:
    """Median ms of reference and kernel, run alternately after one warm-up each."""
    reference(), kernel()
    ref, ker = [], []
    for _ in range(repeats):
        ref.append(timed(reference, device))
        ker.append(timed(kernel, device))
    return statistics.median(ref), statistics.median(ker)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(repeats + 1)][1:]
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def max_diff(a: object, b: object) -> float:
    """Largest absolute difference over (nested) tensor outputs; -inf entries must match exactly."""
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    a, b = a.double(), b.double()
    same_inf = torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not same_inf:
        return float("inf")
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(shape: dict, bsz: int, dtype: torch.dtype, device: torch.device, layers: int):
    """(name, reference call, kernel call, ideal bytes) for one batch size."""
    ops = torch.ops.tokenreduce
    gen = torch.Generator(device="cpu").manual_seed(bsz)
    frames, cells, dim = shape["frames"], shape["cells"], shape["hidden"]
    length = shape["text"] + frames * cells
    video = slice(shape["text"] // 2, shape["text"] // 2 + frames * cells)
    hidden = torch.randn(bsz, length, dim, generator=gen)
    v = hidden[:, video].view(bsz, frames, cells, dim)
    repeat = torch.rand(bsz, frames, cells, 1, generator=gen) < 0.5
    for f in range(1, frames):  # half the cells nearly repeat the previous frame
        v[:, f] = torch.where(repeat[:, f], v[:, f - 1] + 0.2 * torch.randn(bsz, cells, dim, generator=gen), v[:, f])
    hidden = hidden.to(device=device, dtype=dtype)
    group = torch.full((bsz, length), -1)
    group[:, video] = torch.arange(frames * cells) % cells
    pred = same_cell_predecessor(group, cells).to(device)
    candidate = pred >= 0
    sim, mergeable = similar_predecessors_reference(hidden, pred, candidate, 0.6)
    dest = fold_into_heads_reference(pred, mergeable, frames)
    rows = torch.arange(length, device=device).expand(bsz, -1)
    keep = dest == rows
    # prune to 30% of the rows, keeping the merged run heads first (like FrameFusion's budget)
    score = torch.rand(bsz, length, generator=gen).to(device) + keep.float()
    keep &= score >= score.sort(dim=1, descending=True).values[:, int(0.3 * length)][:, None]
    index = compaction_index(keep).index
    size = torch.ones(bsz, length, device=device)
    out_rows = index.shape[1]
    item = hidden.element_size()
    yield ("adjacent_similarity", lambda: similar_predecessors_reference(hidden, pred, candidate, 0.6),
           lambda: ops.adjacent_similarity(hidden, pred, candidate, 0.6),
           nbytes(hidden, pred, candidate) + bsz * length * 5)
    steps = 2 ** max(1, (frames - 1).bit_length())
    yield ("fold_runs", lambda: fold_into_heads_reference(pred, mergeable, frames),
           lambda: ops.fold_runs(pred, mergeable, steps), nbytes(pred, mergeable) + bsz * length * 8)
    yield ("merge_compact", lambda: merge_compact_reference(hidden, size, dest, index),
           lambda: ops.merge_compact(hidden, size, dest, index),
           nbytes(hidden, size, dest, index) + bsz * out_rows * (dim * item + 4))
    yield ("merge_compact (weighted_merge only)", lambda: weighted_merge_reference(hidden, size, dest),
           lambda: ops.merge_compact(hidden, size, dest, rows), 2 * nbytes(hidden) + nbytes(size, dest) * 2)
    yield ("gather_rows (take_rows of hidden)", lambda: take_rows_reference(hidden, index, 1),
           lambda: ops.gather_rows(hidden.view(1, bsz, 1, length, dim), index).view(bsz, out_rows, dim),
           nbytes(index) + 2 * bsz * out_rows * dim * item)
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    query = torch.randn(bsz, heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
    key = torch.randn(bsz, kv_heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
    q_index = torch.arange(length - 4, length, device=device).expand(bsz, -1)
    valid = torch.ones(bsz, length, dtype=torch.bool, device=device)
    scaling = head_dim ** -0.5
    yield ("qk_importance", lambda: last_query_importance_reference(query, key, q_index, valid, scaling),
           lambda: ops.qk_importance(query, key, q_index, valid, scaling),
           nbytes(key, valid) + bsz * heads * 4 * head_dim * item + bsz * length * 4)
    cache = [key] + [torch.randn_like(key) for _ in range(2 * layers - 1)]
    yield (f"kv_compact ({layers} layers)", lambda: compact_kv_reference(cache, index),
           lambda: ops.kv_compact(cache, index), 2 * bsz * kv_heads * out_rows * head_dim * item * 2 * layers)
    x = hidden.reshape(-1, dim)
    planes = lsh_planes(dim, shape["bits"], seed=0, device=device)
    yield ("lsh_signatures", lambda: lsh_signatures_reference(x, planes), lambda: ops.lsh_signatures(x, planes),
           nbytes(x, planes) + x.shape[0] * 8 * ((shape["bits"] + 63) // 64))
    if bsz == 1:  # one prompt's tokens against one stored prompt
        sig = lsh_signatures_reference(x, planes)
        store = sig.roll(1, 0) ^ 1
        yield ("hamming_top1", lambda: hamming_top1_reference(sig, store), lambda: ops.hamming_top1(sig, store),
               nbytes(sig, store) + sig.shape[0] * 16)


def run(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    device = torch.device(args.device)
    kernels.build(device.type)
    shape = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    layers = args.layers or (shape["layers"] if device.type == "cuda" or args.quick else 4)
    copy_gbps = copy_bandwidth(device, nbytes=(1 << 24) if args.quick else (1 << 29))
    rows: list[Row] = []
    for bsz in args.batches:
        for name, reference, kernel, ideal in cases(shape, bsz, dtype, device, layers):
            if args.kernels and name.split(" ")[0] not in args.kernels:
                continue
            ref_ms, ker_ms = compare(reference, kernel, device, args.repeats)
            gbps = ideal / (ker_ms * 1e-3) / 1e9
            rows.append(Row(name, bsz, args.dtype, ref_ms, ker_ms, ref_ms / ker_ms, ideal / 1e9, gbps,
                            gbps / copy_gbps, max_diff(reference(), kernel())))
            print(f"  {name:38s} batch {bsz}: reference {ref_ms:9.3f} ms  kernel {ker_ms:9.3f} ms  "
                  f"x{ref_ms / ker_ms:6.2f}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    meta = {"device": machine, "torch": torch.__version__, "dtype": args.dtype, "shape": shape,
            "kv_layers": layers, "copy_gbps": copy_gbps, "repeats": args.repeats, "quick": args.quick,
            "date": time.strftime("%Y-%m-%d")}
    return meta, rows


def markdown(meta: dict, rows: list[Row]) -> str:
    s = meta["shape"]
    lines = [f"Kernels vs torch references on {meta['device']} (torch {meta['torch']}, {meta['dtype']}, "
             f"{s['frames']} frames x {s['cells']} tokens x {s['hidden']} + {s['text']} text tokens; "
             f"copy bandwidth {meta['copy_gbps']:.1f} GB/s; median of {meta['repeats']})", "",
             "| kernel | batch | reference ms | kernel ms | speed-up | kernel GB/s | of copy bw | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.batch} | {r.reference_ms:.3f} | {r.kernel_ms:.3f} | {r.speedup:.2f}x | "
                     f"{r.kernel_gbps:.1f} | {100 * r.copy_fraction:.0f}% | {r.max_abs_diff:.2g} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="hidden states, queries and keys (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 20 on cuda, 5 on cpu)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers of keys and values for kv_compact (default 28 on cuda, 4 on cpu for memory)")
    p.add_argument("--kernels", default=None, help="comma-separated op names to measure (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke test, not a measurement)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and the kernels")
    p.add_argument("--out", metavar="DIR", help="write kernels.json and kernels.md here (default: stdout only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser().error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.repeats = args.repeats or (20 if args.device.startswith("cuda") else 5)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser().error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.kernels = set(args.kernels.split(",")) if args.kernels else None
    if args.kernels and (unknown := args.kernels - set(kernels.KERNELS)):
        parser().error(f"--kernels: unknown {', '.join(sorted(unknown))}; kernels: {', '.join(kernels.KERNELS)}")
    meta, rows = run(args)
    text = markdown(meta, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
        (out / "kernels.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
