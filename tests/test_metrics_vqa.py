"""Official VQA accuracy (current and legacy rules) and LXMERT's soft score, on hand-worked cases."""
import pytest

from tasks.benchmarks import PredictionError, soft_score_accuracy, vqa_accuracy, vqa_question_accuracy
from tasks.data.readers import VQAAnnotation


def answers(*groups):
    """Ten answers from (answer, count) pairs."""
    out = [a for a, n in groups for _ in range(n)]
    assert len(out) == 10
    return out


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_average_gives_the_soft_score(matches, expected):
    gts = answers(("red", matches), ("blue", 10 - matches)) if matches < 10 else ["red"] * 10
    # per annotator: min(1, matches among the other nine / 3), averaged over the ten
    assert vqa_question_accuracy("red", gts) == pytest.approx(expected)


def test_current_rules_normalise_only_when_the_humans_disagree():
    all_yes = ["yes"] * 10
    assert vqa_question_accuracy("yes", all_yes) == 1.0
    assert vqa_question_accuracy(" yes\n", all_yes) == 1.0        # tabs/newlines/outer blanks go first
    assert vqa_question_accuracy("Yes", all_yes) == 0.0           # identical answers: no normalisation
    assert vqa_question_accuracy("yes.", all_yes) == 0.0
    mixed = answers(("yes", 9), ("Yes", 1))
    assert vqa_question_accuracy("YES!", mixed) == 1.0            # differing: both sides normalised
    assert vqa_question_accuracy("Two", answers(("2", 3), ("two", 3), ("3", 4))) == 1.0
    assert vqa_question_accuracy("the dog", answers(("dog", 1), ("cat", 9))) == pytest.approx(0.3)


def test_legacy_rules_always_normalise_the_prediction_and_only_punctuate_the_humans():
    all_yes = ["yes"] * 10
    assert vqa_question_accuracy("Yes", all_yes, rules="legacy") == 1.0
    # the humans' "the dog" keeps its article under legacy rules, the prediction loses it
    gts = answers(("the dog", 4), ("cat", 6))
    assert vqa_question_accuracy("the dog", gts, rules="current") == 1.0
    assert vqa_question_accuracy("the dog", gts, rules="legacy") == 0.0
    assert vqa_question_accuracy("dog", gts, rules="legacy") == 0.0
    # punctuation is applied to differing human answers: "dog!" -> "dog "
    assert vqa_question_accuracy("dog", answers(("dog!", 4), ("cat", 6)), rules="legacy") == 0.0
    slash = answers(("black/white", 4), ("cat", 6))
    assert vqa_question_accuracy("black white", slash, rules="legacy") == 1.0
    with pytest.raises(ValueError, match="rules"):
        vqa_question_accuracy("x", all_yes, rules="newest")


def test_none_maps_to_zero_in_the_official_normalisation():
    gts = answers(("none", 1), ("nothing", 9))
    assert vqa_question_accuracy("none", gts) == pytest.approx(0.3)
    assert vqa_question_accuracy("0", gts) == pytest.approx(0.3)
    assert vqa_question_accuracy("none", gts, rules="legacy") == 0.0     # "0" vs the humans' "none"


def ann(qid, qtype, atype, gts):
    return VQAAnnotation(qid, 1, qtype, atype, gts[0], tuple(gts))


ANNS = [
    ann(1, "is this", "yes/no", ["yes"] * 10),
    ann(2, "how many", "number", answers(("2", 1), ("3", 9))),
    ann(3, "what color is the", "other", answers(("red", 2), ("blue", 8))),
    ann(4, "what color is the", "other", answers(("blue", 10))),
]


def test_vqa_accuracy_overall_and_per_type_x100_rounded():
    preds = {1: "yes", 2: "two", 3: "red", 4: "Blue"}  # 1, 0.3, 0.6, 0 (identical answers: verbatim)
    result = vqa_accuracy(ANNS, preds)
    assert result == {
        "overall": 47.5,
        "perQuestionType": {"is this": 100.0, "how many": 30.0, "what color is the": 30.0},
        "perAnswerType": {"yes/no": 100.0, "number": 30.0, "other": 30.0},
    }
    assert vqa_accuracy(ANNS, preds, rules="legacy")["overall"] == 72.5   # "Blue" -> "blue" counts
    three = vqa_accuracy(ANNS[:3], {1: "yes", 2: "2", 3: "red"})
    assert three["overall"] == 63.33                                        # (1 + 0.3 + 0.6) / 3


def test_missing_and_unknown_predictions():
    with pytest.raises(PredictionError, match=r"2 of 4 questions have no prediction \(first: 3, 4\)"):
        vqa_accuracy(ANNS, {1: "yes", 2: "3"})
    partial = vqa_accuracy(ANNS, {1: "yes", 2: "3"}, allow_missing=True)
    assert partial["overall"] == 50.0 and partial["perAnswerType"]["other"] == 0.0
    with pytest.raises(PredictionError, match=r"1 predictions are for unknown question ids \(first: 99\)"):
        vqa_accuracy(ANNS, {1: "yes", 2: "3", 3: "red", 4: "blue", 99: "x"}, allow_missing=True)


def test_soft_score_accuracy_is_the_mean_label_score():
    labels = {1: {"yes": 1.0}, 2: {"2": 0.3, "3": 1.0}, 3: {"red": 0.6}, 4: {"a": 1.0}}
    assert soft_score_accuracy({1: "yes", 2: "2", 3: "blue"}, labels) == pytest.approx((1 + 0.3 + 0) / 3)
    with pytest.raises(PredictionError, match="1 predictions have no label"):
        soft_score_accuracy({5: "x"}, labels)


def test_a_duplicated_annotation_is_refused_not_scored_twice():
    """vqaEval.py scores every entry of the annotations list, so a repeated question counts twice (against the
    last copy's answers); the three scorers here refuse any ground-truth id met twice."""
    twice = [*ANNS, ann(3, "what color is the", "other", answers(("red", 10)))]
    with pytest.raises(PredictionError, match=r"^question 3 appears twice in the ground truth; each question "
                                              r"must be scored once$"):
        vqa_accuracy(twice, {1: "yes", 2: "two", 3: "red", 4: "Blue"})
    with pytest.raises(PredictionError, match="question 3 appears twice"):
        vqa_accuracy(twice, {1: "yes"}, allow_missing=True)
