"""Luigi tasks at the end of the chain: the report and RunAll."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import luigi
from luigi.task import flatten

from extractor.detector.labels import attribute_names, object_names
from extractor.draw import draw_boxes
from extractor.fileio import atomic_write
from extractor.images import image_id, list_images, load_image
from extractor.jsonstream import load_json, write_json_atomic
from extractor.store import FeatureReader
from pipeline.base import PipelineTask
from pipeline.detector import TrainDetector
from pipeline.features import ExtractFeatures, ValidateFeatures
from pipeline.grounding import MeasurePointing
from pipeline.training import EvaluateGQA, EvaluateNLVR2, EvaluateVQA, PretrainLXMERT
from tasks.report import grounding_summary, plot_validation, summarize, write_report

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
    """Markdown and HTML report: accuracy table (pretrained / scratch / majority), detector, curves, boxes."""

    inits = luigi.ListParameter(default=["pretrained", "scratch"])
    images = luigi.IntParameter(default=4, description="images drawn with their detected boxes")
    title = luigi.Parameter(default="LXMERT pipeline report")

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
        curves = []
        if "pretrain" in inputs:
            (out / "plots").mkdir(exist_ok=True)
            for png in sorted((inputs["pretrain"] / "plots").glob("*.png")):
                curves.append(Path("plots") / f"pretrain_{png.name}")
                shutil.copyfile(png, out / curves[-1])
            if (inputs["pretrain"] / "logs" / "eval.csv").is_file():
                curves += [p.relative_to(out) for p in plot_validation(inputs["pretrain"] / "logs" / "eval.csv",
                                                                       out / "plots")]
        detections = self.draw(ExtractFeatures.path(inputs["features"]), extraction["images"], out)
        details = {task: {init: {"accuracy": m["accuracy"], "official": m["official"]["model"]}
                          for init, m in runs.items()} for task, runs in evaluations.items()}
        if detector:
            details["detector"] = {k: detector.get(k) for k in ("map50", "per_class", "region_accuracy")}
        summary = summarize(evaluations, detector, _graph_seconds(self))
        pretrain_evals = load_json(inputs["pretrain"] / "metrics.json")["evals"] if "pretrain" in inputs else []
        pointing = {init: load_json(d / "metrics.json") for init, d in inputs.get("pointing", {}).items()}
        summary["grounding"] = grounding_summary(pretrain_evals, pointing)
        details["pointing"] = pointing
        write_report(out, summary, title=self.title, details=details, curves=curves, detections=detections)
        print("[lxmert] summary " + json.dumps(summary), flush=True)

    def draw(self, features: Path, images: str, out: Path) -> list[tuple[Path, str]]:
        """A few images with their stored boxes, object and attribute names."""
        if self.images <= 0:
            return []
        reader = FeatureReader(features)
        cfg = reader.attrs.get("detector_config") or {}
        objects = object_names(cfg.get("object_labels"))
        attributes = attribute_names(cfg.get("attribute_labels"))
        wanted = reader.ids[:: max(1, len(reader) // self.images)][: self.images]
        paths = {image_id(p): p for p in list_images(images)}
        (out / "images").mkdir(exist_ok=True)
        drawn = []
        for img in wanted:
            record = reader.get(img)
            picture = draw_boxes(load_image(paths[img]), record, objects, attributes, max_boxes=10)
            rel = Path("images") / f"{img}.png"
            ok, png = cv2.imencode(".png", picture)
            if not ok:
                raise ValueError(f"{self.get_task_family()}: PNG encoding failed for {img}")
            atomic_write(out / rel, png.tobytes())  # cv2.imwrite would only return False on a full disk
            drawn.append((rel, f"{img}: {record.num_boxes} boxes, the 10 most confident drawn"))
        reader.close()
        return drawn


class RunAll(PipelineTask):
    """The whole chain on the data of the sources in use (luigi.cfg's [pipeline] sources)."""

    def dependencies(self) -> Any:
        return {"report": Report(), "validate": ValidateFeatures()}

    def build(self, out: Path) -> None:
        report = self.input_dirs()["report"]
        summary = load_json(report / "summary.json")
        write_json_atomic(out / "result.json", {"report": str(report), "summary": summary}, indent=1)
        print(f"[lxmert] RunAll finished: report {report / 'report.md'}", flush=True)
