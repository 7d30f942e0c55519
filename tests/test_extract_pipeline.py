"""Extraction end to end on real photos with random tiny-detector weights in the real pickle format."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from extractor.__main__ import main
from extractor.detector.config import DetectorConfig
from extractor.detector.model import Detections, VGDetector
from extractor.detector.selection import select_caffe
from extractor.detector.weights import load_detectron2_weights, save_detectron2_weights
from extractor.extract import BoxRule, ExtractionError, extract_features, to_record
from extractor.images import load_image
from extractor.store import FeatureReader, validate

PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Three colour photos, one grayscale, one broken file, and tiny random weights saved as a pickle."""
    root = tmp_path_factory.mktemp("extract")
    images = root / "images"
    images.mkdir()
    for name, fn in PHOTOS.items():
        Image.fromarray(fn()).save(images / f"{name}.jpg", quality=95)
    Image.fromarray(data.camera()).save(images / "camera.png")
    (images / "broken.jpg").write_bytes(b"these bytes are no image")
    torch.manual_seed(7)
    model = VGDetector(DetectorConfig.load("tiny"))
    with torch.no_grad():  # sharper class scores than the default init, so the 0.2 threshold matters
        model.roi_heads.box_predictor.cls_score.weight.mul_(60)
    save_detectron2_weights(model, root / "tiny.pkl")
    return root


def _good(workdir):
    return [workdir / "images" / f"{n}" for n in ("astronaut.jpg", "camera.png", "chelsea.jpg", "coffee.jpg")]


def test_end_to_end_caffe_adaptive(workdir, tmp_path):
    out = tmp_path / "feats.h5"
    s = extract_features(workdir / "images", workdir / "tiny.pkl", out, config="tiny", min_boxes=10,
                         max_boxes=100, num_workers=0, max_failure_ratio=0.25, progress=False)
    sha = hashlib.sha256((workdir / "tiny.pkl").read_bytes()).hexdigest()
    assert (s["images"], s["extracted"], s["failed"], s["stored"], s["resumed"]) == (5, 4, 1, 4, 0)
    assert s["weights_sha256"] == sha and (s["box_strategy"], s["boxes"]) == ("caffe", "10-100")
    assert validate(out, boxes=100, dim=256) == []
    r = FeatureReader(out)
    assert r.ids == ["astronaut", "camera", "chelsea", "coffee"]  # input (sorted folder) order
    attrs = r.attrs
    assert attrs["weights_sha256"] == sha and attrs["box_strategy"] == "caffe"
    assert (attrs["min_boxes"], attrs["max_boxes"], attrs["amp"]) == (10, 100, "none")
    assert attrs["feature_dtype"] == "float16" and attrs["schema_version"] == 1
    assert attrs["detector_config"] == DetectorConfig.load("tiny").to_dict()
    counts = [r.get(i).num_boxes for i in r.ids]
    assert all(10 <= n <= 100 for n in counts) and len(set(counts)) > 1  # adaptive: per-image counts
    failures = [json.loads(x) for x in (tmp_path / "feats.h5.failures.jsonl").read_text().splitlines()]
    assert [(f["img_id"], f["reason"]) for f in failures] == [("broken", "not an image")]

    # the stored record is the detector's own output for the kept proposals, scaled to original pixels
    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny"))
    load_detectron2_weights(model, workdir / "tiny.pkl")
    image = load_image(workdir / "images" / "coffee.jpg")
    det = model([model.prepare(image)])[0]
    keep, boxes = select_caffe(det.proposals, det.scores, min_boxes=10, max_boxes=100)
    rec = r.get("coffee")
    assert (rec.img_h, rec.img_w) == image.shape[:2] == (400, 600)
    sy, sx = 400 / det.image_size[0], 600 / det.image_size[1]
    want = boxes.numpy() * np.array([sx, sy, sx, sy], np.float32)
    assert np.allclose(rec.boxes, want, atol=1e-2)
    assert np.allclose(rec.features.astype(np.float32), det.features[keep].numpy(), rtol=2e-3, atol=1e-3)
    probs = det.scores[keep].numpy()
    assert np.array_equal(rec.objects_id, probs[:, :-1].argmax(1))
    assert np.allclose(rec.objects_conf, probs[:, :-1].max(1))
    assert rec.attrs_id.max() < 400 and np.all((rec.attrs_conf > 0) & (rec.attrs_conf <= 1))
    big = rec.objects_conf >= 0.2  # caffe rule: boxes above the threshold come first
    assert big.sum() == 0 or big[: big.sum()].all()


def test_maxnms_fixed_float32_in_batches_with_a_worker(workdir, tmp_path):
    out = tmp_path / "maxnms.h5"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in _good(workdir)[::-1]) + "\n")
    s = extract_features(listing, workdir / "tiny.pkl", out, config="tiny", boxes=36, selection="maxnms",
                         batch_size=3, num_workers=1, dtype="float32", progress=False)
    assert (s["stored"], s["failed"], s["box_strategy"], s["boxes"]) == (4, 0, "maxnms", "36")
    assert validate(out, boxes=36, dim=256) == []
    r = FeatureReader(out)
    assert r.ids == ["coffee", "chelsea", "camera", "astronaut"]  # the list file's order
    assert r.attrs["feature_dtype"] == "float32"
    assert all(r.get(i).num_boxes == 36 for i in r.ids)
    confs = r.get("chelsea").objects_conf
    assert np.all(np.diff(confs) <= 1e-6)  # NMS keeps boxes by descending best-class score


