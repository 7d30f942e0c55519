"""The majority-answer baseline of each benchmark: the floor a model must clear to show it looks."""
from __future__ import annotations

from collections import Counter
from typing import Any


def majority_answer(task: str, train: list[dict]) -> Any:
    """The most frequent training answer (VQA / GQA: each question's top-scored answer; NLVR2: the label)."""
    if task == "nlvr2":
        counts = Counter(bool(e["label"]) for e in train if "label" in e)
    else:
        counts = Counter(max(e["label"].items(), key=lambda kv: (kv[1], kv[0]))[0]
                         for e in train if e.get("label"))
    if not counts:
        raise ValueError(f"{task}: no labelled training example to take a majority answer from")
    return max(counts.items(), key=lambda kv: (kv[1], str(kv[0])))[0]


def majority_predictions(task: str, train: list[dict], evaluated: list[dict]) -> dict[Any, Any]:
    """Predictions that give every evaluated example the majority training answer."""
    answer = majority_answer(task, train)
    key = "identifier" if task == "nlvr2" else "question_id"
    return {e[key]: answer for e in evaluated}
