"""The detector: Detectron2 weight layout, Caffe/Detectron2 test-time semantics, batch == single."""
import math

import numpy as np
import pytest
import torch
from skimage import data

from extractor.detector.config import DetectorConfig
from extractor.detector.model import (
    VGDetector,
    cell_anchors,
    grid_anchors,
    resize_image,
    resized_shape,
)
from extractor.detector.selection import select_caffe, select_maxnms


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _detectron2_shapes(blocks, stem=64, res2=256, width=64, classes=1600, attrs=400, rpn_hidden=512,
                       anchors=12):
    """Every Detectron2 parameter name of the bottom-up-attention model and its shape, by the naming rules."""
    shapes = {}

    def conv(prefix, out_c, in_c, k):
        shapes[f"{prefix}.weight"] = (out_c, in_c, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{s}"] = (out_c,)

    conv("backbone.stem.conv1", stem, 3, 7)
    in_c, out_c, b = stem, res2, width
    for stage, n in zip(("backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.res5"), blocks):
        for i in range(n):
            p = f"{stage}.{i}"
            if i == 0:
                conv(f"{p}.shortcut", out_c, in_c, 1)
            conv(f"{p}.conv1", b, in_c if i == 0 else out_c, 1)
            conv(f"{p}.conv2", b, b, 3)
            conv(f"{p}.conv3", out_c, b, 1)
        in_c, out_c, b = out_c, out_c * 2, b * 2
    c4 = res2 * 4
    rpn = "proposal_generator.rpn_head"
    shapes.update({f"{rpn}.conv.weight": (rpn_hidden, c4, 3, 3), f"{rpn}.conv.bias": (rpn_hidden,),
                   f"{rpn}.objectness_logits.weight": (anchors, rpn_hidden, 1, 1),
                   f"{rpn}.objectness_logits.bias": (anchors,),
                   f"{rpn}.anchor_deltas.weight": (anchors * 4, rpn_hidden, 1, 1),
                   f"{rpn}.anchor_deltas.bias": (anchors * 4,)})
    d, bp = res2 * 8, "roi_heads.box_predictor"
    shapes.update({f"{bp}.cls_score.weight": (classes + 1, d), f"{bp}.cls_score.bias": (classes + 1,),
                   f"{bp}.bbox_pred.weight": (classes * 4, d), f"{bp}.bbox_pred.bias": (classes * 4,),
                   f"{bp}.cls_embedding.weight": (classes + 1, d // 8),
                   f"{bp}.fc_attr.weight": (d // 4, d + d // 8), f"{bp}.fc_attr.bias": (d // 4,),
                   f"{bp}.attr_score.weight": (attrs + 1, d // 4), f"{bp}.attr_score.bias": (attrs + 1,)})
    return shapes


def test_r101_state_dict_is_the_detectron2_layout():
    model = VGDetector(DetectorConfig.load("VG-R101-C4"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _detectron2_shapes((3, 4, 23, 3))
    assert got == want
    assert got["roi_heads.box_predictor.cls_score.weight"] == (1601, 2048)
    assert got["roi_heads.box_predictor.bbox_pred.weight"] == (6400, 2048)
    assert got["roi_heads.box_predictor.fc_attr.weight"] == (512, 2304)
    assert got["roi_heads.box_predictor.attr_score.weight"] == (401, 512)
    # res3/res4 stride in conv1 of block 0 (MSRA), res5 head at stride 1 with conv2 dilated by 2
    assert model.backbone.res3[0].conv1.stride == (2, 2) and model.backbone.res3[0].conv2.stride == (1, 1)
    assert model.backbone.res4[0].shortcut.stride == (2, 2)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in model.roi_heads.res5)
    res5 = model.roi_heads.res5[0]
    assert res5.conv1.stride == (1, 1) and res5.shortcut.stride == (1, 1)


def test_r50_and_tiny_share_the_structure():
    r50 = {k: tuple(v.shape) for k, v in VGDetector(DetectorConfig.load("VG-R50-C4")).state_dict().items()}
    assert r50 == _detectron2_shapes((3, 4, 6, 3))
    tiny_cfg = DetectorConfig.load("tiny")
    tiny = {k: tuple(v.shape) for k, v in VGDetector(tiny_cfg).state_dict().items()}
    assert tiny == _detectron2_shapes(tiny_cfg.num_blocks, stem=16, res2=32, width=8, rpn_hidden=64)
    assert tiny_cfg.feature_dim == 256


def test_r101_forward_on_a_small_image():
    cfg = DetectorConfig.load("VG-R101-C4").replace(min_size_test=96, max_size_test=128, rpn_post_nms_topk=3)
    torch.manual_seed(1)
    model = VGDetector(cfg)
    det = model([model.prepare(_bgr(data.coffee()))])[0]
    assert det.image_size == (85, 128)  # 400x600 -> shortest side 96 gives 144 wide, capped to 128
    n = len(det.proposals)
    assert 1 <= n <= 3
    assert det.features.shape == (n, 2048) and det.scores.shape == (n, 1601)
    assert det.boxes.shape == (n, 1600, 4)
    assert det.attr_scores.shape == (n, 401)
    assert torch.allclose(det.scores.sum(1), torch.ones(n), atol=1e-5)


def test_resize_follows_detectron2_resize_shortest_edge():
    assert resized_shape(480, 640, 600, 1000) == (600, 800)
    assert resized_shape(640, 480, 600, 1000) == (800, 600)
    assert resized_shape(500, 2000, 600, 1000) == (250, 1000)  # longest side capped
    assert resized_shape(333, 500, 600, 1000) == (600, 901)  # 500 * 600 / 333 = 900.9 rounds half up
    img = _bgr(data.chelsea())  # 300 x 451
    out = resize_image(img, 600, 1000)
    assert out.shape == (600, 902, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(img.mean())) < 1.0


def test_anchors_follow_detectron2_order_and_maths():
    cells = cell_anchors((64, 128), (0.5, 1.0, 2.0))
    assert cells.shape == (6, 4)
    w = math.sqrt(64 * 64 / 0.5)  # size-major, then ratio; h = ratio * w; centred on 0, not rounded
    assert torch.allclose(cells[0], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))
    assert torch.allclose(cells[1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    assert torch.allclose(cells[4], torch.tensor([-64.0, -64.0, 64.0, 64.0]))
    grid = grid_anchors(cells, 2, 3, 16, 0.0)
    assert grid.shape == (2 * 3 * 6, 4)
    # location (y=1, x=2) is row-major index 5; its anchor 1 is the 64x64 square centred on (32, 16)
    assert torch.allclose(grid[5 * 6 + 1], torch.tensor([0.0, -16.0, 64.0, 48.0]))


def test_stem_uses_caffe_max_pool():
    stem = VGDetector(DetectorConfig.load("tiny")).backbone.stem
    # 224 -> conv 7x7/2 -> 112 -> 3x3/2 pool with pad 0: ceil_mode gives 56 where floor would give 55
    assert stem(torch.zeros(1, 3, 224, 224)).shape[-1] == 56
    # 226 -> 113 -> Caffe pool (pad 0, ceil) 56; Detectron2's default pool (pad 1, floor) 57
    assert stem(torch.zeros(1, 3, 226, 226)).shape[-1] == 56
    stem.caffe_maxpool = False
    assert stem(torch.zeros(1, 3, 226, 226)).shape[-1] == 57


def test_outputs_are_consistent_on_a_real_photo():
    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny"))
    det = model([model.prepare(_bgr(data.astronaut()))])[0]
    h, w = det.image_size
    assert (h, w) == (224, 224)
    p = det.proposals
    assert 0 < len(p) <= 100
    assert (p[:, 0] >= 0).all() and (p[:, 2] <= w).all() and (p[:, 3] <= h).all()
    assert ((p[:, 2] > p[:, 0]) & (p[:, 3] > p[:, 1])).all()
    assert torch.allclose(det.scores.sum(1), torch.ones(len(p)), atol=1e-5)
    assert torch.allclose(det.attr_scores.sum(1), torch.ones(len(p)), atol=1e-5)
    assert (det.boxes[..., 0::2] <= w).all() and (det.boxes >= 0).all()
    # regressed boxes are proposals moved by the class deltas with weights (10, 10, 5, 5)
    deltas = model.roi_heads.box_predictor.bbox_pred(det.features)[:, :4]
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    cx = p[:, 0] + 0.5 * pw + deltas[:, 0] / 10 * pw
    cy = p[:, 1] + 0.5 * ph + deltas[:, 1] / 10 * ph
    bw, bh = torch.exp(deltas[:, 2] / 5) * pw, torch.exp(deltas[:, 3] / 5) * ph
    assert torch.allclose(det.boxes[:, 0, 0], (cx - 0.5 * bw).clamp(0, w), atol=1e-3)
    assert torch.allclose(det.boxes[:, 0, 3], (cy + 0.5 * bh).clamp(0, h), atol=1e-3)


def test_batch_of_mixed_sizes_equals_batch_of_one():
    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny"))
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.astronaut()[:, ::-1]]
    images = [model.prepare(_bgr(np.ascontiguousarray(p))) for p in photos]
    assert len({tuple(x.shape) for x in images}) == 3  # two share a size, so one group has two images
    batched = model(images)
    for x, b in zip(images, batched):
        s = model([x])[0]
        assert s.proposals.shape == b.proposals.shape  # same proposals, same order
        assert torch.allclose(s.proposals, b.proposals, atol=1e-3)
        assert torch.allclose(b.features, s.features, rtol=1e-4, atol=1e-4 * float(s.features.abs().max()))
        assert torch.allclose(b.scores, s.scores, atol=1e-5)
        k1, _ = select_caffe(s.proposals, s.scores, min_boxes=10, max_boxes=100)
        k2, _ = select_caffe(b.proposals, b.scores, min_boxes=10, max_boxes=100)
        assert torch.equal(k1, k2)
        m1, _ = select_maxnms(s.boxes, s.scores)
        m2, _ = select_maxnms(b.boxes, b.scores)
        assert torch.equal(m1, m2)


def test_padding_would_have_changed_the_features():
    """Why the batching rule exists: the same image padded gives different border features."""
    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny"))
    x = model.normalize(model.prepare(_bgr(data.coffee()))[None])
    padded = torch.nn.functional.pad(x, (0, 32, 0, 32))
    with torch.no_grad():
        a = model.backbone(x)
        b = model.backbone(padded)[..., : a.shape[-2], : a.shape[-1]]
    assert not torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("res5_halve", [True, False])
def test_res5_halve_switches_stride_and_dilation(res5_halve):
    cfg = DetectorConfig.load("tiny").replace(res5_halve=res5_halve)
    heads = VGDetector(cfg).roi_heads
    out = heads.res5(torch.zeros(2, 128, 14, 14))
    assert out.shape == ((2, 256, 7, 7) if res5_halve else (2, 256, 14, 14))
