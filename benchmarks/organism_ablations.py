"""Ablations of documented deviations on the trained organism, each variant against our default on the same
test questions as ``tokenreduce eval --organism`` (docs/organism.md), all at one retention (``--retention``,
default 0.3):

* merging: size-weighted (ours) vs the official unweighted mean (framefusion, aim: ``merge="official"``);
* positions after pruning: original (ours) vs renumbered contiguously (fastv, pyramiddrop:
  ``positions="renumbered"``);
* count rounding: ours (ceil) vs the official code's (fastv, pyramiddrop, aim: ``rounding="official"``);
* budget from the real depth (ours: AIM prunes from half to three quarters of the model's own depth,
  PyramidDrop stages at its quarters) vs the papers' absolute layers for a 28-layer LLM (AIM 14 -> 21,
  PyramidDrop 7 / 14 / 21);
* and ShortV, which needs a calibration profile: calibrated here on training videos (``--shortv N``).

Each pair is compared on the same questions with an exact McNemar test (two-sided binomial test on the
questions exactly one of the two gets right): a deviation "helps" or "hurts" only where p < 0.05.

    python benchmarks/organism_ablations.py --out results/organism   # the eval's --out: done runs are reused

Writes ``ablations@R.md`` / ``ablations@R.json`` (R the retention) in ``--out``; results go to the same
``results.jsonl`` as the eval, so dense and the default configurations already measured there are not run
again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce  # noqa: E402
from tokenreduce.eval.report import read_results, summarize  # noqa: E402
from tokenreduce.eval.runner import DENSE, Config, RunSettings, evaluate, expected_settings  # noqa: E402
from tokenreduce.organism.data import render, train_items  # noqa: E402
from tokenreduce.organism.evaluate import WordPrompter, prompt_inputs, samples  # noqa: E402
from tokenreduce.organism.model import WEIGHTS, load, sha256  # noqa: E402
from tokenreduce.organism.report import rows  # noqa: E402

VARIANTS = [  # (deviation, method, what the variant is, its options): each against Config(f"{method}@{retention}")
    ("merging", "framefusion", "unweighted mean (official)", {"merge": "official"}),
    ("merging", "aim", "unweighted mean (official)", {"merge": "official"}),
    ("positions", "fastv", "renumbered", {"positions": "renumbered"}),
    ("positions", "pyramiddrop", "renumbered", {"positions": "renumbered"}),
    ("rounding", "fastv", "official rounding", {"rounding": "official"}),
    ("rounding", "pyramiddrop", "official rounding", {"rounding": "official"}),
    ("rounding", "aim", "official rounding", {"rounding": "official"}),
    ("layer schedule", "aim", "layers 14-21 (28-layer paper)", {"prune_start": 14, "prune_end": 21}),
    ("layer schedule", "pyramiddrop", "layers 7,14,21 (28-layer paper)", {"layers": (7, 14, 21)}),
]


def pairs(retention: float) -> list[tuple[str, Config, Config]]:
    """(deviation, our default, the variant) at ``retention`` for every entry of VARIANTS."""
    return [(deviation, Config(f"{method}@{retention}", (method,), retention),
             Config(f"{method}@{retention} {what}", (method,), retention, options))
            for deviation, method, what, options in VARIANTS]


def mcnemar(ours: dict[str, bool], variant: dict[str, bool]) -> tuple[int, int, float]:
    """On the questions both answered: (ours right and the variant wrong, the reverse, exact two-sided
    McNemar p-value, i.e. the binomial test of the discordant questions against 1/2)."""
    shared = ours.keys() & variant.keys()
    b = sum(ours[k] and not variant[k] for k in shared)
    c = sum(variant[k] and not ours[k] for k in shared)
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder of tokenreduce eval --organism")
    parser.add_argument("--per-task", type=int, default=20, help="test questions per task (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--retention", type=float, default=0.3,
                        help="retention of every pair, in (0, 1); ours is reused where the eval measured it "
                             "(default: %(default)s)")
    parser.add_argument("--shortv", type=int, default=8, metavar="N",
                        help="also ShortV, calibrated on N training videos (0: skip; default: %(default)s)")
    args = parser.parse_args()
    if not 0 < args.retention < 1:
        parser.error(f"--retention must be in (0, 1), got {args.retention}")
    torch.set_num_threads(args.threads)
    model, proc = load()
    items = samples(args.out / "organism_data", args.per_task)
    compared = pairs(args.retention)
    configs = [Config(DENSE)] + list(dict.fromkeys(c for _, ours, variant in compared for c in (ours, variant)))
    if args.shortv:  # ShortV needs a calibration profile: made on training videos, never the test split
        calib = [prompt_inputs(proc, it.questions[0].text, render(it.video)) for it in train_items(args.shortv)]
        profile = tokenreduce.calibrate(model, "shortv", calib)
        configs.append(Config("shortv (calibrated on train)", ("shortv",), None, {"profile": profile}))
    # the eval's own identity and prompt, so its dense and default results are reused, not rerun
    settings = RunSettings(num_frames=8, model=f"organism (weights sha256 {sha256(WEIGHTS)[:12]})")
    prompter = WordPrompter(proc)
    results = args.out / "results.jsonl"
    evaluate(model, prompter, items, configs, results, settings)
    expected = expected_settings(items, configs, settings, prompter)
    table = rows(summarize(results, expected, configs, [], {}))
    by_config = {name: {k: r["correct"] for (k, c), r in read_results(results, expected)[0].items() if c == name}
                 for name in {c.name for c in configs}}
    tests = []
    for deviation, ours, variant in compared:
        b, c, p = mcnemar(by_config[ours.name], by_config[variant.name])
        verdict = "no difference shown" if p >= 0.05 else ("ours better" if b > c else "official better")
        tests.append({"deviation": deviation, "ours": ours.name, "variant": variant.name, "ours_only": b,
                      "variant_only": c, "p": p, "verdict": verdict})
    record = {"retention": args.retention, "configs": table, "paired": tests}
    (args.out / f"ablations@{args.retention}.json").write_text(json.dumps(record, indent=1) + "\n")
    tasks = list(table[0]["tasks"])
    acc = {r["config"]: r for r in table}
    lines = ["| deviation | ours | variant | ours overall | variant overall | "
             + " | ".join(f"{t} (ours / variant)" for t in tasks) + " | only ours right | only variant right "
             "| McNemar p | verdict |", "|---" * (9 + len(tasks)) + "|"]
    for t in tests:
        o, v = acc[t["ours"]], acc[t["variant"]]
        lines.append(f"| {t['deviation']} | {t['ours']} | {t['variant'].removeprefix(t['ours']).strip()} | "
                     f"{o['accuracy']:.2f} | {v['accuracy']:.2f} | "
                     + " | ".join(f"{o['tasks'][k]['accuracy']:.2f} / {v['tasks'][k]['accuracy']:.2f}" for k in tasks)
                     + f" | {t['ours_only']} | {t['variant_only']} | {t['p']:.3f} | {t['verdict']} |")
    if args.shortv:
        r = acc["shortv (calibrated on train)"]
        lines += ["", f"ShortV (calibrated on {args.shortv} training videos): overall {r['accuracy']:.2f} "
                      f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]; "
                  + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in r["tasks"].items())]
    (args.out / f"ablations@{args.retention}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
