"""``tokenreduce demo``: writes a real mp4, decodes it, runs dense and reduced generation side by side
and draws what was kept."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import api
from ..methods import REGISTRY, make_method
from ..testing import FAMILIES, make_inputs, tiny_model, to_device
from ..timing import Clock, time_generate
from ..video import IMAGES, MOTIONS, read_video, write_demo_video
from ..viz import save_kept_patches, save_layer_tokens
from .common import UsageError, device_and_dtype, option, positive_int, retention, user_call

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_RETENTION = 0.3
_NOT_GIVEN = object()  # --retention absent (argparse.SUPPRESS leaves no attribute)
DEMO_FPS = 8


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "demo",
        help="dense vs reduced generation on a real mp4, with pictures of what was kept",
        description=(
            "Write a short H.264 video of a photograph (no download), decode it with PyAV, and generate "
            "from it with the model as it is (dense) and patched with a token-reduction method (reduced). "
            "Prints tokens per LLM layer, visual tokens kept, timings and the generated tokens of both, "
            "and saves kept_patches.png, layer_tokens.png and demo.json next to the video. Without "
            "--model it uses a tiny random-weight model and runs in seconds on a CPU (its outputs mean "
            "nothing and, at 4 layers of width 64, its timings measure overhead, not speed-up)."
        ),
    )
    model = cmd.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="local Hugging Face model folder with its processor (default: tiny random model)")
    model.add_argument("--family", choices=FAMILIES, default="qwen2_vl",
                       help="family of the tiny random model (default: %(default)s)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    model.add_argument("--question", default="Describe what happens in this video.",
                       help="question asked about the video (--model only; the tiny model's prompt is "
                            "random token ids) (default: %(default)r)")
    model.add_argument("--max-new-tokens", type=positive_int, default=8, metavar="N",
                       help="tokens to generate (default: %(default)s)")
    model.add_argument("--repeat", type=positive_int, default=3, metavar="N",
                       help="timed generations per mode after a warm-up; medians are reported "
                            "(default: %(default)s)")

    method = cmd.add_argument_group("method")
    method.add_argument("--method", default="framefusion",
                        help=f"{' or '.join(_visual_methods())}; see 'tokenreduce methods' (default: %(default)s)")
    method.add_argument("--retention", type=retention, default=argparse.SUPPRESS, metavar="R",
                        help="fraction of visual tokens to keep; 'none' leaves the method's own budget "
                             "(e.g. --retention none --option cost=0.3) (default: "
                             f"{DEFAULT_RETENTION} for methods that have a retention option)")
    method.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                        help="another method option, repeatable; VALUE is read as int, float, "
                             "true/false, none or else a string")

    video = cmd.add_argument_group("video")
    video.add_argument("--motion", choices=MOTIONS, default="pan",
                       help="camera pan, still scene with one moving object, zoom-in, or pan with a hard cut "
                            "(default: %(default)s)")
    video.add_argument("--image", choices=IMAGES, default="astronaut",
                       help="scikit-image photograph to film (default: %(default)s)")
    video.add_argument("--frames", type=positive_int, default=16, metavar="N",
                       help="frames written to the mp4 (default: %(default)s)")
    video.add_argument("--size", type=positive_int, default=224, metavar="PX",
                       help="side of the square video in pixels, even; the model's processor resizes it "
                            "(default: %(default)s)")
    video.add_argument("--num-frames", type=positive_int, metavar="N",
                       help="frames sampled evenly when decoding (default: all)")
    cmd.add_argument("--out", default="tokenreduce-demo", type=Path, metavar="DIR",
                     help="folder for demo.mp4, kept_patches.png, layer_tokens.png and demo.json "
                          "(default: %(default)s)")
    cmd.set_defaults(run=run_demo)


@dataclasses.dataclass
class Generation:
    """One timed generation: the new token ids, time to first token and the whole generate call."""

    ids: list[int]
    ttft_ms: float
    generate_ms: float
    text: str | None = None


def _visual_methods() -> list[str]:
    """The methods the demo can show: those acting on visual tokens (KV-cache methods keep no patches)."""
    return [name for name, cls in REGISTRY.items() if cls.engine == "hf"]


def _method(args: argparse.Namespace):
    """The method object from --method, --retention (the default only where the method has one) and
    --option; KV-cache methods are refused, since the demo draws which visual patches were kept."""
    cls = REGISTRY.get(args.method.lower())
    if cls is not None and cls.engine != "hf":
        raise UsageError(f"the demo shows which visual tokens a method keeps; {args.method} compresses the KV "
                         f"cache instead (see benchmarks/kv.py and 'tokenreduce eval'). Visual methods: "
                         f"{', '.join(_visual_methods())}")
    given = getattr(args, "retention", _NOT_GIVEN)
    if given is _NOT_GIVEN:
        has_retention = cls is not None and "retention" in {f.name for f in dataclasses.fields(cls)}
        given = DEFAULT_RETENTION if has_retention else None
    options = {} if given is None else {"retention": given}
    options.update(args.option)
    return user_call(make_method, args.method, **options)


@contextlib.contextmanager
def _writing(folder: Path):
    """Turn a failure to write into --out into a usage error naming the folder."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"--out {folder}: cannot write there ({err.strerror or err})") from err


