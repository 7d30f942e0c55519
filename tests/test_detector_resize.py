"""The two input rules: the Caffe original's (generate_tsv.py, the released features) and Detectron2's."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from extractor.detector.config import DetectorConfig
from extractor.detector.model import VGDetector, boxes_to_original, caffe_scale, preprocess
from extractor.detector.samples import DetectionDataset
from extractor.detector.selection import select_caffe, select_maxnms
from extractor.detector.weights import save_detectron2_weights
from extractor.extract import extract_features
from extractor.store import FeatureReader

CAFFE_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])  # bottom-up-attention's cfg.PIXEL_MEANS


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, :3][:, :, ::-1])


def _original_blob(bgr: np.ndarray, target: int = 600, max_size: int = 1000) -> tuple[np.ndarray, float]:
    """bottom-up-attention's _get_image_blob for one scale, written out independently."""
    im = bgr.astype(np.float32, copy=True)
    im -= CAFFE_MEANS
    scale = float(target) / float(min(im.shape[:2]))
    if np.round(scale * max(im.shape[:2])) > max_size:
        scale = float(max_size) / float(max(im.shape[:2]))
    return cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR), scale


@pytest.mark.parametrize("photo, shape, scale", [
    ("chelsea", (600, 902), 2.0),  # 300x451 enlarged
    ("coffee", (600, 900), 1.5),  # 400x600 enlarged
    ("hubble_deep_field", (600, 688), 600 / 872),  # 872x1000 shrunk
    ("retina", (600, 600), 600 / 1411),  # 1411x1411 shrunk
])
def test_caffe_input_equals_the_original_blob(photo, shape, scale):
    bgr = _bgr(getattr(data, photo)())
    cfg = DetectorConfig.load("VG-R101-C4")
    assert cfg.resize == "caffe"
    tensor, got_scale = preprocess(bgr, cfg)
    want, want_scale = _original_blob(bgr)
    assert got_scale == want_scale == pytest.approx(scale)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, *shape)
    assert np.array_equal(tensor.numpy().transpose(1, 2, 0), want)
    # Detectron2's rule (PIL on uint8) gives another input: about a grey level on enlarged images, many
    # more on shrunk ones (antialiasing); the shapes agree here
    pixels, none = preprocess(bgr, cfg.replace(resize="detectron2"))
    assert none is None and pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, *shape)
    d2 = pixels.float() - torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    gap = float((d2 - tensor).abs().max())
    assert (1.0 <= gap <= 2.0) if scale > 1 else gap > 10.0


def test_caffe_scale_is_the_one_factor_of_the_original():
    assert caffe_scale(300, 451, 600, 1000) == 2.0
    assert caffe_scale(500, 2000, 600, 1000) == 0.5  # longest side would pass 1000: capped by it
    assert caffe_scale(600, 1001, 600, 1000) == 1000 / 1001  # round(1001.0) > 1000
    assert caffe_scale(600, 1000, 600, 1000) == 1.0


def test_boxes_map_back_to_original_pixels():
    scale = 600 / 1411
    original = torch.tensor([[0.0, 0.0, 1411.0, 1411.0], [100.5, 200.25, 700.0, 1300.0]])
    resized = original * scale
    back = boxes_to_original(resized, (1411, 1411), (600, 600), scale)
    assert torch.allclose(back, original, rtol=1e-6, atol=1e-4)
    assert torch.equal(back, (resized / scale).clamp(0, 1411))  # generate_tsv: rois / im_scale
    over = boxes_to_original(torch.tensor([[-3.0, 0.0, 605.0, 601.0]]), (1411, 1411), (600, 600), scale)
    assert over.tolist() == [[0.0, 0.0, 1411.0, 1411.0]]  # clipped to the original image
    # detectron2: per-axis ratios of the rounded sizes (451 -> 902 wide, 300 -> 600 high)
    d2 = boxes_to_original(torch.tensor([[90.2, 60.0, 902.0, 600.0]]), (300, 451), (600, 902), None)
    assert torch.allclose(d2, torch.tensor([[45.1, 30.0, 451.0, 300.0]]))


