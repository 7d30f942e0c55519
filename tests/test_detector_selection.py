"""Box selection on hand-made scores: the Caffe generate_tsv rule and py-bottom-up-attention's max-NMS."""
import pytest
import torch
from torchvision.ops import box_iou as torchvision_iou
from torchvision.ops import nms

from extractor.detector.selection import (
    _greedy_steps_numpy,
    _greedy_steps_torch,
    best_labels,
    caffe_max_conf,
    select_caffe,
    select_maxnms,
)


def _with_background(fg: list[list[float]]) -> torch.Tensor:
    """Class probabilities with the background column appended last (rows sum to 1)."""
    fg_t = torch.tensor(fg)
    return torch.cat([fg_t, 1 - fg_t.sum(1, keepdim=True)], dim=1)


# A and B overlap (IoU 0.82), C stands apart; D sits on A and is beaten by A and B in every class.
BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0],
                      [0.0, 1.0, 10.0, 11.0]])
SCORES = _with_background([[0.60, 0.10], [0.50, 0.30], [0.10, 0.05], [0.05, 0.02]])


def test_caffe_max_conf_is_the_best_score_a_box_keeps_per_class():
    # class 0: A kept (0.6), B and D suppressed by A, C kept (0.1)
    # class 1: B kept (0.3), A and D suppressed by B, C kept (0.05)
    mc = caffe_max_conf(BOXES, SCORES[:, :-1], 0.3)
    assert torch.allclose(mc, torch.tensor([0.60, 0.30, 0.10, 0.0]))


def test_caffe_threshold_then_min_and_max():
    keep, boxes = select_caffe(BOXES, SCORES, score_thresh=0.2, min_boxes=1, max_boxes=100)
    assert keep.tolist() == [0, 1]  # max_conf >= 0.2, sorted by max_conf
    assert torch.equal(boxes, BOXES[[0, 1]])  # the stored box is the proposal itself
    assert select_caffe(BOXES, SCORES, min_boxes=3, max_boxes=100)[0].tolist() == [0, 1, 2]
    assert select_caffe(BOXES, SCORES, min_boxes=1, max_boxes=1)[0].tolist() == [0]
    # fixed N ignores the threshold: the N best by max_conf
    assert select_caffe(BOXES, SCORES, min_boxes=4, max_boxes=4)[0].tolist() == [0, 1, 2, 3]
    # a looser NMS lets D survive in class 0 (IoU(A, D) = 0.82 < 0.9)
    assert select_caffe(BOXES, SCORES, nms_thresh=0.9, min_boxes=1, max_boxes=4)[0].tolist() == [0, 1]
    assert torch.allclose(caffe_max_conf(BOXES, SCORES[:, :-1], 0.9), torch.tensor([0.6, 0.5, 0.1, 0.05]))


def _caffe_reference(boxes: torch.Tensor, class_scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """The generate_tsv loop: NMS per class over the proposals, keep each box's best surviving score."""
    max_conf = torch.zeros(len(boxes))
    for c in range(class_scores.shape[1]):
        s = class_scores[:, c]
        keep = nms(boxes, s, thresh)
        max_conf[keep] = torch.where(s[keep] > max_conf[keep], s[keep], max_conf[keep])
    return max_conf


@pytest.mark.parametrize("thresh", [0.3, 0.5])
def test_vectorised_caffe_matches_the_per_class_loop(thresh):
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(60, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 60], dim=1)
    scores = torch.softmax(torch.randn(60, 41, generator=g) * 2, dim=1)
    fg = scores[:, :-1]
    assert torch.equal(caffe_max_conf(boxes, fg, thresh), _caffe_reference(boxes, fg, thresh))
    # the device path (one torch op per step, used on CUDA) agrees with the CPU path
    overlaps = torchvision_iou(boxes, boxes) > thresh
    order = scores[:, :-1].argsort(dim=0, descending=True, stable=True)
    assert torch.equal(_greedy_steps_torch(overlaps, order), _greedy_steps_numpy(overlaps, order))


def test_caffe_with_no_proposals():
    keep, boxes = select_caffe(torch.zeros(0, 4), torch.zeros(0, 5), min_boxes=10, max_boxes=100)
    assert keep.numel() == 0 and boxes.shape == (0, 4)


def _maxnms_case():
    """Three proposals whose best-class boxes overlap in a row: IoU(A,B) = IoU(B,C) = 0.43, IoU(A,C) = 0.11"""
    best = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0], [8.0, 0.0, 18.0, 10.0]])
    far = torch.tensor([200.0, 200.0, 210.0, 210.0])
    boxes = torch.stack([torch.stack(pair) for pair in ((best[0], far), (far, best[1]), (best[2], far))])
    scores = _with_background([[0.9, 0.05], [0.1, 0.8], [0.7, 0.1]])  # best classes: 0, 1, 0
    return boxes, scores, best


def test_maxnms_uses_the_best_class_box_and_steps_the_threshold():
    boxes, scores, best = _maxnms_case()
    keep, kept = select_maxnms(boxes, scores, min_boxes=2, max_boxes=36)
    assert keep.tolist() == [0, 2]  # at IoU 0.3 B is suppressed by A; two boxes are enough
    assert torch.equal(kept, best[[0, 2]])
    keep, kept = select_maxnms(boxes, scores, min_boxes=3, max_boxes=36)
    assert keep.tolist() == [0, 1, 2]  # 0.3 and 0.4 keep two; 0.5 keeps all three
    assert torch.equal(kept, best)
    assert select_maxnms(boxes, scores, min_boxes=1, max_boxes=1)[0].tolist() == [0]
    # fewer proposals than min_boxes: all thresholds tried, the last result stands
    assert select_maxnms(boxes, scores, min_boxes=5, max_boxes=36)[0].tolist() == [0, 1, 2]


def test_best_labels_skip_the_background_column():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    ids, conf = best_labels(probs)
    assert ids.tolist() == [1, 0]
    assert torch.allclose(conf, torch.tensor([0.2, 0.5]))