def run_demo(args: argparse.Namespace) -> int:
    """Dense and reduced generation side by side on a freshly written and decoded video."""
    method = _method(args)
    device, dtype = device_and_dtype(args.device, args.dtype)

    with _writing(args.out):
        video_path = user_call(write_demo_video, args.out / "demo.mp4", num_frames=args.frames, size=args.size,
                                fps=DEMO_FPS, motion=args.motion, image=args.image)
    frames = read_video(video_path, args.num_frames)
    if args.model:
        model, inputs, decode = _load_pretrained(args, frames, device, dtype)
        model_name = args.model
    else:
        model, inputs, decode = _load_tiny(args.family, frames, device, dtype)
        model_name = f"tiny random {args.family}"

    user_call(api.patch, model, method)  # before the dense run, so a bad fit fails fast
    reduced = _timed_generate(model, inputs, args, device, decode)
    stats = api.stats(model)
    api.unpatch(model)
    dense = _timed_generate(model, inputs, args, device, decode)

    length = inputs["input_ids"].shape[1]
    layers = {"dense": [length] * len(stats.layer_tokens), "reduced": stats.layer_tokens}
    title = f"{method.name} on {model_name}, {args.motion} video"
    with _writing(args.out):
        kept_png = save_kept_patches(frames, stats.kept_grid(0, 0, layer=-1), args.out / "kept_patches.png",
                                     title=title)
        layers_png = save_layer_tokens({"dense": layers["dense"], method.name: layers["reduced"]},
                                       args.out / "layer_tokens.png", title=title)
    report = {
        "model": model_name,
        "model_type": model.config.model_type,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "method": method.name,
        "options": method.options(),
        "video": {"path": str(video_path), "motion": args.motion, "image": args.image, "frames": args.frames,
                  "size": args.size, "fps": DEMO_FPS, "decoded_frames": len(frames)},
        "sequence_length": length,
        "layer_tokens": layers,
        "visual_tokens_in": stats.visual_tokens_in[0],
        "visual_tokens_kept": stats.visual_tokens_kept[0],
        "kept_fraction": stats.kept_fraction[0],
        "timings_ms": {"dense": {"ttft": dense.ttft_ms, "generate": dense.generate_ms},
                       "reduced": {"ttft": reduced.ttft_ms, "generate": reduced.generate_ms},
                       "reduction": stats.reduce_ms},
        "generated": {"dense": dense.ids, "reduced": reduced.ids,
                      "dense_text": dense.text, "reduced_text": reduced.text,
                      "match": dense.ids == reduced.ids},
    }
    with _writing(args.out):
        (args.out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(_format_report(report, dense, reduced, [video_path, kept_png, layers_png, args.out / "demo.json"]))
    return 0


def _load_tiny(
    family: str, frames: np.ndarray, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, dict, None]:
    """A tiny random-weight model of ``family`` and its inputs (random prompt ids around the video)."""
    model = tiny_model(family, dtype=dtype).to(device)
    return model, to_device(make_inputs(model, videos=[frames]), device, dtype), None


def _load_pretrained(
    args: argparse.Namespace, frames: np.ndarray, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, dict, Callable]:
    """The model and processor in ``args.model`` and a chat prompt holding the decoded video."""
    path = Path(args.model)
    if not path.is_dir():
        raise UsageError(f"--model {path} is not a folder; give a local Hugging Face model folder")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=str(device)).eval()
    except (OSError, ValueError, KeyError, TypeError) as err:  # what transformers raises for a bad folder
        raise UsageError(f"--model {path}: cannot load a vision-language model and its processor from this "
                         f"folder: {err}") from err
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The frames are already sampled; tell the processor where they came from (Qwen uses the timing).
    indices = np.round(np.linspace(0, args.frames - 1, len(frames))).astype(int).tolist()
    metadata = {"total_num_frames": args.frames, "fps": DEMO_FPS, "frames_indices": indices}
    inputs = processor(text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                       return_tensors="pt")

    def decode(ids: list[int]) -> str:
        return processor.batch_decode([ids], skip_special_tokens=True)[0]

    return model, to_device(dict(inputs), device, dtype), decode


