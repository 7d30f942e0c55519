"""The run report: a self-contained folder (report.html and report.md beside it, figures and example images in
sub-folders named by relative paths, summary.json and the raw metrics.json) that opens offline.

The page is a list of sections. A section is one function that returns a `Section`: its title and its body
in Markdown and in HTML, built side by side with a `Body` (paragraphs, tables, images, example cards). To add
one, write such a function over the figures it shows, and put its result in the list the Report task passes
to `write_report` (pipeline/report.py); a function with nothing to show returns None and the section is left
out, so no heading ever stands over an empty section.
"""
from __future__ import annotations

import csv
import html
import io
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from extractor.draw import draw_attention, readable, side_by_side
from extractor.fileio import atomic_write
from extractor.jsonstream import write_json_atomic, write_text_atomic
from extractor.store import ImageFeatures
from tasks.benchmarks import BENCHMARKS, Benchmark
from tasks.inference import FineTuned, answer
from tasks.pretrain import MATCHING_KINDS

INITS = {"pretrained": "pretrained + fine-tuned", "scratch": "from scratch"}
CURVES = ("loss", "mlm", "matched", "obj", "attr", "feat", "qa")  # pretraining losses, the total first
CURVE_TITLES = {"loss": "total loss", "mlm": "masked words", "matched": "image-sentence matching",
                "obj": "object labels", "attr": "attribute labels", "feat": "feature regression",
                "qa": "image QA"}


# ----------------------------------------------------------------------------- building blocks

@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, and its body as Markdown and as HTML."""

    title: str
    markdown: str
    html: str

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def _count(n: int, noun: str) -> str:
    """'1 validation', '3 validations'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@dataclass
class Body:
    """A section's body, written once and kept in both formats."""

    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)

    def para(self, text: str) -> Body:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")
        return self

    def heading(self, text: str) -> Body:
        self.md += [f"### {text}", ""]
        self.html.append(f"<h3>{html.escape(text)}</h3>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Body:
        """A table; floats shown with two decimals, None as '-'."""
        cells = [[_cell(c) for c in row] for row in rows]
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells] + [""]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, path: Path, alt: str, caption: str = "") -> Body:
        """An image of the report folder (a path relative to it)."""
        self.md += [f"![{alt}]({path.as_posix()})", *([f"*{caption}*"] if caption else []), ""]
        figcaption = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.html.append(f"<figure><img src='{html.escape(path.as_posix())}' alt='{html.escape(alt)}'>"
                         f"{figcaption}</figure>")
        return self

    def link(self, text: str, path: str) -> Body:
        self.md += [f"[{text}]({path})", ""]
        self.html.append(f"<p><a href='{html.escape(path)}'>{html.escape(text)}</a></p>")
        return self

    def raw(self, markdown: str, markup: str) -> Body:
        self.md += [markdown, ""]
        self.html.append(markup)
        return self

    def section(self, title: str) -> Section:
        return Section(title, "\n".join(self.md).rstrip() + "\n", "\n".join(self.html))


# ----------------------------------------------------------------------------- the numbers

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


def summary_section(summary: dict[str, Any]) -> Section:
    """The paper's ablation: each task's accuracy pretrained vs from scratch vs the majority answer."""
    body = Body().para(f"Validation accuracy (%), official metrics; the whole chain took {summary['seconds']:.0f} s "
                       "of task time.")
    body.table(["task", INITS["pretrained"], INITS["scratch"], "majority answer"],
               [[b.title, summary[t]["pretrained"], summary[t]["scratch"], summary[t]["majority"]]
                for t, b in BENCHMARKS.items()])
    if summary["detector"]["map50"] is not None:
        body.para(f"Detector trained here: mAP@0.5 = {100 * summary['detector']['map50']:.1f}% on its val images.")
    grounding = summary.get("grounding") or {}
    if grounding.get("matching"):
        body.para(f"Image-sentence matching on held-out pairs after pretraining: "
                  f"{grounding['matching']['last_epoch']:.2f}% (chance 50%).")
    if grounding.get("pointing"):
        p = grounding["pointing"]
        body.para("Pointing accuracy of the GQA models' cross-attention (see Grounding): " +
                  ", ".join(f"{INITS[i]} {p[i]:.2f}%" for i in INITS if p.get(i) is not None) +
                  f"; chance {p['chance']:.2f}%.")
    return body.section("Summary")


