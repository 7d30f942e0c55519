"""GQA: the official metrics (eval.py of the GQA release), the submission file, and the benchmark's record."""
from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from extractor.jsonstream import DataFormatError, write_json_atomic
from tasks.benchmarks.base import DuplicateIdError, PredictionError, against, check_coverage, existing, read_records
from tasks.benchmarks.qa import QABenchmark
from tasks.data.answers import default_gqa_table
from tasks.data.readers import GQAChoices, GQAQuestion, load_gqa_task, read_gqa_choices, read_gqa_questions

PathLike = str | os.PathLike[str]

# For "...in common?" questions (types.detailed containing "Common") the official evaluation
# replaces the choices file's answer sets with these when judging validity and plausibility.
COMMON_ANSWERS = frozenset({"color", "material", "shape"})


# ----------------------------------------------------------------------------- the official metrics

def _avg(scores: list[float]) -> float:
    return float(sum(scores)) / len(scores) if scores else 0.0


def _chi_square(gold: dict[str, Counter], predicted: dict[str, Counter]) -> float:
    # Per group: sum over the gold answers of (observed - expected)^2 / expected, where expected
    # is the gold count and observed the predicted count; groups weighted by their size.
    total_score = total = 0.0
    for group, answers in gold.items():
        score = 0.0
        for ans, expected in answers.items():
            score += float(predicted[group].get(ans, 0) - expected) ** 2 / expected
        size = sum(answers.values())
        total_score += score * size
        total += size
    return total_score / total


def gqa_metrics(
    questions: Iterable[GQAQuestion],
    predictions: Mapping[str, str],
    choices: Mapping[str, GQAChoices] | Iterable[tuple[str, GQAChoices]] | None = None,
    *,
    allow_missing: bool = False,
) -> dict:
    """GQA metrics over the balanced questions (percentages, unrounded, as the official script).

    Returns accuracy, binary, open (types.structural == "query"), distribution (chi-square of
    predicted vs gold answer counts per groups.global, averaged weighted by group size, / 100;
    lower is better) and accuracyPer{StructuralType, SemanticType, Steps, Length}; validity and
    plausibility when `choices` is given; consistency (mean accuracy over the entailed questions
    of each correctly answered question) when every entailed question is among `questions`
    and has a prediction. `questions` is read once, so a streaming reader of the multi-GB
    all-questions files may be passed directly.
    """
    balanced: list[GQAQuestion] = []
    gold: dict[str, str] = {}  # answers of the predicted questions, for consistency
    known: set[str] = set()
    for q in questions:
        if q.question_id in known:
            raise DuplicateIdError.of("question", q.question_id)
        known.add(q.question_id)
        if q.is_balanced:
            if q.answer is None:
                raise PredictionError(f"balanced question {q.question_id!r} has no answer (a test split?)")
            balanced.append(q)
        if q.answer is not None and q.question_id in predictions:
            gold[q.question_id] = q.answer
    if not balanced:
        raise PredictionError("no balanced questions (isBalanced) to score")
    check_coverage([q.question_id for q in balanced], predictions, allow_missing=allow_missing, known=known)

    acc: list[float] = []
    kinds: dict[str, list[float]] = {"binary": [], "open": []}
    per: dict[str, defaultdict[str, list[float]]] = {
        k: defaultdict(list) for k in ("accuracyPerStructuralType", "accuracyPerSemanticType",
                                       "accuracyPerSteps", "accuracyPerLength")}
    gold_dist: dict[str, Counter] = defaultdict(Counter)
    pred_dist: dict[str, Counter] = defaultdict(Counter)
    for q in balanced:
        pred = predictions.get(q.question_id)
        score = 1.0 if pred == q.answer else 0.0
        acc.append(score)
        kinds["open" if q.structural == "query" else "binary"].append(score)
        per["accuracyPerLength"][str(len(q.question.split()))].append(score)
        per["accuracyPerSteps"][str(q.steps)].append(score)
        if q.structural is not None:
            per["accuracyPerStructuralType"][q.structural].append(score)
        if q.semantic_type is not None:
            per["accuracyPerSemanticType"][q.semantic_type].append(score)
        if q.global_group is not None:
            gold_dist[q.global_group][q.answer] += 1
            pred_dist[q.global_group][pred] += 1

    result: dict = {"accuracy": _avg(acc) * 100, "binary": _avg(kinds["binary"]) * 100,
                    "open": _avg(kinds["open"]) * 100}
    if choices is not None:
        result.update(_choice_scores(balanced, predictions, choices))
    consistency = _consistency(balanced, predictions, gold)
    if consistency is not None:
        result["consistency"] = consistency
    if gold_dist:
        result["distribution"] = _chi_square(gold_dist, pred_dist) / 100
    for name, groups in per.items():
        result[name] = {k: _avg(v) * 100 for k, v in groups.items()}
    return result


