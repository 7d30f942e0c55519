"""Luigi task that measures grounding directly: pointing accuracy of a fine-tuned GQA model (tasks.grounding)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from pipeline.base import InputPathParameter, PipelineTask, param_problems
from pipeline.data import BuildGQAData, TaskData
from pipeline.features import ExtractFeatures
from pipeline.training import FinetuneGQA, FinetuneTask
from tasks.data.features import open_stores
from tasks.data.jsonstream import write_json_atomic
from tasks.data.tokenization import load_tokenizer, vocab_beside
from tasks.grounding import gqa_pointing_items, object_boxes, pointing_accuracy


def _boxes_problem(path: Path) -> str | None:
    """Not a JSON list (Visual Genome's objects.json) or object (GQA's scene graphs); checked by its start."""
    with open(path, "rb") as f:
        first = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()[:1]
    if first not in ("[", "{"):
        return f"{path}: expected Visual Genome objects.json (a JSON list) or GQA scene graphs (a JSON object)"
    return None


class MeasurePointing(PipelineTask):
    """How often the cross-attention from a GQA question's object words peaks on the named object's box."""

    init = luigi.Parameter(default="pretrained", description="the GQA fine-tuning run's init (see FinetuneGQA)")
    objects = InputPathParameter(default="", kind="file", optional=True,
                                 description="object boxes: Visual Genome objects.json or GQA scene graphs of "
                                             "the evaluated split; empty: the demo world's")
    batch_size = luigi.IntParameter(default=64, significant=False)

    def dependencies(self) -> Any:
        ft = FinetuneGQA(init=self.init)
        deps: dict[str, Any] = {"finetune": ft, "data": BuildGQAData()}
        if not ft.features:
            deps["features"] = ExtractFeatures()
        return deps

    def input_problems(self) -> list[str]:
        problems = param_problems(self, "objects", _boxes_problem)
        if not self.objects and not BuildGQAData().uses_demo():
            problems.append("MeasurePointing: parameter 'objects' is required with real GQA data "
                            "(the scene graphs or Visual Genome objects.json of the evaluated images)")
        return problems

    def objects_file(self) -> Path:
        if self.objects:
            return Path(self.objects)
        return BuildGQAData().world("vg", "objects")

    def build(self, out: Path) -> None:
        from model import LxmertForQuestionAnswering

        inputs = self.input_dirs()
        weights = FinetuneTask.chosen_model(inputs["finetune"])
        ft = FinetuneGQA(init=self.init)
        features = list(ft.features) or [str(ExtractFeatures.path(inputs["features"]))]
        questions = TaskData.official(inputs["data"])["questions"]
        model = LxmertForQuestionAnswering.from_pretrained(weights)
        result = pointing_accuracy(model, load_tokenizer(vocab_beside(str(weights))), open_stores(features),
                                   gqa_pointing_items(questions, object_boxes(self.objects_file())),
                                   batch_size=self.batch_size, max_seq_length=ft.max_seq_length)
        write_json_atomic(out / "metrics.json", {"init": self.init, "weights": str(weights),
                                                 "questions": str(questions), **result}, indent=1)
