"""Readers of the datasets' own formats (tiny handmade files) and of LXMERT's preprocessed json."""
import json
from pathlib import Path

import pytest

from extractor.jsonstream import DataFormatError
from tasks.data.readers import (
    coco_img_id,
    load_gqa_task,
    load_nlvr2_task,
    load_pretrain_corpus,
    load_vqa_task,
    nlvr2_group,
    nlvr2_img_ids,
    read_coco_captions,
    read_gqa_choices,
    read_gqa_questions,
    read_img_id_list,
    read_nlvr2,
    read_vg_image_data,
    read_vg_objects,
    read_vg_qas,
    read_vg_regions,
    read_vqa_annotations,
    read_vqa_questions,
)

DEV = Path(__file__).parent / "data" / "nlvr2_dev.jsonl"


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_img_id_conventions():
    assert coco_img_id(132417, "train2014") == "COCO_train2014_000000132417"
    assert coco_img_id(1, "test-dev2015") == "COCO_test2015_000000000001"
    assert nlvr2_img_ids("train-10171-0-3") == ("train-10171-0-img0", "train-10171-0-img1")
    assert nlvr2_group("dev-850-2-1") == "dev-850--1"


def test_coco_captions_take_the_file_name_stem_or_the_split(tmp_path):
    data = {"info": {}, "images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "height": 480,
                                    "width": 640}, {"id": 25, "height": 1, "width": 1}],
            "licenses": [],
            "annotations": [{"id": 1, "image_id": 9, "caption": " A dog. "}, {"id": 2, "image_id": 25,
                                                                              "caption": "Two cats"}]}
    caps = list(read_coco_captions(write(tmp_path / "captions_val2014.json", data)))
    assert [(c.img_id, c.image_id, c.caption) for c in caps] == [
        ("COCO_val2014_000000000009", 9, "A dog."), ("COCO_val2014_000000000025", 25, "Two cats")]
    # annotations before images, 2017-style file names, split unknown
    data17 = {"annotations": data["annotations"][:1], "images": [{"id": 9, "file_name": "000000000009.jpg"}]}
    assert [c.img_id for c in read_coco_captions(write(tmp_path / "caps.json", data17))] == ["000000000009"]
    with pytest.raises(DataFormatError, match=r"caps2.json: annotations\[1\]: image 25 has no file_name"):
        list(read_coco_captions(write(tmp_path / "caps2.json", data)))
    assert [c.img_id for c in read_coco_captions(tmp_path / "caps2.json", split="train2014")][1] == \
        "COCO_train2014_000000000025"
    bad = {"images": [], "annotations": [{"id": 1, "image_id": 9}]}
    with pytest.raises(DataFormatError, match=r"train2014.json: annotations\[0\]: missing key 'caption'"):
        list(read_coco_captions(write(tmp_path / "captions_train2014.json", bad)))


def test_vg_region_descriptions_both_image_key_variants(tmp_path):
    region = {"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green ",
              "y": 57, "x": 421}
    for key in ("id", "image_id"):
        records = [{key: 1, "regions": [region, {**region, "region_id": 1383}]}]
        path = write(tmp_path / f"rd_{key}.json", records)
        regions = list(read_vg_regions(path))
        assert [(r.img_id, r.region_id, r.phrase, r.x, r.height) for r in regions] == [
            ("1", 1382, "the clock is green", 421, 139), ("1", 1383, "the clock is green", 421, 139)]
    no_top_key = write(tmp_path / "rd.json", [{"regions": [region]}])
    assert next(read_vg_regions(no_top_key)).img_id == "1"
    records = [{"id": 1, "regions": [region]}, {"id": 2, "regions": [{"x": 1}]}]
    broken = write(tmp_path / "rd_bad.json", records)
    with pytest.raises(DataFormatError, match=r"rd_bad.json: record 1 \(image 2\) regions\[0\]: missing key"):
        list(read_vg_regions(broken))


def test_vg_question_answers_and_image_data(tmp_path):
    qas = [{"id": 1, "qas": [{"a_objects": [], "question": "What color is the clock?", "image_id": 1,
                              "qa_id": 986768, "answer": "Green.", "q_objects": []}]},
           {"image_id": 2, "qas": []}]
    got = list(read_vg_qas(write(tmp_path / "question_answers.json", qas)))
    assert [(q.img_id, q.qa_id, q.question, q.answer) for q in got] == [
        ("1", 986768, "What color is the clock?", "Green.")]
    images = [{"width": 800, "url": "u", "height": 600, "image_id": 1, "coco_id": None, "flickr_id": None},
              {"width": 800, "height": 600, "id": 51, "coco_id": 262145}]
    got = list(read_vg_image_data(write(tmp_path / "image_data.json", images)))
    assert [(i.img_id, i.coco_id, i.width) for i in got] == [("1", None, 800), ("51", 262145, 800)]


