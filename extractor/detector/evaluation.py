"""How well a detector detects: the standard Faster R-CNN test, VOC mAP, and region accuracy of its features."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from extractor.detector.labels import OBJECTS_FILE, read_labels
from extractor.detector.model import VGDetector
from extractor.detector.samples import DetectionDataset, DetectionSample


@dataclass
class ImageDetections:
    """Final detections of one image in resized pixels, sorted by score."""

    boxes: Tensor  # (n, 4)
    scores: Tensor  # (n,)
    classes: Tensor  # (n,) int64, background excluded


@torch.no_grad()
def detect(model: VGDetector, images: Sequence[Tensor], *, score_thresh: float = 0.05,
           nms_thresh: float = 0.3, max_detections: int = 100) -> list[ImageDetections]:
    """Standard Faster R-CNN test: class-specific regressed boxes, score threshold, per-class NMS, top-k."""
    out = []
    for det in model(images):
        scores = det.scores[:, :-1]  # background is the last column
        keep = torch.where(scores > score_thresh)
        boxes, s, cls = det.boxes[keep[0], keep[1]], scores[keep], keep[1]
        kept = batched_nms(boxes, s, cls, nms_thresh)[:max_detections]
        out.append(ImageDetections(boxes[kept], s[kept], cls[kept]))
    return out


def match_detections(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, iou: float = 0.5) -> Tensor:
    """VOC matching in one image and class: by descending score, a detection is a true positive when
    its best-overlapping ground truth reaches ``iou`` and was not taken by a better detection."""
    tp = torch.zeros(len(boxes), dtype=torch.bool)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return tp
    overlaps = box_iou(boxes.float(), gt_boxes.float())
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for d in scores.argsort(descending=True, stable=True).tolist():
        best, g = overlaps[d].max(dim=0)
        if best >= iou and not taken[g]:
            tp[d] = taken[g] = True
    return tp


def average_precision(scores: Sequence[float] | np.ndarray, tp: Sequence[bool] | np.ndarray,
                      num_gt: int) -> float:
    """VOC AP with all-point interpolation: area under the precision envelope over recall."""
    if num_gt <= 0:
        raise ValueError("average_precision needs at least one ground-truth box")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(tp, dtype=np.float64)[order]
    cum_tp = np.cumsum(hits)
    recall = np.concatenate([[0.0], cum_tp / num_gt, [1.0]])
    precision = np.concatenate([[0.0], cum_tp / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _batches(n: int, size: int) -> Iterable[range]:
    return (range(i, min(i + size, n)) for i in range(0, n, size))


@torch.no_grad()
def evaluate_map(model: VGDetector, samples: Sequence[DetectionSample] | DetectionDataset, *,
                 iou: float = 0.5, score_thresh: float = 0.05, nms_thresh: float = 0.3,
                 max_detections: int = 100, batch_size: int = 8) -> dict[str, Any]:
    """VOC mAP at ``iou`` over samples (key ``map50`` at 0.5, ``map75`` at 0.75, ...).

    Detections are Detectron2's test defaults with bottom-up-attention's NMS of 0.3; AP is averaged
    over the classes that have ground truth in the samples; ``per_class`` maps class names to AP.
    """
    model.eval()
    dev = model.pixel_mean.device
    names = read_labels(model.cfg.object_labels or OBJECTS_FILE)
    found: dict[int, tuple[list[float], list[bool]]] = {}
    num_gt: dict[int, int] = {}
    for rows in _batches(len(samples), batch_size):
        chunk = [samples[i] for i in rows]
        for s, det in zip(chunk, detect(model, [s.image.to(dev) for s in chunk], score_thresh=score_thresh,
                                        nms_thresh=nms_thresh, max_detections=max_detections)):
            boxes, scores, classes = det.boxes.cpu(), det.scores.cpu(), det.classes.cpu()
            for c in sorted(set(classes.tolist()) | set(s.classes.tolist())):
                mine, truth = classes == c, s.boxes[s.classes == c]
                num_gt[c] = num_gt.get(c, 0) + len(truth)
                hits = match_detections(boxes[mine], scores[mine], truth, iou)
                sc, tp = found.setdefault(c, ([], []))
                sc += scores[mine].tolist()
                tp += hits.tolist()
    per_class = {names[c]: average_precision(*found[c], num_gt[c]) for c in sorted(num_gt) if num_gt[c] > 0}
    mean = float(np.mean(list(per_class.values()))) if per_class else None  # JSON has no NaN
    return {f"map{round(iou * 100)}": mean, "per_class": per_class, "iou": iou, "images": len(samples),
            "ground_truth": sum(num_gt.values())}


@torch.no_grad()
def region_accuracy(model: VGDetector,
                    samples: Sequence[DetectionSample] | DetectionDataset) -> dict[str, float | None]:
    """Whether ground-truth regions' features name their object and attributes, labelled as extraction does.

    ``object``: share of boxes whose argmax class is right; ``attribute``: share of a box's k true
    attributes among its k best (no-attribute column excluded; the attribute head gets the argmax
    class, background included, as at test time). Tells whether the features carry shape and colour.
    """
    model.eval()
    dev = model.pixel_mean.device
    right = found = wanted = boxes = 0
    for i in range(len(samples)):
        s = samples[i]
        if len(s.boxes) == 0:
            continue
        c4 = model.backbone(model.normalize(s.image[None].to(dev)))
        features = model.roi_heads(model.roi_heads.pool(c4, [s.boxes.to(dev)]))
        logits, _, attr_logits = model.roi_heads.box_predictor(features)
        right += int((logits.argmax(-1).cpu() == s.classes).sum())
        boxes += len(s.boxes)
        if attr_logits is not None:
            ranked = attr_logits[:, :-1].argsort(dim=-1, descending=True).cpu()
            for order, truth in zip(ranked, s.attributes):
                truth = truth[(truth >= 0) & (truth < attr_logits.shape[1] - 1)]
                wanted += len(truth)
                found += int(torch.isin(truth, order[: len(truth)]).sum())
    return {"object": right / boxes if boxes else None,
            "attribute": found / wanted if wanted else None}
