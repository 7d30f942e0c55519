"""GQA metrics on a hand-built questions file in the release format, values worked out by hand."""
import json

import pytest

from tasks.benchmarks import PredictionError, gqa_metrics
from tasks.data.readers import GQAChoices, read_gqa_choices, read_gqa_questions


def q(image, question, answer, balanced, types, group=None, entailed=(), semantic=()):
    structural, sem, detailed = types
    return {"imageId": image, "question": question, "answer": answer, "fullAnswer": f"{answer}.",
            "isBalanced": balanced,
            "types": {"structural": structural, "semantic": sem, "detailed": detailed},
            "groups": {"global": group, "local": "x"}, "entailed": list(entailed), "equivalent": [],
            "semantic": [{"operation": o, "argument": a, "dependencies": []} for o, a in semantic],
            "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}}


QUESTIONS = {
    "1": q("2354786", "Is the car red?", "yes", True, ("verify", "attr", "verifyAttr"), entailed=["1", "5"],
           semantic=[("select", "car"), ("verify color", "red")]),                       # 2 steps
    "2": q("2354786", "What color is the table?", "red", True, ("query", "attr", "queryAttr"), group="color",
           entailed=["5", "6"], semantic=[("select", "table"), ("query", "color")]),     # 2 steps
    "3": q("2354787", "What is the animal?", "blue", True, ("query", "attr", "queryAttr"), group="color",
           semantic=[("select", "animal"), ("query", "name")]),                          # 1 step
    "4": q("2354787", "What do the cup and plate have in common?", "material", True,
           ("compare", "obj", "twoCommon")),                                              # 0 steps
    "5": q("2354786", "Is there a red table?", "yes", False, ("verify", "attr", "existAttr"),
           semantic=[("exist", "?")]),
    "6": q("2354786", "Is the table blue?", "no", False, ("verify", "attr", "verifyAttr")),
}
PREDICTIONS = {"1": "yes", "2": "red", "3": "red", "4": "color", "5": "yes", "6": "yes"}
CHOICES = {
    "1": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
    "2": {"valid": ["red", "blue", "green"], "plausible": ["red", "blue"]},
    "3": {"valid": ["red", "blue"], "plausible": ["blue"]},
    "4": {"valid": ["material", "wood"], "plausible": ["material"]},   # overridden: "Common"
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "val_all_questions.json").write_text(json.dumps(QUESTIONS))
    (tmp_path / "val_choices.json").write_text(json.dumps(CHOICES))
    return tmp_path


def test_reader_keeps_what_the_metrics_need(files):
    qs = {x.question_id: x for x in read_gqa_questions(files / "val_all_questions.json")}
    assert list(qs) == ["1", "2", "3", "4", "5", "6"]
    assert qs["2"].img_id == "2354786" and qs["2"].global_group == "color" and qs["2"].entailed == ("5", "6")
    assert [qs[k].steps for k in "12345"] == [2, 2, 1, 0, 0]
    assert qs["5"].is_balanced is False and qs["4"].detailed == "twoCommon"


def test_all_metrics_by_hand(files):
    choices = read_gqa_choices(files / "val_choices.json")
    r = gqa_metrics(read_gqa_questions(files / "val_all_questions.json"), PREDICTIONS, choices)
    assert r["accuracy"] == 50.0                 # q1, q2 right; q3, q4 wrong (q5, q6 not balanced)
    assert r["binary"] == 50.0 and r["open"] == 50.0     # binary: q1, q4; open (query): q2, q3
    assert r["validity"] == 100.0                # q4's "color" is valid through the "Common" rule
    assert r["plausibility"] == 75.0             # q3's "red" is not plausible
    # correct q1 entails q5 (right) -> 1; correct q2 entails q5 (right), q6 (wrong) -> 0.5
    assert r["consistency"] == 75.0
    # group "color": gold {red: 1, blue: 1}, predicted {red: 2}: (2-1)^2/1 + (0-1)^2/1 = 2, / 100
    assert r["distribution"] == pytest.approx(0.02)
    assert r["accuracyPerStructuralType"] == {"verify": 100.0, "query": 50.0, "compare": 0.0}
    assert r["accuracyPerSemanticType"] == {"attr": pytest.approx(200 / 3), "obj": 0.0}
    assert r["accuracyPerSteps"] == {"2": 100.0, "1": 0.0, "0": 0.0}
    assert r["accuracyPerLength"] == {"4": 50.0, "5": 100.0, "9": 0.0}     # words per question


def test_optional_metrics_are_left_out_without_their_inputs(files):
    qs = list(read_gqa_questions(files / "val_all_questions.json"))
    preds = {k: v for k, v in PREDICTIONS.items() if k != "6"}      # an entailed question unanswered
    r = gqa_metrics(qs, preds)
    assert "consistency" not in r and "validity" not in r and "plausibility" not in r
    assert r["accuracy"] == 50.0
    balanced_only = [x for x in qs if x.is_balanced]
    assert "consistency" not in gqa_metrics(balanced_only, {k: PREDICTIONS[k] for k in "1234"})


def write_questions(path, data):
    path.write_text(json.dumps(data))
    return list(read_gqa_questions(path))


def test_choices_as_a_mapping_and_missing_choices(tmp_path):
    qs = write_questions(tmp_path / "q.json", QUESTIONS)
    full = {k: GQAChoices(frozenset(v["valid"]), frozenset(v["plausible"])) for k, v in CHOICES.items()}
    assert gqa_metrics(qs, PREDICTIONS, full)["plausibility"] == 75.0
    del full["3"]
    with pytest.raises(PredictionError, match=r"the choices lack 1 balanced questions \(first: \['3'\]\)"):
        gqa_metrics(qs, PREDICTIONS, full)


def test_missing_and_unknown_predictions(tmp_path):
    qs = write_questions(tmp_path / "q.json", QUESTIONS)
    with pytest.raises(PredictionError, match=r"1 of 4 questions have no prediction \(first: '3'\)"):
        gqa_metrics(qs, {k: PREDICTIONS[k] for k in "124"})
    r = gqa_metrics(qs, {k: PREDICTIONS[k] for k in "124"}, allow_missing=True)
    assert r["accuracy"] == 50.0
    with pytest.raises(PredictionError, match=r"unknown question ids \(first: 'x9'\)"):
        gqa_metrics(qs, {**PREDICTIONS, "x9": "yes"})
    test_split = {"t1": {"imageId": "n1", "question": "Q?", "isBalanced": True}}
    with pytest.raises(PredictionError, match="balanced question 't1' has no answer"):
        gqa_metrics(write_questions(tmp_path / "t.json", test_split), {"t1": "yes"})


def test_a_duplicated_question_is_refused(tmp_path):
    """eval.py loads the questions with json.load, which keeps the last of two equal keys (and a chunk folder
    with dict.update, the last chunk's copy); our streaming reader sees both copies, and the scorer refuses."""
    one = json.dumps(QUESTIONS["3"])
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(QUESTIONS)[:-1] + f', "3": {one}}}')
    with pytest.raises(PredictionError, match=r"^question '3' appears twice in the ground truth; each question "
                                              r"must be scored once$"):
        gqa_metrics(read_gqa_questions(path), PREDICTIONS)
