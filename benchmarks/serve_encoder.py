"""Encoder-step benchmark in vLLM's offline engine: a wave of video requests arriving together, dense
against vLLM's EVS and tokenreduce with each ``encoder_batch``: "budget" (a step's videos batched within
the encoder budget, as a dense server batches) and "one" (one video per tower call, what vLLM's V1
runner does whenever pruning is on).

    python benchmarks/serve_encoder.py --model Qwen/Qwen2.5-VL-7B-Instruct --videos 16 --frames 64
    python benchmarks/serve_encoder.py --quick      # tiny random Qwen2.5-VL on CPU, float32

Run it with the Python that has vLLM (integrations/vllm/setup_env.sh on CPU). Each configuration starts
one in-process ``vllm.LLM``, runs an untimed warm-up wave, then ``--repeats`` timed waves of ``--videos``
requests submitted in one ``generate`` call (each video under a fresh ``multi_modal_uuids`` entry, so the
encoder cache never answers), with ``--max-tokens`` output tokens each. Reported per configuration: the
median wave time, videos/s and the ratio to dense, as JSON and a markdown table in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model name or directory (default with --quick: a tiny random Qwen2.5-VL)")
    p.add_argument("--method", default="evs", help="pre-LLM method: evs, framefusion, aim or sms (default evs)")
    p.add_argument("--retention", type=float, default=0.3, help="fraction of video tokens kept (default 0.3)")
    p.add_argument("--videos", type=int, default=16, help="requests (one video each) per wave (default 16)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (default 224)")
    p.add_argument("--max-tokens", type=int, default=1, help="output tokens per request (default 1: prefill)")
    p.add_argument("--repeats", type=int, default=3, help="timed waves per configuration (default 3)")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (default auto; float32 with --quick)")
    p.add_argument("--max-model-len", type=int, default=16384, help="vLLM max_model_len (default 16384)")
    p.add_argument("--out", default="out/serve_encoder", help="output directory (default out/serve_encoder)")
    p.add_argument("--quick", action="store_true",
                   help="tiny CPU run: tiny Qwen2.5-VL, 4 videos of 8 frames at 56 px, 2 repeats, float32")
    args = p.parse_args(argv)
    if args.quick:
        args.videos, args.frames, args.size, args.repeats = 4, 8, 56, 2
        args.dtype, args.max_model_len = "float32", 2048
    if args.model is None and not args.quick:
        p.error("--model is required (or --quick for the tiny CPU model)")
    if not 0 < args.retention <= 1:
        p.error(f"--retention must be in (0, 1], got {args.retention}")
    return args


def wave(llm, videos: list, params, key: str) -> tuple[float, float]:
    """Seconds to answer one request per video submitted together, and their mean prompt length."""
    tag = "<|vision_start|><|video_pad|><|vision_end|>"
    prompts = [{"prompt": f"user: {tag} describe the video", "multi_modal_data": {"video": video},
                "multi_modal_uuids": {"video": [f"{key}-{i}"]}} for i, video in enumerate(videos)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, statistics.mean(len(o.prompt_token_ids) for o in outs)


def run_config(args, model: str, name: str, engine_kwargs: dict) -> dict:
    from tokenreduce_vllm.testing import make_video, video_metadata
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.videos,
              enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 0, "video": 1}, **engine_kwargs)
    videos = [(make_video(args.frames, args.size, seed=i), video_metadata(args.frames)) for i in range(args.videos)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    wave(llm, videos, params, f"{name}-warm-up")
    times, prompt = [], 0.0
    for repeat in tqdm(range(args.repeats), desc=name, unit="wave", leave=False):
        seconds, prompt = wave(llm, videos, params, f"{name}-{repeat}")
        times.append(seconds)
    del llm
    gc.collect()
    median = statistics.median(times)
    return {"config": name, "wave_s": median, "videos_per_s": args.videos / median, "mean_prompt_tokens": prompt,
            "waves_s": times}


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["wave_s"]
    lines = ["| configuration | wave s (median) | videos/s | × dense | prompt tokens |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['wave_s']:.3f} | {r['videos_per_s']:.2f} | {dense / r['wave_s']:.2f} | "
              f"{r['mean_prompt_tokens']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: quicker to start
    model = args.model
    if model is None:
        from tokenreduce_vllm.testing import make_model

        model = str(make_model(Path(tempfile.gettempdir()) / "tokenreduce_vllm_models", "qwen2_5_vl"))
    configs = {"dense": {}, f"vllm-evs {args.retention}": {"video_pruning_rate": 1 - args.retention}}
    for batch in ("budget", "one"):
        settings = {"method": args.method, "retention": args.retention, "encoder_batch": batch}
        name = f"{args.method} {args.retention}, encoder_batch={batch}"
        configs[name] = {"additional_config": {"tokenreduce": settings}}
    rows = [run_config(args, model, name, kwargs) for name, kwargs in configs.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "machine": platform.processor() or platform.machine(), **vars(args)}
    (out / "serve_encoder.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    (out / "serve_encoder.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
