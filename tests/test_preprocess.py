"""Builders of LXMERT's preprocessed files from tiny raw files in the datasets' own formats."""
import json
from pathlib import Path

import pytest

from extractor.jsonstream import DataFormatError
from tasks.data.answers import AnswerTable, default_vqa_table
from tasks.data.preprocess import (
    CORPUS_SPLITS,
    build_gqa_task,
    build_nlvr2_task,
    build_pretrain_corpus,
    build_vqa_task,
    corpus_split,
    write_corpus,
    write_vqa_subset,
)
from tasks.data.readers import load_gqa_task, load_nlvr2_task, load_pretrain_corpus, load_vqa_task

DEV = Path(__file__).parent / "data" / "nlvr2_dev.jsonl"


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def vqa_pair(tmp_path, subtype, image_id, qid, question, answers):
    qs = {"data_subtype": subtype,
          "questions": [{"image_id": image_id, "question": question, "question_id": qid}]}
    anns = {"annotations": [{"question_id": qid, "image_id": image_id, "question_type": "what",
                             "answer_type": "other", "multiple_choice_answer": answers[0],
                             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                         for i, a in enumerate(answers)]}]}
    return (write(tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json", qs),
            write(tmp_path / f"v2_mscoco_{subtype}_annotations.json", anns))


def test_vqa_task_entries_with_soft_labels(tmp_path):
    answers = ["Two"] * 2 + ["2"] * 2 + ["three", "3", "3", "four", "a pizza", "pizza"]
    q, a = vqa_pair(tmp_path, "val2014", 393267, 393267000, "How many?", answers)
    entries = build_vqa_task(q, a)
    assert entries == [{"question_id": 393267000, "img_id": "COCO_val2014_000000393267", "sent": "How many?",
                        "label": {"2": 1.0, "3": 0.9, "4": 0.3, "pizza": 0.6},
                        "answer_type": "other", "question_type": "what"}]
    assert load_vqa_task(write(tmp_path / "minival.json", entries)) == entries
    only_known = build_vqa_task(q, a, default_vqa_table())
    assert only_known[0]["label"] == {"2": 1.0, "3": 0.9, "4": 0.3, "pizza": 0.6}
    assert build_vqa_task(q, a, AnswerTable(["3"]))[0]["label"] == {"3": 0.9}
    assert build_vqa_task(q)[0] == {"question_id": 393267000, "img_id": "COCO_val2014_000000393267",
                                    "sent": "How many?"}


def test_vqa_task_rejects_questions_and_annotations_that_differ(tmp_path):
    q, _ = vqa_pair(tmp_path, "val2014", 1, 1000, "Q?", ["a"] * 10)
    _, other = vqa_pair(tmp_path, "train2014", 2, 2000, "Q?", ["a"] * 10)
    with pytest.raises(DataFormatError, match="no annotation for question 1000"):
        build_vqa_task(q, other)


def test_gqa_task_entries(tmp_path):
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it?", "answer": "no", "isBalanced": True},
        "t1": {"imageId": "2354786", "question": "Test?", "isBalanced": True}}
    entries = build_gqa_task(write(tmp_path / "testdev_balanced_questions.json", questions))
    assert entries == [
        {"question_id": "201307251", "img_id": "n161313", "sent": "Is it?", "label": {"no": 1.0}},
        {"question_id": "t1", "img_id": "2354786", "sent": "Test?"}]
    assert load_gqa_task(write(tmp_path / "testdev.json", entries)) == entries


def test_nlvr2_task_from_the_real_dev_split(tmp_path):
    entries = build_nlvr2_task(DEV)
    assert len(entries) == 6982
    assert entries[0] == {"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1",
                          "sent": entries[0]["sent"], "label": 0}
    assert entries[1]["label"] == 1 and entries[0]["sent"].startswith("The right image shows")
    assert sum(e["label"] for e in entries) == 3551
    assert load_nlvr2_task(write(tmp_path / "valid.json", entries[:50])) == entries[:50]


def test_corpus_split_rules():
    minival = frozenset({"COCO_val2014_000000000042"})
    assert corpus_split("COCO_train2014_000000000001", minival) == "mscoco_train"
    assert corpus_split("COCO_val2014_000000000042", minival) == "mscoco_minival"
    assert corpus_split("COCO_val2014_000000000043", minival) == "mscoco_nominival"
    assert corpus_split("2354786", minival) == "vgnococo"


@pytest.fixture
def raw(tmp_path):
    caps_train = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}],
                  "annotations": [{"id": 1, "image_id": 9, "caption": "A dog runs."},
                                  {"id": 2, "image_id": 9, "caption": "A brown dog."}]}
    caps_val = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                           {"id": 43, "file_name": "COCO_val2014_000000000043.jpg"}],
                "annotations": [{"id": 3, "image_id": 42, "caption": "Rain."},
                                {"id": 4, "image_id": 43, "caption": "Sun."}]}
    regions = [{"id": 1, "regions": [{"region_id": 10, "image_id": 1, "phrase": "green clock", "x": 0, "y": 0,
                                      "width": 1, "height": 1}]},
               {"id": 500, "regions": [{"region_id": 11, "image_id": 500, "phrase": "a dog's tail", "x": 0,
                                        "y": 0, "width": 1, "height": 1}]}]
    qas = [{"id": 1, "qas": [{"qa_id": 5, "image_id": 1, "question": "What color?", "answer": "Green."}]},
           {"id": 500, "qas": [{"qa_id": 6, "image_id": 500, "question": "Whose tail?",
                                "answer": "A dog's."}]}]
    image_data = [{"image_id": 1, "coco_id": None}, {"image_id": 500, "coco_id": 9},
                  {"image_id": 600, "coco_id": 777}]
    gqa = {"g1": {"imageId": "1", "question": "Is the clock green?", "answer": "yes", "isBalanced": True},
           "g2": {"imageId": "500", "question": "Is it a dog?", "answer": "yes", "isBalanced": True}}
    return {
        "coco_captions": [write(tmp_path / "captions_train2014.json", caps_train),
                          write(tmp_path / "captions_val2014.json", caps_val)],
        "vqa": [vqa_pair(tmp_path, "val2014", 42, 42000, "Is it raining?", ["yes"] * 8 + ["no"] * 2)],
        "vg_regions": write(tmp_path / "region_descriptions.json", regions),
        "vg_qas": write(tmp_path / "question_answers.json", qas),
        "gqa_questions": [write(tmp_path / "train_balanced_questions.json", gqa)],
        "vg_image_data": write(tmp_path / "image_data.json", image_data),
    }


