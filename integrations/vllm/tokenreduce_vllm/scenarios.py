"""Serving scenarios that vLLM's defaults create (prefix-cache hits past a video, chunked-prefill step
boundaries around media, shared prefixes, long videos, mixed per-request retentions), run on the tiny
models of :mod:`tokenreduce_vllm.testing`. The CPU tests (``tests/vllm``) and the GPU tests
(``tests/vllm/gpu``, V1 and V2 model runners) run the same scenarios with different engine options:
each returns the outputs of an engine under the scenario's settings next to those of a reference
engine without them (no prefix caching, no chunking, a long context), which must agree exactly, and
the positions the LLM saw, which must equal :func:`dense_positions`. Each engine is deleted before the
next starts: engines in one process share vLLM's parallel state, which a late garbage collection of an
old engine tears down under a new one."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .testing import make_video, video_metadata

METHODS = ("evs", "framefusion", "aim", "sms")
FRAMES, SIZE = 8, 56
# the server keeps everything unless a request asks: each request picks its method and retention
SERVER = {"method": "evs", "retention": 1.0}
LONG_TEXT = " ".join(["the camera moves left then right and the red square"] * 6)
PAD = " the"  # one token of the tiny models' tokenizers: shifts a prompt's layout by one position


@dataclass(frozen=True)
class Check:
    """How a scenario compares: logprobs within ``atol``; generated tokens equal (else only the first
    step, whose distribution depends on the prompt alone: low precision may flip a near-tie later);
    the positions the LLM's first layer saw (needs an eager engine: hooks do not run in CUDA graphs)."""

    atol: float = 1e-4
    tokens: bool = True
    positions: bool = True


EXACT = Check()


@dataclass
class Result:
    """One request's output: prompt, tokens, top-k logprobs per step, cached prompt tokens, and the
    positions the LLM's first layer saw for the request's computed tokens (when recorded)."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[dict[int, float]]
    cached: int
    text: str
    positions: Any = None
    kept: list[list[int]] = field(default_factory=list)


def tags(family: str) -> dict[str, str]:
    if family == "llava_onevision":
        return {"image": "<image>", "video": "<video>"}
    return {"image": "<|vision_start|><|image_pad|><|vision_end|>",
            "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def media(modality: str, seed: int, frames: int = FRAMES, size: int = SIZE):
    if modality == "image":
        from PIL import Image

        return Image.fromarray(make_video(1, size, seed=seed + 100)[0])
    return make_video(frames, size, seed=seed), video_metadata(frames)


def request(family: str, layout: list[str], before: str = "", after: str = " describe it", seeds=None,
            kwargs: dict | None = None, frames: int = FRAMES, size: int = SIZE) -> dict:
    """A prompt ``user:<before> <media...><after>`` with the ``layout``'s media (``"image"``/``"video"``),
    items separated by a space, and ``kwargs`` as the request's processor kwargs."""
    seeds = seeds or list(range(len(layout)))
    body = " ".join(tags(family)[m] for m in layout)
    data: dict[str, list] = {}
    for modality, seed in zip(layout, seeds, strict=True):
        data.setdefault(modality, []).append(media(modality, seed, frames, size))
    out = {"prompt": f"user:{before} {body}{after}\nassistant: ", "multi_modal_data": data}
    return out | ({"mm_processor_kwargs": kwargs} if kwargs else {})


def engine(model_dir: str | os.PathLike, tokenreduce: dict | None = SERVER, **options):
    """``vllm.LLM`` on a tiny model with ``tokenreduce`` settings; ``options`` override the defaults
    (the tests pass their platform's: dtype, block size, eager, executor)."""
    from vllm import LLM

    extra = {"additional_config": {"tokenreduce": tokenreduce}} if tokenreduce is not None else {}
    base = dict(max_model_len=2048, max_num_seqs=4, seed=0, limit_mm_per_prompt={"image": 2, "video": 2})
    return LLM(model=str(model_dir), tokenizer=str(model_dir), **(base | extra | options))


def record_positions(model) -> None:
    """Record the positions of every forward of the LLM's first layer (``model.scenario_positions``)."""
    model.scenario_positions = []
    model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: model.scenario_positions.append(args[0].cpu().clone()), with_kwargs=True)


