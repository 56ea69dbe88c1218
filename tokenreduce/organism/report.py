"""The organism's evaluation report: accuracy per task and overall with 95% Wilson intervals, chance level,
prefill time against dense, visual tokens kept, and accuracy against retention per method, one panel per task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import TASKS
from .evaluate import CHANCE, wilson


def _cell(acc: float | None, n: int) -> str:
    if acc is None or not n:
        return "–"
    lo, hi = wilson(round(acc * n), n)
    return f"{acc:.2f} [{lo:.2f}, {hi:.2f}]"


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration: overall and per-task accuracy with Wilson intervals, prefill speed-up, tokens."""
    dense_ms = summary["configs"][0]["prefill_ms"]
    out = []
    for r in summary["configs"]:
        if r["accuracy"] is None:
            continue
        tasks = {}
        for task in TASKS:
            v = r["tasks"].get(f"organism/{task}")
            if v:
                hits = round(v["accuracy"] * v["samples"])
                tasks[task] = {"hits": hits, "n": v["samples"], "accuracy": v["accuracy"],
                               "ci95": wilson(hits, v["samples"])}
        hits = round(r["accuracy"] * r["samples"])
        out.append({"config": r["config"], "methods": r["methods"], "retention": r["retention"],
                    "options": r.get("options", {}), "accuracy": r["accuracy"], "n": r["samples"],
                    "ci95": wilson(hits, r["samples"]), "tasks": tasks, "prefill_ms": r["prefill_ms"],
                    "prefill_vs_dense": r["prefill_ms"] / dense_ms if dense_ms and r["prefill_ms"] else None,
                    "visual_kept": r["visual_kept"], "visual_in": r["visual_in"], "failed": r["failed"]})
    return out


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Model: {meta.get('model')}; machine: {meta.get('machine')}.",
             "Accuracy [95% Wilson interval]; chance: " +
             ", ".join(f"{t} {CHANCE[t]:.2f}" for t in TASKS) + ".", "",
             "| config | overall | " + " | ".join(TASKS) + " | visual kept | prefill ms (× dense) |",
             "|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for r in table:
        cells = [_cell(r["tasks"][t]["accuracy"], r["tasks"][t]["n"]) if t in r["tasks"] else "–" for t in TASKS]
        speed = "–" if r["prefill_vs_dense"] is None else f"{r['prefill_ms']:.0f} ({r['prefill_vs_dense']:.2f})"
        lines.append(f"| {r['config']} | {_cell(r['accuracy'], r['n'])} | " + " | ".join(cells) +
                     f" | {r['visual_kept']:.0f}/{r['visual_in']:.0f} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy against retention, one line per method, one panel per task and one overall."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ["overall", *TASKS]
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    dense = next(r for r in table if r["config"] == "dense")
    lines: dict[str, list[dict]] = {}
    for r in table:
        if r["retention"] is not None and not r["options"]:
            lines.setdefault("+".join(r["methods"]), []).append(r)
    for ax, panel in zip(axes, panels, strict=True):
        def acc(r: dict, panel: str = panel) -> float | None:
            return r["accuracy"] if panel == "overall" else r["tasks"].get(panel, {}).get("accuracy")

        for label, rs in lines.items():
            pts = sorted((r["retention"], acc(r)) for r in rs if acc(r) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        if acc(dense) is not None:
            ax.axhline(acc(dense), color="black", linestyle="--", label="dense")
        if panel != "overall":
            ax.axhline(CHANCE[panel], color="grey", linestyle=":", label="chance")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("retention")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[3].set_ylabel("accuracy")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def write_organism_report(summary: dict[str, Any], folder: Path) -> list[Path]:
    """``organism.md``, ``organism.json`` and ``organism_tasks.png`` in ``folder``."""
    table = rows(summary)
    meta = {k: summary.get(k) for k in ("model", "machine", "frames", "dtype")}
    (folder / "organism.json").write_text(json.dumps({"meta": meta, "chance": CHANCE, "configs": table}, indent=1)
                                          + "\n")
    (folder / "organism.md").write_text(markdown(table, meta))
    png = plot(table, folder / "organism_tasks.png", summary.get("plot_title", ""))
    return [folder / "organism.json", folder / "organism.md", png]