def test_pretrain_corpus_one_entry_per_image_with_minival_held_out(raw, tmp_path):
    splits = build_pretrain_corpus(**raw, minival=["COCO_val2014_000000000042"])
    assert tuple(splits) == CORPUS_SPLITS
    # VG image 500 is COCO image 9: its VG and GQA data join the COCO entry
    assert splits["mscoco_train"] == [{
        "img_id": "COCO_train2014_000000000009",
        "sentf": {"mscoco": ["A dog runs.", "A brown dog."], "vg": ["a dog's tail"],
                  "visual7w": ["Whose tail?"], "gqa": ["Is it a dog?"]},
        "labelf": {"visual7w": [{"A dog's.": 1.0}], "gqa": [{"yes": 1.0}]},
    }]
    assert splits["mscoco_minival"] == [{
        "img_id": "COCO_val2014_000000000042",
        "sentf": {"mscoco": ["Rain."], "vqa": ["Is it raining?"]},
        "labelf": {"vqa": [{"yes": 1.0, "no": 0.6}]},
    }]
    assert [e["img_id"] for e in splits["mscoco_nominival"]] == ["COCO_val2014_000000000043"]
    assert splits["vgnococo"] == [{
        "img_id": "1",
        "sentf": {"vg": ["green clock"], "visual7w": ["What color?"], "gqa": ["Is the clock green?"]},
        "labelf": {"visual7w": [{"Green.": 1.0}], "gqa": [{"yes": 1.0}]},
    }]
    paths = write_corpus(splits, tmp_path / "lxmert")
    assert sorted(p.name for p in paths.values()) == sorted(f"{s}.json" for s in CORPUS_SPLITS)
    for name, path in paths.items():
        assert load_pretrain_corpus(path) == splits[name]


def test_pretrain_corpus_without_vg_image_data_keeps_vg_ids(raw):
    raw = {**raw, "vg_image_data": None}
    splits = build_pretrain_corpus(**raw)
    assert [e["img_id"] for e in splits["vgnococo"]] == ["1", "500"]
    assert splits["mscoco_train"][0]["sentf"] == {"mscoco": ["A dog runs.", "A brown dog."]}
    assert splits["mscoco_minival"] == []


def test_pretrain_corpus_rejects_unanswered_gqa(raw, tmp_path):
    test = write(tmp_path / "test_balanced_questions.json",
                 {"t": {"imageId": "1", "question": "Q?", "isBalanced": True}})
    with pytest.raises(DataFormatError, match="question 't' has no answer"):
        build_pretrain_corpus(gqa_questions=[test])


def test_pretrain_corpus_excluded_images_get_no_entry(raw):
    raw = {**raw, "vg_image_data": None}
    splits = build_pretrain_corpus(**raw, exclude=["500", "COCO_val2014_000000000043"])
    assert [e["img_id"] for e in splits["vgnococo"]] == ["1"]
    assert [e["img_id"] for e in splits["mscoco_nominival"]] == ["COCO_val2014_000000000042"]
    assert [e["img_id"] for e in splits["mscoco_train"]] == ["COCO_train2014_000000000009"]


def test_vqa_subset_keeps_only_the_wanted_questions_in_the_official_format(tmp_path):
    qs = {"info": {"v": 2}, "data_subtype": "val2014",
          "questions": [{"image_id": i, "question": f"Q{i}?", "question_id": i * 1000} for i in (1, 2, 3)]}
    anns = {"annotations": [{"question_id": i * 1000, "image_id": i, "question_type": "what",
                             "answer_type": "other", "multiple_choice_answer": "a",
                             "answers": [{"answer": "a", "answer_confidence": "yes", "answer_id": 1}]}
                            for i in (1, 2, 3)]}
    q, a = write(tmp_path / "q.json", qs), write(tmp_path / "a.json", anns)
    n = write_vqa_subset(q, a, [1000, 3000], tmp_path / "mq.json", tmp_path / "ma.json")
    assert n == 2
    sub_q = json.loads((tmp_path / "mq.json").read_text())
    assert sub_q["info"] == {"v": 2} and [x["question_id"] for x in sub_q["questions"]] == [1000, 3000]
    sub_a = json.loads((tmp_path / "ma.json").read_text())
    assert [x["question_id"] for x in sub_a["annotations"]] == [1000, 3000]
    with pytest.raises(DataFormatError, match=r"q.json: 1 of the wanted questions are absent"):
        write_vqa_subset(q, a, [1000, 9000], tmp_path / "x.json", tmp_path / "y.json")
