"""Official metrics of VQA v2, GQA and NLVR2, and the benchmarks' submission files."""
from tasks.metrics.common import DuplicateIdError, PredictionError, check_coverage
from tasks.metrics.gqa import gqa_metrics
from tasks.metrics.nlvr2 import nlvr2_metrics
from tasks.metrics.submission import (
    read_gqa_predictions,
    read_nlvr2_predictions,
    read_vqa_predictions,
    write_gqa_submission,
    write_nlvr2_submission,
    write_vqa_submission,
)
from tasks.metrics.vqa import soft_score_accuracy, vqa_accuracy, vqa_question_accuracy

__all__ = [
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
