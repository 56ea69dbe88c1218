"""``tokenreduce calibrate METHOD``: run a calibrated method's calibration (ShortV's layer contributions,
inter-layer groups) on a few local samples and save the profile that ``patch(..., profile=...)`` reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import UsageError, device_and_dtype, option, positive_int, user_call

DATA_HELP = """\
The --data file is JSON Lines, one sample per line; paths are relative to the file's folder:
  {"video": "clips/a.mp4", "question": "What happens?"}    a video (frames sampled evenly)
  {"image": "photos/b.jpg", "question": "Describe it."}    an image
  {"text": "A long document ..."}                          text only (text LLMs)
"question" is optional (default: "Describe it in detail.")."""


def register(commands: argparse._SubParsersAction) -> None:
    from ..methods.base import calibrated

    cmd = commands.add_parser(
        "calibrate", help="calibrate a method on local samples and save its profile (JSON)",
        description="Run a calibrated method's calibration on a local model and a few local samples, and write "
                    "the profile that 'tokenreduce.patch(model, METHOD, profile=PATH)' reads. The profile is tied "
                    "to the model's architecture and layer count.",
        epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("method", help=f"the method to calibrate: {', '.join(calibrated())}")
    cmd.add_argument("--model", required=True, metavar="PATH", help="local Hugging Face model folder")
    cmd.add_argument("--data", required=True, type=Path, metavar="FILE", help="samples, JSON Lines (see below)")
    cmd.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the profile")
    cmd.add_argument("--limit", type=positive_int, metavar="N", help="use the first N samples (default: all)")
    cmd.add_argument("--num-frames", type=positive_int, default=8, metavar="N",
                     help="frames sampled from each video (default: %(default)s)")
    cmd.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    cmd.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    cmd.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                     help="a calibration option of the method, repeatable")
    cmd.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from .. import api
    from ..methods.base import REGISTRY, calibrated

    if args.method.lower() not in calibrated():
        known = "unknown method" if args.method.lower() not in REGISTRY else "a method without calibration"
        raise UsageError(f"{args.method!r} is {known}; methods with a calibration: {', '.join(calibrated())}")
    records = read_records(args.data)[: args.limit]
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, build = load(args.model, device, dtype)
    samples = [build(rec, args.data.parent, args.num_frames, where) for where, rec in records]
    profile = user_call(api.calibrate, model, args.method, samples, **dict(args.option))
    profile["calibration_data"] = str(args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    api.save_profile(profile, args.out)
    print(f"wrote {args.out}: {args.method} profile of {profile.get('architecture')} "
          f"({profile.get('num_layers')} layers) from {len(samples)} samples")
    return 0


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(file:line, record)`` for every non-empty line; UsageError naming the first bad line."""
    if not path.is_file():
        raise UsageError(f"--data {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is not JSON: {err}") from None
        if not isinstance(rec, dict) or not ({"video", "image", "text"} & set(rec)):
            raise UsageError(f"{where}: a sample needs a 'video', 'image' or 'text' field")
        out.append((where, rec))
    if not out:
        raise UsageError(f"--data {path} holds no samples")
    return out


def load(path: str, device, dtype):
    """The model in ``path`` and a function turning a record into its inputs (processor or tokenizer)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--model {folder} is not a folder; give a local Hugging Face model folder")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    multimodal = hasattr(AutoConfig.from_pretrained(folder), "vision_config")
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=dtype).to(device).eval()
    processor = (AutoProcessor if multimodal else AutoTokenizer).from_pretrained(folder)

    def build(rec: dict[str, Any], root: Path, num_frames: int, where: str) -> dict:
        return {k: v.to(device) for k, v in _inputs(processor, multimodal, rec, root, num_frames, where).items()}

    return model, build


def _inputs(processor, multimodal: bool, rec: dict[str, Any], root: Path, num_frames: int, where: str) -> dict:
    if "text" in rec and not ({"video", "image"} & set(rec)):
        tokenizer = getattr(processor, "tokenizer", processor)
        return dict(tokenizer(rec["text"], return_tensors="pt"))
    if not multimodal:
        raise UsageError(f"{where}: this is a text model; give {{'text': ...}} samples")
    kind = "video" if "video" in rec else "image"
    file = root / rec[kind]
    if not file.is_file():
        raise UsageError(f"{where}: {kind} file {file} does not exist")
    messages = [{"role": "user", "content": [{"type": kind},
                                             {"type": "text", "text": rec.get("question", "Describe it in detail.")}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if kind == "image":
        from PIL import Image

        with Image.open(file) as img:
            return dict(processor(text=[prompt], images=[img.convert("RGB")], return_tensors="pt"))
    from ..video import read_video

    try:
        frames = read_video(file, num_frames)
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from None
    metadata = {"total_num_frames": len(frames), "fps": 1.0, "frames_indices": list(range(len(frames)))}
    return dict(processor(text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                          return_tensors="pt"))
