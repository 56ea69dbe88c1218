"""Summaries of an evaluation's JSONL results: per configuration and task, as JSON, markdown and plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .fingerprint import Expected
from .runner import ANY_CONFIG, DENSE, Config


def read_results(path: Path, expected: Expected
                 ) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], str]]:
    """The latest result per (sample key, config) made with the ``expected`` settings, and the latest error per
    (sample key, config) that has no result (config ``"*"``: the sample's media or dense run failed). Lines
    of other samples, configurations or settings are left out."""
    results: dict[tuple[str, str], dict] = {}
    errors: dict[tuple[str, str], str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not expected.matches(rec):
                continue
            if "error" in rec:
                errors[(rec["key"], rec["config"])] = rec["error"]
            else:
                results[(rec["key"], rec["config"])] = rec
    done = {k for k, _ in results}
    errors = {(k, c): e for (k, c), e in errors.items()
              if (k, c) not in results and not (c == ANY_CONFIG and k in done)}
    return results, errors


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(path: Path, expected: Expected, configs: list[Config], problems: list[str], meta: dict[str, Any]
              ) -> dict[str, Any]:
    """Accuracy per task and overall, difference to dense, tokens, times and agreement per configuration, from
    the results made with the ``expected`` settings."""
    results, errors = read_results(path, expected)
    dense_pred = {k: r["pred"] for (k, c), r in results.items() if c == DENSE}
    rows = []
    for config in configs:
        recs = [r for (k, c), r in results.items() if c == config.name]
        tasks: dict[str, list[bool]] = {}
        for r in recs:
            tasks.setdefault(f"{r['benchmark']}/{r['task']}", []).append(r["correct"])
        reduced = [r for r in recs if "kl" in r]
        row = {
            "config": config.name, "methods": list(config.methods), "retention": config.retention,
            "options": config.options, "samples": len(recs),
            "failed": sum(1 for (_, c) in errors if c in (config.name, ANY_CONFIG)),
            "accuracy": _mean([float(r["correct"]) for r in recs]),
            "tasks": {t: {"samples": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(tasks.items())},
            "visual_in": _mean([r["visual_in"] for r in recs]),
            "visual_kept": _mean([r["visual_kept"] for r in recs]),
            "kept_fraction": _mean([r["visual_kept"] / r["visual_in"] for r in recs if r["visual_in"]]),
            "layer_rows_fraction": _mean([r["mean_layer_rows"] / r["prompt_tokens"] for r in recs
                                          if "mean_layer_rows" in r]),
            "prefill_ms": _mean([r["prefill_ms"] for r in recs]),
            "sample_ms": _mean([r["sample_ms"] for r in recs]),
            "top1_agree": _mean([float(r["top1_agree"]) for r in reduced]),
            "kl": _mean([r["kl"] for r in reduced]),
            "answer_agree": _mean([float(r["pred"] == dense_pred[r["key"]]) for r in reduced
                                   if r["key"] in dense_pred]),
            "gen_accuracy": _mean([float(r["gen_correct"]) for r in recs if "gen_correct" in r]),
            "gen_match": _mean([float(r["gen_match"]) for r in recs if "gen_match" in r]),
        }
        rows.append(row)
    dense = rows[0]
    for row in rows:
        if row["accuracy"] is not None and dense["accuracy"] is not None:
            row["delta"] = row["accuracy"] - dense["accuracy"]
        for task, v in row["tasks"].items():
            if task in dense["tasks"]:
                v["delta"] = v["accuracy"] - dense["tasks"][task]["accuracy"]
    return {**meta, "results_file": str(path), "configs": rows,
            "failed_samples": len({k for k, c in errors if c == ANY_CONFIG}),
            "failed_runs": sum(1 for _, c in errors if c != ANY_CONFIG),
            "failures": list(dict.fromkeys(errors.values())),
            "skipped_records": len(problems), "problems": problems}


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    if summary.get("note"):
        lines += [f"**{summary['note']}**", ""]
    lines += ["| config | samples | failed | accuracy | Δ dense | visual kept | kept % | rows/layer % | prefill ms "
              "| ms/sample | top-1 agree | KL | answer agree | gen exact |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["configs"]:
        lines.append(
            f"| {r['config']} | {r['samples']} | {r['failed']} | {_fmt(r['accuracy'], '.3f')} | "
            f"{_fmt(r.get('delta'), '+.3f')} | "
            f"{_fmt(r['visual_kept'], '.0f')}/{_fmt(r['visual_in'], '.0f')} | "
            f"{_fmt(None if r['kept_fraction'] is None else 100 * r['kept_fraction'], '.1f')} | "
            f"{_fmt(None if r['layer_rows_fraction'] is None else 100 * r['layer_rows_fraction'], '.1f')} | "
            f"{_fmt(r['prefill_ms'], '.1f')} | {_fmt(r['sample_ms'], '.1f')} | {_fmt(r['top1_agree'], '.3f')} | "
            f"{_fmt(r['kl'], '.4f')} | {_fmt(r['answer_agree'], '.3f')} | {_fmt(r['gen_match'], '.3f')} |")
    tasks = sorted({t for r in summary["configs"] for t in r["tasks"]})
    if len(tasks) > 1:
        lines += ["", "Accuracy per task (Δ dense):", "",
                  "| config | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for r in summary["configs"]:
            cells = []
            for t in tasks:
                v = r["tasks"].get(t)
                cells.append("–" if v is None else f"{v['accuracy']:.3f}" +
                             (f" ({v['delta']:+.3f})" if r["config"] != DENSE and "delta" in v else ""))
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    lines += ["", f"Failed samples (media or dense run): {summary['failed_samples']}; failed method runs: "
                  f"{summary['failed_runs']}; records skipped while reading: {summary['skipped_records']}."]
    for msg in summary["failures"][:20] + summary["problems"][:20]:
        lines.append(f"- {msg}")
    return "\n".join(lines) + "\n"


def plots(summary: dict[str, Any], folder: Path, prefix: str = "") -> list[Path]:
    """Accuracy against retention and against measured prefill time, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in summary["configs"] if r["accuracy"] is not None]
    dense = next((r for r in rows if r["config"] == DENSE), None)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["config"] != DENSE:
            lines.setdefault("+".join(r["methods"]), []).append(r)
    written = []
    title = summary.get("plot_title", "")
    for xkey, xlabel, name in (("retention", "retention (fraction of visual tokens kept)", "accuracy_retention.png"),
                               ("prefill_ms", "measured prefill time (ms, vision tower + LLM)",
                                "accuracy_prefill.png")):
        fig = Figure(figsize=(5.5, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for label, rs in lines.items():
            pts = sorted((r[xkey], r["accuracy"], r["retention"]) for r in rs if r[xkey] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if xkey == "prefill_ms":  # which retention each point is
                for x, y, retention in pts:
                    if retention is not None:
                        ax.annotate(f"{retention:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        if dense is not None:
            if xkey == "retention":
                ax.axhline(dense["accuracy"], color="black", linestyle="--", label="dense")
            else:
                ax.plot([dense["prefill_ms"]], [dense["accuracy"]], "k*", markersize=12, label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        path = folder / f"{prefix}{name}"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def write_reports(summary: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(summary))
    return [folder / "report.json", folder / "report.md", *plots(summary, folder)]
