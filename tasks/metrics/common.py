"""What every metric checks first: predictions and questions match one to one."""
from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any


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
