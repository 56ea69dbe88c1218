"""``tokenreduce eval``: multiple-choice accuracy of a model dense and under token-reduction methods, on
benchmark files in their published formats, with agreement to the dense model, tokens and times."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from ..video import BACKENDS
from .common import UsageError, device_and_dtype, option, positive_int, user_call

FORMATS = ("videomme", "mvbench", "mlvu", "egoschema", "imageqa")  # tokenreduce.eval.datasets.FORMATS
FRAMES_ORGANISM = 8  # tokenreduce.organism.data.FRAMES (kept here so --help needs no import)
ORGANISM_NAME = "organism (DINOv2 ViT-S/14 + SmolLM2-135M-Instruct, trained projector + LoRA)"
RANDOM_NOTE = ("random-weight model: these numbers check the plumbing (decoding, prompts, scoring), not accuracy")


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "eval",
        help="accuracy dense vs token-reduction methods on video/image multiple-choice QA",
        description=(
            "Evaluate a local Hugging Face vision-language model, dense and under each method and retention, "
            "on multiple-choice QA read from local files in the published formats of Video-MME, MVBench, MLVU "
            "and EgoSchema, or an image-QA JSONL. The answer is the option letter with the highest next-token "
            "logit after the prompt; --max-new-tokens also generates and parses the text. Reports accuracy per "
            "task and overall, the difference to dense, top-1 agreement and KL divergence of the last-token "
            "distribution against dense, visual tokens kept and measured times, as report.json, report.md and "
            "plots in --out. Results are appended to OUT/results.jsonl with the settings they were made with: "
            "rerunning resumes where it stopped, and runs again what was made with other settings. "
            "A missing or undecodable video or a malformed record is reported by name and counted; the run "
            "goes on."
        ),
        epilog="Example: tokenreduce eval --model ~/Qwen2.5-VL-7B-Instruct --format videomme --data Video-MME "
               "--methods framefusion,fastv --retentions 0.1,0.3,0.5 --frames 32 --out results/videomme",
    )
    model = cmd.add_argument_group("model")
    what = model.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PATH", help="local Hugging Face model folder with its processor")
    what.add_argument("--tiny", action="store_true",
                      help="a tiny random-weight Qwen2-VL with a built-in processor (plumbing check; seconds on CPU)")
    what.add_argument("--organism", action="store_true",
                      help="the trained organism (DINOv2 + SmolLM2-135M as LLaVA-NeXT-Video, see docs/organism.md) on "
                           "its own procedural test split (needs no --data; answers are option words)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="model dtype (default: bfloat16 on cuda, float32 on cpu)")

    data = cmd.add_argument_group("data")
    data.add_argument("--format", choices=FORMATS, default="mvbench", help="dataset format (default: %(default)s)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, metavar="PATH",
                        help="the benchmark's annotation file or folder (see docs: Video-MME folder or parquet/json; "
                             "MVBench/MLVU folder with json/; EgoSchema folder with questions.json; imageqa .jsonl)")
    source.add_argument("--needle", action="store_true",
                        help="generate the synthetic needle task (one frame carries the answer) in --format under "
                             "OUT/needle_data and evaluate it")
    data.add_argument("--media", type=Path, metavar="DIR",
                      help="folder of the videos/images, if not where the benchmark's layout puts them")
    data.add_argument("--allow-outside-media", action="store_true",
                      help="let annotation files name media outside the media folder (absolute paths, '..'); "
                           "refused by default so that a downloaded annotation file cannot open any file")
    data.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N questions only")
    data.add_argument("--per-task", type=positive_int, default=20, metavar="N",
                      help="--organism: test questions per task (default: %(default)s)")
    data.add_argument("--frames", type=positive_int, default=8, metavar="N",
                      help="frames sampled evenly from each video (default: %(default)s)")
    data.add_argument("--video-backend", choices=BACKENDS,
                      help="video decoder (default: decord if installed, else pyav; both give the same frames)")

    method = cmd.add_argument_group("methods")
    method.add_argument("--methods", default="framefusion", metavar="LIST",
                        help="comma-separated methods; 'a+b' composes a and b in one run (default: %(default)s)")
    method.add_argument("--retentions", default="0.3", metavar="LIST",
                        help="comma-separated retentions for methods that take one (default: %(default)s)")
    method.add_argument("--option", type=option, action="append", default=[], metavar="KEY=VALUE",
                        help="another method option, repeatable (goes to every listed method that has it)")
    method.add_argument("--max-new-tokens", type=int, default=0, metavar="N",
                        help="also generate N tokens greedily, parse the letter and compare generations with "
                             "dense (default: 0, logits only)")

    cmd.add_argument("--out", type=Path, default=Path("tokenreduce-eval"), metavar="DIR",
                     help="folder for results.jsonl, report.json, report.md and plots (default: %(default)s)")
    cmd.add_argument("--fresh", action="store_true", help="discard OUT/results.jsonl instead of resuming from it")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(run=run_eval)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers such as 0.3,0.5, got {text!r}") from None
    if not values:
        raise UsageError(f"{name}: give at least one value")
    return values


def run_eval(args: argparse.Namespace) -> int:
    """Read the dataset, run dense and every configuration on every sample, write the reports."""
    import torch

    from .. import api
    from ..eval.datasets import read_dataset
    from ..eval.prompts import ChatPrompter
    from ..eval.report import markdown, summarize, write_reports
    from ..eval.runner import RunSettings, evaluate, expected_settings, make_configs
    from ..methods import REGISTRY
    from ..organism.evaluate import WordPrompter
    from ..video import video_backend

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    methods = [m for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError(f"--methods {args.methods!r} names no method: give at least one, comma-separated "
                         f"(available: {', '.join(REGISTRY)})")
    user_call(video_backend, args.video_backend)
    configs = user_call(make_configs, methods, _floats(args.retentions, "--retentions"), dict(args.option))
    device, dtype = device_and_dtype(args.device, args.dtype)

    if args.organism:
        if args.data or args.needle:
            raise UsageError("--organism brings its own test split; drop --data/--needle")
        from ..organism.evaluate import samples as organism_samples

        if args.frames != FRAMES_ORGANISM:
            raise UsageError(f"--organism was trained on {FRAMES_ORGANISM} frames per video; drop --frames "
                             f"(got {args.frames})")
        data = args.out / "organism_data"
        samples, problems = organism_samples(data, args.per_task), []
    elif not (args.data or args.needle):
        raise UsageError("give --data PATH, --needle or --organism")
    elif args.needle:
        from ..eval.needle import write_needle_dataset

        data = write_needle_dataset(args.out / "needle_data" / args.format, args.format,
                                    frames=max(args.frames, 8))
    else:
        data = args.data
    if not args.organism:
        samples, problems = user_call(read_dataset, args.format, data, args.media,
                                      allow_outside_media=args.allow_outside_media)
    samples = samples[: args.limit] if args.limit else samples
    for msg in problems:
        print(f"skipped: {msg}")
    if not samples:
        raise UsageError(f"no usable questions in {data} ({len(problems)} records skipped)")

    model, processor, name, identity = _load(args, device, dtype)
    prompter = WordPrompter(processor) if args.organism else ChatPrompter(processor)
    for config in configs[1:]:  # a method that does not fit the model fails now, not on every sample
        user_call(config.patch, model)
        api.unpatch(model)
    results = args.out / "results.jsonl"
    if args.fresh and results.exists():
        results.unlink()
    settings = RunSettings(num_frames=args.frames, max_new_tokens=args.max_new_tokens, device=device, dtype=dtype,
                           model=identity, video_backend=args.video_backend)
    counts = evaluate(model, prompter, samples, configs, results, settings, progress=not args.no_progress)
    notes = []
    if args.tiny:
        notes.append(RANDOM_NOTE)
    if args.needle:
        notes.append("synthetic needle task (one frame carries the answer)")
    meta = {"model": name, "format": "organism" if args.organism else args.format, "data": str(data),
            "frames": args.frames, "video_backend": video_backend(args.video_backend),
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "answer_extraction": ("highest next-token logit among the option words after the prompt" if args.organism
                                  else "highest next-token logit among the option letters after the prompt")
                                 + ("; generated text parsed too (gen_*)" if args.max_new_tokens else ""),
            "note": "; ".join(notes),
            "plot_title": f"{name} on {'its test split' if args.organism else args.format}"
                          + (" (random weights: plumbing only)" * args.tiny),
            "counts": counts}
    summary = summarize(results, expected_settings(samples, configs, settings, prompter), configs, problems, meta)
    written = write_reports(summary, args.out)
    if args.organism:
        from ..organism.report import write_organism_report

        written += write_organism_report(summary, args.out)
    print(markdown(summary))
    print(f"{counts['run']} new results, {counts['skipped']} resumed from {results}, {counts['outdated']} made "
          "with other settings run again, "
          f"{counts['failed_samples']} failed samples, {counts['failed_runs']} failed method runs")
    print("wrote " + ", ".join(str(p) for p in [results, *written]))
    return 0


def _load(args: argparse.Namespace, device, dtype):
    """(model, processor, display name, identity for the results' settings) from --model PATH, the trained
    organism, or the tiny random model with its built-in processor."""
    if args.organism:
        from ..organism.model import WEIGHTS, load, sha256

        try:
            model, processor = load()
        except (FileNotFoundError, ImportError) as err:
            raise UsageError(str(err)) from err
        return model.to(device, dtype), processor, ORGANISM_NAME, f"organism (weights sha256 {sha256(WEIGHTS)[:12]})"
    if args.tiny:
        from ..eval.tiny import tiny_processor
        from ..testing import tiny_model

        name = "tiny random qwen2_vl"
        return tiny_model("qwen2_vl", dtype=dtype).to(device), tiny_processor(), name, name
    path = Path(args.model)
    if not path.is_dir():
        raise UsageError(f"--model {path} is not a folder; give a local Hugging Face model folder")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..eval.fingerprint import model_identity

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map=str(device)).eval()
    return model, processor, str(path), model_identity(path)
