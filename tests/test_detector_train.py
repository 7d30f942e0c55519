"""Detector training: losses, VOC mAP, weights that extraction loads, determinism, annotation errors."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from extractor.detector.annotations import AnnotationError, read_vg_annotations
from extractor.detector.config import DetectorConfig, save_config_yaml
from extractor.detector.evaluation import average_precision, evaluate_map, match_detections
from extractor.detector.losses import LossSettings, attribute_loss, detector_losses
from extractor.detector.model import Detections, VGDetector
from extractor.detector.samples import DetectionDataset, DetectionSample
from extractor.detector.train import init_frozen_norms, main, train_detector
from extractor.detector.weights import load_detectron2_weights
from extractor.extract import extract_features
from extractor.store import FeatureReader
from tasks.demo.detector import demo_detector_config, write_detector_config

SHAPES = ("square", "circle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220)}


def _write_world(root, n=16, side=64, seed=0, attributes_file=False):
    """A few squares and discs of two colours on grey noise, with VG objects.json and label files."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "objects_vocab.txt").write_text("square\ncircle,disc\n")
    (root / "attributes_vocab.txt").write_text("red\nblue\ngray,grey\n")
    yy, xx = np.mgrid[:side, :side]
    records, attr_records = [], []
    for k in range(n):
        img = rng.integers(100, 140, (side, side, 3)).astype(np.uint8)
        objects = []
        for j, cell in enumerate(rng.permutation(4)[:2].tolist()):  # two quadrants, so boxes never overlap
            size = int(rng.integers(14, 27))
            x = (cell % 2) * side // 2 + int(rng.integers(0, side // 2 - size + 1))
            y = (cell // 2) * side // 2 + int(rng.integers(0, side // 2 - size + 1))
            shape, colour = SHAPES[int(rng.integers(2))], list(COLOURS)[int(rng.integers(2))]
            if shape == "square":
                mask = (xx >= x) & (xx < x + size) & (yy >= y) & (yy < y + size)
            else:
                mask = (xx + 0.5 - x - size / 2) ** 2 + (yy + 0.5 - y - size / 2) ** 2 <= (size / 2) ** 2
            img[mask] = COLOURS[colour]
            obj = {"object_id": 100 * k + j, "x": x, "y": y, "w": size, "h": size, "names": [shape]}
            if attributes_file:
                attr_records.append((k, {**obj, "attributes": [colour]}))
            else:
                obj["attributes"] = [colour]
            objects.append(obj)
        Image.fromarray(img).save(root / "images" / f"{1000 + k}.png")
        records.append({"image_id": 1000 + k, "objects": objects})
    (root / "objects.json").write_text(json.dumps(records))
    if attributes_file:
        per_image = [{"image_id": 1000 + k, "attributes": [o for i, o in attr_records if i == k]}
                     for k in range(n)]
        (root / "attributes.json").write_text(json.dumps(per_image))
    return root


def _config(root, side=64):
    return demo_detector_config(root / "objects_vocab.txt", root / "attributes_vocab.txt", side)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "detector.pkl"
    val = [str(1000 + k) for k in range(12, 16)]
    result = train_detector(_config(world), images=world / "images", objects=world / "objects.json",
                            output=out, val_ids=val, steps=60, batch_size=4, seed=0, progress=False)
    return result, out


# ---------------------------------------------------------------- VOC AP, hand-worked

def test_average_precision_hand_worked():
    # 3 ground truths; by score: TP, FP, TP, FP -> precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3.
    # Envelope: 1 up to recall 1/3, then 2/3 up to recall 2/3: AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
    assert average_precision([0.6, 0.9, 0.7, 0.8], [False, True, True, False], 3) == pytest.approx(5 / 9)
    # FP first, then two TPs over 2 ground truths: the envelope lifts the first half to 2/3.
    assert average_precision([0.9, 0.8, 0.7], [False, True, True], 2) == pytest.approx(2 / 3)
    assert average_precision([0.5, 0.4], [True, True], 2) == pytest.approx(1.0)
    assert average_precision([], [], 4) == 0.0
    with pytest.raises(ValueError, match="ground-truth"):
        average_precision([0.5], [True], 0)


def test_match_detections_takes_each_ground_truth_once_by_score():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes = torch.tensor([[0.0, 0, 10, 10],  # exact, lower score: the duplicate
                          [0.0, 0, 10, 9],  # IoU 0.9, higher score: takes gt 0
                          [20, 20, 30, 25],  # IoU 0.5 exactly: a match (>=)
                          [40, 40, 50, 50]])  # nothing there
    scores = torch.tensor([0.5, 0.9, 0.7, 0.8])
    assert match_detections(boxes, scores, gt, 0.5).tolist() == [False, True, True, False]
    assert match_detections(boxes, scores, gt, 0.6).tolist() == [False, True, False, False]
    assert match_detections(boxes, scores, gt[:0]).tolist() == [False] * 4


class _FixedDetector(torch.nn.Module):
    """Stands in for VGDetector at test time: returns given raw scores and class boxes."""

    def __init__(self, cfg, scores, boxes):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.scores, self.boxes = scores, boxes

    def forward(self, images):
        features = torch.zeros(len(self.boxes), 8)
        return [Detections((64, 64), self.boxes[:, 0], self.scores, self.boxes, features, None)]


def test_evaluate_map_hand_worked(world):
    cfg = _config(world)  # classes: square, circle; background is the LAST score column
    sample = DetectionSample("1", torch.zeros(3, 64, 64, dtype=torch.uint8),
                             torch.tensor([[0.0, 0, 20, 20], [30, 30, 50, 50], [5, 40, 25, 60]]),
                             torch.tensor([0, 0, 1]), torch.full((3, 1), -1))
    square_a, square_b, circle = [0.0, 0, 20, 20], [30, 30, 50, 50], [5, 40, 25, 60]
    far = [40, 0, 60, 10]
    # Per region: (square score, circle score, background); boxes per class.
    scores = torch.tensor([[0.8, 0.1, 0.1],  # square on square_a: TP (circle 0.1 > 0.05 on square_a: FP)
                           [0.6, 0.0, 0.4],  # square far away: FP
                           [0.3, 0.0, 0.7],  # square on square_b: TP, ranked after the FP
                           [0.01, 0.9, 0.09]])  # circle on circle: TP; square 0.01 under the threshold
    boxes = torch.tensor([[square_a, square_a], [far, far], [square_b, square_b], [circle, circle]])
    result = evaluate_map(_FixedDetector(cfg, scores, boxes), [sample])
    # square: TP, FP, TP over 2 gt -> 1/2 * 1 + 1/2 * 2/3 = 5/6; circle: TP (0.9), FP (0.1) over 1 gt -> 1.
    assert result["per_class"] == pytest.approx({"square": 5 / 6, "circle": 1.0})
    assert result["map50"] == pytest.approx((5 / 6 + 1.0) / 2)
    assert result["ground_truth"] == 3
    assert evaluate_map(_FixedDetector(cfg, scores, boxes), [sample], iou=0.75)["map75"] == result["map50"]


# ---------------------------------------------------------------- training

def test_attribute_loss_hand_worked():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # 3 attributes + "no attribute" (last)
    logits = probs.log().repeat(3, 1)
    targets = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    # box 0: mean of -log .5 and -log .25; box 1: -log .125; box 2 has none: -log .125 ("no attribute")
    want = ((math.log(2) + math.log(4)) / 2 + math.log(8) + math.log(8)) / 3
    assert attribute_loss(logits, targets).item() == pytest.approx(want)
    empty = torch.zeros(0, 4, requires_grad=True)
    none = attribute_loss(empty, targets[:0])
    assert none.item() == 0.0 and none.requires_grad


def test_losses_decrease_and_trained_weights_extract(world, trained, tmp_path):
    result, weights = trained
    first, last = result["history"][0], result["history"][-1]
    assert result["steps"] == 60 and result["train_images"] == 12 and result["val_images"] == 4
    # The RoI losses are not monotone: as the RPN improves, harder proposals become positives.
    assert last["loss"] < first["loss"] and last["roi_class"] < first["roi_class"]
    assert last["rpn_objectness"] < 0.1 * first["rpn_objectness"]
    assert last["attribute"] < 0.1 * first["attribute"]
    assert result["region_accuracy"]["attribute"] >= 0.75  # val regions' features tell red from blue
    assert 0.0 <= result["map50"] <= 1.0 and set(result["per_class"]) == {"square", "circle"}
    saved = json.loads(weights.with_suffix(".json").read_text())
    assert saved["weights_sha256"] == result["weights_sha256"] and saved["map50"] == result["map50"]

    cfg = _config(world)
    model = VGDetector(cfg)
    assert load_detectron2_weights(model, weights) == result["weights_sha256"]
    out = tmp_path / "feats.h5"
    summary = extract_features(world / "images", weights, out, config=cfg, boxes=5, num_workers=0,
                               progress=False)
    assert summary["stored"] == 16 and summary["weights_sha256"] == result["weights_sha256"]
    reader = FeatureReader(out)
    rec = reader.get("1000")
    assert reader.feature_dim == cfg.feature_dim == 256 and rec.num_boxes == 5
    assert np.all(np.isfinite(rec.features)) and rec.objects_id.max() < 2 and rec.attrs_id.max() < 3


def test_trained_weights_travel_with_their_config_and_labels(world, trained, tmp_path):
    """train_detector's folder is self-describing: moved elsewhere, its config names its labels beside it."""
    _, weights = trained
    moved = shutil.copytree(weights.parent, tmp_path / "moved")
    text = (moved / "detector.yaml").read_text()
    assert "OBJECTS: objects_vocab.txt" in text and "ATTRIBUTES: attributes_vocab.txt" in text
    assert str(world) not in text and str(weights.parent) not in text
    cfg = DetectorConfig.load(moved / "detector.yaml")
    assert cfg == _beside(_config(world), moved)
    image = world / "images" / "1000.png"
    here = extract_features(image, weights, tmp_path / "a.h5", config=_config(world), boxes=3, num_workers=0,
                            progress=False)
    there = extract_features(image, moved / "detector.pkl", tmp_path / "b.h5", config=moved / "detector.yaml",
                             boxes=3, num_workers=0, progress=False)
    assert here["weights_sha256"] == there["weights_sha256"]
    a, b = FeatureReader(tmp_path / "a.h5").get("1000"), FeatureReader(tmp_path / "b.h5").get("1000")
    assert np.array_equal(a.features, b.features) and np.array_equal(a.objects_id, b.objects_id)


def test_weights_without_their_config_say_which_config_to_pass(trained, world, tmp_path, capsys):
    """The default config (VG-R101-C4) does not fit demo weights: one line naming the YAML beside them."""
    from extractor.__main__ import main as extract_main
    _, weights = trained
    moved = shutil.copytree(weights.parent, tmp_path / "moved")
    argv = ["--images", str(world / "images" / "1000.png"), "--weights", str(moved / "detector.pkl"),
            "--output", str(tmp_path / "f.h5"), "--no-progress"]
    assert extract_main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {moved / 'detector.pkl'} has 2 classes and 3 attributes; the config VG-R101-C4 has 1600 classes "
        f"and 400 attributes: pass --config {moved / 'detector.yaml'}\n")
    assert extract_main([*argv, "--config", str(moved / "detector.yaml")]) == 0