def test_vg_objects_and_attributes_both_key_variants(tmp_path):
    new = [{"image_id": 1, "image_url": "u", "objects": [
        {"synsets": ["tree.n.01"], "h": 339, "object_id": 1058549, "merged_object_ids": [],
         "names": ["trees"], "w": 799, "y": 0, "x": 0, "attributes": ["green", "tall"]}]}]
    old = [{"id": 1, "objects": [{"id": 1058549, "x": 0, "y": 0, "w": 799, "h": 339, "name": "trees"}]}]
    a = next(read_vg_objects(write(tmp_path / "attributes.json", new)))
    b = next(read_vg_objects(write(tmp_path / "objects.json", old)))
    assert a.img_id == b.img_id == "1"
    assert a.objects[0].names == b.objects[0].names == ("trees",)
    assert a.objects[0].attributes == ("green", "tall") and b.objects[0].attributes == ()
    assert a.objects[0].object_id == b.objects[0].object_id == 1058549
    # Visual Genome's own attributes.json keeps each image's objects under "attributes"
    vg_attributes = [{"image_id": 1, "attributes": new[0]["objects"]}]
    c = next(read_vg_objects(write(tmp_path / "vg_attributes.json", vg_attributes)))
    assert c == a
    bad = [{"image_id": 1, "objects": [{"object_id": 5, "x": 0, "y": 0, "w": 1, "h": 1, "names": "tree"}]}]
    with pytest.raises(DataFormatError, match=r"record 0 \(image 1\) objects\[0\]: key 'names' should be"):
        list(read_vg_objects(write(tmp_path / "o_bad.json", bad)))
    with pytest.raises(DataFormatError, match=r"record 0: missing the image key"):
        list(read_vg_objects(write(tmp_path / "o_nokey.json", [{"objects": []}])))


def vqa_files(tmp_path):
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
          "data_subtype": "val2014",
          "questions": [{"image_id": 42, "question": "What is he holding?", "question_id": 42000},
                        {"image_id": 42, "question": "Is it raining?", "question_id": 42001}]}
    anns = {"info": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 42000, "image_id": 42, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "umbrella",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["umbrella"] * 7 + ["Umbrella", "an umbrella", "kite"])]},
        {"question_id": 42001, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["yes"] * 8 + ["no"] * 2)]}]}
    return write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", qs), \
        write(tmp_path / "v2_mscoco_val2014_annotations.json", anns)


def test_vqa_questions_and_annotations(tmp_path):
    q_path, a_path = vqa_files(tmp_path)
    qs = list(read_vqa_questions(q_path))
    assert [(q.question_id, q.img_id, q.question) for q in qs] == [
        (42000, "COCO_val2014_000000000042", "What is he holding?"),
        (42001, "COCO_val2014_000000000042", "Is it raining?")]
    anns = list(read_vqa_annotations(a_path))
    assert anns[0].answers[-3:] == ("Umbrella", "an umbrella", "kite") and anns[1].answer_type == "yes/no"
    # subtype from data_subtype when the file name has none, even when it comes after the questions
    data = json.loads(q_path.read_text())
    moved = {"questions": data["questions"], "data_subtype": "train2014"}
    assert next(read_vqa_questions(write(tmp_path / "q.json", moved))).img_id == "COCO_train2014_000000000042"
    with pytest.raises(DataFormatError, match="subtype is unknown"):
        list(read_vqa_questions(write(tmp_path / "q2.json", {"questions": data["questions"]})))
    broken = json.loads(a_path.read_text())
    broken["annotations"][1]["answers"][3] = {"answer_id": 4}
    with pytest.raises(DataFormatError, match=r"a.json: annotations\[1\].answers\[3\]: missing key 'answer'"):
        list(read_vqa_annotations(write(tmp_path / "a.json", broken)))
    with pytest.raises(DataFormatError, match="no 'annotations' array"):
        list(read_vqa_annotations(q_path))


