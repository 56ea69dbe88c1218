"""Vision-stage benchmark: dense against ``static`` (and ``static`` + ``framefusion``) on real H.264 clips
whose fraction of static units differs a lot (static camera with a moving object, camera pan, scene cut).

    python benchmarks/vision.py                      # small Qwen2.5-VL shape on CPU, 8 frames at 224 px
    python benchmarks/vision.py --frames 64 --size 448 --arch qwen2.5-vl-7b --device cuda --dtype bf16

Every configuration runs in one process on the same inputs; the configurations take turns (round-robin, so
a noisy machine's slow spells hit them alike), after one warm-up round. Per turn: the vision tower alone
(``get_video_features``, patched when the method is) and one greedy ``generate`` of one token timed to its
first logits (TTFT); prefill = TTFT - vision (medians). Fidelity: the relative L2 change of the
features that reach the LLM (per token, mean) against the dense tower's. Weights are random: timings are
the architecture's, the features' values are not a real model's.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce  # noqa: E402
from tokenreduce.methods.framefusion import FrameFusion  # noqa: E402
from tokenreduce.methods.static import Static  # noqa: E402
from tokenreduce.testing import make_inputs, tiny_model  # noqa: E402
from tokenreduce.timing import Clock, time_generate  # noqa: E402
from tokenreduce.video import read_video, write_demo_video  # noqa: E402

# Qwen2.5-VL's layout (windowed blocks, a full-attention block every 4, 112 px windows) at 2/5 of its tower
# width and 1/4 of its depth, with a 12-layer LLM of width 512: small enough for a shared 2-core CPU.
SMALL = dict(
    text_config=dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                     num_attention_heads=8, num_key_value_heads=2),
    vision_config=dict(depth=8, hidden_size=512, intermediate_size=1368, num_heads=8, out_hidden_size=512,
                       window_size=112, fullatt_block_indexes=[3, 7]),
)
VIDEOS = {"static camera": "static", "pan": "pan", "scene cut": "cuts"}


def configs() -> dict[str, list | None]:
    return {
        "dense": None,
        "static": [Static()],
        "static r=0.3": [Static(retention=0.3)],
        "static + framefusion 0.3": [Static(), FrameFusion(retention=0.3)],
    }


def build(arch: str, device: str, dtype: torch.dtype):
    if arch == "small-qwen2.5-vl":
        return tiny_model("qwen2_5_vl", dtype=dtype, **copy.deepcopy(SMALL)).to(device)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import build_arch

    return build_arch(arch, device, dtype, "sdpa")


def turn(model, inputs: dict, methods: list | None, clock: Clock) -> dict[str, Any]:
    """One timed turn of one configuration: vision tower alone, then generate to the first logits."""
    if methods is None:
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
    else:
        tokenreduce.patch(model, methods)
    with torch.no_grad():
        t0 = clock.now()
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        t1 = clock.now()
        run = time_generate(model, inputs, clock, max_new_tokens=1, do_sample=False)
    row = {"vision_ms": t1 - t0, "ttft_ms": run.ttft_ms, "features": torch.cat(out.pooler_output).float()}
    if methods is not None:
        s = tokenreduce.stats(model)
        row["static_fraction"] = s.stages["vision"]["static_fraction"]
        row["llm_visual_tokens"] = s.visual_tokens_kept[0]
    else:
        row["static_fraction"] = 0.0
        row["llm_visual_tokens"] = int((inputs["input_ids"] == model.config.video_token_id).sum())
    return row


def measure(model, inputs: dict, repeats: int, clock: Clock) -> dict[str, dict[str, Any]]:
    """Every configuration on one video, round-robin, the first round untimed; medians per configuration."""
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in configs()}
    for i in range(repeats + 1):
        for name, methods in configs().items():
            row = turn(model, inputs, methods, clock)
            if i:
                turns[name].append(row)
    out = {}
    for name, rows in turns.items():
        vision = statistics.median(r["vision_ms"] for r in rows)
        ttft = statistics.median(r["ttft_ms"] for r in rows)
        out[name] = {**rows[-1], "vision_ms": vision, "ttft_ms": ttft, "prefill_ms": ttft - vision}
    return out


def fidelity(features: torch.Tensor, dense: torch.Tensor) -> float:
    return float(((features - dense).norm(dim=-1) / dense.norm(dim=-1).clamp(min=1e-6)).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small-qwen2.5-vl", help="small-qwen2.5-vl (default) or an arch of speed.py")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (even)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for vision.json and vision.md")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = build(args.arch, args.device, dtype).eval()
    clock = Clock(torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        clips = {name: read_video(write_demo_video(Path(tmp) / f"{motion}.mp4", num_frames=args.frames,
                                                   size=args.size, motion=motion))
                 for name, motion in VIDEOS.items()}
    rows = []
    for video in tqdm(clips, desc="videos"):
        inputs = make_inputs(model, videos=[clips[video]], max_pixels=args.size**2)
        inputs = {k: v.to(args.device, dtype) if k.startswith("pixel") else v.to(args.device)
                  for k, v in inputs.items()}
        results = measure(model, inputs, args.repeats, clock)
        base = results["dense"]
        for name, row in results.items():
            row.update(video=video, method=name, ttft_speedup=base["ttft_ms"] / row["ttft_ms"],
                       vision_speedup=base["vision_ms"] / row["vision_ms"],
                       feature_change=fidelity(row["features"], base["features"]))
            rows.append(row)
    for row in rows:
        row.pop("features")
    header = {"arch": args.arch, "frames": args.frames, "size": args.size, "device": args.device,
              "dtype": args.dtype, "repeats": args.repeats, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    lines = [f"{args.arch}, {args.frames} frames at {args.size} px, {args.device} {args.dtype}, "
             f"median of {args.repeats}", "",
             "| video | method | static units | LLM visual tokens | vision ms | prefill ms | TTFT ms | "
             "vision speed-up | TTFT speed-up | feature change |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['video']} | {r['method']} | {r['static_fraction']:.0%} | {r['llm_visual_tokens']} | "
                     f"{r['vision_ms']:.0f} | {r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | "
                     f"{r['vision_speedup']:.2f}x | {r['ttft_speedup']:.2f}x | {r['feature_change']:.3f} |")
    (args.out / "vision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
