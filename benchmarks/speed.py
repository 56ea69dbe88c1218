"""Speed benchmark: a dense video LLM against each token-reduction method at several retentions.

    python benchmarks/speed.py --arch qwen2-vl-7b --frames 64 --size 448 --out results/
    python benchmarks/speed.py --model /path/to/Qwen2-VL-7B-Instruct --methods fastv --retentions 0.3
    python benchmarks/speed.py --quick --device cpu          # tiny model, 2 frames: a smoke test
    python benchmarks/speed.py --arch llava-video-7b --dry-run  # meta device: shapes and token counts only

Every configuration (dense first, then each method x retention) runs in one process on the same inputs:
a synthetic video (``tokenreduce.testing.make_frames``, a pan over a photograph) through the family's
real processor. Per repeat it times the vision tower alone (``get_video_features``) and one greedy
``generate`` of ``--decode-tokens`` tokens whose logits processor stamps the clock at every step:

* TTFT = start of ``generate`` to the first logits (vision + prefill);
* prefill = median TTFT - median vision time;
* decode = (last stamp - first stamp) / (tokens - 1), ms per generated token.

Medians over ``--repeats`` after ``--warmup`` untimed runs; on CUDA every stamp follows a synchronize.
``--arch`` builds a real-size architecture with RANDOM weights: the timings and memory are those of
the real model, the generated text and the methods' choices of tokens are meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import inspect
import json
import math
import platform
import statistics
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce  # noqa: E402
from tokenreduce.methods import make_method  # noqa: E402
from tokenreduce.testing import FAMILIES, FRAME_SIZE, make_frames, make_inputs, tiny_model, to_device  # noqa: E402
from tokenreduce.timing import Clock, time_generate  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# architectures: tiny_model overrides giving the published shapes (weights are random)

_QWEN2_7B_TEXT: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
)
_MROPE = dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])
_QWEN_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                 video_token_id=151656)
# SigLIP-so400m minus its last layer: the HF LLaVA-OneVision/-Video checkpoints keep 26 of its 27 layers
# and read the last kept one (the original models read the penultimate layer), so only 26 layers run.
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      patch_size=14, image_size=384)
_LLAVA_OV_7B: dict[str, Any] = dict(
    text_config={**_QWEN2_7B_TEXT, "rope_parameters": dict(rope_type="default", rope_theta=1e6)},
    vision_config=_SIGLIP_SO400M, image_token_index=151646, video_token_index=151647,
    image_grid_pinpoints=[[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-vl-7b": ("qwen2_vl", dict(
        text_config={**_QWEN2_7B_TEXT, "rope_parameters": _MROPE},
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_QWEN_IDS)),
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(
        text_config={**_QWEN2_7B_TEXT, "max_position_embeddings": 128000, "rope_parameters": _MROPE},
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_QWEN_IDS)),
    "qwen3-vl-8b": ("qwen3_vl", dict(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         max_position_embeddings=262144, rope_parameters=dict(
                             rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20])),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        **_QWEN_IDS)),
    "llava-video-7b": ("llava_onevision", _LLAVA_OV_7B),  # LLaVA-Video-7B-Qwen2 is a OneVision model in HF
    "llava-onevision-7b": ("llava_onevision", _LLAVA_OV_7B),
    **{f"tiny-{family}": (family, {}) for family in FAMILIES},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK = dict(arch="tiny-qwen2_vl", frames=2, size=2 * FRAME_SIZE, repeats=1, warmup=1, decode_tokens=4)
DEFAULTS = dict(frames=64, size=448, repeats=3, warmup=1, decode_tokens=32)


# ---------------------------------------------------------------------------------------------------------
# model and inputs


def build_arch(name: str, device: str | torch.device, dtype: torch.dtype, attn: str, seed: int = 0
               ) -> PreTrainedModel:
    """Random-weight model of architecture ``name``, created directly on ``device`` (no CPU init)."""
    family, overrides = ARCHS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = tiny_model(family, dtype=dtype, attn_implementation=attn, seed=seed,
                           **copy.deepcopy(overrides))
    return model.eval()


def load_model(path: str, device: str | torch.device, dtype: torch.dtype, attn: str, meta: bool = False
               ) -> PreTrainedModel:
    """A local Hugging Face checkpoint with its ``*ForConditionalGeneration`` class; ``meta``: no weights."""
    config = AutoConfig.from_pretrained(path)
    names = [a for a in (config.architectures or []) if a in tokenreduce.supported_classes()]
    cls = getattr(transformers, names[0]) if names else transformers.AutoModelForImageTextToText
    if meta:
        auto = cls is transformers.AutoModelForImageTextToText
        with torch.device("meta"):
            build = cls.from_config if auto else cls._from_config
            model = build(config, dtype=dtype, attn_implementation=attn)
    else:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn, device_map=str(device))
    return model.eval()


def build_inputs(model: PreTrainedModel, frames: Any, size: int) -> dict[str, torch.Tensor]:
    """``make_inputs`` for one video, Qwen-VL frames processed at up to ``size`` x ``size`` pixels."""
    return make_inputs(model, videos=[frames], max_pixels=max(size, FRAME_SIZE) ** 2)


# ---------------------------------------------------------------------------------------------------------
# timing


@dataclass
class Row:
    """One configuration: timings (medians, ms), memory, token counts and ratios to dense."""

    method: str
    retention: float | None
    vision_ms: float
    ttft_ms: float
    prefill_ms: float
    decode_ms_per_token: float | None
    generate_ms: float
    peak_mem_gib: float | None
    reduce_ms: float
    sequence_length: int
    visual_tokens_in: int
    visual_tokens_kept: int
    layer_tokens: list[int]
    mean_layer_tokens: float
    final_layer_tokens: int
    token_ratio: float = 1.0
    ideal_prefill_speedup: float = 1.0
    prefill_speedup: float | None = 1.0
    ttft_speedup: float = 1.0
    decode_speedup: float | None = None
    generate_speedup: float = 1.0
    samples: dict[str, list[float]] = field(default_factory=dict)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def measure(model: PreTrainedModel, inputs: dict[str, torch.Tensor], method: str, retention: float | None,
            args: argparse.Namespace) -> Row:
    """Warm up, then time ``args.repeats`` runs of (vision tower alone, generate) for one configuration."""
    device = next(model.parameters()).device
    clock = Clock(device)
    encoder = model.get_video_features
    vision_inputs = {k: inputs[k] for k in inspect.signature(encoder).parameters if k in inputs}
    generation = copy.deepcopy(model.generation_config)
    generation.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                      max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens)
    if generation.pad_token_id is None:
        generation.pad_token_id = generation.eos_token_id
    keys = ("vision_ms", "ttft_ms", "decode_ms", "generate_ms", "reduce_ms")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    patched = method != "dense"

    def once() -> dict[str, list[float]]:
        t0 = clock.now()
        encoder(**vision_inputs)
        t1 = clock.now()
        run = time_generate(model, inputs, clock, generation_config=generation)
        reduce = tokenreduce.stats(model).reduce_ms if patched else 0.0
        return dict(vision_ms=[t1 - t0], ttft_ms=[run.ttft_ms], decode_ms=[] if run.decode_ms is None else
                    [run.decode_ms], generate_ms=[run.generate_ms], reduce_ms=[reduce])

    with torch.no_grad():
        for _ in range(args.warmup):
            once()
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.repeats):
            for k, v in once().items():
                samples[k] += v
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if clock.cuda else None

    seq = int(inputs["input_ids"].shape[1])
    visual_in = int((inputs["input_ids"] == model.config.video_token_id).sum())
    if patched:
        s = tokenreduce.stats(model)
        layers, kept = list(s.layer_tokens), int(s.visual_tokens_kept[0])
    else:
        layers, kept = [seq] * model.config.text_config.num_hidden_layers, visual_in
    vision, ttft = _median(samples["vision_ms"]), _median(samples["ttft_ms"])
    decode = _median(samples["decode_ms"]) if samples["decode_ms"] else None
    return Row(method=method, retention=retention, vision_ms=vision, ttft_ms=ttft, prefill_ms=ttft - vision,
               decode_ms_per_token=decode,
               generate_ms=_median(samples["generate_ms"]), peak_mem_gib=peak,
               reduce_ms=_median(samples["reduce_ms"]),
               sequence_length=seq, visual_tokens_in=visual_in, visual_tokens_kept=kept, layer_tokens=layers,
               mean_layer_tokens=statistics.fmean(layers), final_layer_tokens=layers[-1], samples=samples)


def add_ratios(rows: list[Row]) -> None:
    """Speedups against the dense row (``rows[0]``) and the sequence-length ideal."""
    dense = rows[0]
    for r in rows:
        r.token_ratio = r.mean_layer_tokens / dense.mean_layer_tokens
        r.ideal_prefill_speedup = 1 / r.token_ratio
        positive = r.prefill_ms > 0 and dense.prefill_ms > 0  # TTFT - vision can dip below 0 on tiny models
        r.prefill_speedup = dense.prefill_ms / r.prefill_ms if positive else None
        r.ttft_speedup = dense.ttft_ms / r.ttft_ms
        r.generate_speedup = dense.generate_ms / r.generate_ms
        if r.decode_ms_per_token and dense.decode_ms_per_token:
            r.decode_speedup = dense.decode_ms_per_token / r.decode_ms_per_token


# ---------------------------------------------------------------------------------------------------------
# report


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


COLUMNS: tuple[tuple[str, str, str], ...] = (  # title, Row field, format
    ("method", "method", "s"), ("retention", "retention", "g"), ("visual kept", "visual_tokens_kept", "d"),
    ("visual in", "visual_tokens_in", "d"), ("final-layer tokens", "final_layer_tokens", "d"),
    ("mean layer tokens", "mean_layer_tokens", ".0f"), ("vision ms", "vision_ms", ".1f"),
    ("prefill ms", "prefill_ms", ".1f"), ("TTFT ms", "ttft_ms", ".1f"),
    ("decode ms/tok", "decode_ms_per_token", ".2f"), ("peak GiB", "peak_mem_gib", ".2f"),
    ("reduce ms", "reduce_ms", ".2f"), ("prefill ×", "prefill_speedup", ".2f"),
    ("ideal prefill ×", "ideal_prefill_speedup", ".2f"), ("TTFT ×", "ttft_speedup", ".2f"),
    ("decode ×", "decode_speedup", ".2f"), ("generate ×", "generate_speedup", ".2f"),
)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def markdown(header: dict[str, Any], rows: list[Row]) -> str:
    """The results table with the run's settings and the formulas used."""
    h = header
    lines = [
        f"# tokenreduce speed: {h['model']}",
        "",
        f"{h['device']} · torch {h['torch']} · transformers {h['transformers']} · "
        f"tokenreduce {h['tokenreduce']} · {h['dtype']} · attention {h['attn']}",
        "",
        f"{h['frames']} frames at {h['size']} px (model input {h['frame_pixels']}) · "
        f"sequence {h['sequence_length']} tokens, {h['visual_tokens']} visual · "
        f"{h['num_layers']} LLM layers · {_count(h['params'])} parameters · "
        f"{h['decode_tokens']} generated tokens · median of {h['repeats']} after {h['warmup']} warmup",
        "",
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(getattr(r, name), spec) for _, name, spec in COLUMNS) + " |")
    lines += [
        "",
        "vision = `get_video_features` alone; TTFT = `generate` start to first logits; "
        "prefill = TTFT − vision; decode = (last − first logits) / (tokens − 1); × = dense / method.",
        "",
        "ideal prefill × = dense prefill / (dense prefill × mean_l tokens_l / mean_l dense tokens_l) "
        "= sequence length / mean over LLM layers of the rows each layer processes, i.e. prefill cost "
        "taken as linear in the rows (ignores attention's quadratic term and fixed costs).",
    ]
    for note in h["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# command line


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="local Hugging Face model directory")
    src.add_argument("--arch", metavar="NAME", help=f"random-weight architecture: {', '.join(ARCHS)}")
    p.add_argument("--methods", default="framefusion,fastv",
                   help="comma-separated; join names with '+' to compose them, e.g. aim+shortv; shortv "
                        "freezes its last 60%% of layers (timing needs no profile) (default: %(default)s)")
    p.add_argument("--retentions", type=_floats, default=[0.1, 0.2, 0.3, 0.5],
                   help="comma-separated fractions of visual tokens kept (default: 0.1,0.2,0.3,0.5)")
    p.add_argument("--frames", type=int, help=f"video frames (default {DEFAULTS['frames']})")
    p.add_argument("--size", type=int, help=f"frame side in pixels (default {DEFAULTS['size']}; "
                                            "LLaVA processors resize to their tower's image size)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--repeats", type=int, help=f"timed runs per config (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed runs first (default {DEFAULTS['warmup']})")
    p.add_argument("--decode-tokens", type=int,
                   help=f"tokens generated per run (default {DEFAULTS['decode_tokens']})")
    p.add_argument("--seed", type=int, default=0, help="video pan and random weights")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--out", metavar="DIR", help="write speed.json and speed.md here (default: stdout only)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: defaults become tiny-qwen2_vl, 2 frames at 112 px, 1 warmup, "
                        "1 repeat, 4 tokens (explicit options still win)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and the inputs; print shapes and token counts")
    return p


