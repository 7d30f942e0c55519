"""VQA v2 accuracy as the official evaluation (vqaEval.py) computes it, and LXMERT's soft score."""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Literal

from tasks.data.answers import normalize_answer, process_punctuation
from tasks.data.readers import VQAAnnotation
from tasks.metrics.common import PredictionError, check_coverage

Rules = Literal["current", "legacy"]


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