# module-level, not lambdas: a multiprocessing executor pickles what ``apply_model`` runs
def _clear_positions(model) -> None:
    model.scenario_positions.clear()


def _seen_positions(model) -> list:
    return list(model.scenario_positions)


def _kept(model) -> list[list[int]]:
    return [i.cpu().tolist() for i in getattr(model, "tokenreduce_last", [])]


def run(llm, requests: list[dict], max_tokens: int = 3, logprobs: int = 5, positions: bool = False) -> list[Result]:
    """Greedy generations of ``requests`` submitted together. With ``positions`` (one request only,
    in-process engine) the positions the LLM saw for its computed tokens, in order."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    if positions:
        llm.apply_model(_clear_positions)
    outs = llm.generate(requests, params, use_tqdm=False)
    kept = llm.apply_model(_kept)[0]
    results = []
    for out in outs:
        results.append(Result(prompt=list(out.prompt_token_ids), tokens=list(out.outputs[0].token_ids),
                              logprobs=[{k: v.logprob for k, v in step.items()} for step in out.outputs[0].logprobs],
                              cached=int(out.num_cached_tokens or 0), text=out.outputs[0].text, kept=kept))
    if positions:
        import torch

        seen = llm.apply_model(_seen_positions)[0]
        results[0].positions = torch.cat(seen, dim=-1)
    return results


def mismatch(a: Result, b: Result, check: Check = EXACT) -> str | None:
    """Why two outputs of the same request differ (None when prompts, tokens and every top-k logprob
    both report agree within ``check.atol``; without ``check.tokens`` the first step only)."""
    atol = check.atol
    if a.prompt != b.prompt:
        return f"prompts differ ({len(a.prompt)} vs {len(b.prompt)} tokens)"
    if check.tokens and a.tokens != b.tokens:
        return f"tokens differ: {a.tokens} vs {b.tokens}"
    steps = len(a.logprobs) if check.tokens else 1
    for step, (x, y) in enumerate(zip(a.logprobs[:steps], b.logprobs[:steps], strict=True)):
        for token in set(x) & set(y):
            if abs(x[token] - y[token]) > atol:
                return f"step {step} token {token}: logprob {x[token]} vs {y[token]}"
    return None


def dense_positions(prompt: list[int], items: list[tuple[int, Any, list[int] | None]]) -> Any:
    """The M-RoPE positions ``[3, len(prompt)]`` a reduced prompt must get: vLLM's rule for the dense
    prompt (text counts on from the largest position before it plus one, a media item's grid starts
    there), with each kept media token at its original grid position. ``items`` are (offset, ``[3, n]``
    dense grid positions from 0, kept grid indices or None for all), in prompt order. Written from the
    rule, independently of the plugin's code."""
    import torch

    out = torch.zeros(3, len(prompt), dtype=torch.long)
    nxt, i = 0, 0
    for offset, grid, kept in items:
        while i < offset:
            out[:, i] = nxt
            nxt, i = nxt + 1, i + 1
        rows = grid if kept is None else grid[:, torch.as_tensor(kept)]
        out[:, offset:offset + rows.shape[1]] = rows + nxt
        i = offset + rows.shape[1]
        nxt = nxt + int(grid.max()) + 1
    while i < len(prompt):
        out[:, i] = nxt
        nxt, i = nxt + 1, i + 1
    return out


def qwen_grid(t: int, h: int, w: int, t_factor: float = 1.0) -> Any:
    """``[3, t*h*w]`` (t, h, w) of a merged Qwen grid, temporal index scaled as vLLM does."""
    import torch

    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    grid[0] = (grid[0].double() * t_factor).long()
    return grid