SHORTV_FROZEN = 0.6  # ShortV's share of frozen layers (19 of 32 in the paper) when timing without a profile


def method_objects(spec: str, retention: float, num_layers: int) -> list:
    """The methods of ``spec`` (a name, or names joined by '+' to compose them) at ``retention``.
    Methods without a retention option get their defaults; ShortV, which needs a calibration profile
    to choose its layers, freezes its last ``SHORTV_FROZEN`` share of layers (the count is what costs
    time; which layers it is does not change the timing)."""
    out = []
    for name in spec.split("+"):
        if name == "shortv":
            count = round(SHORTV_FROZEN * num_layers)
            out.append(make_method(name, layers=tuple(range(num_layers - count, num_layers))))
        elif "retention" in make_method(name).options():
            out.append(make_method(name, retention=retention))
        else:
            out.append(make_method(name))
    return out


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (``--quick`` ones where asked) and turn bad options into ``parser.error``."""
    defaults = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.model is None and args.arch is None:
        args.arch = "tiny-qwen2_vl" if args.quick else "qwen2-vl-7b"
    if args.arch is not None and args.arch not in ARCHS:
        p.error(f"unknown --arch {args.arch!r}; available: {', '.join(ARCHS)}")
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"--model {args.model!r} is not a directory")
    args.method_list = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    available = tokenreduce.methods()
    for spec in args.method_list:
        for m in spec.split("+"):
            if m not in available:
                listing = "; ".join(f"{k} ({v})" for k, v in available.items())
                p.error(f"unknown method {m!r}; available: {listing}")
        for r in args.retentions:
            try:
                method_objects(spec, r, num_layers=64)
            except (ValueError, TypeError) as e:
                p.error(f"--retentions {r}: {e}")
    for key in ("frames", "size", "repeats", "decode_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def _model_inputs(args: argparse.Namespace, device: str | torch.device) -> tuple[PreTrainedModel, dict]:
    dtype = DTYPES[args.dtype]
    if args.model:
        model = load_model(args.model, device, dtype, args.attn, meta=str(device) == "meta")
    else:
        model = build_arch(args.arch, device, dtype, args.attn, seed=args.seed)
    frames = make_frames(args.frames, args.size, seed=args.seed)
    return model, build_inputs(model, frames, args.size)


def _frame_pixels(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> str:
    tower = model.config.vision_config
    if "video_grid_thw" in inputs:
        _, h, w = inputs["video_grid_thw"][0].tolist()
        return f"{h * tower.patch_size}x{w * tower.patch_size}"
    return f"{tower.image_size}x{tower.image_size}"


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads, then restore the previous count (tests call ``main``)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run every configuration, print the table and write ``--out``; returns the exit code."""
    p = parser()
    args = resolve(p, p.parse_args(argv))
    with _torch_threads(args.threads):
        return run(p, args)


