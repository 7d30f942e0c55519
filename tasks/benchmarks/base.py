"""What every benchmark shares: the record's interface, the coverage check every metric makes first,
and the checks of the files a scorer reads."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractor.jsonstream import DataFormatError, iter_array
from tasks.data.answers import AnswerTable
from tasks.training.loop import TrainConfig

# ----------------------------------------------------------------------------- coverage


class PredictionError(ValueError):
    """Predictions that miss questions, or name questions the ground truth does not have."""


class DuplicateIdError(PredictionError):
    """A ground-truth id met twice: scoring it twice would weigh that question double."""

    @classmethod
    def of(cls, what: str, key: Hashable) -> DuplicateIdError:
        """The one wording the three benchmarks share."""
        return cls(f"{what} {key!r} appears twice in the ground truth; each {what} must be scored once")


def _first(ids: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (", ..." if len(ids) > n else "")


def check_coverage(
    expected: Sequence[Hashable],
    predictions: Mapping[Any, Any],
    *,
    allow_missing: bool,
    known: Collection[Hashable] | None = None,
    what: str = "question",
) -> int:
    """Raise DuplicateIdError on an id the ground truth holds twice, PredictionError on unknown
    prediction ids, or on missing ones unless allow_missing.

    A duplicated id would be scored twice (VQA's and NLVR2's official scripts do so by accident;
    GQA's cannot hold one: see docs/datasets-and-metrics.md), so it is refused. `known` (default:
    `expected`) are the ids a prediction may name; returns how many expected ids have no prediction
    (they score as wrong when allowed).
    """
    seen: set[Hashable] = set()
    for k in expected:
        if k in seen:
            raise DuplicateIdError.of(what, k)
        seen.add(k)
    known_ids = seen if known is None else known
    unknown = [k for k in predictions if k not in known_ids]
    if unknown:
        raise PredictionError(
            f"{len(unknown)} predictions are for unknown {what} ids (first: {_first(unknown)})")
    missing = [k for k in expected if k not in predictions]
    if missing and not allow_missing:
        raise PredictionError(
            f"{len(missing)} of {len(expected)} {what}s have no prediction (first: {_first(missing)}); "
            "--allow-missing (allow_missing=True) scores them as wrong")
    return len(missing)


# ----------------------------------------------------------------------------- files a scorer reads


def existing(path: Path, option: str) -> Path:
    """`path`, or an error naming the command-line option that gave it."""
    if not path.exists():
        raise FileNotFoundError(f"{option}: no such file: {path}")
    return path


def against(truth: Path, score: Callable[[], dict]) -> dict:
    """Run a scorer; an id the ground truth holds twice is reported against the ground-truth file."""
    try:
        return score()
    except DuplicateIdError as err:
        raise DataFormatError(f"{truth}: {err}") from None


def read_records(path: Path, keys: tuple[str, str]) -> list[tuple[int, object, object]]:
    """(index, first key's value, second key's value) of each record of a JSON list of objects."""
    out = []
    for i, rec in enumerate(iter_array(path)):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise DataFormatError(f"{path}: record {i}: expected {{{', '.join(repr(k) for k in keys)}}}, "
                                  f"got {rec!r:.80}")
        out.append((i, rec[keys[0]], rec[keys[1]]))
    return out


# ----------------------------------------------------------------------------- the record


class Benchmark(ABC):
    """One benchmark in one record: its task files, dataset, head, loss, answer decoding, official
    metric, submission files, majority baseline and fine-tuning recipe. Fine-tuning, evaluation, the
    report and the pipeline ask the record; a new benchmark is one new module and one registry line."""

    name: str = ""                    # the command-line word (`python -m tasks.finetune vqa`) and `task`
    title: str = ""                   # its row in the report
    metric_help: str = ""             # what `python -m tasks.evaluate <name>` reports
    id_key: str = ""                  # the task files' example id, the key of a prediction
    head_prefix: str = ""             # the task head's key prefix: what a pretrained model lacks
    annotation_file: str = ""         # the official file fine-tuning scores with (a key of official.json)
    submission_suffix: str = ".json"  # of the submission file the official scorer reads
    answers: bool = False             # the head picks from an answer table
    lr: float = 5e-5                  # the fine-tuning recipe's learning rate
    model_class: type[nn.Module]      # the network with this benchmark's head
    load_task: Callable[[str | Path], list[dict]]                   # the entries of one LXMERT-format task file
    submission_writer: Callable[[str | Path, Mapping[Any, Any]], None]  # the submission file, atomically
    submission_reader: Callable[[str | Path], dict[Any, Any]]         # {id: answer} of a submission file
    image_keys: tuple[str, ...] = ("img_id",)  # the task entries' image fields, in the order the model reads them

    def recipe(self) -> TrainConfig:
        """The loop settings of the original fine-tuning recipe: batch 32, 4 epochs, warm-up 10%,
        gradient clipping 5, BertAdam at the benchmark's learning rate."""
        return TrainConfig(output_dir=f"runs/finetune/{self.name}", epochs=4, batch_size=32, lr=self.lr,
                           warmup_ratio=0.1, clip_grad_norm=5.0)

    # -- data and network
    def answer_table(self, path: str | None) -> AnswerTable | None:
        """The head's answer table: `path` (an ans2label json) or the released default; None without one."""
        return None

    @abstractmethod
    def dataset(self, entries: list[dict], stores: Sequence[Any], tokenizer: Any, table: AnswerTable | None,
                max_seq_length: int, max_boxes: int) -> Any:
        """The entries whose images are in the feature files, as a Dataset of `collate_task` examples."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], kind: str) -> torch.Tensor:
        """The training loss of a collated batch; `kind` is FinetuneConfig.loss."""

    @abstractmethod
    def decode(self, out: Any, dataset: Any) -> list[Any]:
        """The predicted answer of each example of a batch's network output, as the submission holds it."""

    # -- scoring
    @abstractmethod
    def score(self, entries: list[dict], preds: Mapping[Any, Any], annotations: str | None,
              choices: str | None) -> dict[str, Any]:
        """The metrics of predictions over the task entries (unpredicted ones count as wrong); the
        official metric when its files (`annotations`, `choices`) are given or not needed."""

    def best_metric(self, annotations: str | None) -> str:
        """The metric that picks the best epoch: the official accuracy when it can be computed."""
        return "accuracy"

    @abstractmethod
    def headline(self, metrics: dict[str, Any]) -> float:
        """The number papers report, in percent, from the official scorer's output."""

    @abstractmethod
    def breakdowns(self, official: dict[str, Any]) -> dict[str, dict[str, float]]:
        """The official scorer's output as the report's tables: {table title: {row: value}}, values in percent
        unless the row's name says otherwise."""

    @abstractmethod
    def evaluate(self, predictions: Path, **official: Any) -> dict:
        """The official scorer on a submission file and the split's official files (named as the
        `python -m tasks.evaluate` options); bad input raises DataFormatError / PredictionError / OSError."""

    @abstractmethod
    def add_evaluate_arguments(self, parser: Any) -> None:
        """The `python -m tasks.evaluate <name>` options: the official files, --predictions and the rest."""

    # -- submission files
    def write_submission(self, path: str | Path, predictions: Mapping[Any, Any]) -> Path:
        """The benchmark's submission file of `predictions` (written atomically); returns its path."""
        self.submission_writer(path, predictions)
        return Path(path)

    def read_submission(self, path: str | Path) -> dict[Any, Any]:
        """{example id: answer} of a submission file, as `write_submission` wrote it."""
        return self.submission_reader(path)

    # -- one example, for people (the report's examples)
    @abstractmethod
    def gold(self, entry: dict) -> Any:
        """The right answer of a task entry (the best-scored one), or None when it has no label."""

    @abstractmethod
    def credit(self, entry: dict, answer: Any) -> float:
        """What `answer` scores on a task entry, in [0, 1] (VQA's soft score; 0 or 1 elsewhere)."""

    # -- majority baseline
    @abstractmethod
    def training_answers(self, train: list[dict]) -> list[Any]:
        """The answer each labelled training example counts for in the majority baseline."""

    def majority_answer(self, train: list[dict]) -> Any:
        """The most frequent training answer: the floor a model must clear to show it looks."""
        counts = Counter(self.training_answers(train))
        if not counts:
            raise ValueError(f"{self.name}: no labelled training example to take a majority answer from")
        return max(counts.items(), key=lambda kv: (kv[1], str(kv[0])))[0]

    def majority_predictions(self, train: list[dict], evaluated: list[dict]) -> dict[Any, Any]:
        """Predictions that give every evaluated example the majority training answer."""
        answer = self.majority_answer(train)
        return {e[self.id_key]: answer for e in evaluated}
