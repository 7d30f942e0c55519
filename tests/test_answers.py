"""Answer conversion, the official VQA normalisation (hand-worked quirks), soft scores, answer tables."""
import json

import pytest

from extractor.jsonstream import DataFormatError
from tasks.data.answers import (
    CONTRACTIONS,
    AnswerTable,
    build_gqa_table,
    build_pretrain_table,
    build_vqa_table,
    convert_ans,
    convert_label,
    default_gqa_table,
    default_pretrain_table,
    default_vqa_table,
    head_init_mapping,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_label,
    vqa_soft_score,
)
from tasks.data.readers import VGQA, GQAQuestion, VQAAnnotation


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),                  # lowercase, trailing '.', number word
    ("A man", "man"),               # leading article
    ("an apple.", "apple"),
    ("The Grey", "gray"),           # article, then grey -> gray
    ("a the cat", "cat"),           # "a " then "the " (checked in that order)
    ("the a cat", "a cat"),         # "the " is checked last: "a " stays
    ("eleven", "eleven"),           # only one..ten
    ("ten", "10"),
    ("none", "none"),               # unlike the VQA normalisation
    ("yes..", "yes."),              # one '.' only
    ("", ""),
    ("the", "the"),                 # no trailing blank: not an article prefix
])
def test_convert_ans(raw, expected):
    assert convert_ans(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"),                    # comma between digits: every mark is deleted
    ("(2,5) x-ray", "25 xray"),           # ... including the others in the text
    ("yes, it is", "yes it is"),          # ", " -> the comma is deleted
    ("black/white", "black white"),       # no blank beside '/': it becomes a blank
    ("t-shirt", "t shirt"),
    ("hello (world)", "hello world "),    # " (" deletes '(' but ')' has no blank beside it
    ("yes!", "yes "),
    ("3.5", "3.5"),                       # '.' before a digit stays
    ("a.5", "a.5"),                       # no look-behind: only "followed by a digit" matters
    ("mr. t", "mr t"),
    ("end.", "end"),
    ("." * 40, "." * 8),                  # at most 32 periods are removed
    ("it's", "it's"),                     # apostrophes are kept
    ("a:b", "a:b"),                       # so are colons
    ("?", " "),
])
def test_process_punctuation_quirks(raw, expected):
    assert process_punctuation(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Two Dogs", "2 dogs"),
    ("The cat", "cat"),
    ("none", "0"),
    ("zero or one", "0 or 1"),
    ("a an the", ""),
    ("dont know", "don't know"),
    ("Im here", "im here"),               # the official capitalised keys never match
    ("somebody'd", "somebodyd"),          # the official table's odd entry
    ("  many   spaces ", "many spaces"),
])
def test_process_digit_article(raw, expected):
    assert process_digit_article(raw) == expected


def test_normalize_answer():
    assert normalize_answer("The Two Dogs!") == "2 dogs"
    assert normalize_answer("hes right.") == "he's right"
    assert normalize_answer("a, b") == "b"          # ", " deleted, then the article
    assert normalize_answer("1, 2") == "1 2"        # no digit,digit: ", " deletes the comma
    assert normalize_answer("4,5 or 6") == "45 or 6"
    assert len(CONTRACTIONS) == 116