def run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The benchmark proper (or the ``--dry-run`` summary) for resolved options."""
    label = args.model or args.arch

    if args.dry_run:
        model, inputs = _model_inputs(args, "meta")
        params = sum(t.numel() for t in model.parameters())
        visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        print(f"{label}: {type(model).__name__}, {_count(params)} parameters, "
              f"{model.config.text_config.num_hidden_layers} LLM layers")
        print(f"{args.frames} frames at {args.size} px -> model input {_frame_pixels(model, inputs)}: "
              f"{visual} visual tokens, sequence {inputs['input_ids'].shape[1]}")
        print(f"inputs: {shapes}")
        return 0

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, inputs = _model_inputs(args, device)
    inputs = to_device(inputs, device, DTYPES[args.dtype])
    weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    configs: list[tuple[str, float | None]] = [("dense", None)]
    configs += [(m, r) for m in args.method_list for r in args.retentions]

    rows: list[Row] = []
    bar = tqdm(configs, desc="configurations", file=sys.stderr, dynamic_ncols=True)
    for method, retention in bar:
        bar.set_postfix_str(method if retention is None else f"{method} {retention:g}")
        try:
            if method != "dense":
                layers = model.config.text_config.num_hidden_layers
                tokenreduce.patch(model, method_objects(method, retention, layers))
        except (TypeError, ValueError) as e:
            p.error(str(e))
        rows.append(measure(model, inputs, method, retention, args))
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
        if device.type == "cuda":  # hand the last configuration's blocks back before the next one
            gc.collect()
            torch.cuda.empty_cache()
    add_ratios(rows)

    notes = [] if device.type == "cuda" else ["Peak memory is only measured on CUDA."]
    if args.model is None:
        notes.append("Random weights: only time and memory mean anything, not outputs or tokens kept.")
    header = {
        "model": label, "model_class": type(model).__name__, "random_weights": args.model is None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenreduce": tokenreduce.__version__, "python": platform.python_version(), "dtype": args.dtype,
        "attn": args.attn, "frames": args.frames, "size": args.size,
        "frame_pixels": _frame_pixels(model, inputs),
        "sequence_length": rows[0].sequence_length, "visual_tokens": rows[0].visual_tokens_in,
        "num_layers": model.config.text_config.num_hidden_layers,
        "params": sum(t.numel() for t in model.parameters()), "weights_gib": weights,
        "repeats": args.repeats, "warmup": args.warmup, "decode_tokens": args.decode_tokens,
        "seed": args.seed, "notes": notes,
        "formulas": {"prefill_ms": "median TTFT - median vision",
                     "decode_ms_per_token": "(last logits - first logits) / (decode_tokens - 1)",
                     "ideal_prefill_speedup": "dense mean layer tokens / mean layer tokens"},
    }
    table = markdown(header, rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"header": header, "rows": [asdict(r) for r in rows]}
        (out / "speed.json").write_text(json.dumps(report, indent=1))
        (out / "speed.md").write_text(table)
        print(f"wrote {out / 'speed.json'} and {out / 'speed.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