def benchmark_section(benchmark: Benchmark, runs: Mapping[str, dict[str, Any]]) -> Section | None:
    """A benchmark's official breakdowns (per answer type, question type...), one column per model and the
    majority answer."""
    if not runs:
        return None
    inits = [i for i in INITS if i in runs]
    tables = {init: benchmark.breakdowns(runs[init]["official"]["model"]) for init in inits}
    majority = benchmark.breakdowns(next(iter(runs.values()))["official"]["majority"])
    body = Body()
    for name, baseline in majority.items():
        keys = list(dict.fromkeys([*(k for i in inits for k in tables[i][name]), *baseline]))
        if name != "overall":  # types in alphabetical order; the overall metrics in the scorer's
            keys.sort()
        body.heading(name.capitalize())
        body.table(["metric" if name == "overall" else name.removeprefix("per "), *(INITS[i] for i in inits),
                    "majority answer"],
                   [[key, *(tables[i][name].get(key) for i in inits), baseline.get(key)] for key in keys])
    return body.section(benchmark.title.split(" (")[0])


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def pretraining_section(run: Path, out: Path) -> Section | None:
    """The pretraining losses, training (every logged step) and validation (each epoch), one panel per
    objective on one grid figure."""
    from matplotlib.figure import Figure

    train = _read_csv(run / "logs" / "train.csv")
    valid = _read_csv(run / "logs" / "eval.csv")
    names = [c for c in CURVES if any(r.get(c) not in (None, "") for r in train)]
    if not names:
        return None
    columns = 4
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(4 * columns, 3.2 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        points = [(int(r["step"]), float(r[name])) for r in train if r.get(name) not in (None, "")]
        ax.plot(*zip(*points), label="training", linewidth=1.2)
        held = [(int(r["step"]), float(r[f"valid_{name}"])) for r in valid if r.get(f"valid_{name}") not in (None, "")]
        if held:
            ax.plot(*zip(*held), "o-", label="validation", linewidth=1.2)
        ax.set_title(CURVE_TITLES[name])
        ax.set_xlabel("optimiser step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    path = Path("figures") / "pretraining.png"
    (out / path.parent).mkdir(exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(out / path, png.getvalue())
    body = Body().image(path, "pretraining losses", "Pretraining losses per objective: training (each logged step) "
                        f"and validation (each epoch); {_count(len(train), 'logged step')}, "
                        f"{_count(len(valid), 'validation')}.")
    return body.section("Pretraining curves")


def grounding_summary(pretrain_evals: Sequence[dict[str, Any]], pointing: Mapping[str, dict[str, Any]]
                      ) -> dict[str, Any]:
    """summary.json's grounding figures: the matching accuracy (%) on held-out pairs after each pretraining
    epoch, and per init the pointing accuracy (%) with its chance level."""
    out: dict[str, Any] = {}
    matching = [round(100 * e["valid_matched_accuracy"], 2) for e in pretrain_evals if "valid_matched_accuracy" in e]
    if matching:
        out["matching"] = {"per_epoch": matching, "last_epoch": matching[-1], "chance": 50.0}
        for kind in MATCHING_KINDS:  # per kind of sentence shown, where the evaluation had both
            key = f"valid_matched_accuracy_{kind}"
            per_kind = [round(100 * e[key], 2) for e in pretrain_evals if key in e]
            if len(per_kind) == len(matching):
                out["matching"][kind] = {"per_epoch": per_kind, "last_epoch": per_kind[-1]}
    if pointing:
        out["pointing"] = {init: pointing[init]["accuracy"] for init in INITS if init in pointing}
        out["pointing"]["chance"] = next(iter(pointing.values()))["chance"]
    return out


def grounding_section(grounding: Mapping[str, Any], pointing: Mapping[str, dict[str, Any]], out: Path
                      ) -> Section | None:
    """Does the network tie words to regions: the matching accuracy on held-out image-sentence pairs after each
    pretraining epoch, and the pointing accuracy of the GQA models' cross-attention, pretrained vs scratch."""
    from matplotlib.figure import Figure

    if not grounding:
        return None
    body = Body()
    matching = grounding.get("matching")
    if matching:
        epochs = list(range(1, len(matching["per_epoch"]) + 1))
        kinds = [k for k in MATCHING_KINDS if k in matching]
        fig = Figure(figsize=(6, 3.6), dpi=100, layout="constrained")
        ax = fig.subplots()
        ax.plot(epochs, matching["per_epoch"], "o-", label="held-out pairs")
        for kind in kinds:
            ax.plot(epochs, matching[kind]["per_epoch"], ".--", linewidth=1, label=f"showing {kind}")
        ax.axhline(matching["chance"], color="gray", linestyle="--", label="chance")
        ax.set_xlabel("pretraining epoch")
        ax.set_ylabel("matching accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        path = Path("figures") / "matching.png"
        (out / path.parent).mkdir(exist_ok=True)
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write(out / path, png.getvalue())
        split = ""
        if kinds:
            split = (" (" + ", ".join(f"{matching[k]['last_epoch']:.2f}% on pairs showing {k}" for k in kinds)
                     + "; a question of another image, such as \"Is there a red circle?\", can often be asked "
                       "of this image too, while a caption of another image is rarely true of it)")
        body.para("Image-sentence matching on held-out pairs (half with a sentence of another image): the accuracy "
                  f"of the matching head after each pretraining epoch; {matching['last_epoch']:.2f}% after the "
                  f"last{split}, chance {matching['chance']:.0f}%.")
        body.image(path, "matching accuracy per epoch", "Matching accuracy on held-out pairs after each epoch"
                   + (", overall and by the kind of sentence shown." if kinds else "."))
    if pointing:
        inits = [i for i in INITS if i in pointing]
        first = pointing[inits[0]]
        body.para("Pointing: for each object a GQA validation question names (its annotations give the words and "
                  "the scene graph the box), does the fine-tuned GQA model's cross-attention from those words, "
                  "averaged over heads and cross layers, peak on a box that overlaps the object (IoU >= 0.5)? "
                  f"{first['objects']} named objects in {first['questions']} questions; chance is the share of "
                  f"boxes that overlap the object, and {first['reachable']:.1f}% of the objects have such a box.")
        layers = max(len(pointing[i]["per_layer"]) for i in inits)
        body.table(["model", "pointing accuracy (%)", *(f"cross layer {k + 1}" for k in range(layers))],
                   [[INITS[i], pointing[i]["accuracy"], *pointing[i]["per_layer"]] for i in inits]
                   + [["chance", first["chance"], *([None] * layers)]])
    return body.section("Grounding")


def detector_section(metrics: dict[str, Any] | None) -> Section | None:
    """The detector trained here: its mAP@0.5, region accuracy and the AP of each class."""
    if not metrics or not metrics.get("per_class"):
        return None
    body = Body().para(f"mAP@0.5 = {100 * metrics['map50']:.1f}% over {len(metrics['per_class'])} classes on "
                       f"{metrics.get('val_images', '?')} validation images.")
    accuracy = metrics.get("region_accuracy") or {}
    if accuracy:
        body.para("Accuracy of the label of ground-truth regions: " +
                  ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(accuracy.items())) + ".")
    body.table(["class", "AP@0.5 (%)"], [[name, 100 * ap] for name, ap in sorted(metrics["per_class"].items(),
                                                                                  key=lambda kv: (-kv[1], kv[0]))])
    return body.section("Detector")


# ----------------------------------------------------------------------------- examples

@dataclass
class Example:
    """One validation example as the report shows it."""

    key: str
    text: str
    gold: Any
    predictions: dict[str, Any]   # init -> answer
    credits: dict[str, float]     # init -> what the answer scores
    best: float                   # what the gold answer scores
    image: Path                   # relative to the report folder
    attention: list[list[tuple[str, float]]]  # per image, the most attended boxes


def choose_examples(benchmark: Benchmark, entries: Sequence[dict], predictions: Mapping[Any, Any], n: int,
                    seed: int = 0) -> list[dict]:
    """`n` labelled entries at a fixed seed: half that `predictions` gets right and half it gets wrong (more of
    one kind when the other runs out), right and wrong in turn."""
    labelled = [e for e in entries if benchmark.gold(e) is not None and e[benchmark.id_key] in predictions]
    random.Random(seed).shuffle(labelled)

    def right(e: dict) -> bool:
        return benchmark.credit(e, predictions[e[benchmark.id_key]]) >= benchmark.credit(e, benchmark.gold(e))

    good = [e for e in labelled if right(e)]
    bad = [e for e in labelled if not right(e)]
    take_good = min(len(good), max(n // 2, n - len(bad)))
    good, bad = good[:take_good], bad[: n - take_good]
    mixed = [e for pair in zip(good, bad) for e in pair]  # right and wrong in turn, the rest after
    return mixed + good[len(mixed) // 2:] + bad[len(mixed) // 2:]


def render_examples(benchmark: Benchmark, chosen: Sequence[dict], predictions: Mapping[str, Mapping[Any, Any]],
                    model: FineTuned, record: Callable[[str], ImageFeatures], picture: Callable[[str], np.ndarray],
                    names: Callable[[ImageFeatures], list[str]], out: Path) -> list[Example]:
    """Each chosen entry's image(s) drawn with the boxes shaded by `model`'s attention from the question,
    written under out/examples/; `predictions` are every model's, by init."""
    (out / "examples").mkdir(exist_ok=True)
    examples = []
    for k, entry in enumerate(chosen, start=1):
        key = entry[benchmark.id_key]
        records = [record(entry[field]) for field in benchmark.image_keys]
        result = answer(model, entry["sent"], records, top=1, option="sentence")
        drawn = [draw_attention(readable(picture(entry[field])), r.boxes, shares, names(r), (r.img_h, r.img_w))
                 for field, r, shares in zip(benchmark.image_keys, records, result.attention)]
        path = Path("examples") / f"{benchmark.name}-{k}.jpg"
        ok, data = cv2.imencode(".jpg", side_by_side(drawn), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ValueError(f"report: JPEG encoding failed for {benchmark.name} example {key}")
        atomic_write(out / path, data.tobytes())
        attention = []
        for r, shares in zip(records, result.attention):
            labels = names(r)
            attention.append([(labels[j], float(shares[j])) for j in np.argsort(-shares, kind="stable")[:3]])
        gold = benchmark.gold(entry)
        examples.append(Example(str(key), entry["sent"], gold, {i: p.get(key) for i, p in predictions.items()},
                                {i: benchmark.credit(entry, p.get(key)) for i, p in predictions.items()},
                                benchmark.credit(entry, gold), path, attention))
    return examples


def _verdict(credit: float, best: float) -> str:
    return "right" if credit >= best else "wrong" if credit == 0 else f"partly ({credit:.1f})"


def examples_section(benchmark: Benchmark, examples: Sequence[Example], shaded_by: str) -> Section | None:
    """Validation examples: the image(s) with their boxes shaded by attention, the question, the right answer
    and each model's."""
    if not examples:
        return None
    body = Body().para(f"{len(examples)} validation examples at a fixed seed, about half answered right by the "
                       f"{INITS.get(shaded_by, shaded_by)} model. Boxes are shaded by its attention from the "
                       "question (last cross layer, mean over heads and words); the three most attended are "
                       "numbered with their share.")
    cards, md = [], []
    for ex in examples:
        rows = [("right answer", _cell(ex.gold), "")] + [
            (i, _cell(p), _verdict(ex.credits[i], ex.best)) for i, p in ex.predictions.items()]
        seen = "; ".join(("image " + str(k + 1) + ": " if len(ex.attention) > 1 else "")
                         + ", ".join(f"{n} {100 * s:.0f}%" for n, s in top) for k, top in enumerate(ex.attention))
        md += [f"**{ex.text}** ({ex.key})", "", f"![{ex.key}]({ex.image.as_posix()})", ""]
        md += [f"- {who}: {ans}" + (f" ({verdict})" if verdict else "") for who, ans, verdict in rows]
        md += [f"- attention: {seen}", ""]
        table = "".join(f"<tr><th>{html.escape(who)}</th>" + (
            f"<td>{html.escape(ans)}</td><td class='{verdict.split(' ')[0]}'>{html.escape(verdict)}</td>"
            if verdict else f"<td colspan='2'>{html.escape(ans)}</td>") + "</tr>" for who, ans, verdict in rows)
        cards.append(f"<div class='card'><p class='text'>{html.escape(ex.text)}</p>"
                     f"<img src='{html.escape(ex.image.as_posix())}' alt='{html.escape(ex.key)}'>"
                     f"<table>{table}</table><p class='attention'>attention: {html.escape(seen)}</p>"
                     f"<p class='key'>{html.escape(ex.key)}</p></div>")
    wide = " wide" if len(benchmark.image_keys) > 1 else ""
    body.raw("\n".join(md), f"<div class='cards{wide}'>" + "".join(cards) + "</div>")
    return body.section(f"{benchmark.title.split(' (')[0]} examples")


# ----------------------------------------------------------------------------- the page

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1240px;margin:0 auto;padding:0 16px 48px;color:#222}
nav{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd}
nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
td{font-variant-numeric:tabular-nums}
figure{margin:8px 0}figure img{max-width:100%}figcaption{color:#555;font-size:90%}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:16px}
.cards.wide{grid-template-columns:repeat(auto-fill,minmax(800px,1fr))}
.card{border:1px solid #ccc;border-radius:6px;padding:8px}
.card img{display:block;max-width:100%}
.card .text{font-weight:600;margin:0 0 6px}
.card table{margin:6px 0;width:100%}.cards.wide .card table{width:auto;min-width:400px}
.card .key,.card .attention{color:#555;font-size:85%;margin:2px 0}
td.right{color:#176b17}td.wrong{color:#a11}td.partly{color:#a60}
"""


def write_report(out: Path, sections: Sequence[Section | None], *, title: str, summary: dict[str, Any],
                 metrics: dict[str, Any]) -> dict[str, Path]:
    """Write report.md, report.html, summary.json and metrics.json (the raw figures, linked from the page)
    into `out`; sections that are None are left out."""
    shown = [s for s in sections if s is not None]
    links = "[summary.json](summary.json), [metrics.json](metrics.json)"
    md = [f"# {title}", "", "Sections: " + ", ".join(f"[{s.title}](#{s.anchor})" for s in shown) + ".", ""]
    for s in shown:
        md += [f"## {s.title}", "", s.markdown]
    md += ["---", "", f"Raw figures: {links}.", ""]
    nav = "".join(f"<a href='#{s.anchor}'>{html.escape(s.title)}</a>" for s in shown)
    page = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>"]
    page += [f"<section id='{s.anchor}'><h2>{html.escape(s.title)}</h2>{s.html}</section>" for s in shown]
    page.append("<footer><p>Raw figures: <a href='summary.json'>summary.json</a>, "
                "<a href='metrics.json'>metrics.json</a>.</p></footer></body></html>")
    paths = {"markdown": out / "report.md", "html": out / "report.html", "summary": out / "summary.json",
             "metrics": out / "metrics.json"}
    write_text_atomic(paths["markdown"], "\n".join(md))
    write_text_atomic(paths["html"], "\n".join(page))
    write_json_atomic(paths["summary"], summary, indent=1)
    write_json_atomic(paths["metrics"], json.loads(json.dumps(metrics, default=str)), indent=1)
    return paths
