"""NLVR2 metrics on the real dev split, and the three submission formats."""
import json
from pathlib import Path

import pytest

from extractor.jsonstream import DataFormatError
from tasks.benchmarks import (
    PredictionError,
    nlvr2_metrics,
    read_gqa_predictions,
    read_nlvr2_predictions,
    read_vqa_predictions,
    write_gqa_submission,
    write_nlvr2_submission,
    write_vqa_submission,
)
from tasks.data.readers import nlvr2_group, read_nlvr2

DEV = Path(__file__).parent / "data" / "nlvr2_dev.jsonl"


@pytest.fixture(scope="module")
def dev():
    return list(read_nlvr2(DEV))


def test_all_true_scores_the_share_of_true_labels(dev):
    raw = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    assert len(dev) == len(raw) == 6982
    share_true = sum(r["label"] == "True" for r in raw) / len(raw)
    r = nlvr2_metrics(dev, {e.identifier: True for e in dev})
    assert r["accuracy"] == share_true == 3551 / 6982
    assert r["consistency"] == 78 / 2018   # groups whose labels are all True, of 2018 sentences
    perfect = nlvr2_metrics(dev, {e.identifier: e.label for e in dev})
    assert perfect == {"accuracy": 1.0, "consistency": 1.0}


def test_consistency_by_hand_on_the_first_two_sentences(dev):
    # both sentences of set 850 are True for image pairs 1 and 2, False for pairs 0 and 3
    first8 = dev[:8]
    assert {nlvr2_group(e.identifier) for e in first8} == {"dev-850--0", "dev-850--1"}
    labels = {e.identifier: e.label for e in first8}
    assert labels == {"dev-850-0-0": False, "dev-850-2-0": True, "dev-850-3-0": False, "dev-850-1-0": True,
                      "dev-850-1-1": True, "dev-850-0-1": False, "dev-850-3-1": False, "dev-850-2-1": True}
    assert nlvr2_metrics(first8, {i: True for i in labels}) == {"accuracy": 0.5, "consistency": 0.0}
    one_wrong = {**labels, "dev-850-3-1": True}
    assert nlvr2_metrics(first8, one_wrong) == {"accuracy": 7 / 8, "consistency": 0.5}


def test_missing_unknown_and_unlabeled(dev):
    preds = {e.identifier: True for e in dev[:8]}
    del preds["dev-850-1-1"]
    with pytest.raises(PredictionError, match=r"1 of 8 examples have no prediction \(first: 'dev-850-1-1'\)"):
        nlvr2_metrics(dev[:8], preds)
    assert nlvr2_metrics(dev[:8], preds, allow_missing=True)["accuracy"] == 3 / 8
    with pytest.raises(PredictionError, match="unknown example ids"):
        nlvr2_metrics(dev[:8], {**preds, "dev-1-1-1": False}, allow_missing=True)
    hidden = [type(dev[0])(e.identifier, e.sentence, None, None, None) for e in dev[:2]]
    with pytest.raises(PredictionError, match="2 examples have no label"):
        nlvr2_metrics(hidden, {e.identifier: True for e in hidden})


def test_submission_files_roundtrip(tmp_path):
    write_vqa_submission(tmp_path / "vqa.json", {7: "yes", 8: "2"})
    assert json.loads((tmp_path / "vqa.json").read_text()) == [
        {"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "2"}]
    assert read_vqa_predictions(tmp_path / "vqa.json") == {7: "yes", 8: "2"}
    write_gqa_submission(tmp_path / "gqa.json", {"201": "red"})
    assert json.loads((tmp_path / "gqa.json").read_text()) == [{"questionId": "201", "prediction": "red"}]
    assert read_gqa_predictions(tmp_path / "gqa.json") == {"201": "red"}
    write_nlvr2_submission(tmp_path / "nlvr2.csv", {"dev-850-0-0": False, "dev-850-2-0": 1})
    assert (tmp_path / "nlvr2.csv").read_text() == "dev-850-0-0,False\ndev-850-2-0,True\n"
    assert read_nlvr2_predictions(tmp_path / "nlvr2.csv") == {"dev-850-0-0": False, "dev-850-2-0": True}
    with pytest.raises(ValueError, match="is not a boolean"):
        write_nlvr2_submission(tmp_path / "x.csv", {"dev-1-0-0": "yes"})
    assert not (tmp_path / "x.csv").exists()


def test_prediction_readers_reject_malformed_records(tmp_path):
    records = [{"question_id": 1, "answer": "a"}, {"question_id": "2", "answer": "b"}]
    (tmp_path / "v.json").write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"v.json: record 1: question_id should be an integer"):
        read_vqa_predictions(tmp_path / "v.json")
    (tmp_path / "d.json").write_text(json.dumps([{"question_id": 1, "answer": "a"}] * 2))
    with pytest.raises(DataFormatError, match=r"record 1: question 1 is predicted twice"):
        read_vqa_predictions(tmp_path / "d.json")
    (tmp_path / "g.json").write_text(json.dumps([{"questionId": "1"}]))
    with pytest.raises(DataFormatError, match=r"g.json: record 0: expected \{'questionId', 'prediction'\}"):
        read_gqa_predictions(tmp_path / "g.json")
    (tmp_path / "n.csv").write_text("identifier,prediction\ndev-1-0-0,true\n\ndev-1-1-0,maybe\n")
    with pytest.raises(DataFormatError, match=r"n.csv: line 4: expected `identifier,True\|False`"):
        read_nlvr2_predictions(tmp_path / "n.csv")


def test_a_duplicated_example_is_refused_not_scored_twice(dev):
    """metrics.py counts each line of the labels file (a repeat would count twice; with every identifier
    predicted it stops at its own 'Some predictions are missing!' check); here a repeat is refused."""
    twice = [*dev[:8], dev[3]]
    with pytest.raises(PredictionError, match=r"^example 'dev-850-1-0' appears twice in the ground truth"):
        nlvr2_metrics(twice, {e.identifier: True for e in dev[:8]})