def test_soft_scores_and_labels():
    assert [vqa_soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    with pytest.raises(ValueError, match="count"):
        vqa_soft_score(-1)
    answers = ["Two"] * 3 + ["2"] * 2 + ["three"] + ["red"] * 4
    assert vqa_label(answers) == {"2": 1.0, "3": 0.3, "red": 1.0}
    table = AnswerTable(["red", "2"])
    assert vqa_label(answers, table) == {"2": 1.0, "red": 1.0}
    assert vqa_label(["yes"] * 3 + ["no"] * 7) == {"yes": 0.9, "no": 1.0}


def test_released_tables_sizes_and_known_entries():
    vqa, gqa, pre = default_vqa_table(), default_gqa_table(), default_pretrain_table()
    assert (len(vqa), len(gqa), len(pre)) == (3129, 1842, 9500)
    assert vqa.label2ans[:2] == ["", "woods"] and vqa.label("0") == 444 and vqa.label("1") == 2195
    assert vqa.label("yes") == 425 and vqa.label("no") == 1403
    assert gqa.label2ans[:2] == ["cat food", "elephant"] and gqa.label("puddle") == 712
    assert pre.label2ans[0] == '"stop"' and pre.dsets[0] == ["visual7w"]
    assert pre.label2ans[-1] == "zucchini" and pre.dsets[-1] == ["vqa", "visual7w", "gqa"]
    assert pre.label("yes") == 9471
    assert len(default_pretrain_table(["vqa"])) == 3124 and len(default_pretrain_table(["gqa"])) == 1735
    assert len(default_pretrain_table(["vqa", "gqa", "visual7w"])) == 9500
    with pytest.raises(KeyError, match="'nope' is not in the table"):
        vqa.label("nope")


def test_head_init_mapping_follows_convert_ans():
    vqa, gqa, pre = default_vqa_table(), default_gqa_table(), default_pretrain_table()
    m = head_init_mapping(vqa, pre)
    assert len(m) == 3129 and sum(i >= 0 for i in m) == 3124
    assert m[vqa.label("yes")] == 9471 and m[0] == -1          # "" is not a pretraining answer
    absent = sorted(vqa.answer(i) for i, j in enumerate(m) if j < 0)
    assert absent == ["", "1 4", "1 world", "5 star", "visilab"]
    assert sum(i >= 0 for i in head_init_mapping(gqa, pre)) == 1736
    target = AnswerTable(["The Grey", "two.", "nothing-like-it"])
    assert head_init_mapping(target, pre) == [pre.label("gray"), pre.label("2"), -1]


def test_convert_label_keeps_the_higher_score_on_collisions():
    table = AnswerTable(["2", "dog"])
    assert convert_label({"Two": 0.3, "2": 1.0, "A dog.": 0.6, "cat": 1.0}, table) == {"2": 1.0, "dog": 0.6}


def test_table_save_load_roundtrip_in_lxmert_formats(tmp_path):
    t = AnswerTable(["b", "a", "c"], [["vqa"], ["gqa", "vqa"], ["visual7w"]])
    t.save(tmp_path / "a2l.json", tmp_path / "l2a.json")
    assert json.loads((tmp_path / "a2l.json").read_text()) == {"b": 0, "a": 1, "c": 2}
    assert json.loads((tmp_path / "l2a.json").read_text()) == ["b", "a", "c"]
    assert AnswerTable.load(tmp_path / "a2l.json", tmp_path / "l2a.json") == AnswerTable(["b", "a", "c"])
    t.save_pretrain(tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text())[1] == {"ans": "a", "dsets": ["gqa", "vqa"]}
    back = AnswerTable.load_pretrain(tmp_path / "all.json")
    assert back == t and back.subset(["gqa"]).label2ans == ["a"]


@pytest.mark.parametrize("a2l, l2a, message", [
    ({"x": 0, "y": 0}, None, "label 0 is given to 'x' and 'y'"),
    ({"x": 0, "y": 2}, None, "answer 'y' has label 2"),
    ({"x": 0, "y": 1}, ["x", "z"], "label 1 is 'z' but"),
    ({"x": 0}, ["x", "y"], "2 answers but"),
    (["x"], None, "expected an object"),
])
def test_table_load_errors_name_file_and_entry(tmp_path, a2l, l2a, message):
    (tmp_path / "a2l.json").write_text(json.dumps(a2l))
    l2a_path = None
    if l2a is not None:
        l2a_path = tmp_path / "l2a.json"
        l2a_path.write_text(json.dumps(l2a))
    with pytest.raises(DataFormatError, match=message) as err:
        AnswerTable.load(tmp_path / "a2l.json", l2a_path)
    assert "json" in str(err.value)


def test_pretrain_table_load_error_names_record(tmp_path):
    (tmp_path / "all.json").write_text(json.dumps([{"ans": "a", "dsets": ["vqa"]}, {"ans": 3, "dsets": []}]))
    with pytest.raises(DataFormatError, match=r"all.json: record 1"):
        AnswerTable.load_pretrain(tmp_path / "all.json")
    with pytest.raises(ValueError, match="'a' appears twice"):
        AnswerTable(["a", "b", "a"])


def _ann(qid, mc):
    return VQAAnnotation(qid, 1, "what", "other", mc, (mc,) * 10)


def _gqa(qid, answer):
    return GQAQuestion(qid, "1", "q?", answer, True, "query", "attr", "d", None, (), 1)


def test_build_vqa_table_counts_questions_after_normalisation():
    anns = [_ann(1, "Two"), _ann(2, "2"), _ann(3, "2."), _ann(4, "dog"), _ann(5, "Dog"), _ann(6, "cat")]
    assert build_vqa_table(anns, min_count=2).label2ans == ["2", "dog"]
    assert build_vqa_table(anns, min_count=1).label2ans == ["2", "dog", "cat"]
    assert len(build_vqa_table(anns)) == 0  # default threshold: 9 questions


def test_build_gqa_and_pretrain_tables():
    qs = [_gqa("1", "red"), _gqa("2", "red"), _gqa("3", "blue"), _gqa("4", None)]
    assert build_gqa_table(qs).label2ans == ["red", "blue"]
    assert build_gqa_table(qs, min_count=2).label2ans == ["red"]
    vg = [VGQA("1", i, "q?", a) for i, a in enumerate(["Red.", "a cat", "Grey", "red"])]
    table = build_pretrain_table(vqa=[_ann(1, "Red"), _ann(2, "two")], gqa=qs, visual7w=vg, min_count=1)
    assert table.label2ans == ["2", "blue", "cat", "gray", "red"]
    assert table.dsets == [["vqa"], ["gqa"], ["visual7w"], ["visual7w"], ["vqa", "visual7w", "gqa"]]
    per_source = build_pretrain_table(vqa=[_ann(1, "Red")], visual7w=vg, min_count={"vqa": 1, "visual7w": 2})
    assert per_source.label2ans == ["red"] and per_source.dsets == [["vqa", "visual7w"]]