def test_training_is_deterministic_with_a_seed(world, tmp_path):
    cfg = _config(world)
    kw = {"images": world / "images", "objects": world / "objects.json", "steps": 3, "batch_size": 2,
          "val_fraction": 0.0, "progress": False}
    state = torch.get_rng_state()
    a = train_detector(cfg, output=tmp_path / "a.pkl", seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b = train_detector(cfg, output=tmp_path / "b.pkl", seed=7, **kw)
    c = train_detector(cfg, output=tmp_path / "c.pkl", seed=8, **kw)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert a["history"] == b["history"] and a["map50"] is None and a["val_images"] == 0


def test_losses_on_an_image_without_objects_are_finite(world):
    cfg = _config(world)
    model = VGDetector(cfg).train()
    empty = DetectionSample("e", torch.full((3, 128, 128), 120, dtype=torch.uint8), torch.zeros(0, 4),
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long))
    full = DetectionDataset(read_vg_annotations(world / "images", world / "objects.json",
                                                object_vocab=cfg.object_labels,
                                                attribute_vocab=cfg.attribute_labels)[0], cfg)[0]
    init_frozen_norms(model, [empty, full])
    losses = detector_losses(model, [empty], LossSettings())
    assert set(losses) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box", "attribute"}
    assert losses["rpn_box"] == 0 and losses["roi_box"] == 0 and losses["attribute"] == 0
    assert all(torch.isfinite(v) for v in losses.values()) and losses["roi_class"] > 0
    sum(detector_losses(model, [empty, full]).values()).backward()  # mixed batch: one graph, no error