@pytest.mark.parametrize("resize", ["caffe", "detectron2"])
def test_batch_invariance_in_both_input_rules(resize):
    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny").replace(resize=resize))
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.astronaut()[:, ::-1]]
    images = [model.prepare(_bgr(np.ascontiguousarray(p))) for p in photos]
    assert images[0].dtype == (torch.float32 if resize == "caffe" else torch.uint8)
    assert len({tuple(x.shape) for x in images}) == 3  # two share a size, so one group has two images
    batched = model(images)
    for x, b in zip(images, batched):
        s = model([x])[0]
        assert s.proposals.shape == b.proposals.shape
        assert torch.allclose(s.proposals, b.proposals, atol=1e-3)
        assert torch.allclose(b.features, s.features, rtol=1e-4, atol=1e-4 * float(s.features.abs().max()))
        assert torch.equal(select_caffe(s.proposals, s.scores)[0], select_caffe(b.proposals, b.scores)[0])
        assert torch.equal(select_maxnms(s.boxes, s.scores)[0], select_maxnms(b.boxes, b.scores)[0])


def test_extraction_records_the_rule_and_divides_boxes_by_the_caffe_scale(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.coffee()).save(images / "coffee.png")  # lossless: the test decodes the same pixels
    torch.manual_seed(3)
    cfg = DetectorConfig.load("tiny")
    model = VGDetector(cfg)
    save_detectron2_weights(model, tmp_path / "w.pkl")
    out = tmp_path / "f.h5"
    s = extract_features(images, tmp_path / "w.pkl", out, config="tiny", resize="caffe", boxes=5,
                         num_workers=0, progress=False)
    assert s["resize"] == "caffe"
    reader = FeatureReader(out)
    assert reader.attrs["resize"] == "caffe" and reader.attrs["detector_config"]["resize"] == "caffe"
    rec = reader.get("coffee")
    caffe_model = VGDetector(cfg.replace(resize="caffe"))
    caffe_model.load_state_dict(model.state_dict())
    tensor, scale = preprocess(_bgr(data.coffee()), caffe_model.cfg)
    assert scale == 224 / 400
    det = caffe_model([tensor])[0]
    keep, boxes = select_caffe(det.proposals, det.scores, min_boxes=5, max_boxes=5)
    assert np.allclose(rec.boxes, (boxes / scale).clamp(min=0).numpy(), atol=1e-3)
    assert np.allclose(rec.features, det.features[keep].numpy(), rtol=1e-2, atol=1e-2)
    default = extract_features(images, tmp_path / "w.pkl", tmp_path / "d.h5", config="tiny", boxes=5,
                               num_workers=0, progress=False)
    assert default["resize"] == "detectron2" and FeatureReader(tmp_path / "d.h5").attrs["resize"] == "detectron2"


def test_training_samples_follow_the_config_rule(tmp_path):
    from extractor.detector.annotations import ImageAnnotation

    path = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    ann = ImageAnnotation(img_id="chelsea", path=path, boxes=np.array([[45.1, 30.0, 451.0, 300.0]], np.float32),
                          classes=np.array([1]), attributes=np.array([[0]]))
    cfg = DetectorConfig.load("tiny").replace(min_size_test=600, max_size_test=1000)
    d2 = DetectionDataset([ann], cfg)[0]
    caffe = DetectionDataset([ann], cfg.replace(resize="caffe"))[0]
    assert d2.image.dtype == torch.uint8 and caffe.image.dtype == torch.float32
    assert tuple(caffe.image.shape) == tuple(d2.image.shape) == (3, 600, 902)
    assert torch.allclose(caffe.boxes, torch.tensor([[90.2, 60.0, 902.0, 600.0]]))  # times the one factor 2
    flipped = DetectionDataset([ann], cfg.replace(resize="caffe"))[(0, True)]
    assert torch.equal(flipped.image, caffe.image.flip(-1))
    assert torch.allclose(flipped.boxes, torch.tensor([[0.0, 60.0, 811.8, 600.0]]))
