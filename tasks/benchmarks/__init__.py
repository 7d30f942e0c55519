"""The benchmarks, one module each (vqa.py, gqa.py, nlvr2.py): a record holding everything the rest of
the project asks of a benchmark, with its official metric and submission files. This registry is the
one list of them: a new benchmark is one new module and one line here."""
from tasks.benchmarks.base import Benchmark, DuplicateIdError, PredictionError, check_coverage
from tasks.benchmarks.gqa import GQA, gqa_metrics, read_gqa_predictions, write_gqa_submission
from tasks.benchmarks.nlvr2 import NLVR2, nlvr2_metrics, read_nlvr2_predictions, write_nlvr2_submission
from tasks.benchmarks.qa import soft_score_accuracy
from tasks.benchmarks.vqa import VQA, read_vqa_predictions, vqa_accuracy, vqa_question_accuracy, write_vqa_submission

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (VQA, GQA, NLVR2)}

__all__ = [
    "BENCHMARKS",
    "GQA",
    "NLVR2",
    "VQA",
    "Benchmark",
    "DuplicateIdError",
    "PredictionError",
    "check_coverage",
    "gqa_metrics",
    "nlvr2_metrics",
    "read_gqa_predictions",
    "read_nlvr2_predictions",
    "read_vqa_predictions",
    "soft_score_accuracy",
    "vqa_accuracy",
    "vqa_question_accuracy",
    "write_gqa_submission",
    "write_nlvr2_submission",
    "write_vqa_submission",
]
