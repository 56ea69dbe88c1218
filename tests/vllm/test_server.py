"""The plugin behind vLLM's OpenAI-compatible server, started with ``tokenreduce serve`` on 127.0.0.1 and
queried with the real ``openai`` client; and ``benchmarks/serve.py --quick`` (dense and reduced servers)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.version")  # not just "vllm": tests/vllm itself is a namespace package "vllm"
openai = pytest.importorskip("openai")

from tokenreduce_vllm.testing import make_video, mp4_data_url, png_data_url  # noqa: E402

from tokenreduce.methods.pre_llm import video_token_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FRAMES, SIZE, FPS = 8, 56, 2.0
GRID = (FRAMES // 2, (SIZE // 28) ** 2)  # Qwen2.5-VL: temporal patch 2, 14 px patches merged 2 x 2
METHOD, RETENTION = "framefusion", 0.5


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client(model_dirs, tmp_path_factory):
    """One reduced server for the module (a vLLM start is slow on a small CPU)."""
    bench = _bench()
    port = bench.free_port()
    model = str(model_dirs["qwen2_5_vl"])
    cmd = [sys.executable, "-m", "tokenreduce", "serve", model, "--method", METHOD, "--retention", str(RETENTION),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "2048", "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 1})]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with bench.Server(cmd, port, log, timeout=600):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY"), model


def _chat(client, model, media: dict | None, **extra) -> openai.types.chat.ChatCompletion:
    content = ([media] if media else []) + [{"type": "text", "text": "describe"}]
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=3, temperature=0.0, extra_body={"ignore_eos": True, **extra})


def _video(seed: int = 1) -> dict:
    return {"type": "video_url", "video_url": {"url": mp4_data_url(make_video(FRAMES, SIZE, seed=seed), FPS)}}


def test_image_and_video_requests(client):
    client, model = client
    text = _chat(client, model, None)
    image = _chat(client, model, {"type": "image_url", "image_url": {"url": png_data_url(make_video(1, SIZE)[0])}})
    video = _chat(client, model, _video())
    for reply in (text, image, video):
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    # the chat template writes <|vision_start|><|..._pad|><|vision_end|>; the pad token becomes the placeholders
    n_image = image.usage.prompt_tokens - text.usage.prompt_tokens - 2
    n_video = video.usage.prompt_tokens - text.usage.prompt_tokens - 2
    assert n_image == (SIZE // 28) ** 2  # images pass through
    assert n_video == video_token_count(METHOD, *GRID, RETENTION) < GRID[0] * GRID[1]


def test_per_request_settings(client):
    """``vllm_xargs`` (and, without --trust-request-mm-kwargs, ``mm_processor_kwargs``) carry a request's
    own ``tokenreduce_*`` settings; other untrusted processor kwargs stay refused; bad values get a 400."""
    client, model = client
    text = _chat(client, model, None).usage.prompt_tokens + 2
    low = RETENTION / 2
    by_xargs = _chat(client, model, _video(), vllm_xargs={"tokenreduce_retention": low})
    by_kwargs = _chat(client, model, _video(), mm_processor_kwargs={"tokenreduce_retention": low})
    for reply in (by_xargs, by_kwargs):
        assert reply.usage.prompt_tokens - text == video_token_count(METHOD, *GRID, low)
    by_method = _chat(client, model, _video(), vllm_xargs={"tokenreduce_method": "evs"})
    assert by_method.usage.prompt_tokens - text == video_token_count("evs", *GRID, RETENTION)
    for extra, message in [({"vllm_xargs": {"tokenreduce_retention": 2}}, "retention must be a number in (0, 1]"),
                           ({"vllm_xargs": {"tokenreduce_retention": 0.9}}, "more than the server's"),
                           ({"mm_processor_kwargs": {"fps": 1}}, "--trust-request-mm-kwargs")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(message)):
            _chat(client, model, _video(seed=2), **extra)


def test_bad_settings_fail_before_serving():
    """``tokenreduce serve`` refuses an in-LLM method before vLLM starts (exit code 2, one clear line)."""
    done = subprocess.run([sys.executable, "-m", "tokenreduce", "serve", "some/model", "--method", "fastv"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "inside the LLM's layers" in done.stderr and "evs" in done.stderr


def test_benchmark_quick(tmp_path):
    """Dense and reduced servers, concurrency 1 and 4: every request answered, prompts reduced as counted."""
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--method", "evs",
                    "--retention", "0.3", "--out", str(out)], check=True, timeout=1800)
    report = json.loads((out / "serve.json").read_text())
    rows = {(r["server"], r["concurrency"]): r for r in report["rows"]}
    assert set(rows) == {(s, c) for s in ("dense", "evs 0.3") for c in (1, 4)}
    for row in rows.values():
        assert row["requests"] == 4 and row["requests_per_s"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"] > 0
        assert row["output_tokens_per_s"] > 0
    removed = GRID[0] * GRID[1] - video_token_count("evs", *GRID, 0.3)
    for c in (1, 4):
        assert rows[("dense", c)]["mean_prompt_tokens"] - rows[("evs 0.3", c)]["mean_prompt_tokens"] == removed
    assert "| evs 0.3 | 4 |" in (out / "serve.md").read_text()


def test_encoder_benchmark_quick(tmp_path):
    """``benchmarks/serve_encoder.py --quick``: dense, vLLM's EVS and both encoder_batch settings, each wave
    answered with the reduced prompts."""
    out = tmp_path / "encoder"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_encoder.py"), "--quick", "--out", str(out)],
                   check=True, timeout=1800)
    rows = {r["config"]: r for r in json.loads((out / "serve_encoder.json").read_text())["rows"]}
    assert list(rows) == ["dense", "vllm-evs 0.3", "evs 0.3, encoder_batch=budget", "evs 0.3, encoder_batch=one"]
    removed = GRID[0] * GRID[1] - video_token_count("evs", *GRID, 0.3)
    for name, row in rows.items():
        assert len(row["waves_s"]) == 2 and row["wave_s"] > 0
        assert rows["dense"]["mean_prompt_tokens"] - row["mean_prompt_tokens"] == (0 if name == "dense" else removed)
    assert "| evs 0.3, encoder_batch=one |" in (out / "serve_encoder.md").read_text()