def _timed_generate(
    model: PreTrainedModel, inputs: dict, args: argparse.Namespace, device: torch.device,
    decode: Callable | None,
) -> Generation:
    """Greedy generation, timed ``args.repeat`` times after a 1-token warm-up (medians)."""
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    clock = Clock(device)
    runs = [time_generate(model, inputs, clock, max_new_tokens=args.max_new_tokens, do_sample=False)
            for _ in range(args.repeat)]
    ids = runs[-1].sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return Generation(ids, statistics.median(r.ttft_ms for r in runs), statistics.median(r.generate_ms for r in runs),
                      decode(ids) if decode else None)


def _format_report(report: dict, dense: Generation, reduced: Generation, written: list[Path]) -> str:
    """The demo's numbers as an aligned text table."""
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items())
    video = report["video"]
    lines = [
        f"model    {report['model']} ({report['model_type']}) on {report['device']}, {report['dtype']}",
        f"method   {report['method']}({options})",
        f"video    {video['path']}: {video['frames']} frames of {video['size']} px ({video['motion']}), "
        f"{video['decoded_frames']} decoded",
        f"prompt   {report['sequence_length']} tokens, {report['visual_tokens_in']} of them visual",
        "",
        f"{'':28}{'dense':>10}{'reduced':>10}",
        "tokens per LLM layer",
    ]
    dense_layers, reduced_layers = report["layer_tokens"]["dense"], report["layer_tokens"]["reduced"]
    start = 0
    for end in range(1, len(dense_layers) + 1):  # one line per run of layers with the same lengths
        if end == len(dense_layers) or reduced_layers[end] != reduced_layers[start]:
            name = f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"
            lines.append(f"  {name:26}{dense_layers[start]:>10}{reduced_layers[start]:>10}"
                         f"  ({reduced_layers[start] / dense_layers[start]:.0%})")
            start = end
    lines += [
        f"{'visual tokens':28}{report['visual_tokens_in']:>10}{report['visual_tokens_kept']:>10}"
        f"  ({report['kept_fraction']:.1%} kept)",
        "timings (ms)",
        f"  {'time to first token':26}{dense.ttft_ms:>10.1f}{reduced.ttft_ms:>10.1f}",
        f"  {f'generate {len(dense.ids)}/{len(reduced.ids)} tokens':26}"
        f"{dense.generate_ms:>10.1f}{reduced.generate_ms:>10.1f}",
        f"  {'reduction (in prefill)':26}{'-':>10}{report['timings_ms']['reduction']:>10.1f}",
        "",
        f"dense    {dense.text!r}" if dense.text is not None else f"dense    {dense.ids}",
        f"reduced  {reduced.text!r}" if reduced.text is not None else f"reduced  {reduced.ids}",
    ]
    same = next((i for i, (a, b) in enumerate(zip(dense.ids, reduced.ids, strict=False)) if a != b),
                min(len(dense.ids), len(reduced.ids)))
    verdict = "yes" if dense.ids == reduced.ids else f"no (first {same} of {len(dense.ids)} tokens agree)"
    lines += [f"match    {verdict}", "", "wrote    " + ", ".join(str(p) for p in written)]
    return "\n".join(lines)
