"""Luigi task that measures grounding directly: pointing accuracy of a fine-tuned GQA model (tasks.grounding)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from extractor.jsonstream import write_json_atomic
from pipeline.base import InputPathParameter, param_problems
from pipeline.data import BuildGQAData, TaskData
from pipeline.features import ExtractFeatures
from pipeline.sources import SourcedTask
from pipeline.training import FinetuneGQA, FinetuneTask
from tasks.data.features import open_stores
from tasks.data.tokenization import load_tokenizer, vocab_beside
from tasks.grounding import gqa_pointing_items, object_boxes, pointing_accuracy


def _boxes_problem(path: Path) -> str | None:
    """Not a JSON list (Visual Genome's objects.json) or object (GQA's scene graphs); checked by its start."""
    with open(path, "rb") as f:
        first = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()[:1]
    if first not in ("[", "{"):
        return f"{path}: expected Visual Genome objects.json (a JSON list) or GQA scene graphs (a JSON object)"
    return None


class MeasurePointing(SourcedTask):
    """How often the cross-attention from a GQA question's object words peaks on the named object's box."""

    init = luigi.Parameter(default="pretrained", description="the GQA fine-tuning run's init (see FinetuneGQA)")
    objects = InputPathParameter(default="", kind="file", optional=True,
                                 description="object boxes of the evaluated GQA images: GQA's scene graphs or "
                                             "Visual Genome objects.json; empty: the sources file's "
                                             "gqa.valid_objects (without it the report has no pointing figure)")
    batch_size = luigi.IntParameter(default=64, significant=False)

    sourced = {"objects": "gqa.valid_objects"}
    needed = ("objects",)

    def dependencies(self) -> Any:
        ft = FinetuneGQA(init=self.init)
        deps: dict[str, Any] = {"finetune": ft, "data": BuildGQAData(), **self.source_dependencies()}
        if not ft.features:
            deps["features"] = ExtractFeatures()
        return deps

    def input_problems(self) -> list[str]:
        return super().input_problems() + param_problems(self, "objects", _boxes_problem)

    def build(self, out: Path) -> None:
        from model import LxmertForQuestionAnswering

        inputs = self.input_dirs()
        weights = FinetuneTask.chosen_model(inputs["finetune"])
        ft = FinetuneGQA(init=self.init)
        features = list(ft.features) or [str(ExtractFeatures.path(inputs["features"]))]
        questions = TaskData.official(inputs["data"])["questions"]
        model = LxmertForQuestionAnswering.from_pretrained(weights)
        result = pointing_accuracy(model, load_tokenizer(vocab_beside(str(weights))), open_stores(features),
                                   gqa_pointing_items(questions, object_boxes(self.input_value("objects"))),
                                   batch_size=self.batch_size, max_seq_length=ft.max_seq_length)
        write_json_atomic(out / "metrics.json", {"init": self.init, "weights": str(weights),
                                                 "questions": str(questions), **result}, indent=1)
