"""The demo world: deterministic, in the real datasets' formats, and its answers are what is drawn."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import pytest

from tasks.demo import (
    COLORS,
    PRESETS,
    SHAPES,
    SOURCES_FILE,
    WorldConfig,
    generate_world,
    read_manifest,
    world_path,
)
from tasks.demo import world as world_module
from tasks.demo.__main__ import main as cli_main
from tasks.demo.scene import PLURALS, nearest_color
from tasks.demo.sources import DETECTOR_CONFIG

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
SMALL = dataclasses.replace(TINY, coco_train_images=2, coco_val_images=2, vg_train_images=2, vg_val_images=2,
                            nlvr2_train_sets=1, nlvr2_dev_sets=1)
NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "world"
    generate_world(root, seed=0, config=TINY, workers=1)
    return root


def load(root: Path, *keys: str):
    return json.loads(world_path(root, *keys).read_text())


def nlvr2_rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in world_path(root, "nlvr2", "data", split).read_text().splitlines()]


def scene_graphs(root: Path) -> dict:
    return json.loads(world_path(root, "scene_graphs").read_text())


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- determinism and atomic writing

def test_same_seed_same_bytes_across_processes_and_threads(world: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    cmd = [sys.executable, "-m", "tasks.demo", "--out", str(other), "--seed", "0", "--size", "tiny",
           "--workers", "2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["world"] == str(other)
    a, b = tree(world), tree(other)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_another_seed_gives_another_world(tmp_path: Path) -> None:
    for seed in (0, 1):
        generate_world(tmp_path / str(seed), seed=seed, config=SMALL, workers=1)
    for keys in (("vqa", "questions", "train2014"), ("gqa", "questions", "train"), ("scene_graphs",)):
        first, second = (world_path(tmp_path / str(seed), *keys).read_bytes() for seed in (0, 1))
        assert first != second


def test_existing_world_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "w"
    generate_world(out, seed=3, config=SMALL, workers=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_world(out, seed=4, config=SMALL, workers=1)
    assert read_manifest(out)["seed"] == 3
    generate_world(out, seed=4, config=SMALL, overwrite=True, workers=1)
    assert read_manifest(out)["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(w):
        raise RuntimeError("disk full")

    monkeypatch.setattr(world_module, "_nlvr2", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_world(tmp_path / "w", seed=0, config=TINY, workers=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="world.json is missing"):
        read_manifest(tmp_path / "w")


def test_cli_refuses_existing_folder_and_bad_sizes(world: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in ((["--out", str(world), "--size", "tiny"], "already exists"),
                          (["--out", str(world) + "-new", "--max-objects", "9"], "max_objects <= 8")):
        with pytest.raises(SystemExit) as stop:
            cli_main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not Path(str(world) + "-new").exists()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=0)
    with pytest.raises(ValueError, match="minival_images"):
        WorldConfig(coco_val_images=10, minival_images=11)
    with pytest.raises(ValueError, match="nlvr2_pairs_per_set"):
        WorldConfig(nlvr2_pairs_per_set=1)


# ---------------------------------------------------------------- the real formats, field by field

def test_manifest_lists_every_file(world: Path) -> None:
    manifest = read_manifest(world)
    assert manifest["seed"] == 0 and manifest["config"] == dataclasses.asdict(TINY)
    assert manifest["image_size"] == [128, 128]

    def paths(entry):
        return [entry] if isinstance(entry, str) else [p for v in entry.values() for p in paths(v)]

    listed = paths(manifest["files"])
    assert all((world / p).exists() for p in listed)
    on_disk = {str(p.relative_to(world)) for p in world.rglob("*") if p.is_file() and p.suffix != ".png"}
    # beside the manifest: the sources file naming what the pipeline reads, and the detector it trains
    assert on_disk == {p for p in listed if (world / p).is_file()} | {"world.json", SOURCES_FILE, DETECTOR_CONFIG}
    with pytest.raises(KeyError, match="no files entry"):
        world_path(world, "vqa", "nope")


def test_coco_and_vqa_formats(world: Path) -> None:
    for split in ("train2014", "val2014"):
        caps = load(world, "coco", "captions", split)
        assert {"images", "annotations"} <= set(caps)
        assert all(set(im) == {"id", "file_name", "height", "width"} for im in caps["images"])
        assert all(set(a) == {"id", "image_id", "caption"} for a in caps["annotations"])
        per_image = Counter(a["image_id"] for a in caps["annotations"])
        assert set(per_image.values()) == {TINY.captions_per_image}
        questions = load(world, "vqa", "questions", split)
        assert questions["data_subtype"] == split and questions["task_type"] == "Open-Ended"
        assert all(set(q) == {"image_id", "question", "question_id"} for q in questions["questions"])
        anns = load(world, "vqa", "annotations", split)["annotations"]
        assert [a["question_id"] for a in anns] == [q["question_id"] for q in questions["questions"]]
        for a in anns:
            assert set(a) == {"question_id", "image_id", "question_type", "answer_type",
                              "multiple_choice_answer", "answers"}
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
            counts = Counter(x["answer"] for x in a["answers"])
            assert counts[a["multiple_choice_answer"]] == max(counts.values())
    noisy = [x["answer"] for a in load(world, "vqa", "annotations", "train2014")["annotations"]
             for x in a["answers"] if x["answer"] != a["multiple_choice_answer"]]
    assert 0 < len(noisy) < 0.2 * 10 * len(load(world, "vqa", "annotations", "train2014")["annotations"])


def test_visual_genome_formats(world: Path) -> None:
    objects, attributes = load(world, "vg", "objects"), load(world, "vg", "attributes")
    assert all(set(e) == {"image_id", "objects"} for e in objects)
    assert all(set(e) == {"image_id", "attributes"} for e in attributes)  # as Visual Genome's own file
    for entry in objects:
        for o in entry["objects"]:
            assert {"object_id", "x", "y", "w", "h", "names", "attributes"} <= set(o)
            assert o["names"][0] in SHAPES and len(o["attributes"]) == 2
    assert [e["attributes"] for e in attributes] == [e["objects"] for e in objects]
    regions = load(world, "vg", "region_descriptions")
    assert all(set(e) == {"id", "regions"} for e in regions)
    assert all(set(r) == {"region_id", "image_id", "phrase", "x", "y", "width", "height"} and
               r["image_id"] == e["id"] for e in regions for r in e["regions"])
    qas = load(world, "vg", "question_answers")
    assert all(set(e) == {"id", "qas"} for e in qas)
    assert all(set(q) == {"qa_id", "image_id", "question", "answer"} and q["answer"].endswith(".")
               for e in qas for q in e["qas"])
    image_data = load(world, "vg", "image_data")
    assert all({"image_id", "width", "height", "url", "coco_id"} <= set(e) for e in image_data)
    object_ids = [o["object_id"] for e in objects for o in e["objects"]]
    assert len(set(object_ids)) == len(object_ids)


def test_gqa_format_and_links(world: Path) -> None:
    for split in ("train", "val"):
        questions = load(world, "gqa", "questions", split)
        choices = load(world, "gqa", "choices", split)
        assert sorted(choices) == sorted(questions)
        for qid, q in questions.items():
            assert re.fullmatch(r"\d{8}", qid)
            assert {"imageId", "question", "answer", "fullAnswer", "isBalanced", "types", "entailed",
                    "equivalent", "groups", "semantic"} <= set(q)
            assert q["isBalanced"] is True and isinstance(q["imageId"], str)
            assert set(q["types"]) == {"structural", "semantic", "detailed"}
            assert q["types"]["structural"] in ("query", "verify", "logical", "choose", "compare")
            assert set(q["groups"]) == {"global", "local"}
            assert all({"operation", "dependencies", "argument"} == set(s) for s in q["semantic"])
            assert qid in q["equivalent"] and qid not in q["entailed"]
            for other in q["entailed"] + q["equivalent"]:
                assert questions[other]["imageId"] == q["imageId"]
            assert q["answer"] in choices[qid]["valid"]
            assert (q["types"]["structural"] == "query") == (q["groups"]["global"] is not None)
        assert sum(len(q["entailed"]) for q in questions.values()) > 0
        structural = Counter(q["types"]["structural"] for q in questions.values())
        assert set(structural) == {"query", "verify", "logical", "choose", "compare"}


def test_gqa_entailed_answers_follow(world: Path) -> None:
    """A colour query entails the verify / choose questions on the same object: their answers must agree."""
    questions = load(world, "gqa", "questions", "train")
    checked = 0
    for q in questions.values():
        m = re.fullmatch(r"(?:What|Which) color is the (.+)\?", q["question"])
        for other in q["entailed"] if m else []:
            e = questions[other]
            v = re.fullmatch(rf"Is the {re.escape(m.group(1))} (\w+)\?", e["question"])
            if v:
                assert e["answer"] == ("yes" if v.group(1) == q["answer"] else "no")
                checked += 1
            c = re.fullmatch(rf"Is the {re.escape(m.group(1))} (\w+) or (\w+)\?", e["question"])
            if c:
                assert e["answer"] == q["answer"] and q["answer"] in c.groups()
                checked += 1
    assert checked > 0


def test_nlvr2_format(world: Path) -> None:
    for split in ("train", "dev"):
        rows = nlvr2_rows(world, split)
        assert len(rows) == TINY.nlvr2_pairs_per_set * TINY.nlvr2_sentences_per_set * (
            TINY.nlvr2_train_sets if split == "train" else TINY.nlvr2_dev_sets)
        for r in rows:
            assert {"identifier", "sentence", "left_url", "right_url", "label"} <= set(r)
            assert re.fullmatch(rf"{split}-\d+-\d+-\d+", r["identifier"])
            assert r["label"] in ("True", "False")


def test_label_files(world: Path) -> None:
    manifest = read_manifest(world)
    objects = world_path(world, "labels", "objects").read_text().splitlines()
    lines = world_path(world, "labels", "attributes").read_text().splitlines()
    attributes = [line.split(",")[0] for line in lines]
    assert objects == manifest["classes"]["objects"] == list(SHAPES)
    assert attributes == manifest["classes"]["attributes"]
    used = {a for e in load(world, "vg", "objects") for o in e["objects"] for a in o["attributes"]}
    assert used <= set(attributes)


# ---------------------------------------------------------------- ids and files on disk agree

def test_ids_match_files(world: Path) -> None:
    for split in ("train2014", "val2014"):
        images = load(world, "coco", "captions", split)["images"]
        folder = world_path(world, "coco", "images", split)
        assert sorted(p.name for p in folder.iterdir()) == sorted(im["file_name"] for im in images)
        assert all(im["file_name"] == f"COCO_{split}_{im['id']:012d}.png" for im in images)
        ids = {im["id"] for im in images}
        assert {q["image_id"] for q in load(world, "vqa", "questions", split)["questions"]} <= ids
        assert {a["image_id"] for a in load(world, "coco", "captions", split)["annotations"]} == ids
    train_ids = {im["id"] for im in load(world, "coco", "captions", "train2014")["images"]}
    val_stems = {Path(im["file_name"]).stem for im in load(world, "coco", "captions", "val2014")["images"]}
    assert not train_ids & {im["id"] for im in load(world, "coco", "captions", "val2014")["images"]}
    minival = world_path(world, "splits", "coco_minival").read_text().split()
    assert set(minival) == val_stems and len(minival) == TINY.coco_val_images

    vg_ids = [e["image_id"] for e in load(world, "vg", "image_data")]
    on_disk = sorted(p.name for p in world_path(world, "vg", "images").iterdir())
    assert on_disk == sorted(f"{i}.png" for i in vg_ids)
    assert [e["image_id"] for e in load(world, "vg", "objects")] == vg_ids
    assert [e["id"] for e in load(world, "vg", "region_descriptions")] == vg_ids
    assert [e["id"] for e in load(world, "vg", "question_answers")] == vg_ids
    gqa_images = {s: {q["imageId"] for q in load(world, "gqa", "questions", s).values()}
                  for s in ("train", "val")}
    vg_val = world_path(world, "splits", "vg_val").read_text().split()
    assert gqa_images["val"] == set(vg_val) and len(vg_val) == TINY.vg_val_images
    assert gqa_images["train"] == {str(i) for i in vg_ids} - set(vg_val)
    heldout = world_path(world, "splits", "heldout").read_text().split()
    assert heldout == minival + vg_val

    for split in ("train", "dev"):
        rows = nlvr2_rows(world, split)
        folder = world_path(world, "nlvr2", "images", split)
        expected = set()
        for r in rows:
            pair = r["identifier"].rsplit("-", 1)[0]
            assert (world / r["left_url"]).name == f"{pair}-img0.png" and (world / r["right_url"]).is_file()
            expected |= {f"{pair}-img0.png", f"{pair}-img1.png"}
        assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    assert len(scene_graphs(world)) == sum(1 for _ in world.rglob("*.png"))


# ---------------------------------------------------------------- scene graphs, pixels and answers agree

def test_scene_graphs_match_pixels_and_vg_boxes(world: Path) -> None:
    graphs = scene_graphs(world)
    files = {p.stem: p for p in world.rglob("*.png")}
    for stem, graph in graphs.items():
        bgr = cv2.imread(str(files[stem]), cv2.IMREAD_COLOR)
        assert bgr.shape == (graph["height"], graph["width"], 3)
        rgb = bgr[..., ::-1]
        boxes = []
        for o in graph["objects"]:
            x, y, w, h = o["x"], o["y"], o["w"], o["h"]
            assert 0 <= x and 0 <= y and x + w <= graph["width"] and y + h <= graph["height"]
            assert nearest_color(rgb[y + h // 2, x + w // 2]) == o["color"]
            assert (o["size"] == "large") == (w >= 28)
            boxes.append((x, y, x + w, y + h))
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "objects overlap"
    for entry in load(world, "vg", "objects"):
        drawn = graphs[str(entry["image_id"])]["objects"]
        written = [(o["names"][0], o["attributes"], o["x"], o["y"], o["w"], o["h"]) for o in entry["objects"]]
        truth = [(o["shape"], [o["color"], o["size"]], o["x"], o["y"], o["w"], o["h"]) for o in drawn]
        assert written == truth


def _count(objects: list[dict], **attrs: str) -> int:
    return sum(all(o[k] == v for k, v in attrs.items()) for o in objects)


def test_vqa_answers_agree_with_scene(world: Path) -> None:
    graphs = scene_graphs(world)
    checked = Counter()
    for split in ("train2014", "val2014"):
        qs = load(world, "vqa", "questions", split)["questions"]
        anns = load(world, "vqa", "annotations", split)["annotations"]
        for q, a in zip(qs, anns):
            objects = graphs[f"COCO_{split}_{q['image_id']:012d}"]["objects"]
            text, answer = q["question"], a["multiple_choice_answer"]
            singular = {PLURALS[s]: s for s in SHAPES}
            if text in ("How many shapes are there?", "How many objects are in the picture?"):
                assert answer == str(len(objects))
            elif m := re.fullmatch(r"How many (\w+) are there\?", text):
                assert answer == str(_count(objects, shape=singular[m.group(1)]))
            elif m := re.fullmatch(r"How many (\w+) objects are there\?", text):
                assert answer == str(_count(objects, color=m.group(1)))
            elif m := re.fullmatch(r"How many (\w+) (\w+) are there\?", text):
                assert answer == str(_count(objects, color=m.group(1), shape=singular[m.group(2)]))
            elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", text):
                assert answer == ("yes" if _count(objects, color=m.group(1), shape=m.group(2)) else "no")
            elif m := re.fullmatch(r"What color is the (\w+)\?", text):
                (o,) = [o for o in objects if o["shape"] == m.group(1)]
                assert answer == o["color"]
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", text):
                attr = "color" if m.group(1) in COLORS else "size"
                (o,) = [o for o in objects if o[attr] == m.group(1)]
                assert answer == o["shape"]
            else:
                continue
            checked[text.split()[0]] += 1
    assert set(checked) == {"How", "Is", "What"}


def test_vg_and_gqa_answers_agree_with_scene(world: Path) -> None:
    graphs = scene_graphs(world)
    checked = 0
    for entry in load(world, "vg", "question_answers"):
        objects = graphs[str(entry["id"])]["objects"]
        for qa in entry["qas"]:
            if m := re.fullmatch(r"How many (\w+) are there\?", qa["question"]):
                said = qa["answer"].rstrip(".").lower()
                shape = {PLURALS[s]: s for s in SHAPES}[m.group(1)]
                assert NUMBERS.get(said, said) == str(_count(objects, shape=shape))
                checked += 1
    for split in ("train", "val"):
        for q in load(world, "gqa", "questions", split).values():
            objects = graphs[q["imageId"]]["objects"]
            if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q["question"]):
                assert q["answer"] == ("yes" if _count(objects, color=m.group(1), shape=m.group(2)) else "no")
                checked += 1
            elif m := re.fullmatch(r"Are the (\w+) and the (\w+) the same color\?", q["question"]):
                (a,) = [o for o in objects if o["shape"] == m.group(1)]
                (b,) = [o for o in objects if o["shape"] == m.group(2)]
                assert q["answer"] == ("yes" if a["color"] == b["color"] else "no")
                checked += 1
    assert checked > 20


def test_nlvr2_labels_agree_with_scenes(world: Path) -> None:
    graphs = scene_graphs(world)
    checked = 0
    for split in ("train", "dev"):
        for r in nlvr2_rows(world, split):
            pair = r["identifier"].rsplit("-", 1)[0]
            left, right = graphs[f"{pair}-img0"]["objects"], graphs[f"{pair}-img1"]["objects"]
            if m := re.fullmatch(r"At least one image contains an? (\w+) (\w+)\.", r["sentence"]):
                truth = any(_count(x, color=m.group(1), shape=m.group(2)) for x in (left, right))
            elif m := re.fullmatch(r"The (left|right) image contains an? (\w+) (\w+)\.", r["sentence"]):
                side = left if m.group(1) == "left" else right
                truth = _count(side, color=m.group(2), shape=m.group(3)) > 0
            elif m := re.fullmatch(r"Both images contain the same number of (\w+)\.", r["sentence"]):
                shape = {PLURALS[s]: s for s in SHAPES}[m.group(1)]
                truth = _count(left, shape=shape) == _count(right, shape=shape)
            else:
                continue
            assert r["label"] == str(truth)
            checked += 1
    assert checked > 5


# ---------------------------------------------------------------- no answer can be guessed from the words

def test_answers_are_balanced(world: Path) -> None:
    anns = load(world, "vqa", "annotations", "train2014")["annotations"]
    answers = Counter(a["multiple_choice_answer"] for a in anns)
    assert answers.most_common(1)[0][1] / len(anns) < 0.35
    by_type = defaultdict(Counter)
    for a in anns:
        if a["answer_type"] == "yes/no":
            by_type[a["question_type"]][a["multiple_choice_answer"]] += 1
    for qtype, c in by_type.items():
        assert abs(c["yes"] - c["no"]) <= 4, (qtype, c)  # a synonym or a wrong answer may shift one vote
    gqa = load(world, "gqa", "questions", "train")
    answers = Counter(q["answer"] for q in gqa.values())
    assert answers.most_common(1)[0][1] / len(gqa) < 0.4
    by_detailed = defaultdict(Counter)
    for q in gqa.values():
        by_detailed[q["types"]["detailed"]][q["answer"]] += 1
    for detailed, c in by_detailed.items():
        assert max(c.values()) - min(c.values()) <= 3, (detailed, c)
    manifest = read_manifest(world)
    assert manifest["stats"]["coco_vqa"]["majority"]["train_share"] == round(
        Counter(a["multiple_choice_answer"] for a in anns).most_common(1)[0][1] / len(anns), 4)


def test_nlvr2_labels_are_balanced_per_sentence(world: Path) -> None:
    for split in ("train", "dev"):
        rows = nlvr2_rows(world, split)
        labels = Counter(r["label"] for r in rows)
        assert abs(labels["True"] - labels["False"]) <= 0.1 * len(rows)
        groups = defaultdict(list)
        for r in rows:
            s, set_id, _, sentence = r["identifier"].split("-")
            groups[(set_id, sentence)].append(r["label"])
        assert all(set(v) == {"True", "False"} for v in groups.values())


def test_world_vocabulary_covers_every_text(world: Path) -> None:
    """vocab.txt tokenizes every sentence, question and answer of the world as BERT's 30,522 do."""
    from tasks.data.tokenization import load_tokenizer

    vocab = world_path(world, "vocab")
    small, full = load_tokenizer(vocab), load_tokenizer()
    assert 50 < len(small.vocab) < 300
    texts = [c["caption"] for s in ("train2014", "val2014") for c in load(world, "coco", "captions", s)["annotations"]]
    texts += [q["question"] for s in ("train2014", "val2014") for q in load(world, "vqa", "questions", s)["questions"]]
    texts += [q["question"] for s in ("train", "val") for q in load(world, "gqa", "questions", s).values()]
    texts += [r["phrase"] for e in load(world, "vg", "region_descriptions") for r in e["regions"]]
    texts += [q["question"] for e in load(world, "vg", "question_answers") for q in e["qas"]]
    texts += [r["sentence"] for s in ("train", "dev") for r in nlvr2_rows(world, s)]
    for text in set(texts):
        ids = small(text)["input_ids"]
        assert small.unk_token_id not in ids, text
        assert small.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(full(text)["input_ids"])
