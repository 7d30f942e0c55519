"""Luigi tasks at the end of the chain: the report and RunAll."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import luigi
from luigi.task import flatten

from extractor.detector.labels import attribute_names, object_names
from extractor.draw import box_name
from extractor.images import image_id, list_images, load_image
from extractor.jsonstream import load_json, write_json_atomic
from extractor.store import FeatureReader, ImageFeatures
from pipeline.base import PipelineTask
from pipeline.detector import TrainDetector
from pipeline.features import ExtractFeatures, ValidateFeatures
from pipeline.grounding import MeasurePointing
from pipeline.training import EvaluateGQA, EvaluateNLVR2, EvaluateVQA, PretrainLXMERT
from tasks.benchmarks import BENCHMARKS, Benchmark
from tasks.inference import load_finetuned
from tasks.report import (
    INITS,
    benchmark_section,
    choose_examples,
    detector_section,
    examples_section,
    grounding_section,
    grounding_summary,
    pretraining_section,
    render_examples,
    summarize,
    summary_section,
    write_report,
)

EVALUATIONS = {"vqa": EvaluateVQA, "gqa": EvaluateGQA, "nlvr2": EvaluateNLVR2}


def _graph_seconds(root: PipelineTask) -> float:
    """Build time of every finished task under `root` (each once): the chain's wall time run serially."""
    seen, total, stack = set(), 0.0, list(flatten(root.dependencies()))
    while stack:
        task = stack.pop()
        if task.task_id in seen or not isinstance(task, PipelineTask):
            continue
        seen.add(task.task_id)
        record = task.output_dir() / "task.json"
        if record.is_file():
            total += json.loads(record.read_text()).get("seconds", 0.0)
        stack.extend(flatten(task.dependencies()))
    return total


class Report(PipelineTask):
    """The report folder (tasks/report.py): summary table, each benchmark's breakdowns and validation examples
    with the model's attention, the pretraining curves, the detector's AP per class."""

    inits = luigi.ListParameter(default=["pretrained", "scratch"])
    examples = luigi.IntParameter(default=8, description="validation examples shown per task")
    seed = luigi.IntParameter(default=0, description="the seed that picks the examples")
    title = luigi.Parameter(default="LXMERT pipeline report")

    ASK = "ask.json"  # the first example as a `python -m tasks.ask` command, for RunAll to print

    def dependencies(self) -> Any:
        deps: dict[str, Any] = {
            "evaluate": {task: {init: cls(init=init) for init in self.inits} for task, cls in EVALUATIONS.items()},
            "features": ExtractFeatures()}
        if "pretrained" in self.inits:
            deps["pretrain"] = PretrainLXMERT()
        if MeasurePointing().input_value("objects"):  # the GQA images' boxes are known
            deps["pointing"] = {init: MeasurePointing(init=init) for init in self.inits}
        return deps

    def build(self, out: Path) -> None:
        inputs = self.input_dirs()
        evaluations = {task: {init: load_json(d / "metrics.json") for init, d in runs.items()}
                       for task, runs in inputs["evaluate"].items()}
        extraction = ExtractFeatures.inputs(inputs["features"])  # the detector trained upstream, if any
        detector = TrainDetector.metrics(Path(extraction["detector"])) if extraction["detector"] else None
        summary = summarize(evaluations, detector, _graph_seconds(self))
        pretrain_evals = load_json(inputs["pretrain"] / "metrics.json")["evals"] if "pretrain" in inputs else []
        pointing = {init: load_json(d / "metrics.json") for init, d in inputs.get("pointing", {}).items()}
        summary["grounding"] = grounding_summary(pretrain_evals, pointing)
        shown = _Shown(ExtractFeatures.path(inputs["features"]), extraction["images"])
        sections, asks = [summary_section(summary), grounding_section(summary["grounding"], pointing, out)], []
        for task, benchmark in BENCHMARKS.items():
            sections.append(benchmark_section(benchmark, evaluations.get(task, {})))
            if self.examples > 0 and inputs["evaluate"].get(task):
                section, ask = self.task_examples(benchmark, inputs["evaluate"][task], evaluations[task], shown, out)
                sections.append(section)
                asks += ask
        sections.append(pretraining_section(inputs["pretrain"], out) if "pretrain" in inputs else None)
        sections.append(detector_section(detector))
        shown.close()
        write_report(out, sections, title=self.title, summary=summary,
                     metrics={"evaluations": evaluations, "detector": detector, "pointing": pointing})
        if asks:
            write_json_atomic(out / self.ASK, {**asks[0], "detector": extraction["detector"] or extraction["weights"]},
                              indent=1)
        print("[lxmert] summary " + json.dumps(summary), flush=True)

    def task_examples(self, benchmark: Benchmark, folders: dict[str, Path], metrics: dict[str, dict[str, Any]],
                      shown: _Shown, out: Path) -> tuple[Any, list[dict[str, Any]]]:
        """A benchmark's examples section, shaded by the first model's attention (the pretrained one when
        there is one), and the first example as a command asking that model."""
        inits = [i for i in INITS if i in folders]
        preds = {i: benchmark.read_submission(folders[i] / metrics[i]["predictions"]) for i in inits}
        data = EVALUATIONS[benchmark.name](init=inits[0]).input_dirs()["data"]
        entries = benchmark.load_task(data / "valid.json")
        chosen = choose_examples(benchmark, entries, preds[inits[0]], self.examples, self.seed)
        table = data / "ans2label.json"
        weights = Path(metrics[inits[0]]["weights"])
        model = load_finetuned(weights, benchmark.name, table if table.is_file() else None)
        examples = render_examples(benchmark, chosen, preds, model, shown.record, shown.picture, shown.names, out)
        asks = [{"model": str(weights.parent), "images": [str(shown.paths[e[k]]) for k in benchmark.image_keys],
                 "option": "--statement" if len(benchmark.image_keys) > 1 else "--question", "text": e["sent"]}
                for e in chosen[:1]]
        return examples_section(benchmark, examples, inits[0]), asks