def test_gqa_questions_from_a_file_or_a_folder_of_chunks(tmp_path):
    def question(i):
        return {"imageId": f"23{i}", "question": f"Q{i}?", "answer": "yes", "isBalanced": i % 2 == 0,
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
                "groups": {"global": None, "local": "l"}, "entailed": [], "equivalent": [str(i)],
                "semantic": []}
    folder = tmp_path / "val_all_questions"
    folder.mkdir()
    for chunk in (0, 1, 10, 2):  # numeric order: 0, 1, 2, 10
        chunk_questions = {str(chunk * 10 + k): question(k) for k in range(2)}
        write(folder / f"val_all_questions_{chunk}.json", chunk_questions)
    ids = [q.question_id for q in read_gqa_questions(folder)]
    assert ids == ["0", "1", "10", "11", "20", "21", "100", "101"]
    one = next(read_gqa_questions(folder / "val_all_questions_1.json"))
    assert (one.img_id, one.answer, one.is_balanced, one.structural) == ("230", "yes", True, "verify")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .json chunk files"):
        list(read_gqa_questions(tmp_path / "empty_dir"))
    bad = write(tmp_path / "bad.json", {"7": {"imageId": 5, "question": "Q?"}})
    with pytest.raises(DataFormatError, match=r"bad.json: question '7': key 'imageId' should be str"):
        list(read_gqa_questions(bad))
    choices = write(tmp_path / "val_choices.json", {"7": {"valid": ["a", "b"], "plausible": ["a"]}})
    assert next(read_gqa_choices(choices))[1].plausible == frozenset({"a"})


def test_nlvr2_reader_on_the_real_dev_split(tmp_path):
    examples = list(read_nlvr2(DEV))
    assert len(examples) == 6982
    first = examples[0]
    assert first.identifier == "dev-850-0-0" and first.label is False
    assert first.sentence.startswith("The right image shows a curving walkway")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}\n'
                   '{"identifier": "dev-1-0", "sentence": "s", "label": "True"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl: line 2: identifier 'dev-1-0' is not"):
        list(read_nlvr2(bad))
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "yes"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl: line 1: label should be 'True' or 'False'"):
        list(read_nlvr2(bad))


def test_lxmert_preprocessed_json_is_validated_on_load(tmp_path):
    vqa = [{"answer_type": "other", "img_id": "COCO_val2014_000000393267", "label": {"many": 1},
            "question_id": 393267000, "question_type": "how many", "sent": "How many people in the image?"}]
    assert load_vqa_task(write(tmp_path / "minival.json", vqa)) == vqa
    gqa = [{"question_id": "201307251", "img_id": "2354786", "sent": "Is it?", "label": {"yes": 1.0}}]
    assert load_gqa_task(write(tmp_path / "testdev.json", gqa)) == gqa
    nlvr2 = [{"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1", "label": 0,
              "sent": "s", "uid": "nlvr2_valid_0"}]
    assert load_nlvr2_task(write(tmp_path / "valid.json", nlvr2)) == nlvr2
    corpus = [{"img_id": "COCO_val2014_000000000042", "sentf": {"mscoco": ["a"], "vqa": ["q?"]},
               "labelf": {"vqa": [{"yes": 1.0}]}}]
    assert load_pretrain_corpus(write(tmp_path / "mscoco_minival.json", corpus)) == corpus

    with pytest.raises(DataFormatError, match=r"v.json: record 1: key 'question_id' should be int"):
        load_vqa_task(write(tmp_path / "v.json", vqa + [{**vqa[0], "question_id": "393267000"}]))
    with pytest.raises(DataFormatError, match=r"g.json: record 0: label should be \{answer: score\}"):
        load_gqa_task(write(tmp_path / "g.json", [{**gqa[0], "label": {"yes": "1"}}]))
    with pytest.raises(DataFormatError, match=r"n.json: record 0: label should be 0 or 1"):
        load_nlvr2_task(write(tmp_path / "n.json", [{**nlvr2[0], "label": 2}]))
    misaligned = [{**corpus[0], "labelf": {"vqa": [{"yes": 1.0}, {"no": 1.0}]}}]
    with pytest.raises(DataFormatError, match=r"c.json: record 0 \(image COCO_val2014_000000000042\): "
                                              r"labelf\['vqa'\] should be a list aligned with its 1"):
        load_pretrain_corpus(write(tmp_path / "c.json", misaligned))


def test_img_id_lists(tmp_path):
    (tmp_path / "minival.txt").write_text("COCO_val2014_000000000042\n\n139\n")
    assert read_img_id_list(tmp_path / "minival.txt") == ["COCO_val2014_000000000042",
                                                          "COCO_val2014_000000000139"]
    assert read_img_id_list(write(tmp_path / "ids.json", [42, "2354786x"])) == [
        "COCO_val2014_000000000042", "2354786x"]
    assert read_img_id_list(tmp_path / "minival.txt", numbers_as=None) == ["COCO_val2014_000000000042", "139"]
    ids = read_img_id_list(tmp_path / "minival.txt", numbers_as="train2014")
    assert ids[1] == "COCO_train2014_000000000139"
    with pytest.raises(DataFormatError, match=r"bad.json: entry 0"):
        read_img_id_list(write(tmp_path / "bad.json", [1.5]))
