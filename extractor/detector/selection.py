"""Which detected regions become a stored image's boxes: the two rules in use, as pure tensor functions.

``caffe`` is the rule of the original bottom-up-attention ``generate_tsv.py`` (the features LXMERT
was trained on): every class runs NMS over the proposal boxes with its own scores; a proposal's
``max_conf`` is the best class score it keeps; proposals with max_conf >= 0.2 are kept, at least
min_boxes and at most max_boxes (fixed N: min = max = N). The stored box is the proposal itself.

``maxnms`` is py-bottom-up-attention's rule: each proposal takes its best class and that class's
regressed box; class-agnostic NMS at IoU 0.3, 0.4, ... 0.9 until at least min_boxes survive.

IoU follows Detectron2/torchvision (no +1 on widths), class scores have background LAST.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

STRATEGIES = ("caffe", "maxnms")
MAXNMS_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _greedy_steps_torch(overlaps: Tensor, order: Tensor) -> Tensor:
    """(C, R) kept mask of per-class greedy NMS: all classes advance one rank per step (GPU-friendly)."""
    r, c = order.shape
    flat_base = torch.arange(c, device=order.device) * r  # (class, box) pairs as flat indices into C*R
    suppressed = torch.zeros(c * r, dtype=torch.bool, device=order.device)
    kept = torch.zeros(c * r, dtype=torch.bool, device=order.device)
    for k in range(r):
        box = order[k]
        pair = flat_base + box
        alive = ~suppressed.index_select(0, pair)
        kept.index_copy_(0, pair, alive)
        suppressed.view(c, r).logical_or_(overlaps.index_select(0, box) & alive.unsqueeze(1))
    return kept.view(c, r)


def _greedy_steps_numpy(overlaps: Tensor, order: Tensor) -> Tensor:
    """Same as _greedy_steps_torch; on the CPU numpy's single-threaded small ops are several times faster."""
    over, order_np = overlaps.cpu().numpy(), order.cpu().numpy()
    r, c = order_np.shape
    flat_base = np.arange(c) * r
    suppressed = np.zeros((c, r), dtype=bool)
    flat_suppressed = suppressed.reshape(-1)
    kept = np.zeros(c * r, dtype=bool)
    for k in range(r):
        box = order_np[k]
        pair = flat_base + box
        alive = np.flatnonzero(~flat_suppressed[pair])
        kept[pair[alive]] = True
        suppressed[alive] |= over[box[alive]]
    return torch.from_numpy(kept.reshape(c, r)).to(order.device)


def caffe_max_conf(boxes: Tensor, class_scores: Tensor, nms_thresh: float) -> Tensor:
    """(R,) best class score each box keeps under per-class greedy NMS; class_scores (R, C), no background.

    Instead of a Python loop over C classes, all classes advance together one rank per step over
    one shared IoU matrix (R steps): the per-class NMS of generate_tsv, computed exactly.
    """
    if class_scores.shape[0] == 0:
        return class_scores.new_zeros(0)
    overlaps = box_iou(boxes.float(), boxes.float()) > nms_thresh  # (R, R)
    order = class_scores.argsort(dim=0, descending=True, stable=True)  # (R, C): order[k, c] = k-th box of c
    steps = _greedy_steps_torch if class_scores.is_cuda else _greedy_steps_numpy
    return (class_scores.t() * steps(overlaps, order)).amax(dim=0)


def select_caffe(proposals: Tensor, scores: Tensor, *, score_thresh: float = 0.2, nms_thresh: float = 0.3,
                 min_boxes: int = 10, max_boxes: int = 100) -> tuple[Tensor, Tensor]:
    """Kept proposal indices sorted by max_conf (descending) and their boxes (the proposals themselves)."""
    max_conf = caffe_max_conf(proposals, scores[:, :-1], nms_thresh)
    order = max_conf.argsort(descending=True, stable=True)
    above = int((max_conf >= score_thresh).sum())
    keep = order[: min(max(above, min_boxes), max_boxes)]
    return keep, proposals[keep]


def select_maxnms(boxes: Tensor, scores: Tensor, *, min_boxes: int = 36, max_boxes: int = 36,
                  thresholds: tuple[float, ...] = MAXNMS_THRESHOLDS) -> tuple[Tensor, Tensor]:
    """Kept indices (by score, descending) and their best-class regressed boxes; boxes (R, C, 4)."""
    best_scores, best_classes = scores[:, :-1].max(dim=1)
    best_boxes = boxes[torch.arange(len(boxes), device=boxes.device), best_classes]
    keep = best_scores.new_zeros(0, dtype=torch.long)
    for t in thresholds:
        keep = nms(best_boxes.float(), best_scores.float(), t)[:max_boxes]
        if len(keep) >= min_boxes:
            break
    return keep, best_boxes[keep]


def best_labels(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax id and its probability over the non-background columns (background is the last column)."""
    conf, ids = probs[:, :-1].max(dim=1)
    return ids, conf
