"""Bad inputs are refused with errors naming the entry: before any task runs (paths, lists, JSON, YAML,
feature files, init paths), or, for what only a load can tell (code-execution payloads, too many
unreadable images, damaged feature values), by the task that reads them, without running the payload."""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import luigi
import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import tiny_detector_weights

import pipeline.base
from extractor.store import FeatureWriter, ImageFeatures
from model import LxmertForPreTraining
from pipeline.data import BuildNLVR2Data, BuildPretrainCorpus, BuildVQAData
from pipeline.detector import TrainDetector
from pipeline.features import ExtractFeatures, ValidateFeatures
from pipeline.training import FinetuneVQA, PretrainLXMERT
from tasks.demo.feature_world import write_world
from tasks.training.checkpoints import CheckpointWarning, load_latest_checkpoint, save_checkpoint
from tasks.training.weights import read_checkpoint


class CreatesFile:
    """Unpickling this calls open(target, "w"), which creates the file: the payload of every test here."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@contextmanager
def task_errors() -> Iterator[list[tuple[str, BaseException]]]:
    """(family, exception) of each task that fails, or whose requires() raises, during luigi.build."""
    found: list[tuple[str, BaseException]] = []

    def record(task: luigi.Task, exc: BaseException) -> None:
        found.append((task.get_task_family(), exc))

    events = (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK)
    for event in events:
        luigi.Task.event_handler(event)(record)
    try:
        yield found
    finally:
        for event in events:
            luigi.Task.remove_event_handler(event, record)


def build(task: luigi.Task) -> tuple[luigi.LuigiStatusCode, str]:
    """Run `task` with the local scheduler; (status, every error message joined)."""
    with task_errors() as errors:
        result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="CRITICAL")
    return result.status, "\n".join(f"{family}: {exc}" for family, exc in errors)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good inputs shared by the tests: tiny detector weights, a photo, a training world."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save(images / "a.png")
    world = write_world(root / "world", n_images=8, max_boxes=4, feature_dim=16)
    return {"weights": tiny_detector_weights(root / "tiny.pkl"), "images": images,
            "features": world.features, "corpus": world.corpus}


def features_file(path: Path, n: int = 3, k: int = 4, d: int = 8) -> Path:
    """A sound feature file of n images im0..; damaged by the tests with h5py."""
    with FeatureWriter(path, max_boxes=k, feature_dim=d, dtype="float16") as w:
        for i in range(n):
            rng = np.random.default_rng(i)
            boxes = np.array([[1, 2, 30, 20], [5, 5, 40, 45]], np.float32)
            w.add(ImageFeatures(f"im{i}", 50, 60, boxes, rng.standard_normal((2, d)).astype(np.float32),
                                np.array([1, 2]), np.full(2, 0.5, np.float32), np.array([3, 4]),
                                np.full(2, 0.25, np.float32)))
        w.finalize()
    return path


def truncated(path: Path) -> Path:
    data = features_file(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def without_dataset(path: Path, name: str = "objects_conf") -> Path:
    with h5py.File(features_file(path), "r+") as f:
        del f[name]
    return path


def assert_nothing_ran(status: luigi.LuigiStatusCode, wd: Path) -> None:
    assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED
    assert not wd.exists()  # no task started: not even a lock or a partial folder was made


# ------------------------------------------------------------------ inputs named by users, before any work

def _list_with_missing_line_3(tmp: Path, files: dict[str, Path]) -> Path:
    listing = tmp / "list.txt"
    listing.write_text(f"# images\n{files['images'] / 'a.png'}\n{tmp / 'gone.png'}\n")
    return listing


def _write(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


CASES = {
    # name: (task factory (tmp, files) -> task, fragments the error must contain)
    "image list entry missing (demo detector upstream)": (
        lambda t, f: ExtractFeatures(images=str(_list_with_missing_line_3(t, f))),
        ["ExtractFeatures / ExtractFeaturesShard: parameter 'images'", "list.txt:3", "gone.png"]),
    "image folder empty": (
        lambda t, f: ExtractFeatures(images=str(_empty_dir(t)), weights=str(f["weights"]), config="tiny"),
        ["parameter 'images'", "empty: no images in it"]),
    "detector YAML missing": (
        lambda t, f: ExtractFeatures(images=str(f["images"]), weights=str(f["weights"]),
                                     config=str(t / "nope.yaml")),
        ["parameter 'config'", "config file not found", "nope.yaml"]),
    "detector YAML does not parse": (
        lambda t, f: ExtractFeatures(images=str(f["images"]), weights=str(f["weights"]),
                                     config=str(_write(t, "bad.yaml", "MODEL: [1, 2\n"))),
        ["parameter 'config'", "bad.yaml: not valid YAML"]),
    "detector config name unknown": (
        lambda t, f: TrainDetector(config="VG-R999"),
        ["TrainDetector: parameter 'config'", "unknown config 'VG-R999'"]),
    "detector objects.json does not parse": (
        lambda t, f: TrainDetector(images=str(f["images"]), config="tiny",
                                   objects=str(_write(t, "objects.json", '[{"image_id": 1,'))),
        ["TrainDetector: parameter 'objects'", "objects.json: invalid JSON"]),
    "corpus file missing": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(t / "corpus.json")]),
        ["PretrainLXMERT: parameter 'corpus' names file", "corpus.json', which does not exist"]),
    "corpus file does not parse": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(_write(t, "c.json", "[{]"))]),
        ["PretrainLXMERT: parameter 'corpus'", "c.json: invalid JSON", "line 1 column 3"]),
    "corpus file is not a list": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(_write(t, "c.json", "{}"))]),
        ["PretrainLXMERT: parameter 'corpus'", "c.json: expected a JSON list, found a JSON dict"]),
    "raw VQA questions do not parse": (
        lambda t, f: BuildVQAData(train_questions=[str(_write(t, "q.json", "{'questions': []}"))],
                                  train_annotations=[str(_write(t, "a.json", "{}"))],
                                  val_questions=str(t / "a.json"), val_annotations=str(t / "a.json")),
        ["BuildVQAData: parameter 'train_questions'", "q.json: invalid JSON"]),
    "raw VQA files do not pair up": (
        lambda t, f: BuildVQAData(train_questions=[str(_write(t, "q.json", "{}"))], train_annotations=[],
                                  val_questions=str(t / "q.json"), val_annotations=str(t / "q.json")),
        ["BuildVQAData: parameters 'train_questions' and 'train_annotations' must pair up (1 vs 0 files)"]),
    "raw VQA val files not given": (
        lambda t, f: BuildVQAData(train_questions=[str(_write(t, "q.json", "{}"))],
                                  train_annotations=[str(t / "q.json")]),
        ["BuildVQAData: parameter 'valid_questions' is required", "parameter 'valid_annotations' is required"]),
    "NLVR2 JSON lines with a bad line": (
        lambda t, f: BuildNLVR2Data(train=str(_write(t, "train.json", '{"a": 1}\n{"a": \n')),
                                    valid=str(_write(t, "dev.json", '{"a": 1}\n'))),
        ["BuildNLVR2Data: parameter 'train_statements' (given as 'train')", "train.json: line 2: invalid JSON"]),
    "minival id list is not a list": (
        lambda t, f: BuildPretrainCorpus(coco_captions=[str(_write(t, "cap.json", "{}"))],
                                         minival=str(_write(t, "minival.json", '{"ids": 1}'))),
        ["BuildPretrainCorpus: parameter 'minival'", "minival.json: expected a JSON list of image ids"]),
    "init folder without weights": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(f["corpus"])],
                                    init=str(_empty_dir(t))),
        ["PretrainLXMERT: parameter 'init'", "holds neither model.safetensors nor pytorch_model.bin"]),
    "fine-tuning init path missing": (
        lambda t, f: FinetuneVQA(features=[str(f["features"])], init=str(t / "runs" / "final")),
        ["FinetuneVQA: parameter 'init' is neither pretrained / scratch nor an existing path", "runs/final"]),
    "model config.json missing": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(f["corpus"])],
                                    model=str(t / "config.json")),
        ["PretrainLXMERT: parameter 'model'", "is neither a preset", "config.json"]),
    "model config.json does not parse": (
        lambda t, f: PretrainLXMERT(features=[str(f["features"])], corpus=[str(f["corpus"])],
                                    model=str(_write(t, "config.json", "{hidden_size: 4}"))),
        ["PretrainLXMERT: parameter 'model'", "config.json: invalid JSON: Expecting property name"]),
}


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir(exist_ok=True)
    return tmp / "empty"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_scheduling_naming_the_entry(case, files, wd, tmp_path):
    make, fragments = CASES[case]
    status, errors = build(make(tmp_path, files))
    assert_nothing_ran(status, wd)
    assert "inputs missing or unreadable, nothing was run" in errors
    for fragment in fragments:
        assert fragment in errors


def test_every_problem_of_the_graph_is_reported_at_once(files, wd, tmp_path):
    bad = truncated(tmp_path / "bad.h5")
    status, errors = build(FinetuneVQA(features=[str(bad)], init=str(tmp_path / "nope"), model="nope"))
    assert_nothing_ran(status, wd)
    lines = errors.split("\n  ")[1:]
    assert len(lines) == 3
    assert f"FinetuneVQA: parameter 'features': {bad}: not a readable HDF5 feature file" in lines[0]
    assert lines[1].startswith("FinetuneVQA: parameter 'model': 'nope' is neither a preset")
    assert "parameter 'init' is neither pretrained / scratch nor an existing path: '" in lines[2]


def test_big_json_inputs_are_checked_by_their_first_character(files, wd, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.base, "JSON_PARSE_LIMIT", 8)
    corpus = _write(tmp_path, "corpus.json", '  {"img_id": "x"}' + " " * 20)  # an object, not LXMERT's list
    status, errors = build(PretrainLXMERT(features=[str(files["features"])], corpus=[str(corpus)]))
    assert_nothing_ran(status, wd)
    assert f"parameter 'corpus': {corpus}: starts with '{{', not '['" in errors
    assert "only the first character is checked" in errors
    # a big file that starts right is let through unparsed (its reader reports problems later)
    _write(tmp_path, "corpus.json", '[{"img_id": "x"' + " " * 20)
    assert pipeline.base.json_check("[")(corpus) is None


# ------------------------------------------------------------------ feature files: truncated, schema, values

@pytest.mark.parametrize("damage, message", [
    (truncated, "not a readable HDF5 feature file"),
    (without_dataset, "does not follow the feature-store schema: missing datasets: objects_conf"),
])
def test_training_tasks_refuse_a_broken_feature_file_naming_it(damage, message, files, wd, tmp_path, demo_tiny):
    bad = damage(tmp_path / "broken.h5")
    for task in (PretrainLXMERT(features=[str(files["features"]), str(bad)], corpus=[str(files["corpus"])]),
                 FinetuneVQA(features=[str(bad)], init="scratch")):  # its data task would build the demo world
        status, errors = build(task)
        assert_nothing_ran(status, wd)
        assert f"{task.get_task_family()}: parameter 'features': {bad}: {message}" in errors


def _nan(f: h5py.File) -> None:
    f["features"][1, 0, 3] = np.nan


def _inf(f: h5py.File) -> None:
    f["features"][2, 1, 0] = np.inf


def _box_outside(f: h5py.File) -> None:
    f["boxes"][0, 1, 2] = 75.0  # x2 past the 60-pixel width


def _duplicate_id(f: h5py.File) -> None:
    f["img_id"][2] = "im0"


def _int_features(f: h5py.File) -> None:
    data = f["features"][()].astype(np.int32)
    del f["features"]
    f.create_dataset("features", data=data)


@pytest.mark.parametrize("damage, problem", [
    (None, "not a readable HDF5 feature file"),  # truncated
    (_int_features, "features: want float16 or float32, got int32"),
    (_nan, "non-finite features: 1 image(s), e.g. im1"),
    (_inf, "non-finite features: 1 image(s), e.g. im2"),
    (_box_outside, "boxes are not pixel x1 y1 x2 y2 inside the image: 1 image(s), e.g. im0"),
    (_duplicate_id, "img_id has duplicates: 1 id(s), e.g. im0"),
])
def test_validate_features_fails_listing_each_kind_of_problem(damage, problem, wd, tmp_path):
    path = tmp_path / "f.h5"
    if damage is None:
        truncated(path)
    else:
        with h5py.File(features_file(path), "r+") as f:
            damage(f)
    task = ValidateFeatures(features=str(path))
    status, errors = build(task)
    assert status == luigi.LuigiStatusCode.FAILED
    assert f"ValidateFeatures: {path} has 1 problem(s):" in errors and problem in errors
    assert not task.output_dir().exists()
    report = json.loads((task.partial_dir() / "report.json").read_text())
    assert report["file"] == str(path) and len(report["problems"]) == 1 and problem in report["problems"][0]


def test_validate_features_passes_a_sound_file(wd, tmp_path):
    task = ValidateFeatures(features=str(features_file(tmp_path / "f.h5")), boxes=4, dim=8)
    assert build(task) == (luigi.LuigiStatusCode.SUCCESS, "")
    assert json.loads((task.output_dir() / "report.json").read_text())["problems"] == []


# ------------------------------------------------------------------ too many unreadable images

def test_failure_ratio_above_the_limit_fails_the_task_with_a_clear_message(files, wd, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "b_empty.jpg").write_bytes(b"")
    (images / "c_text.png").write_text("no pixels here\n")
    Image.open(files["images"] / "a.png").save(images / "a_good.png")
    params = {"images": str(images), "weights": str(files["weights"]), "config": "tiny", "boxes": 4,
              "decode_workers": 0}
    status, errors = build(ExtractFeatures(max_failure_ratio=0.5, **params))
    assert status == luigi.LuigiStatusCode.FAILED
    assert ("2 of 3 images could not be read, more than max_failure_ratio=0.5 allows; first: "
            f"{images / 'b_empty.jpg'}: empty file") in errors
    assert not ExtractFeatures(max_failure_ratio=0.5, **params).output_dir().exists()
    # within the limit the same folder completes, the bad files listed with their reasons
    task = ExtractFeatures(max_failure_ratio=0.7, **params)
    assert build(task) == (luigi.LuigiStatusCode.SUCCESS, "")
    failures = (task.output_dir() / "features.h5.failures.jsonl").read_text().splitlines()
    assert [(r["img_id"], r["reason"]) for r in map(json.loads, failures)] == [
        ("b_empty", "empty file"), ("c_text", "not an image")]


# ------------------------------------------------------------------ code-execution payloads

@pytest.fixture()
def payload(tmp_path) -> tuple[CreatesFile, Path]:
    marker = tmp_path / "payload-ran.txt"
    yield CreatesFile(marker), marker
    assert not marker.exists()  # every test of a payload: the file was never created


def test_detector_weights_with_a_payload_are_refused_by_extract_features(files, wd, tmp_path, payload):
    obj, _ = payload
    pickled, torched = tmp_path / "evil.pkl", tmp_path / "evil.pth"
    pickled.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": obj}}))
    torch.save({"model": {"backbone.stem.conv1.weight": obj}}, torched)
    for weights, refusal in ((pickled, "refused to load global io.open"), (torched, "weights_only=True")):
        status, errors = build(ExtractFeatures(images=str(files["images"]), weights=str(weights),
                                               config="tiny", decode_workers=0))
        assert status == luigi.LuigiStatusCode.FAILED
        assert f"ExtractFeaturesShard: {weights}" in errors and refusal in errors


def _lxmert_payload_files(root: Path, obj: CreatesFile) -> dict[str, Path]:
    """The payload in every torch form a user can name: original .pth, a model folder, a training checkpoint."""
    state = {"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "bert.pooler.dense.bias": obj}
    (root / "folder").mkdir()
    torch.save(state, root / "evil_LXRT.pth")
    torch.save(state, root / "folder" / "pytorch_model.bin")
    ckpt = save_checkpoint({"model": state, "step": 1}, root / "checkpoints", 1, keep_last=1)
    return {"pth": root / "evil_LXRT.pth", "folder": root / "folder", "checkpoint": ckpt}


def test_model_and_checkpoint_loaders_refuse_a_payload_naming_the_file(tmp_path, payload):
    files = _lxmert_payload_files(tmp_path, payload[0])
    for path in (files["pth"], files["folder"]):
        with pytest.raises(Exception, match="weights_only") as e:
            LxmertForPreTraining.from_pretrained(path)
        assert str(path) in str(e.value) or str(path / "pytorch_model.bin") in str(e.value)
    for path in files.values():
        with pytest.raises(ValueError, match="weights_only") as e:
            read_checkpoint(path, "init_from")
        assert str(e.value).startswith("init_from: ") and str(path) in str(e.value)


def test_resume_skips_a_checkpoint_with_a_payload_with_a_warning(tmp_path, payload):
    good = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "step": 1, "epoch": 0,
            "batch_in_epoch": 1}
    save_checkpoint(good, tmp_path, 1, keep_last=3)
    evil = save_checkpoint({**good, "step": 2, "model": {"w": payload[0]}}, tmp_path, 2, keep_last=3)
    with pytest.warns(CheckpointWarning, match=rf"checkpoint {re.escape(str(evil))} is unreadable .*weights_only"):
        state, path = load_latest_checkpoint(tmp_path)
    assert path.name == "step-00000001.pt" and state["step"] == 1


@pytest.mark.parametrize("family", ["PretrainLXMERT", "FinetuneVQA"])
def test_training_tasks_refuse_an_init_with_a_payload(family, files, wd, tmp_path, payload, demo_tiny):
    evil = _lxmert_payload_files(tmp_path, payload[0])["pth"]
    common = {"features": [str(files["features"])], "init": str(evil), "model": "tiny", "num_workers": 0}
    task = (PretrainLXMERT(corpus=[str(files["corpus"])], **common) if family == "PretrainLXMERT"
            else FinetuneVQA(**common))
    status, errors = build(task)
    assert status == luigi.LuigiStatusCode.FAILED
    assert f"{family}: init_from: cannot read weights from {evil}" in errors and "weights_only" in errors
    assert not task.output_dir().exists()
