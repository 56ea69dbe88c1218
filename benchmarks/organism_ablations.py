"""Ablations of documented deviations on the trained organism, on the same test questions as
``tokenreduce eval --organism`` (docs/organism.md):

* budget from the real depth (ours: AIM prunes from half to three quarters of the model's own depth,
  PyramidDrop stages at its quarters) vs the papers' absolute layers for a 28-layer LLM (AIM 14 -> 21,
  PyramidDrop 7 / 14 / 21), both at retention 0.3;
* and ShortV, which needs a calibration profile: calibrated here on training videos (``--shortv N``).

    python benchmarks/organism_ablations.py --out results/organism   # the eval's --out: done runs are reused

Writes ``ablations.md`` / ``ablations.json`` in ``--out``; results go to the same ``results.jsonl``
as the eval, so dense and the default configurations already measured there are not run again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce  # noqa: E402
from tokenreduce.eval.report import summarize  # noqa: E402
from tokenreduce.eval.runner import DENSE, Config, RunSettings, evaluate, sample_key  # noqa: E402
from tokenreduce.organism.data import render, train_items  # noqa: E402
from tokenreduce.organism.evaluate import WordPrompter, prompt_inputs, samples  # noqa: E402
from tokenreduce.organism.model import load  # noqa: E402
from tokenreduce.organism.report import rows  # noqa: E402

ABLATIONS = [  # (default config, the paper's absolute-layer variant)
    (Config("aim@0.3", ("aim",), 0.3), Config("aim@0.3 layers 14-21 (28-layer paper)", ("aim",), 0.3,
                                              {"prune_start": 14, "prune_end": 21})),
    (Config("pyramiddrop@0.3", ("pyramiddrop",), 0.3),
     Config("pyramiddrop@0.3 layers 7,14,21 (28-layer paper)", ("pyramiddrop",), 0.3, {"layers": (7, 14, 21)})),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder of tokenreduce eval --organism")
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shortv", type=int, default=8, metavar="N",
                        help="also ShortV, calibrated on N training videos (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, proc = load()
    items = samples(args.out / "organism_data", args.per_task)
    configs = [Config(DENSE)] + [c for pair in ABLATIONS for c in pair]
    if args.shortv:  # ShortV needs a calibration profile: made on training videos, never the test split
        calib = [prompt_inputs(proc, it.questions[0].text, render(it.video)) for it in train_items(args.shortv)]
        profile = tokenreduce.calibrate(model, "shortv", calib)
        configs.append(Config("shortv (calibrated on train)", ("shortv",), None, {"profile": profile}))
    evaluate(model, WordPrompter(proc), items, configs, args.out / "results.jsonl", RunSettings(num_frames=8))
    summary = summarize(args.out / "results.jsonl", {sample_key(s) for s in items}, configs, [], {})
    table = rows(summary)
    (args.out / "ablations.json").write_text(json.dumps(table, indent=1) + "\n")
    lines = ["| config | overall [95% CI] | " + " | ".join(t for t in table[0]["tasks"]) + " |",
             "|---|---|" + "---|" * len(table[0]["tasks"])]
    for r in table:
        lines.append(f"| {r['config']} | {r['accuracy']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                     + " | ".join(f"{v['accuracy']:.2f}" for v in r["tasks"].values()) + " |")
    (args.out / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
