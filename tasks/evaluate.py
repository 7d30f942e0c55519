"""Score predictions with the official metrics: `python -m tasks.evaluate {vqa,gqa,nlvr2} ...`.

Prints one JSON object on stdout. Bad input (a missing or malformed file, predictions that miss
questions or name unknown ones) exits with status 2 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from extractor.jsonstream import DataFormatError
from tasks.data.readers import (
    read_gqa_choices,
    read_gqa_questions,
    read_nlvr2,
    read_vqa_annotations,
    read_vqa_questions,
)
from tasks.metrics import (
    DuplicateIdError,
    PredictionError,
    gqa_metrics,
    nlvr2_metrics,
    read_gqa_predictions,
    read_nlvr2_predictions,
    read_vqa_predictions,
    vqa_accuracy,
)


def _existing(path: Path, option: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{option}: no such file: {path}")
    return path


def _against(truth: Path, score: Callable[[], dict]) -> dict:
    """Run a scorer; an id the ground truth holds twice is reported against the ground-truth file."""
    try:
        return score()
    except DuplicateIdError as err:
        raise DataFormatError(f"{truth}: {err}") from None


def evaluate_vqa(annotations: Path, predictions: Path, questions: Path | None = None,
                 rules: str = "current", allow_missing: bool = False) -> dict:
    """Official VQA accuracy of a results file [{question_id, answer}] against annotation files."""
    anns = list(read_vqa_annotations(_existing(Path(annotations), "--annotations")))
    preds = read_vqa_predictions(_existing(Path(predictions), "--predictions"))
    if questions is not None:
        asked = {q.question_id for q in read_vqa_questions(_existing(Path(questions), "--questions"))}
        annotated = {a.question_id for a in anns}
        if asked != annotated:
            diff = sorted(asked ^ annotated)
            raise DataFormatError(
                f"{questions} and {annotations} do not hold the same questions "
                f"({len(diff)} differ, first: {diff[:5]})")
    return _against(annotations, lambda: vqa_accuracy(anns, preds, rules=rules, allow_missing=allow_missing))


def evaluate_gqa(questions: Path, predictions: Path, choices: Path | None = None,
                 allow_missing: bool = False) -> dict:
    """Official GQA metrics of a [{questionId, prediction}] file."""
    preds = read_gqa_predictions(_existing(Path(predictions), "--predictions"))
    qs = read_gqa_questions(_existing(Path(questions), "--questions"))
    ch = None if choices is None else read_gqa_choices(_existing(Path(choices), "--choices"))
    return _against(questions, lambda: gqa_metrics(qs, preds, ch, allow_missing=allow_missing))


def evaluate_nlvr2(data: Path, predictions: Path, allow_missing: bool = False) -> dict:
    """NLVR2 accuracy and consistency of an `identifier,True|False` CSV."""
    preds = read_nlvr2_predictions(_existing(Path(predictions), "--predictions"))
    examples = read_nlvr2(_existing(Path(data), "--data"))
    return _against(data, lambda: nlvr2_metrics(examples, preds, allow_missing=allow_missing))


def _vqa(args: argparse.Namespace) -> dict:
    return evaluate_vqa(args.annotations, args.predictions, args.questions, args.rules, args.allow_missing)


def _gqa(args: argparse.Namespace) -> dict:
    return evaluate_gqa(args.questions, args.predictions, args.choices, args.allow_missing)


def _nlvr2(args: argparse.Namespace) -> dict:
    return evaluate_nlvr2(args.data, args.predictions, args.allow_missing)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per benchmark."""
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    missing_help = "score questions without a prediction as wrong instead of failing"

    vqa = sub.add_parser("vqa", help="VQA v2 accuracy (overall, per answer type, per question type)")
    vqa.add_argument("--questions", type=Path, help="questions json; when given, must match the annotations")
    vqa.add_argument("--annotations", type=Path, required=True, help="annotations json (ten answers each)")
    vqa.add_argument("--predictions", type=Path, required=True, help="results json [{question_id, answer}]")
    vqa.add_argument("--rules", choices=("current", "legacy"), default="current",
                     help="official normalisation rules: current (default) or the earlier legacy ones")
    vqa.add_argument("--allow-missing", action="store_true", help=missing_help)
    vqa.set_defaults(run=_vqa)

    gqa = sub.add_parser("gqa", help="GQA accuracy, binary/open, distribution, validity, plausibility, "
                                     "consistency")
    gqa.add_argument("--questions", type=Path, required=True,
                     help="questions json (balanced or all; a folder of chunk files is read in order)")
    gqa.add_argument("--predictions", type=Path, required=True, help="[{questionId, prediction}] json")
    gqa.add_argument("--choices", type=Path, help="*_choices.json for validity and plausibility")
    gqa.add_argument("--allow-missing", action="store_true", help=missing_help)
    gqa.set_defaults(run=_gqa)

    nlvr2 = sub.add_parser("nlvr2", help="NLVR2 accuracy and consistency")
    nlvr2.add_argument("--data", type=Path, required=True, help="the split's JSON-lines file")
    nlvr2.add_argument("--predictions", type=Path, required=True, help="CSV of identifier,True|False")
    nlvr2.add_argument("--allow-missing", action="store_true", help=missing_help)
    nlvr2.set_defaults(run=_nlvr2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one evaluation; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (DataFormatError, PredictionError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
