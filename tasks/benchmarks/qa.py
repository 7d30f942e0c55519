"""What VQA and GQA share: a question about one image, answered by the QA head from an answer table,
trained on soft scores, and LXMERT's own soft-score accuracy."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractor.store import FeatureReader
from model import LxmertForQuestionAnswering
from model.modeling import mean_cross_entropy
from tasks.benchmarks.base import Benchmark, PredictionError
from tasks.benchmarks.datasets import TaskDataset, encode
from tasks.data.answers import AnswerTable
from tasks.data.batches import IGNORE, model_inputs

LOSSES = ("bce", "ce")  # soft-score BCE (the original) | cross-entropy on the best answer (GQA's --mceLoss)


class QADataset(TaskDataset):
    """VQA / GQA questions with soft-score targets over the answer table."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 table: AnswerTable, max_seq_length: int = 20, max_boxes: int = 0) -> None:
        super().__init__(entries, stores, tokenizer, ("img_id",), max_seq_length, max_boxes)
        self.table = table

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        feats, boxes = self._image(e["img_id"])
        target = np.zeros(len(self.table), dtype=np.float32)
        for ans, score in (e.get("label") or {}).items():
            if ans in self.table:
                target[self.table.label(ans)] = score
        return {"key": e["question_id"], "input_ids": encode(self.tokenizer, e["sent"], self.max_seq_length),
                "visual_feats": feats, "visual_pos": boxes, "target": target}


def qa_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """The original VQA / GQA loss: mean BCE-with-logits over (batch x answers) times the number of
    answers; with `ce`, cross-entropy on each question's best answer (unlabelled ones skipped),
    also times the number of answers as the original does (0 when no question is labelled). Nothing
    here waits for the device."""
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]
    best, index = target.max(dim=1)
    return mean_cross_entropy(logits, index.masked_fill(best <= 0, IGNORE)) * logits.shape[1]


def soft_score_accuracy(
    predictions: Mapping[Hashable, str], labels: Mapping[Hashable, Mapping[str, float]]
) -> float:
    """LXMERT's validation accuracy: the mean label score of the predicted answers (a fraction).

    `labels` are the task files' {answer: score} (VQA soft scores; GQA {answer: 1.0}, which makes
    this plain accuracy).
    """
    if not predictions:
        raise ValueError("predictions: nothing to score")
    unlabeled = [k for k in predictions if k not in labels]
    if unlabeled:
        raise PredictionError(f"{len(unlabeled)} predictions have no label (first: {unlabeled[:5]!r})")
    return sum(labels[k].get(ans, 0.0) for k, ans in predictions.items()) / len(predictions)


class QABenchmark(Benchmark):
    """VQA and GQA: the QA head over an answer table, trained on the task files' soft scores."""

    id_key = "question_id"
    head_prefix = "answer_head."
    answers = True
    model_class = LxmertForQuestionAnswering
    default_table: Callable[[], AnswerTable]  # the released table (the rows of the released checkpoints' heads)

    @abstractmethod
    def official_score(self, labels: Mapping[Any, Any], preds: Mapping[Any, Any], annotations: str,
                       choices: str | None) -> dict[str, Any]:
        """The official metrics over the questions of `labels`, with `accuracy` among them."""

    def answer_table(self, path: str | None) -> AnswerTable:
        return AnswerTable.load(path) if path else self.default_table()

    def dataset(self, entries: list[dict], stores: Sequence[Any], tokenizer: Any, table: AnswerTable | None,
                max_seq_length: int, max_boxes: int) -> QADataset:
        return QADataset(entries, stores, tokenizer, table, max_seq_length, max_boxes)

    def loss(self, model: nn.Module, batch: dict[str, Any], kind: str) -> torch.Tensor:
        logits = model(**model_inputs(batch)).question_answering_score
        return qa_loss(logits, batch["target"], kind)

    def decode(self, out: Any, dataset: Any) -> list[Any]:
        return [dataset.table.answer(v) for v in out.question_answering_score.argmax(-1).tolist()]

    def score(self, entries: list[dict], preds: Mapping[Any, Any], annotations: str | None,
              choices: str | None) -> dict[str, Any]:
        """LXMERT's soft score (in %) and, given the official file, the official metrics."""
        labels = {e["question_id"]: e.get("label") or {} for e in entries}
        result: dict[str, Any] = {"soft_score": 100 * soft_score_accuracy({k: preds.get(k, "") for k in labels},
                                                                          labels)}
        if annotations:
            result.update(self.official_score(labels, preds, annotations, choices))
        return result

    def best_metric(self, annotations: str | None) -> str:
        return "accuracy" if annotations else "soft_score"

    def gold(self, entry: dict) -> Any:
        label = entry.get("label") or {}
        return max(label.items(), key=lambda kv: (kv[1], kv[0]))[0] if label else None

    def credit(self, entry: dict, answer: Any) -> float:
        return float((entry.get("label") or {}).get(answer, 0.0))

    def training_answers(self, train: list[dict]) -> list[Any]:
        """Each labelled question's top-scored answer."""
        return [max(e["label"].items(), key=lambda kv: (kv[1], kv[0]))[0] for e in train if e.get("label")]
