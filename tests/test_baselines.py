import pytest

from tasks.baselines import majority_answer, majority_predictions


def test_majority_of_top_scored_answers():
    train = [{"question_id": 1, "label": {"red": 1.0, "blue": 0.3}},
             {"question_id": 2, "label": {"blue": 1.0}},
             {"question_id": 3, "label": {"red": 0.9, "green": 0.6}},
             {"question_id": 4, "label": {}}]
    assert majority_answer("vqa", train) == "red"
    assert majority_predictions("gqa", train, [{"question_id": "a"}, {"question_id": "b"}]) == {"a": "red",
                                                                                              "b": "red"}


def test_nlvr2_majority_label_and_empty_training_set():
    train = [{"identifier": f"x-{i}", "label": label} for i, label in enumerate((1, 0, 0))]
    assert majority_predictions("nlvr2", train, [{"identifier": "d-1"}]) == {"d-1": False}
    with pytest.raises(ValueError, match="vqa: no labelled training example"):
        majority_answer("vqa", [{"question_id": 1}])
