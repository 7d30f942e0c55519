import pytest

from tasks.benchmarks import BENCHMARKS


def test_majority_of_top_scored_answers():
    train = [{"question_id": 1, "label": {"red": 1.0, "blue": 0.3}},
             {"question_id": 2, "label": {"blue": 1.0}},
             {"question_id": 3, "label": {"red": 0.9, "green": 0.6}},
             {"question_id": 4, "label": {}}]
    assert BENCHMARKS["vqa"].majority_answer(train) == "red"
    evaluated = [{"question_id": "a"}, {"question_id": "b"}]
    assert BENCHMARKS["gqa"].majority_predictions(train, evaluated) == {"a": "red", "b": "red"}


def test_nlvr2_majority_label_and_empty_training_set():
    train = [{"identifier": f"x-{i}", "label": label} for i, label in enumerate((1, 0, 0))]
    assert BENCHMARKS["nlvr2"].majority_predictions(train, [{"identifier": "d-1"}]) == {"d-1": False}
    with pytest.raises(ValueError, match="vqa: no labelled training example"):
        BENCHMARKS["vqa"].majority_answer([{"question_id": 1}])
