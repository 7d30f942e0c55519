"""Submission files of the three benchmarks: writers (atomic) and validating readers."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from extractor.jsonstream import DataFormatError, iter_array, write_json_atomic, write_text_atomic

PathLike = str | os.PathLike[str]


def write_vqa_submission(path: PathLike, predictions: Mapping[int, str]) -> None:
    """VQA results [{"question_id": int, "answer": str}], the format the VQA servers take."""
    write_json_atomic(path, [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()])


def write_gqa_submission(path: PathLike, predictions: Mapping[str, str]) -> None:
    """GQA predictions [{"questionId": str, "prediction": str}]."""
    write_json_atomic(path, [{"questionId": str(q), "prediction": str(p)} for q, p in predictions.items()])


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


def _records(path: Path, keys: tuple[str, str]) -> list[tuple[int, object, object]]:
    out = []
    for i, rec in enumerate(iter_array(path)):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise DataFormatError(f"{path}: record {i}: expected {{{', '.join(repr(k) for k in keys)}}}, "
                                  f"got {rec!r:.80}")
        out.append((i, rec[keys[0]], rec[keys[1]]))
    return out


def read_vqa_predictions(path: PathLike) -> dict[int, str]:
    """{question_id: answer} from a VQA results file; ids must be integers and unique."""
    path = Path(path)
    out: dict[int, str] = {}
    for i, qid, ans in _records(path, ("question_id", "answer")):
        if isinstance(qid, bool) or not isinstance(qid, int) or not isinstance(ans, str):
            raise DataFormatError(f"{path}: record {i}: question_id should be an integer and answer "
                                  f"a string, got {qid!r}, {ans!r:.80}")
        if qid in out:
            raise DataFormatError(f"{path}: record {i}: question {qid} is predicted twice")
        out[qid] = ans
    return out


def read_gqa_predictions(path: PathLike) -> dict[str, str]:
    """{questionId: prediction} from a GQA predictions file; ids are strings (integers accepted)."""
    path = Path(path)
    out: dict[str, str] = {}
    for i, qid, pred in _records(path, ("questionId", "prediction")):
        if isinstance(qid, bool) or not isinstance(qid, str | int) or not isinstance(pred, str):
            raise DataFormatError(f"{path}: record {i}: questionId and prediction should be strings, "
                                  f"got {qid!r}, {pred!r:.80}")
        if str(qid) in out:
            raise DataFormatError(f"{path}: record {i}: question {qid!r} is predicted twice")
        out[str(qid)] = pred
    return out


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
