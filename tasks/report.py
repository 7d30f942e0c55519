"""The run report: the paper's ablation table (pretrained vs from scratch vs majority), the detector,
loss curves and images with their detected boxes, as Markdown, HTML and summary.json."""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from extractor.fileio import atomic_write
from extractor.jsonstream import write_json_atomic, write_text_atomic
from tasks.benchmarks import BENCHMARKS


def summarize(evaluations: dict[str, dict[str, dict[str, Any]]], detector: dict[str, Any] | None,
              seconds: float) -> dict[str, Any]:
    """summary.json: wall time, detector mAP and per task the pretrained / scratch / majority accuracy (%)."""
    summary: dict[str, Any] = {"seconds": round(seconds, 1),
                               "detector": {"map50": detector.get("map50") if detector else None}}
    for task in BENCHMARKS:
        runs = evaluations.get(task, {})
        any_run = next(iter(runs.values()), None)
        summary[task] = {"pretrained": runs["pretrained"]["accuracy"] if "pretrained" in runs else None,
                         "scratch": runs["scratch"]["accuracy"] if "scratch" in runs else None,
                         "majority": any_run["majority_accuracy"] if any_run else None}
    return summary


def grounding_summary(pretrain_evals: list[dict[str, Any]], pointing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's grounding figures: the matching accuracy (%) on held-out pairs after the first and
    the last pretraining epoch, and per init the pointing accuracy (%) with its chance level."""
    out: dict[str, Any] = {}
    matching = [e["valid_matched_accuracy"] for e in pretrain_evals if "valid_matched_accuracy" in e]
    if matching:
        out["matching"] = {"first_epoch": round(100 * matching[0], 2), "last_epoch": round(100 * matching[-1], 2)}
    if pointing:
        out["pointing"] = {init: m["accuracy"] for init, m in pointing.items()}
        out["pointing"]["chance"] = next(iter(pointing.values()))["chance"]
    return out


def plot_validation(eval_csv: Path, out_dir: Path, prefix: str = "pretrain_valid") -> list[Path]:
    """One PNG per column of a run's eval.csv against the epoch (losses, matching accuracy, QA score)."""
    from matplotlib.figure import Figure

    with eval_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    written = []
    for column in (c for c in (rows[0] if rows else {}) if c not in ("step", "epoch")):
        points = [(int(r["epoch"]) + 1, float(r[column])) for r in rows if r.get(column) not in (None, "")]
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.set_title(f"held-out {column.removeprefix('valid_')} after each epoch")
        ax.grid(True, alpha=0.3)
        png = io.BytesIO()
        fig.savefig(png, format="png")
        path = out_dir / f"{prefix}_{column.removeprefix('valid_')}.png"
        atomic_write(path, png.getvalue())
        written.append(path)
    return written


def _grounding_rows(summary: dict[str, Any]) -> list[list[str]]:
    g = summary.get("grounding") or {}
    rows = []
    if "matching" in g:
        rows.append(["image-sentence matching, held-out pairs (first -> last pretraining epoch)",
                     f"{_fmt(g['matching']['first_epoch'])} -> {_fmt(g['matching']['last_epoch'])}", "", "50.00"])
    if "pointing" in g:
        p = g["pointing"]
        rows.append(["pointing: attention of GQA object words on the named object's box",
                     _fmt(p.get("pretrained")), _fmt(p.get("scratch")), f"{_fmt(p.get('chance'))} (chance)"])
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _table(summary: dict[str, Any]) -> list[list[str]]:
    rows = [["task", "pretrained + fine-tuned", "from scratch", "majority answer"]]
    for task, benchmark in BENCHMARKS.items():
        s = summary[task]
        rows.append([benchmark.title, _fmt(s["pretrained"]), _fmt(s["scratch"]), _fmt(s["majority"])])
    return rows + _grounding_rows(summary)


def write_report(out: Path, summary: dict[str, Any], *, title: str, details: dict[str, Any],
                 curves: list[Path], detections: list[tuple[Path, str]]) -> dict[str, Path]:
    """Write report.md, report.html and summary.json into `out`; images are paths relative to `out`."""
    rows = _table(summary)
    md = [f"# {title}", "", f"Total time: {summary['seconds']:.0f} s.", ""]
    if summary["detector"]["map50"] is not None:
        md += [f"Detector trained here: mAP@0.5 = {100 * summary['detector']['map50']:.1f} on its val images.", ""]
    md += ["## Accuracy on the val split (%)", ""]
    md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", "## Details", "", "```json", json.dumps(details, indent=1, sort_keys=True), "```", ""]
    if curves:
        md += ["## Loss curves", ""] + [f"![{p.stem}]({p.as_posix()})" for p in curves] + [""]
    if detections:
        md += ["## Detected boxes", ""] + [f"![{c}]({p.as_posix()})" for p, c in detections] + [""]

    def cells(row: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"

    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:4px 8px}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><p>Total time: {summary['seconds']:.0f} s.</p>"]
    if summary["detector"]["map50"] is not None:
        page.append(f"<p>Detector mAP@0.5: {100 * summary['detector']['map50']:.1f}</p>")
    page += ["<h2>Accuracy on the val split (%)</h2><table>", cells(rows[0], "th")]
    page += [cells(r, "td") for r in rows[1:]] + ["</table>"]
    page.append(f"<h2>Details</h2><pre>{html.escape(json.dumps(details, indent=1, sort_keys=True))}</pre>")
    if curves:
        page += ["<h2>Loss curves</h2>"] + [f"<img src='{html.escape(p.as_posix())}'>" for p in curves]
    if detections:
        page += ["<h2>Detected boxes</h2>"] + [
            f"<figure><img src='{html.escape(p.as_posix())}'><figcaption>{html.escape(c)}</figcaption></figure>"
            for p, c in detections]
    page.append("</body></html>")
    paths = {"markdown": out / "report.md", "html": out / "report.html", "summary": out / "summary.json"}
    write_text_atomic(paths["markdown"], "\n".join(md))
    write_text_atomic(paths["html"], "\n".join(page))
    write_json_atomic(paths["summary"], summary, indent=1)
    return paths