# ---------------------------------------------------------------- annotations and configs

def test_names_map_through_synonyms_and_attributes_json(tmp_path):
    root = _write_world(tmp_path / "w", n=3, attributes_file=True)
    records = json.loads((root / "objects.json").read_text())
    records[0]["objects"][0]["names"] = ["Disc"]  # a synonym, any case
    records[1]["objects"][0]["attributes"] = ["grey"]  # merged with attributes.json's colour
    records[2]["objects"][0]["w"] = 0  # no area: skipped and counted
    (root / "objects.json").write_text(json.dumps(records))
    anns, skipped = read_vg_annotations(root / "images", root / "objects.json", root / "attributes.json",
                                        object_vocab=root / "objects_vocab.txt",
                                        attribute_vocab=root / "attributes_vocab.txt")
    assert [a.img_id for a in anns] == ["1000", "1001", "1002"] and skipped["empty_boxes"] == 1
    assert anns[0].classes[0] == 1
    colour = ["red", "blue"].index(json.loads((root / "attributes.json").read_text())[1]["attributes"][0]
                                   ["attributes"][0])
    assert anns[1].attributes[0].tolist() == [2, colour]
    assert anns[1].boxes.shape == (2, 4) and len(anns[2].classes) == 1
    no_attrs, _ = read_vg_annotations(root / "images", root / "objects.json",
                                      object_vocab=root / "objects_vocab.txt",
                                      attribute_vocab=root / "attributes_vocab.txt")
    assert no_attrs[0].attributes.tolist() == [[-1], [-1]]  # none given (the loss targets "no attribute")


