"""NLVR2 accuracy and consistency as the official evaluation (nlvr2/eval/metrics.py) computes them."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from tasks.data.readers import NLVR2Example, nlvr2_group
from tasks.metrics.common import PredictionError, check_coverage


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