def expected_positions(family: str, model_dir: str | os.PathLike, prompt: list[int], kept: list[list[int]],
                       frames: int = FRAMES, size: int = SIZE) -> Any:
    """:func:`dense_positions` of a prompt of this package's media (``kept``: the kept grid indices of
    each video in prompt order), from the model's config: Qwen's merged (t, h, w) grids (temporal index
    x tokens_per_second x seconds per temporal patch), LLaVA-OneVision's 1-D runs with the video's
    trailing newline at the end of its dense run."""
    import json

    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    image_id = config.get("image_token_id", config.get("image_token_index"))
    video_id = config.get("video_token_id", config.get("video_token_index"))
    ids = torch.tensor(prompt)
    is_media = (ids == image_id) | (ids == video_id)
    starts = [i for i in range(len(prompt)) if is_media[i] and (i == 0 or not is_media[i - 1] or ids[i] != ids[i - 1])]
    items, videos = [], iter(kept)
    for start in starts:
        end = start
        while end < len(prompt) and prompt[end] == prompt[start]:
            end += 1
        video = prompt[start] == video_id
        if family == "llava_onevision":
            dense = frames * 4 + 1 if video else end - start  # 56 px SigLIP: 4 x 4 patches pooled by 2
            grid = torch.arange(dense).expand(3, -1)
            items.append((start, grid, [*next(videos), dense - 1] if video else None))
            continue
        side = size // 28
        if video:
            per_second = config["vision_config"].get("tokens_per_second", 1.0)
            seconds = 2 / 2.0 if family == "qwen2_5_vl" else 1.0  # temporal patch 2 at 2 fps
            items.append((start, qwen_grid(frames // 2, side, side, per_second * seconds), next(videos)))
        else:
            items.append((start, qwen_grid(1, side, side), None))
    return dense_positions(prompt, items)


def _video_kwargs(method: str, retention: float) -> dict:
    return {"tokenreduce_method": method, "tokenreduce_retention": retention}


def _check_positions(family, model_dir, result: Result, kept: list[list[int]], problems: list[str], what: str,
                     frames: int = FRAMES, size: int = SIZE) -> None:
    """The LLM saw the dense positions for the request's computed prompt tokens and the tokens after."""
    import torch

    if result.positions is None:
        return
    expected = expected_positions(family, model_dir, result.prompt, kept, frames, size)
    after = expected.max() + 1 + torch.arange(len(result.tokens) - 1)
    expected = torch.cat([expected[:, result.cached:], after.expand(3, -1)], dim=1)
    seen = result.positions
    if seen.shape != expected.shape or not torch.equal(seen, expected):
        bad = (seen != expected).any(0).nonzero().flatten()[:5].tolist() if seen.shape == expected.shape else []
        problems.append(f"{what}: positions seen {tuple(seen.shape)} differ from the dense prompt's "
                        f"{tuple(expected.shape)} (prompt {len(result.prompt)} tokens, {result.cached} cached; "
                        f"first bad columns {bad})")


def prefix_cache(model_dir, family: str, options: dict, methods=METHODS, retention: float = 0.5,
                 check: Check = EXACT) -> list[str]:
    """Prefix caching on: each method's video request (video first, long text after) asked twice, then a
    second chat turn about the same video, so that the cache covers the video; each output must equal
    an engine's without prefix caching, and the positions seen must be the dense prompt's."""
    requests = [request(family, ["video"], after=LONG_TEXT, kwargs=_video_kwargs(m, retention)) for m in methods]
    cached = engine(model_dir, **(options | {"enable_prefix_caching": True}))
    if check.positions:
        cached.apply_model(record_positions)
    got, problems = [], []
    for method, req in zip(methods, requests, strict=True):
        first = run(cached, [req], positions=check.positions)[0]
        again = run(cached, [req], positions=check.positions)[0]
        turn = req | {"prompt": req["prompt"] + first.text + "\nuser: and what happens next?\nassistant: "}
        second = run(cached, [turn], positions=check.positions)[0]
        for name, result in (("first", first), ("repeated", again), ("second turn", second)):
            if name != "first" and result.cached <= _last_media(result.prompt, model_dir):
                problems.append(f"{method} {name}: the prefix cache did not cover the video ({result.cached} tokens)")
            _check_positions(family, model_dir, result, first.kept, problems, f"{method} {name}")
        got.append((req, first, again, turn, second))
    del cached
    gc.collect()
    reference = engine(model_dir, **(options | {"enable_prefix_caching": False}))
    for method, (req, first, again, turn, second) in zip(methods, got, strict=True):
        ref, ref_turn = run(reference, [req])[0], run(reference, [turn])[0]
        for name, a, b in (("first", first, ref), ("repeated", again, ref), ("second turn", second, ref_turn)):
            if (why := mismatch(a, b, check)) is not None:
                problems.append(f"{method} {name} vs no prefix caching: {why}")
    del reference
    gc.collect()
    return problems


# one video, two videos, an image then a video: boundaries around every kind of item, alone and second
LAYOUTS = (["video"], ["video", "video"], ["image", "video"])


def chunk_boundaries(model_dir, family: str, options: dict, chunk: int = 8, layouts=LAYOUTS,
                     method: str = "evs", retention: float = 0.5, check: Check = EXACT) -> list[str]:
    """Chunked prefill with ``chunk`` tokens per step over prompts padded by 0..chunk-1 tokens, so that a
    step boundary falls at every offset around each media item (its start token, first and last media
    token, end token); each output must equal an unchunked engine's, and for a lone video the positions
    seen must be the dense prompt's."""
    requests = [request(family, layout, before=PAD * pad, kwargs=_video_kwargs(method, retention))
                for layout in layouts for pad in range(chunk)]
    chunked = engine(model_dir, **(options | {"enable_prefix_caching": False, "enable_chunked_prefill": True,
                                                "max_num_batched_tokens": chunk}))
    if check.positions:
        chunked.apply_model(record_positions)
    problems, got = [], []
    for req in requests:
        result = run(chunked, [req], positions=check.positions)[0]
        layout = [m for m in ("image", "video") for _ in req["multi_modal_data"].get(m, [])]
        if layout == ["video"]:  # the model's last tower call is this video's (an image may come after it)
            _check_positions(family, model_dir, result, [result.kept[-1]], problems, f"{layout} {req['prompt'][:40]!r}")
        got.append(result)
    first_media = {_first_media(r.prompt, model_dir) % chunk for r in got}
    if len(first_media) != chunk:
        problems.append(f"the pads did not put a step boundary at every offset: residues {sorted(first_media)}")
    del chunked
    gc.collect()
    reference = engine(model_dir, **(options | {"enable_prefix_caching": False}))
    for req, result, alone in zip(requests, got, run(reference, requests), strict=True):
        if (why := mismatch(result, alone, check)) is not None:
            problems.append(f"{req['prompt'][:60]!r} chunked by {chunk} vs whole: {why}")
    del reference
    gc.collect()
    return problems


def shared_prefix(model_dir, family: str, options: dict, block_size: int, check: Check = EXACT) -> list[str]:
    """Prefix caching with ``block_size``: two requests whose first block ends right before their video's
    first media token (Qwen: with ``<|vision_start|>``), with different videos; the second reuses that
    block. Each output must equal an engine's without prefix caching."""
    cached = engine(model_dir, **(options | {"enable_prefix_caching": True, "block_size": block_size}))
    tokenizer = cached.get_tokenizer()
    pad = next(p for p in range(2 * block_size)
               if _first_media(tokenizer.encode(request(family, ["video"], before=PAD * p)["prompt"]), model_dir)
               == block_size)
    requests = [request(family, ["video"], before=PAD * pad, seeds=[seed]) for seed in (0, 1)]
    got = [run(cached, [r])[0] for r in requests]
    del cached
    gc.collect()
    problems = []
    if got[1].cached < block_size:
        problems.append(f"the second request did not reuse the first block ({got[1].cached} cached tokens)")
    reference = engine(model_dir, **(options | {"enable_prefix_caching": False}))
    for seed, (req, result) in enumerate(zip(requests, got, strict=True)):
        if (why := mismatch(result, run(reference, [req])[0], check)) is not None:
            problems.append(f"video {seed} with a shared first block vs no prefix caching: {why}")
    del reference
    gc.collect()
    return problems


def long_video(model_dir, family: str, options: dict, max_model_len: int = 128, retention: float = 0.25,
               check: Check = EXACT) -> list[str]:
    """A video whose dense prompt exceeds ``max_model_len`` while its reduced prompt fits: the engine
    must serve it with the dense prompt's positions and the outputs of an engine with a long context."""
    size = 112
    frames = 64 if family == "llava_onevision" else 16  # LLaVA-OneVision resizes frames to 56 px
    req = request(family, ["video"], kwargs=_video_kwargs("evs", retention), frames=frames, size=size)
    short = engine(model_dir, **(options | {"max_model_len": max_model_len}))
    if check.positions:
        short.apply_model(record_positions)
    result = run(short, [req], positions=check.positions)[0]
    del short
    gc.collect()
    problems = []
    dense = len(result.prompt) - len(result.kept[-1]) + _dense_video_tokens(family, frames, size)
    if not len(result.prompt) <= max_model_len < dense:
        problems.append(f"the scenario needs a reduced prompt within max_model_len {max_model_len} and a dense one "
                        f"beyond it: {len(result.prompt)} and {dense} tokens")
    _check_positions(family, model_dir, result, [result.kept[-1]], problems, "long video", frames, size)
    reference = engine(model_dir, **options)
    if (why := mismatch(result, run(reference, [req])[0], check)) is not None:
        problems.append(f"max_model_len {max_model_len} vs 2048: {why}")
    del reference
    gc.collect()
    return problems


def mixed_retentions(model_dir, family: str, options: dict, retentions=(0.25, 0.5, 1.0),
                     check: Check = EXACT) -> list[str]:
    """Prefix caching on: three requests about one video with three retentions, submitted together,
    twice (the second time from the cache); each must equal the same request alone in an engine
    without prefix caching."""
    requests = [request(family, ["video"], after=LONG_TEXT, kwargs=_video_kwargs("evs", r)) for r in retentions]
    cached = engine(model_dir, **(options | {"enable_prefix_caching": True}))
    rounds = [run(cached, requests), run(cached, requests)]
    del cached
    gc.collect()
    problems = []
    if len({len(r.prompt) for r in rounds[0]}) != len(retentions):
        problems.append("the three retentions did not give three prompt lengths")
    if min(r.cached for r in rounds[1]) <= max(_last_media(r.prompt, model_dir) for r in rounds[1]):
        problems.append(f"the second round did not hit the cache past the video: {[r.cached for r in rounds[1]]}")
    reference = engine(model_dir, **(options | {"enable_prefix_caching": False}))
    for req, retention, *results in zip(requests, retentions, *rounds, strict=True):
        alone = run(reference, [req])[0]
        for n, result in enumerate(results):
            if (why := mismatch(result, alone, check)) is not None:
                problems.append(f"retention {retention} round {n + 1} vs alone without prefix caching: {why}")
    del reference
    gc.collect()
    return problems


def _media_ids(model_dir) -> tuple[int, int]:
    from .testing import placeholder_ids

    return placeholder_ids(model_dir)


def _first_media(prompt: list[int], model_dir) -> int:
    ids = _media_ids(model_dir)
    return next(i for i, t in enumerate(prompt) if t in ids)


def _last_media(prompt: list[int], model_dir) -> int:
    ids = _media_ids(model_dir)
    return max(i for i, t in enumerate(prompt) if t in ids)


def _dense_video_tokens(family: str, frames: int, size: int) -> int:
    if family == "llava_onevision":
        return frames * 4 + 1
    return frames // 2 * (size // 28) ** 2


def isolated(name: str, model_dir, family: str, options: dict, **kwargs) -> list[str]:
    """Run ``scenarios.<name>`` in a fresh Python process and return its problems. Engines started one
    after another in one process share vLLM's process-wide state (parallel groups, environment cache),
    and in a long pytest session a late-collected engine was seen to tear it down under a later one."""
    spec = json.dumps({"name": name, "args": [str(model_dir), family, options], "kwargs": kwargs})
    code = ("import json, sys\nfrom tokenreduce_vllm import scenarios as s\nspec = json.loads(sys.argv[1])\n"
            "kwargs = spec['kwargs']\nif 'check' in kwargs:\n    kwargs['check'] = s.Check(**kwargs['check'])\n"
            "problems = getattr(s, spec['name'])(*spec['args'], **kwargs)\nprint('PROBLEMS ' + json.dumps(problems))\n")
    done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBLEMS ")]
    if not lines:
        return [f"scenario {name} failed (exit {done.returncode}): {done.stderr[-3000:]}"]
    return json.loads(lines[-1][len("PROBLEMS "):])