class _Shown:
    """The stored features, image files and box names the examples are drawn from."""

    def __init__(self, features: Path, images: str) -> None:
        self.reader = FeatureReader(features)
        cfg = self.reader.attrs.get("detector_config") or {}
        self.objects = object_names(cfg.get("object_labels"))
        self.attributes = attribute_names(cfg.get("attribute_labels"))
        self.paths = {image_id(p): p for p in list_images(images)}

    def record(self, img_id: str) -> ImageFeatures:
        return self.reader.get(img_id)

    def picture(self, img_id: str) -> Any:
        return load_image(self.paths[img_id])

    def names(self, record: ImageFeatures) -> list[str]:
        return [box_name(record, j, self.objects, self.attributes) for j in range(record.num_boxes)]

    def close(self) -> None:
        self.reader.close()


class RunAll(PipelineTask):
    """The whole chain on the data of the sources in use (luigi.cfg's [pipeline] sources)."""

    def dependencies(self) -> Any:
        return {"report": Report(), "validate": ValidateFeatures()}

    def build(self, out: Path) -> None:
        report = self.input_dirs()["report"]
        summary = load_json(report / "summary.json")
        write_json_atomic(out / "result.json", {"report": str(report), "summary": summary}, indent=1)
        print(f"[lxmert] RunAll finished: report {report / 'report.html'} (and report.md)", flush=True)
        if (report / Report.ASK).is_file():
            ask = load_json(report / Report.ASK)
            cmd = [sys.executable, "-m", "tasks.ask", "--model", ask["model"], "--detector", ask["detector"],
                   *(x for image in ask["images"] for x in ("--image", image)), ask["option"], ask["text"],
                   "--draw", "answer.png"]
            print("[lxmert] ask the fine-tuned model about an image:\n" + shlex.join(cmd),
                  flush=True)