def _choice_scores(
    balanced: list[GQAQuestion],
    predictions: Mapping[str, str],
    choices: Mapping[str, GQAChoices] | Iterable[tuple[str, GQAChoices]],
) -> dict[str, float]:
    wanted = {q.question_id: q for q in balanced}
    judged: dict[str, tuple[float, float]] = {}
    for qid, c in (choices.items() if isinstance(choices, Mapping) else choices):
        q = wanted.get(qid)
        if q is None:
            continue
        common = q.detailed is not None and "Common" in q.detailed
        pred = predictions.get(qid)
        judged[qid] = (float(pred in (COMMON_ANSWERS if common else c.valid)),
                       float(pred in (COMMON_ANSWERS if common else c.plausible)))
    missing = [qid for qid in wanted if qid not in judged]
    if missing:
        raise PredictionError(f"the choices lack {len(missing)} balanced questions (first: {missing[:5]!r})")
    order = [judged[q.question_id] for q in balanced]
    return {"validity": _avg([v for v, _ in order]) * 100, "plausibility": _avg([p for _, p in order]) * 100}


def _consistency(
    balanced: list[GQAQuestion], predictions: Mapping[str, str], gold: Mapping[str, str]
) -> float | None:
    inferred = {q.question_id: [e for e in q.entailed if e != q.question_id] for q in balanced}
    needed = [e for es in inferred.values() for e in es]
    if not needed or any(e not in gold for e in needed):
        return None
    scores = []
    for q in balanced:
        es = inferred[q.question_id]
        if es and predictions.get(q.question_id) == q.answer:
            scores.append(_avg([1.0 if predictions[e] == gold[e] else 0.0 for e in es]))
    return _avg(scores) * 100


# ----------------------------------------------------------------------------- the submission file

def write_gqa_submission(path: PathLike, predictions: Mapping[str, str]) -> None:
    """GQA predictions [{"questionId": str, "prediction": str}]."""
    write_json_atomic(path, [{"questionId": str(q), "prediction": str(p)} for q, p in predictions.items()])


def read_gqa_predictions(path: PathLike) -> dict[str, str]:
    """{questionId: prediction} from a GQA predictions file; ids are strings (integers accepted)."""
    path = Path(path)
    out: dict[str, str] = {}
    for i, qid, pred in read_records(path, ("questionId", "prediction")):
        if isinstance(qid, bool) or not isinstance(qid, str | int) or not isinstance(pred, str):
            raise DataFormatError(f"{path}: record {i}: questionId and prediction should be strings, "
                                  f"got {qid!r}, {pred!r:.80}")
        if str(qid) in out:
            raise DataFormatError(f"{path}: record {i}: question {qid!r} is predicted twice")
        out[str(qid)] = pred
    return out


# ----------------------------------------------------------------------------- the record

class GQABenchmark(QABenchmark):
    """GQA: BCE over the 1842 answers (`loss=ce` for the original's cross-entropy option); the official
    accuracy, binary / open, validity, plausibility, consistency and distribution."""

    name, title = "gqa", "GQA (accuracy, official)"
    metric_help = "GQA accuracy, binary/open, distribution, validity, plausibility, consistency"
    annotation_file = "questions"
    lr = 1e-5
    load_task = staticmethod(load_gqa_task)
    default_table = staticmethod(default_gqa_table)
    submission_writer = staticmethod(write_gqa_submission)
    submission_reader = staticmethod(read_gqa_predictions)

    def official_score(self, labels: Mapping[Any, Any], preds: Mapping[Any, Any], annotations: str,
                       choices: str | None) -> dict[str, Any]:
        questions = [q for q in read_gqa_questions(annotations) if q.question_id in labels]
        answer_sets = dict(read_gqa_choices(choices)) if choices else None
        return gqa_metrics(questions, preds, answer_sets, allow_missing=True)

    def headline(self, metrics: dict[str, Any]) -> float:
        return round(float(metrics["accuracy"]), 2)

    def breakdowns(self, official: dict[str, Any]) -> dict[str, dict[str, float]]:
        names = {"accuracy": "accuracy", "binary": "binary", "open": "open", "consistency": "consistency",
                 "validity": "validity", "plausibility": "plausibility",
                 "distribution": "distribution (chi-square / 100, lower is better)"}
        return {"overall": {shown: official[key] for key, shown in names.items() if key in official},
                "per structural type": official["accuracyPerStructuralType"],
                "per semantic type": official["accuracyPerSemanticType"]}

    def evaluate(self, predictions: Path, questions: Path, choices: Path | None = None,
                 allow_missing: bool = False) -> dict:
        """Official GQA metrics of a [{questionId, prediction}] file."""
        preds = read_gqa_predictions(existing(Path(predictions), "--predictions"))
        qs = read_gqa_questions(existing(Path(questions), "--questions"))
        ch = None if choices is None else read_gqa_choices(existing(Path(choices), "--choices"))
        return against(questions, lambda: gqa_metrics(qs, preds, ch, allow_missing=allow_missing))

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--questions", type=Path, required=True,
                            help="questions json (balanced or all; a folder of chunk files is read in order)")
        parser.add_argument("--predictions", type=Path, required=True, help="[{questionId, prediction}] json")
        parser.add_argument("--choices", type=Path, help="*_choices.json for validity and plausibility")


GQA = GQABenchmark()
