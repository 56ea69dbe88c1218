"""Serving benchmark: vLLM's OpenAI server, dense against tokenreduce (and optionally vLLM's own EVS),
under concurrent video requests.

    python benchmarks/serve.py --model Qwen/Qwen2.5-VL-7B-Instruct --method evs --retention 0.3 --vllm-evs
    python benchmarks/serve.py --quick          # tiny random Qwen2.5-VL on CPU: a smoke test (the tests run it)

Run it with the Python that has vLLM and the tokenreduce plugin (integrations/vllm/setup_env.sh). For each
server (dense first, then reduced, then ``--vllm-evs``: vLLM's ``--video-pruning-rate 1-retention``) the
script starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, waits for /health, sends one
untimed warm-up request, then at each concurrency level sends up to ``--requests`` chat completions (each
with its own video, so no encoder or prefix cache can answer for another) from that many concurrent
streams of the ``openai`` client, bounded by ``--max-seconds`` per level, and stops the server.

Per level: requests/s (completed / wall time of the level), time to first token p50/p99 (request sent to
the first streamed token), output tokens/s, and the mean prompt tokens vLLM reports (showing the reduced
placeholders). Written as JSON and a markdown table to ``--out``. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

HOST = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Only 127.0.0.1 is contacted; the servers are started by this script.")
    p.add_argument("--model", help="model name or directory (default with --quick: a tiny random Qwen2.5-VL)")
    p.add_argument("--method", default="evs", help="pre-LLM method: evs, framefusion, aim or sms (default evs)")
    p.add_argument("--retention", type=float, default=0.3, help="fraction of video tokens kept (default 0.3)")
    p.add_argument("--encoder-batch", default="auto",
                   help="the plugin's encoder_batch, comma-separated for one reduced server each: auto, budget, "
                        "one (default auto)")
    p.add_argument("--vllm-evs", action="store_true",
                   help="also run vLLM's own EVS (--video-pruning-rate 1-retention; Qwen2.5-VL and others)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default 1,4,16,32)")
    p.add_argument("--requests", type=int, default=64, help="requests per level at most (default 64)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time bound per level (default 120)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (default 224)")
    p.add_argument("--fps", type=float, default=2.0, help="video frame rate (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (default auto; float32 with --quick)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra vLLM server argument (repeatable), e.g. --server-arg=--tensor-parallel-size=2")
    p.add_argument("--out", default="out/serve", help="output directory (default out/serve)")
    p.add_argument("--quick", action="store_true",
                   help="tiny CPU run: tiny Qwen2.5-VL, concurrency 1,4, 4 requests, 8 frames of 56 px, 4 tokens, "
                        "float32, --enforce-eager --max-model-len 2048")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.frames, args.size, args.max_tokens = "1,4", 4, 8, 56, 4
        args.dtype = "float32" if args.dtype == "auto" else args.dtype
        args.server_arg = ["--enforce-eager", "--max-model-len=2048", *args.server_arg]
    try:
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not all(c >= 1 for c in args.levels) or args.requests < 1 or args.max_seconds <= 0:
        p.error("--concurrency levels and --requests must be >= 1, --max-seconds > 0")
    if not 0 < args.retention <= 1:
        p.error(f"--retention must be in (0, 1], got {args.retention}")
    args.encoder_batches = args.encoder_batch.split(",")
    if bad := [b for b in args.encoder_batches if b not in ("auto", "budget", "one")]:
        p.error(f"--encoder-batch: expected auto, budget or one, got {', '.join(bad)}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(model: str, extra: list[str], port: int, dtype: str) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1:``port`` in this Python."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", HOST,
            "--port", str(port), "--dtype", dtype, "--seed", "0",
            "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}), *extra]


class Server:
    """A server subprocess (``cmd``) listening on 127.0.0.1:``port``, healthy on enter, stopped on exit;
    its output goes to ``log``."""

    def __init__(self, cmd: list[str], port: int, log: Path, timeout: float = 600.0):
        self.cmd, self.port, self.log, self.timeout = cmd, port, log, timeout

    def __enter__(self) -> Server:
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log: {self.log}\n"
                                   + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise TimeoutError(f"vLLM server not healthy after {self.timeout} s; log: {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"


def videos(n: int, frames: int, size: int, fps: float, seed: int) -> list[str]:
    """``n`` distinct mp4 data URLs (different seeds: no cache can answer one request for another)."""
    from tokenreduce_vllm.testing import make_video, mp4_data_url

    return [mp4_data_url(make_video(frames, size, seed=seed + i), fps) for i in range(n)]


async def one_request(client, model: str, video: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, usage = None, None
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                               {"type": "text", "text": "describe the video"}]}])
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "end": time.perf_counter() - start,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else 0}


async def run_level(url: str, model: str, pool: list[str], concurrency: int, max_tokens: int,
                    max_seconds: float) -> dict:
    """Up to ``len(pool)`` requests from ``concurrency`` streams; no new request after ``max_seconds``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=max_seconds + 600)
    queue = list(reversed(pool))
    results: list[dict] = []
    start = time.perf_counter()

    async def worker() -> None:
        while queue and time.perf_counter() - start < max_seconds:
            results.append(await one_request(client, model, queue.pop(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttfts = sorted(r["ttft"] for r in results)
    prompt = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
            "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
            "mean_prompt_tokens": statistics.fmean(prompt) if prompt else None}


def bench_server(name: str, extra: list[str], args, model: str, out: Path) -> list[dict]:
    port = args.port or free_port()
    rows = []
    cmd = server_command(model, extra, port, args.dtype)
    with Server(cmd, port, out / f"server_{name.replace(' ', '_')}.log", args.startup_timeout) as server:
        warm = videos(1, args.frames, args.size, args.fps, seed=10**6)
        asyncio.run(run_level(server.url, model, warm, 1, args.max_tokens, args.max_seconds))
        for i, level in enumerate(tqdm(args.levels, desc=name, unit="level")):
            pool = videos(args.requests, args.frames, args.size, args.fps, seed=1000 * (i + 1))
            rows.append({"server": name, **asyncio.run(
                run_level(server.url, model, pool, level, args.max_tokens, args.max_seconds))})
    return rows


def markdown(rows: list[dict]) -> str:
    dense = {r["concurrency"]: r for r in rows if r["server"] == "dense"}
    lines = ["| server | concurrency | requests | req/s | × dense | TTFT p50 ms | TTFT p99 ms | output tok/s "
             "| prompt tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = dense.get(r["concurrency"])
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}" if base else "–"
        prompt = f"{r['mean_prompt_tokens']:.0f}" if r["mean_prompt_tokens"] is not None else "–"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {ratio} "
                     f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['output_tokens_per_s']:.1f} "
                     f"| {prompt} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        if not args.quick:
            raise SystemExit("--model is required (or --quick for a tiny random model)")
        from tokenreduce_vllm.testing import make_model

        model = str(make_model(tempfile.mkdtemp(prefix="tokenreduce_serve_"), "qwen2_5_vl"))
    servers = [("dense", [])]
    for batch in args.encoder_batches:
        settings = {"method": args.method, "retention": args.retention, "encoder_batch": batch}
        name = f"{args.method} {args.retention:g}" + ("" if batch == "auto" else f" ({batch})")
        servers.append((name, ["--additional-config", json.dumps({"tokenreduce": settings})]))
    if args.vllm_evs:
        servers.append((f"vllm-evs {args.retention:g}", ["--video-pruning-rate", f"{1 - args.retention:g}"]))
    rows = []
    for name, extra in servers:
        rows.extend(bench_server(name, extra + [a for arg in args.server_arg for a in arg.split("=", 1)],
                                 args, model, out))
    import vllm

    meta = {"model": model, "method": args.method, "retention": args.retention,
            "encoder_batch": args.encoder_batches, "frames": args.frames,
            "size": args.size, "fps": args.fps, "max_tokens": args.max_tokens, "dtype": args.dtype,
            "vllm": vllm.__version__, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "quick": args.quick}
    (out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows)
    (out / "serve.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