def test_failure_ratio_stops_and_a_rerun_resumes(workdir, tmp_path):
    good = _good(workdir)
    bad = workdir / "images" / "broken.jpg"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, [good[0], good[1], bad, good[2]])) + "\n")
    out = tmp_path / "resume.h5"
    with pytest.raises(ExtractionError, match="1 of 4 images could not be read.*broken.jpg: not an image"):
        extract_features(listing, workdir / "tiny.pkl", out, config="tiny", max_failure_ratio=0.0,
                         num_workers=0, progress=False)
    assert not out.exists()  # nothing half-written at the final path
    s = extract_features(listing, workdir / "tiny.pkl", out, config="tiny", max_failure_ratio=0.25,
                         num_workers=0, progress=False)
    assert (s["resumed"], s["extracted"], s["failed"], s["stored"]) == (2, 1, 1, 3)
    fresh = tmp_path / "fresh.h5"
    extract_features(listing, workdir / "tiny.pkl", fresh, config="tiny", max_failure_ratio=0.25,
                     num_workers=0, progress=False)
    a, b = FeatureReader(out), FeatureReader(fresh)
    assert a.ids == b.ids == ["astronaut", "camera", "chelsea"]
    for i in a.ids:
        assert np.array_equal(a.get(i).features, b.get(i).features)
        assert np.array_equal(a.get(i).boxes, b.get(i).boxes)


def test_command_line(workdir, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = ["--images", str(workdir / "images"), "--weights", str(workdir / "tiny.pkl"), "--output", str(out),
            "--config", "tiny", "--boxes", "12", "--max-failure-ratio", "0.3", "--workers", "0",
            "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "4 images stored" in line and "1 failed" in line and "caffe 12 boxes" in line
    assert validate(out, boxes=12) == []
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-1] + ["--config", "VG-R999", "--overwrite", "--no-progress"]) == 1
    assert "unknown config 'VG-R999'" in capsys.readouterr().err
    assert main(args + ["--weights", str(tmp_path / "none.pkl"), "--overwrite"]) == 1
    assert "weights file not found" in capsys.readouterr().err
    assert main(["--images", str(tmp_path / "nowhere"), "--weights", str(workdir / "tiny.pkl"),
                 "--output", str(tmp_path / "x.h5"), "--config", "tiny"]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(args + ["--max-boxes", "20", "--overwrite"]) == 2


def test_parameter_errors_name_the_parameter(workdir, tmp_path):
    common = (workdir / "images", workdir / "tiny.pkl", tmp_path / "x.h5")
    for kwargs, message in [({"boxes": 36, "max_boxes": 50}, "either boxes"),
                            ({"min_boxes": 50, "max_boxes": 10}, r"min_boxes \(50\) is larger"),
                            ({"boxes": 0}, "boxes must be a positive integer"),
                            ({"selection": "greedy"}, "selection must be one of"),
                            ({"dtype": "bfloat16"}, "dtype must be one of"),
                            ({"amp": "fp16"}, "amp='fp16' needs device='cuda'"),
                            ({"resize": "opencv"}, "resize must be one of"),
                            ({"region_chunk": 0}, "region_chunk must be a positive integer"),
                            ({"batch_size": 0}, "batch_size must be a positive integer")]:
        with pytest.raises(ExtractionError, match=message):
            extract_features(*common, config="tiny", progress=False, **kwargs)


def test_record_is_scaled_to_original_pixels():
    """Resized 100x200 from an original 50x100: boxes halve; no attribute head gives attrs_id -1."""
    proposals = torch.tensor([[10.0, 20.0, 60.0, 100.0], [0.0, 0.0, 200.0, 100.0],
                              [150.0, 50.0, 199.0, 99.0]])
    scores = torch.tensor([[0.7, 0.1, 0.2], [0.05, 0.25, 0.7], [0.3, 0.3, 0.4]])
    det = Detections(image_size=(100, 200), proposals=proposals, scores=scores,
                     boxes=proposals[:, None, :].expand(3, 2, 4), features=torch.arange(6.0).view(3, 2),
                     attr_scores=None)
    rec = to_record("x", (50, 100), det, BoxRule("caffe", 2, 2), "float16")
    assert (rec.img_id, rec.img_h, rec.img_w, rec.num_boxes) == ("x", 50, 100, 2)
    assert rec.objects_id.tolist() == [0, 0] and np.allclose(rec.objects_conf, [0.7, 0.3])
    assert np.allclose(rec.boxes, [[5, 10, 30, 50], [75, 25, 99.5, 49.5]])
    assert rec.features.dtype == np.float16 and rec.features.tolist() == [[0, 1], [4, 5]]
    assert rec.attrs_id.tolist() == [-1, -1] and rec.attrs_conf.tolist() == [0, 0]