def test_unknown_names_and_missing_images_are_errors_naming_them(tmp_path):
    root = _write_world(tmp_path / "w", n=2)
    vocab = {"object_vocab": root / "objects_vocab.txt", "attribute_vocab": root / "attributes_vocab.txt"}
    records = json.loads((root / "objects.json").read_text())
    records[1]["objects"][1]["names"] = ["hexagon"]
    (root / "objects.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"image 1001 object 101: name 'hexagon' is not in the object"):
        read_vg_annotations(root / "images", root / "objects.json", **vocab)
    anns, skipped = read_vg_annotations(root / "images", root / "objects.json", unknown_names="skip", **vocab)
    assert skipped["unknown_objects"] == 1 and len(anns[1].classes) == 1

    records[1]["objects"][1]["names"] = ["square"]
    records[0]["objects"][0]["attributes"] = ["shiny"]
    (root / "objects.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"image 1000 object 0: attribute 'shiny'"):
        read_vg_annotations(root / "images", root / "objects.json", **vocab)
    with pytest.raises(AnnotationError, match="image 1000 object 0: attribute 'shiny'"):
        train_detector(_config(root), images=root / "images", objects=root / "objects.json",
                       output=tmp_path / "w.pkl", steps=1, progress=False)
    assert not (tmp_path / "w.pkl").exists()

    (root / "images" / "1001.png").unlink()
    records[0]["objects"][0]["attributes"] = ["red"]
    (root / "objects.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match="image 1001 has no image file"):
        read_vg_annotations(root / "images", root / "objects.json", **vocab)
    with pytest.raises(AnnotationError, match=r"requested image id\(s\) have no annotations: \['77'\]"):
        read_vg_annotations(root / "images", root / "objects.json", ids=["1000", "77"], **vocab)


def test_demo_config_and_its_yaml(world, tmp_path):
    cfg = demo_detector_config(world / "objects_vocab.txt", world / "attributes_vocab.txt", 128)
    assert (cfg.num_classes, cfg.num_attributes, cfg.feature_dim) == (2, 3, 256)
    assert (cfg.min_size_test, cfg.max_size_test, cfg.anchor_sizes) == (256, 256, (32.0, 64.0, 128.0))
    assert (cfg.pooler_type, cfg.pooler_sampling_ratio, cfg.rpn_post_nms_topk) == ("ROIAlignV2", 1, 64)
    assert not cfg.stride_in_1x1 and cfg.pixel_std != (1.0, 1.0, 1.0)
    path = save_config_yaml(cfg, tmp_path / "demo.yaml")
    assert DetectorConfig.load(path) == _beside(cfg, tmp_path)
    assert write_detector_config(tmp_path / "world.yaml", world / "objects_vocab.txt",
                                 world / "attributes_vocab.txt", 128).read_text() == path.read_text()


def _beside(cfg, folder):
    """cfg with its label files named in `folder`, where a saved config copies them."""
    return cfg.replace(object_labels=str(folder.resolve() / "objects_vocab.txt"),
                       attribute_labels=str(folder.resolve() / "attributes_vocab.txt"))


def test_command_line(world, tmp_path, capsys):
    out = tmp_path / "det.pkl"
    (tmp_path / "val.txt").write_text("1014\n1015\n")
    config = write_detector_config(tmp_path / "preset" / "demo.yaml", world / "objects_vocab.txt",
                                   world / "attributes_vocab.txt", 64)
    argv = ["--images", str(world / "images"), "--objects", str(world / "objects.json"), "--output", str(out),
            "--config", str(config), "--val-ids", str(tmp_path / "val.txt"), "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    assert "2 steps on 14 images" in capsys.readouterr().out
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["val_images"] == 2 and metrics["steps"] == 2
    assert DetectorConfig.load(out.with_suffix(".yaml")) == _beside(_config(world), tmp_path)
    assert main(argv[:-5] + ["--val-ids", str(tmp_path / "nope.txt"), "--no-progress"]) == 1
    assert "id list not found" in capsys.readouterr().err
