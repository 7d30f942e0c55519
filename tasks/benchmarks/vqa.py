"""VQA v2: the official accuracy (vqaEval.py), the submission file, and the benchmark's record."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from extractor.jsonstream import DataFormatError, write_json_atomic
from tasks.benchmarks.base import PredictionError, against, check_coverage, existing, read_records
from tasks.benchmarks.qa import QABenchmark
from tasks.data.answers import default_vqa_table, normalize_answer, process_punctuation
from tasks.data.readers import VQAAnnotation, load_vqa_task, read_vqa_annotations, read_vqa_questions

Rules = Literal["current", "legacy"]
PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- the official metric

def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, answers: Sequence[str], rules: Rules = "current") -> float:
    """Accuracy of one prediction against the human answers, in [0, 1].

    rules="current" (the official script today): answers and prediction lose tabs / newlines and
    outer blanks; ONLY when the human answers are not all identical are they and the prediction
    normalised (normalize_answer), so against ten identical answers the prediction must match
    them verbatim. rules="legacy" (the earlier script): the prediction is always normalised, the
    human answers only get the punctuation rule, and only when they differ.
    Each annotator i scores min(1, matches among the others / 3); the result is their mean.
    """
    if not answers:
        raise ValueError("answers: no human answers to score against")
    if rules == "current":
        gts = [_clean(a) for a in answers]
        res = _clean(prediction)
        if len(set(gts)) > 1:
            gts = [normalize_answer(a) for a in gts]
            res = normalize_answer(res)
    elif rules == "legacy":
        res = normalize_answer(_clean(prediction))
        gts = list(answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    else:
        raise ValueError(f"rules: expected 'current' or 'legacy', got {rules!r}")
    matches = sum(g == res for g in gts)
    per_annotator = [min(1.0, (matches - (g == res)) / 3) for g in gts]
    return sum(per_annotator) / len(per_annotator)


def _pct(scores: list[float], ndigits: int) -> float:
    return round(100 * float(sum(scores)) / len(scores), ndigits)


def vqa_accuracy(
    annotations: Iterable[VQAAnnotation],
    predictions: Mapping[int, str],
    *,
    rules: Rules = "current",
    allow_missing: bool = False,
    ndigits: int = 2,
) -> dict:
    """Official VQA accuracy over every annotated question, x100 rounded to `ndigits`.

    Returns {"overall": float, "perQuestionType": {type: float}, "perAnswerType": {type: float}}.
    A question without a prediction is an error (PredictionError) unless allow_missing, which
    scores it 0; a prediction for a question not annotated is always an error.
    """
    anns = list(annotations)
    if not anns:
        raise PredictionError("annotations: no questions to score")
    check_coverage([a.question_id for a in anns], predictions, allow_missing=allow_missing)
    overall: list[float] = []
    per_qtype: dict[str, list[float]] = {}
    per_atype: dict[str, list[float]] = {}
    for a in anns:
        pred = predictions.get(a.question_id)
        acc = 0.0 if pred is None else vqa_question_accuracy(pred, a.answers, rules)
        overall.append(acc)
        per_qtype.setdefault(a.question_type, []).append(acc)
        per_atype.setdefault(a.answer_type, []).append(acc)
    return {
        "overall": _pct(overall, ndigits),
        "perQuestionType": {t: _pct(s, ndigits) for t, s in per_qtype.items()},
        "perAnswerType": {t: _pct(s, ndigits) for t, s in per_atype.items()},
    }


# ----------------------------------------------------------------------------- the submission file

def write_vqa_submission(path: PathLike, predictions: Mapping[int, str]) -> None:
    """VQA results [{"question_id": int, "answer": str}], the format the VQA servers take."""
    write_json_atomic(path, [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()])


def read_vqa_predictions(path: PathLike) -> dict[int, str]:
    """{question_id: answer} from a VQA results file; ids must be integers and unique."""
    path = Path(path)
    out: dict[int, str] = {}
    for i, qid, ans in read_records(path, ("question_id", "answer")):
        if isinstance(qid, bool) or not isinstance(qid, int) or not isinstance(ans, str):
            raise DataFormatError(f"{path}: record {i}: question_id should be an integer and answer "
                                  f"a string, got {qid!r}, {ans!r:.80}")
        if qid in out:
            raise DataFormatError(f"{path}: record {i}: question {qid} is predicted twice")
        out[qid] = ans
    return out


# ----------------------------------------------------------------------------- the record

class VQABenchmark(QABenchmark):
    """VQA v2: soft-score BCE over the 3129 answers; official accuracy per answer and question type."""

    name, title = "vqa", "VQA v2 (accuracy, official)"
    metric_help = "VQA v2 accuracy (overall, per answer type, per question type)"
    annotation_file = "annotations"
    lr = 5e-5
    load_task = staticmethod(load_vqa_task)
    default_table = staticmethod(default_vqa_table)
    submission_writer = staticmethod(write_vqa_submission)
    submission_reader = staticmethod(read_vqa_predictions)

    def official_score(self, labels: Mapping[Any, Any], preds: Mapping[Any, Any], annotations: str,
                       choices: str | None) -> dict[str, Any]:
        anns = [a for a in read_vqa_annotations(annotations) if a.question_id in labels]
        result = vqa_accuracy(anns, preds, allow_missing=True)
        result["accuracy"] = result.pop("overall")
        return result

    def headline(self, metrics: dict[str, Any]) -> float:
        return float(metrics["overall"])

    def breakdowns(self, official: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {"per answer type": official["perAnswerType"], "per question type": official["perQuestionType"]}

    def evaluate(self, predictions: Path, annotations: Path, questions: Path | None = None,
                 rules: Rules = "current", allow_missing: bool = False) -> dict:
        """Official VQA accuracy of a results file [{question_id, answer}] against annotation files."""
        anns = list(read_vqa_annotations(existing(Path(annotations), "--annotations")))
        preds = read_vqa_predictions(existing(Path(predictions), "--predictions"))
        if questions is not None:
            asked = {q.question_id for q in read_vqa_questions(existing(Path(questions), "--questions"))}
            annotated = {a.question_id for a in anns}
            if asked != annotated:
                diff = sorted(asked ^ annotated)
                raise DataFormatError(
                    f"{questions} and {annotations} do not hold the same questions "
                    f"({len(diff)} differ, first: {diff[:5]})")
        return against(annotations, lambda: vqa_accuracy(anns, preds, rules=rules, allow_missing=allow_missing))

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--questions", type=Path, help="questions json; when given, must match the annotations")
        parser.add_argument("--annotations", type=Path, required=True, help="annotations json (ten answers each)")
        parser.add_argument("--predictions", type=Path, required=True, help="results json [{question_id, answer}]")
        parser.add_argument("--rules", choices=("current", "legacy"), default="current",
                            help="official normalisation rules: current (default) or the earlier legacy ones")


VQA = VQABenchmark()
