"""NLVR2: one sentence and two images, the pair head, the official accuracy and consistency
(nlvr2/eval/metrics.py), the CSV submission file, and the benchmark's record."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.jsonstream import DataFormatError, write_text_atomic
from extractor.store import FeatureReader
from model import LxmertForNLVR2
from tasks.benchmarks.base import Benchmark, PredictionError, against, check_coverage, existing
from tasks.benchmarks.datasets import TaskDataset, encode
from tasks.data.answers import AnswerTable
from tasks.data.batches import IGNORE, model_inputs
from tasks.data.readers import NLVR2Example, load_nlvr2_task, nlvr2_group, read_nlvr2

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- the official metric

def nlvr2_metrics(
    examples: Iterable[NLVR2Example], predictions: Mapping[str, bool], *, allow_missing: bool = False
) -> dict[str, float]:
    """{"accuracy", "consistency"} as fractions in [0, 1], as the official script reports them.

    Consistency is the share of sentence groups (identifier with the pair field blanked: the
    same sentence over several image pairs) whose examples are all predicted correctly.
    """
    exs = list(examples)
    if not exs:
        raise PredictionError("no examples to score")
    unlabeled = [e.identifier for e in exs if e.label is None]
    if unlabeled:
        raise PredictionError(f"{len(unlabeled)} examples have no label (first: {unlabeled[:5]!r})")
    check_coverage([e.identifier for e in exs], predictions, allow_missing=allow_missing, what="example")
    correct = 0
    group_ok: dict[str, bool] = {}
    for e in exs:
        ok = predictions.get(e.identifier) == e.label
        correct += ok
        group = nlvr2_group(e.identifier)
        group_ok[group] = group_ok.get(group, True) and ok
    return {"accuracy": correct / len(exs), "consistency": sum(group_ok.values()) / len(group_ok)}


# ----------------------------------------------------------------------------- the submission file

def write_nlvr2_submission(path: PathLike, predictions: Mapping[str, bool | int]) -> None:
    """NLVR2 predictions, one `identifier,True|False` line per example."""
    lines = []
    for identifier, pred in predictions.items():
        if "," in identifier or "\n" in identifier:
            raise ValueError(f"predictions: identifier {identifier!r} cannot be written to CSV")
        if pred not in (True, False):  # also admits 0 and 1
            raise ValueError(f"predictions: {identifier!r} -> {pred!r} is not a boolean or 0/1")
        lines.append(f"{identifier},{'True' if pred else 'False'}\n")
    write_text_atomic(path, "".join(lines))


def read_nlvr2_predictions(path: PathLike) -> dict[str, bool]:
    """{identifier: bool} from an NLVR2 CSV (`identifier,True|False`, case-insensitive; a header
    line starting with "identifier," is skipped)."""
    path = Path(path)
    out: dict[str, bool] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.lower().startswith("identifier,")):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or fields[1].lower() not in ("true", "false") or not fields[0]:
            raise DataFormatError(
                f"{path}: line {lineno}: expected `identifier,True|False`, got {line!r:.80}")
        if fields[0] in out:
            raise DataFormatError(f"{path}: line {lineno}: {fields[0]!r} is predicted twice")
        out[fields[0]] = fields[1].lower() == "true"
    return out


# ----------------------------------------------------------------------------- the dataset and the record

class NLVR2Dataset(TaskDataset):
    """NLVR2 sentences with their two images; label 1 = True."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 max_seq_length: int = 20, max_boxes: int = 0) -> None:
        super().__init__(entries, stores, tokenizer, ("img0", "img1"), max_seq_length, max_boxes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        (f0, b0), (f1, b1) = self._image(e["img0"]), self._image(e["img1"])
        k = max(len(f0), len(f1))
        feats = np.zeros((2, k, f0.shape[1]), dtype=f0.dtype)
        boxes = np.zeros((2, k, 4), dtype=np.float32)
        mask = np.zeros((2, k), dtype=np.float32)
        for j, (f, b) in enumerate(((f0, b0), (f1, b1))):
            feats[j, : len(f)], boxes[j, : len(b)], mask[j, : len(f)] = f, b, 1.0
        return {"key": e["identifier"], "input_ids": encode(self.tokenizer, e["sent"], self.max_seq_length),
                "visual_feats": feats, "visual_pos": boxes, "box_mask": mask,
                "label": int(e.get("label", IGNORE))}


class NLVR2Benchmark(Benchmark):
    """NLVR2: each image with the sentence through the shared encoder, the pair head, 2-way cross-entropy."""

    name, title = "nlvr2", "NLVR2 (accuracy)"
    metric_help = "NLVR2 accuracy and consistency"
    id_key = "identifier"
    head_prefix = "logit_fc."
    submission_suffix = ".csv"
    lr = 5e-5
    load_task = staticmethod(load_nlvr2_task)
    submission_writer = staticmethod(write_nlvr2_submission)
    submission_reader = staticmethod(read_nlvr2_predictions)
    image_keys = ("img0", "img1")
    model_class = LxmertForNLVR2

    def dataset(self, entries: list[dict], stores: Sequence[Any], tokenizer: Any, table: AnswerTable | None,
                max_seq_length: int, max_boxes: int) -> NLVR2Dataset:
        return NLVR2Dataset(entries, stores, tokenizer, max_seq_length, max_boxes)

    def loss(self, model: nn.Module, batch: dict[str, Any], kind: str) -> torch.Tensor:
        return model(**model_inputs(batch), labels=batch["label"]).loss

    def decode(self, out: Any, dataset: Any) -> list[Any]:
        return [bool(v) for v in out.logits.argmax(-1).tolist()]

    def score(self, entries: list[dict], preds: Mapping[Any, Any], annotations: str | None,
              choices: str | None) -> dict[str, Any]:
        """Accuracy and consistency (fractions); the labels are in the task entries."""
        examples = [NLVR2Example(e["identifier"], e["sent"], bool(e["label"]), None, None)
                    for e in entries if "label" in e]
        return nlvr2_metrics(examples, preds, allow_missing=True)

    def headline(self, metrics: dict[str, Any]) -> float:
        return round(100 * float(metrics["accuracy"]), 2)

    def breakdowns(self, official: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"overall": {"accuracy": 100 * official["accuracy"], "consistency": 100 * official["consistency"]}}

    def evaluate(self, predictions: Path, data: Path, allow_missing: bool = False) -> dict:
        """NLVR2 accuracy and consistency of an `identifier,True|False` CSV."""
        preds = read_nlvr2_predictions(existing(Path(predictions), "--predictions"))
        examples = read_nlvr2(existing(Path(data), "--data"))
        return against(data, lambda: nlvr2_metrics(examples, preds, allow_missing=allow_missing))

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, required=True, help="the split's JSON-lines file")
        parser.add_argument("--predictions", type=Path, required=True, help="CSV of identifier,True|False")

    def gold(self, entry: dict) -> Any:
        return bool(entry["label"]) if "label" in entry else None

    def credit(self, entry: dict, answer: Any) -> float:
        return float("label" in entry and answer == bool(entry["label"]))

    def training_answers(self, train: list[dict]) -> list[Any]:
        """Each labelled pair's label."""
        return [bool(e["label"]) for e in train if "label" in e]


NLVR2 = NLVR2Benchmark()
