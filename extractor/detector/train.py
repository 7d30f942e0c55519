"""Train the Visual Genome detector (RPN, box head, attribute head) on Visual Genome annotations.

No pretrained weights can be fetched, so a detector for a new set of classes (the demo world's
shapes, colours and sizes) is trained here from random initialisation, end to end, with
torchvision's Faster R-CNN machinery: ``Matcher``, ``BalancedPositiveNegativeSampler`` and the
model's own ``BoxCoder``s. The losses follow torchvision's RPN and ``fastrcnn_loss`` with one
difference that matters: our predictor keeps background as the LAST class (Detectron2's order),
so background is label ``num_classes``, not 0. The attribute head learns on positive regions
given their ground-truth class, as bottom-up-attention trained it.

Training runs the model's parts (``backbone``, ``RegionProposalNetwork.head_outputs`` / ``select``,
``Res5RoIHeads.pool``, ``BoxPredictor``) with gradients; ``VGDetector.forward`` stays the inference
path, so trained weights extract exactly like released ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm

from extractor.detector.config import _MAPPED, NAMED_CONFIGS, ConfigError, DetectorConfig
from extractor.detector.labels import ATTRIBUTES_FILE, OBJECTS_FILE, read_labels
from extractor.detector.model import Bottleneck, Conv2dNorm, VGDetector, image_to_tensor, resize_image
from extractor.detector.weights import save_detectron2_weights
from extractor.fileio import atomic_write
from extractor.images import ImageReadError, image_id, list_images, load_image

# Detectron2's MSRA input normalisation: a network trained from scratch without batch statistics
# needs inputs near unit scale (the released Caffe model's std of 1 only suits its own weights).
DEMO_PIXEL_MEAN = (103.530, 116.280, 123.675)
DEMO_PIXEL_STD = (57.375, 57.120, 58.395)
SMOOTH_L1_BETA = 1.0 / 9  # torchvision's choice for both box losses


class AnnotationError(ValueError):
    """Annotations that cannot be trained on (unknown name, missing image, malformed record)."""


# ---------------------------------------------------------------- configs

def demo_detector_config(objects_vocab: str | os.PathLike, attributes_vocab: str | os.PathLike,
                         image_size: int | Sequence[int]) -> DetectorConfig:
    """The tiny detector sized for the demo world: its classes, its image size, anchors for its shapes.

    Measured choices (docs/extractor.md, "Training a detector"): images upscaled 2x, because C4's
    stride of 16 leaves a 14 px shape under one cell at 1x and mAP falls by half; anchors of
    16 / 32 / 64 world pixels (the shapes are 14-38 px at 128); stride in the 3x3 conv, which
    learns shapes faster from scratch than the MSRA 1x1; ROIAlignV2 at 7x7 with one sample per bin
    (RoIPool's rounding to cells nearly triples the box loss; more samples make RoIAlign's CPU
    backward dearer); few proposals (at most 6 objects an image).
    """
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or min(sides) < 16:
        raise ConfigError(f"image_size must be a side or (width, height) of at least 16 px, "
                          f"got {image_size!r}")
    scale = 2
    unit = min(sides) * scale / 128  # the anchor sizes below are for a 128 px world
    objects, attributes = Path(objects_vocab).resolve(), Path(attributes_vocab).resolve()
    return DetectorConfig.load("tiny").replace(
        name="demo-detector",
        num_classes=len(read_labels(objects)), object_labels=str(objects),
        num_attributes=len(read_labels(attributes)), attribute_labels=str(attributes),
        stride_in_1x1=False, pixel_mean=DEMO_PIXEL_MEAN, pixel_std=DEMO_PIXEL_STD,
        min_size_test=min(sides) * scale, max_size_test=max(sides) * scale,
        anchor_sizes=tuple(float(round(s * unit)) for s in (16, 32, 64)),
        rpn_pre_nms_topk=600, rpn_post_nms_topk=64, pooler_type="ROIAlignV2", pooler_resolution=7,
        pooler_sampling_ratio=1)


# Keys that also set a field but say less (DEPTH implies standard blocks) or are the older spelling.
_YAML_ALIASES = frozenset({"MODEL.RESNETS.DEPTH", "MODEL.ROI_BOX_HEAD.ATTR", "MODEL.ROI_BOX_HEAD.NUM_ATTRS"})


def save_config_yaml(cfg: DetectorConfig, path: str | os.PathLike) -> Path:
    """Write cfg as a Detectron2-style YAML that ``DetectorConfig.load`` reads back equal (for the CLIs)."""
    keys: dict[str, str] = {}
    for key, (field, _) in _MAPPED.items():
        if key not in _YAML_ALIASES:
            keys.setdefault(field, key)
    tree: dict[str, Any] = {}
    for field, value in cfg.to_dict().items():
        if value is None:
            continue
        if field in ("anchor_sizes", "anchor_ratios"):
            value = [value]  # Detectron2 writes one list per feature level
        node = tree
        *parents, leaf = keys[field].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = Path(path)
    atomic_write(path, yaml.safe_dump(tree, sort_keys=True))
    return path


# ---------------------------------------------------------------- annotations

def read_vocabulary(path: str | os.PathLike) -> dict[str, int]:
    """Every comma-separated synonym of a label line (lower-cased) -> that line's class id."""
    count = len(read_labels(path))  # validates the file and fixes the numbering
    index: dict[str, int] = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()[:count]):
        for name in line.split(","):
            if name.strip():
                index.setdefault(name.strip().lower(), i)
    return index


@dataclass
class ImageAnnotation:
    """One image's ground truth in original pixels; attribute ids padded with -1 (k >= 1 columns)."""

    img_id: str
    path: Path
    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2
    classes: np.ndarray  # (n,) int64
    attributes: np.ndarray  # (n, k) int64


def _load_json_list(path: Path, what: str) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
    return data


def _entry_id(entry: Any, path: Path, index: int) -> str:
    if not isinstance(entry, dict) or "image_id" not in entry:
        raise AnnotationError(f"{path}: record {index} has no image_id")
    return str(entry["image_id"])


def read_vg_annotations(images: str | os.PathLike, objects: str | os.PathLike,
                        attributes: str | os.PathLike | None = None, *, object_vocab: str | os.PathLike,
                        attribute_vocab: str | os.PathLike | None, ids: Iterable[str | int] | None = None,
                        unknown_names: str = "error") -> tuple[list[ImageAnnotation], dict[str, int]]:
    """Visual Genome objects (+ attributes) as class / attribute ids, with counts of what was skipped.

    An object's class is the first of its ``names``; a name matches any synonym of a label line.
    Attributes come from the object itself and from attributes.json (same object_id), merged.
    Unknown names raise AnnotationError naming the name, object and image (``unknown_names="skip"``
    drops them instead and counts them); boxes without area are dropped and counted.
    """
    if unknown_names not in ("error", "skip"):
        raise ValueError(f"unknown_names must be 'error' or 'skip', got {unknown_names!r}")
    objects, images = Path(objects), Path(images)
    classes = read_vocabulary(object_vocab)
    attr_ids = read_vocabulary(attribute_vocab) if attribute_vocab is not None else None
    wanted = None if ids is None else {str(i) for i in ids}
    files = {image_id(p): p for p in list_images(images)}
    where = str(objects) if attributes is None else f"{objects} / {attributes}"

    extra: dict[tuple[str, Any], list[Any]] = {}
    if attributes is not None and attr_ids is not None:
        attributes = Path(attributes)
        for k, entry in enumerate(_load_json_list(attributes, "attributes")):
            img = _entry_id(entry, attributes, k)
            if wanted is None or img in wanted:
                for obj in entry.get("attributes") or []:
                    extra[(img, obj.get("object_id"))] = list(obj.get("attributes") or [])

    skipped = {"empty_boxes": 0, "unknown_objects": 0, "unknown_attributes": 0}
    out: list[ImageAnnotation] = []
    seen: set[str] = set()
    for k, entry in enumerate(_load_json_list(objects, "objects")):
        img = _entry_id(entry, objects, k)
        if wanted is not None and img not in wanted:
            continue
        if img in seen:
            raise AnnotationError(f"{objects}: image {img} appears twice (record {k})")
        seen.add(img)
        if img not in files:
            raise AnnotationError(f"{objects}: image {img} has no image file in {images}")
        boxes, labels, attrs = [], [], []
        for obj in entry.get("objects") or []:
            oid = obj.get("object_id")
            names = obj.get("names") or ([obj["name"]] if obj.get("name") else [])
            try:
                x, y, w, h = (float(obj[c]) for c in ("x", "y", "w", "h"))
            except (KeyError, TypeError, ValueError):
                raise AnnotationError(f"{objects}: image {img} object {oid}: needs numeric x, y, w, h"
                                      ) from None
            if not names:
                raise AnnotationError(f"{objects}: image {img} object {oid} has no names")
            if w <= 0 or h <= 0:
                skipped["empty_boxes"] += 1
                continue
            name = str(names[0]).strip().lower()
            if name not in classes:
                if unknown_names == "skip":
                    skipped["unknown_objects"] += 1
                    continue
                raise AnnotationError(f"{objects}: image {img} object {oid}: name {names[0]!r} is not in the "
                                      f"object vocabulary {object_vocab}")
            found: list[int] = []
            for a in (list(obj.get("attributes") or []) + extra.get((img, oid), [])) if attr_ids else []:
                key = str(a).strip().lower()
                if key not in attr_ids:
                    if unknown_names == "skip":
                        skipped["unknown_attributes"] += 1
                        continue
                    raise AnnotationError(f"{where}: image {img} object {oid}: attribute {a!r} is not in the "
                                          f"attribute vocabulary {attribute_vocab}")
                if attr_ids[key] not in found:
                    found.append(attr_ids[key])
            boxes.append([x, y, x + w, y + h])
            labels.append(classes[name])
            attrs.append(found)
        width = max([len(a) for a in attrs] + [1])
        out.append(ImageAnnotation(
            img, files[img], np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            np.asarray([a + [-1] * (width - len(a)) for a in attrs], dtype=np.int64).reshape(-1, width)))
    if wanted is not None and len(seen) < len(wanted):
        missing = sorted(wanted - seen)
        raise AnnotationError(f"{objects}: {len(missing)} requested image id(s) have no annotations: "
                              f"{missing[:10]}")
    return out, skipped


# ---------------------------------------------------------------- samples

@dataclass
class DetectionSample:
    """One resized image and its ground truth in resized pixels, what the losses and the mAP consume."""

    img_id: str
    image: Tensor  # (3, h, w) uint8 BGR
    boxes: Tensor  # (n, 4) float32 x1 y1 x2 y2
    classes: Tensor  # (n,) int64
    attributes: Tensor  # (n, k) int64, -1 padded


class DetectionDataset(Dataset):
    """Decodes, resizes (test-time rule) and optionally mirrors annotated images; items are (index, flip)."""

    def __init__(self, annotations: Sequence[ImageAnnotation], cfg: DetectorConfig) -> None:
        self.annotations = list(annotations)
        self.min_size, self.max_size = cfg.min_size_test, cfg.max_size_test

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, key: int | tuple[int, bool]) -> DetectionSample:
        i, flip = key if isinstance(key, tuple) else (key, False)
        ann = self.annotations[i]
        try:
            image = load_image(ann.path)
        except ImageReadError as e:
            raise AnnotationError(f"image {ann.img_id}: {e}") from None
        h, w = image.shape[:2]
        image = resize_image(image, self.min_size, self.max_size)
        rh, rw = image.shape[:2]
        boxes = torch.from_numpy(ann.boxes) * torch.tensor([rw / w, rh / h, rw / w, rh / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, rw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, rh)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # drop boxes outside the image
        if flip:
            image = image[:, ::-1]
            boxes = torch.stack([rw - boxes[:, 2], boxes[:, 1], rw - boxes[:, 0], boxes[:, 3]], dim=1)
        return DetectionSample(ann.img_id, image_to_tensor(image), boxes[keep],
                               torch.from_numpy(ann.classes)[keep], torch.from_numpy(ann.attributes)[keep])


def _as_list(items: list[DetectionSample]) -> list[DetectionSample]:
    return items


# ---------------------------------------------------------------- losses

@dataclass(frozen=True)
class LossSettings:
    """Sampling sizes and loss weights (Detectron2's key in the comments, its default in brackets).

    The RoI defaults suit scenes of a few objects trained briefly (the demo world: fewer regions
    per image, half of them positive); a full Visual Genome run would use Detectron2's values.
    The attribute loss is down-weighted because, at full weight, colour and size (easy) take the
    shared features first and the shapes are learned several times slower (measured).
    """

    rpn_batch_per_image: int = 256  # MODEL.RPN.BATCH_SIZE_PER_IMAGE [256]
    rpn_positive_fraction: float = 0.5  # MODEL.RPN.POSITIVE_FRACTION [0.5]
    rpn_iou: tuple[float, float] = (0.3, 0.7)  # MODEL.RPN.IOU_THRESHOLDS [0.3, 0.7]
    roi_batch_per_image: int = 16  # MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE [512]
    roi_positive_fraction: float = 0.5  # MODEL.ROI_HEADS.POSITIVE_FRACTION [0.25]
    roi_iou: float = 0.5  # MODEL.ROI_HEADS.IOU_THRESHOLDS [0.5]
    attribute_weight: float = 0.3


def _match(matcher: Matcher, gt: Tensor, boxes: Tensor) -> Tensor:
    """Matcher indices (>= 0 matched gt, -1 below, -2 between); an image without objects is all negative."""
    if len(gt) == 0:
        return torch.full((len(boxes),), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.long, device=boxes.device)
    return matcher(box_iou(gt, boxes))


def _sample(sampler: BalancedPositiveNegativeSampler, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the sampled positives and negatives (labels: 1 positive, 0 negative, -1 ignored)."""
    pos, neg = sampler([labels])
    return torch.where(pos[0])[0], torch.where(neg[0])[0]


def detector_losses(model: VGDetector, batch: Sequence[DetectionSample],
                    settings: LossSettings = LossSettings()) -> dict[str, Tensor]:
    """Faster R-CNN losses of a batch: RPN objectness / boxes, RoI classes / boxes, attributes.

    Images of equal size share one backbone pass and nothing is padded (the model's batching rule).
    Proposals come from the RPN without gradient, the ground-truth boxes are appended to them, and
    the RoI head trains on the sampled regions of all images at once. Background is label C (last).
    """
    dev = model.pixel_mean.device
    rpn, heads, predictor = model.proposal_generator, model.roi_heads, model.roi_heads.box_predictor
    num_classes = model.cfg.num_classes
    anchor_matcher = Matcher(settings.rpn_iou[1], settings.rpn_iou[0], allow_low_quality_matches=True)
    region_matcher = Matcher(settings.roi_iou, settings.roi_iou, allow_low_quality_matches=False)
    anchor_sampler = BalancedPositiveNegativeSampler(settings.rpn_batch_per_image,
                                                     settings.rpn_positive_fraction)
    region_sampler = BalancedPositiveNegativeSampler(settings.roi_batch_per_image,
                                                     settings.roi_positive_fraction)

    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(batch):
        groups.setdefault((int(s.image.shape[-2]), int(s.image.shape[-1])), []).append(i)
    obj_loss = rpn_box_loss = torch.zeros((), device=dev)
    anchors_sampled = 0
    pooled, labels, targets, attr_targets = [], [], [], []
    for size, idx in groups.items():
        c4 = model.backbone(model.normalize(torch.stack([batch[i].image for i in idx]).to(dev)))
        logits, deltas, anchors = rpn.head_outputs(c4)
        regions = []
        for j, i in enumerate(idx):
            gt = batch[i].boxes.to(dev)
            matches = _match(anchor_matcher, gt, anchors)
            below = torch.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, -1)  # -1: between, ignored
            anchor_labels = torch.where(matches >= 0, 1, below)
            pos, neg = _sample(anchor_sampler, anchor_labels)
            both = torch.cat([pos, neg])
            obj_loss = obj_loss + F.binary_cross_entropy_with_logits(
                logits[j, both], anchor_labels[both].float(), reduction="sum")
            if len(pos):
                wanted = rpn.box_coder.encode_single(gt[matches[pos]], anchors[pos])
                rpn_box_loss = rpn_box_loss + F.smooth_l1_loss(
                    deltas[j, pos], wanted, beta=SMOOTH_L1_BETA, reduction="sum")
            anchors_sampled += len(both)

            with torch.no_grad():
                proposals = torch.cat([rpn.select(logits[j], deltas[j], anchors, size), gt])
            matches = _match(region_matcher, gt, proposals)
            pos, neg = _sample(region_sampler, (matches >= 0).long())
            both = torch.cat([pos, neg])
            regions.append(proposals[both])
            cls = torch.full((len(both),), num_classes, dtype=torch.long, device=dev)
            cls[: len(pos)] = batch[i].classes.to(dev)[matches[pos]]
            labels.append(cls)
            targets.append(model.box_coder.encode_single(gt[matches[pos]], proposals[pos]))
            attr_targets.append(batch[i].attributes.to(dev)[matches[pos]])
        pooled.append(heads.pool(c4, regions))

    features = heads(torch.cat(pooled))
    labels_t = torch.cat(labels)
    fg = torch.where(labels_t < num_classes)[0]
    cls_loss = F.cross_entropy(predictor.cls_score(features).float(), labels_t)
    deltas = predictor.bbox_pred(features).float().view(len(features), num_classes, 4)
    box_loss = F.smooth_l1_loss(deltas[fg, labels_t[fg]], torch.cat(targets), beta=SMOOTH_L1_BETA,
                                reduction="sum") / max(len(labels_t), 1)
    losses = {"rpn_objectness": obj_loss / max(anchors_sampled, 1),
              "rpn_box": rpn_box_loss / max(anchors_sampled, 1),
              "roi_class": cls_loss, "roi_box": box_loss}
    if predictor.attribute_on:
        width = max(t.shape[1] for t in attr_targets)
        wanted = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-1) for t in attr_targets])
        losses["attribute"] = settings.attribute_weight * attribute_loss(
            predictor.attribute_logits(features[fg], labels_t[fg]), wanted)
    return losses


def attribute_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax CE averaged over each box's attribute labels, then over boxes; targets (n, k), -1 padded.

    A box's k labels pull its softmax towards k equal shares (multi-label as the original
    bottom-up-attention trained it); a box without attributes targets the "no attribute" column,
    the last one, so the head learns to say "none" rather than guess.
    """
    if len(logits) == 0:
        return logits.sum() * 0.0  # keeps the graph when a batch has no positive region
    targets = targets.clone()
    targets[~(targets >= 0).any(dim=1), 0] = logits.shape[1] - 1
    valid = targets >= 0
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets.clamp(min=0))
    return -((logp * valid).sum(1) / valid.sum(1)).mean()


# ---------------------------------------------------------------- test-time detection and mAP

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


# ---------------------------------------------------------------- training

@torch.no_grad()
def init_frozen_norms(model: VGDetector, samples: Sequence[DetectionSample]) -> None:
    """Set every frozen BN to the statistics of its conv's output on a few images, then leave it frozen.

    Trained from scratch, a network whose normalisation never adapts starts badly scaled; this
    data-dependent start (what a pretrained frozen BN would hold) makes each conv's output zero-mean,
    unit-variance at step 0 and learns the shapes markedly faster (measured). Residual branches start at
    full scale (the inference init's 0.1 only suits unscaled random weights).
    """
    def set_stats(conv: nn.Module, args: tuple[Tensor, ...]) -> None:
        out = F.conv2d(args[0], conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        conv.norm.running_mean.copy_(out.mean(dim=(0, 2, 3)))
        conv.norm.running_var.copy_(out.var(dim=(0, 2, 3)).clamp(min=1e-2))  # a dead channel stays tame

    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.conv3.norm.weight.fill_(1.0)
    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, Conv2dNorm)]
    try:
        dev = model.pixel_mean.device
        groups: dict[tuple[int, ...], list[DetectionSample]] = {}
        for s in samples:
            groups.setdefault(tuple(s.image.shape), []).append(s)
        images = max(groups.values(), key=len)  # the stem and res2..4 see one batch of equal-sized images
        c4 = model.backbone(model.normalize(torch.stack([s.image for s in images]).to(dev)))
        h, w = images[0].image.shape[-2:]
        regions = [torch.cat([s.boxes, s.boxes.new_tensor([[0, 0, w, h]])]).to(dev) for s in images]
        model.roi_heads(model.roi_heads.pool(c4, regions))  # res5 sees the objects and the whole image
    finally:
        for hook in hooks:
            hook.remove()


def _is_val(img_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id: stable when images are added or reordered."""
    h = int.from_bytes(hashlib.sha1(img_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _split(anns: list[ImageAnnotation], train_ids: list[str] | None, val_ids: list[str] | None,
           val_fraction: float, objects: Path) -> tuple[list[ImageAnnotation], list[ImageAnnotation]]:
    """(train, val): val_ids when given, else a hash-chosen val_fraction of the (train_ids) images."""
    if val_ids is not None:
        val_set = set(val_ids)
        overlap = sorted(val_set & set(train_ids or []))
        if overlap:
            raise ValueError(f"train_ids and val_ids share {len(overlap)} image(s): {overlap[:10]}")
        missing = sorted(val_set - {a.img_id for a in anns})
        if missing:
            raise AnnotationError(f"{objects}: {len(missing)} val image id(s) have no annotations: "
                                  f"{missing[:10]}")
        return [a for a in anns if a.img_id not in val_set], [a for a in anns if a.img_id in val_set]
    return ([a for a in anns if not _is_val(a.img_id, val_fraction)],
            [a for a in anns if _is_val(a.img_id, val_fraction)])


def train_detector(cfg: DetectorConfig | str | os.PathLike, *, images: str | os.PathLike,
                   objects: str | os.PathLike, attributes: str | os.PathLike | None = None,
                   output: str | os.PathLike, train_ids: Iterable[str | int] | None = None,
                   val_ids: Iterable[str | int] | None = None, val_fraction: float = 0.2,
                   metrics: str | os.PathLike | None = None, epochs: float = 10.0, steps: int | None = None,
                   batch_size: int = 4, lr: float = 5e-3, weight_decay: float = 1e-4, warmup_steps: int = 50,
                   flip: bool = True, losses: LossSettings = LossSettings(), seed: int = 0,
                   device: str = "cpu", num_workers: int = 0, unknown_names: str = "error",
                   progress: bool = True) -> dict[str, Any]:
    """Train VGDetector(cfg) from random initialisation; save Detectron2-format weights and a metrics JSON.

    Validation images are ``val_ids`` when given, else a deterministic ``val_fraction`` of the
    (``train_ids``) images chosen by a hash of their id. ``steps`` overrides ``epochs``. AdamW with
    warm-up and cosine decay; on CPU the same seed and thread count give the same weights.
    Returns the metrics (mAP@0.5 and region accuracy on val, per-epoch mean losses, wall and CPU
    seconds), which are also written to ``metrics`` (default: ``output`` with suffix ``.json``).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    cfg = DetectorConfig.load(cfg)
    output = Path(output)
    metrics_path = Path(metrics) if metrics is not None else output.with_suffix(".json")
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("steps", 1 if steps is None else steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if steps is None and not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_list = None if train_ids is None else [str(i) for i in train_ids]
    val_list = None if val_ids is None else [str(i) for i in val_ids]
    anns, skipped = read_vg_annotations(
        images, objects, attributes, object_vocab=cfg.object_labels or OBJECTS_FILE,
        attribute_vocab=(cfg.attribute_labels or ATTRIBUTES_FILE) if cfg.attribute_on else None,
        ids=None if train_list is None else train_list + (val_list or []), unknown_names=unknown_names)
    train, val = _split(anns, train_list, val_list, val_fraction, Path(objects))
    if not train:
        raise AnnotationError(f"{objects}: no training images left (train_ids / val_ids / val_fraction)")

    dev = torch.device(device)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps if steps is not None else max(1, round(epochs * steps_per_epoch))
    warmup = min(warmup_steps, max(total // 5, 1))
    train_data, val_data = DetectionDataset(train, cfg), DetectionDataset(val, cfg)
    order = torch.Generator().manual_seed(seed)
    batches: list[list[tuple[int, bool]]] = []  # (image, mirrored) of every step, drawn up front
    while len(batches) < total:
        perm = torch.randperm(len(train), generator=order).tolist()
        mirror = (torch.rand(len(train), generator=order) < 0.5).tolist() if flip else [False] * len(train)
        batches += [[(i, mirror[i]) for i in perm[b: b + batch_size]]
                    for b in range(0, len(perm), batch_size)]
    batches = batches[:total]
    loader = DataLoader(train_data, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list)

    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeds init and sampling, leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = VGDetector(cfg).to(dev).train()
        init_frozen_norms(model, [train_data[key] for key in batches[0] + batches[min(1, total - 1)]])
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
        with tqdm(total=total, disable=not progress, desc="detector", unit="step") as bar:
            for step, batch in enumerate(loader):
                parts = detector_losses(model, batch, losses)
                loss = sum(parts.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"detector loss is {loss.item()} at step {step} "
                                             f"({ {k: v.item() for k, v in parts.items()} }); try a lower lr "
                                             f"than {lr}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for k, v in {**parts, "loss": loss}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
                    n = step + 1 - (history[-1]["step"] if history else 0)
                    history.append({"epoch": len(history) + 1, "step": step + 1,
                                    **{k: round(v / n, 5) for k, v in sums.items()}})
                    sums = {}
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    model.eval()
    result: dict[str, Any] = {"map50": None, "per_class": {}, "region_accuracy": {}}
    if len(val_data):
        result.update(evaluate_map(model, val_data))
        result["region_accuracy"] = region_accuracy(model, val_data)
    sha = save_detectron2_weights(model, output)  # written under a temporary name, then renamed
    result.update({
        "weights": str(output), "weights_sha256": sha, "metrics": str(metrics_path), "config": cfg.to_dict(),
        "train_images": len(train), "val_images": len(val), "skipped": skipped, "steps": total,
        "epochs": round(total / steps_per_epoch, 3), "batch_size": batch_size, "lr": lr, "seed": seed,
        "device": str(dev), "threads": torch.get_num_threads(), "train_seconds": round(train_wall, 2),
        "train_cpu_seconds": round(train_cpu, 2), "seconds": round(time.perf_counter() - wall, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2), "history": history})
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(metrics_path, result)
    return result


# ---------------------------------------------------------------- command line

def _read_ids(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"id list not found: {p}")
    return [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extractor.detector.train",
                                description="Train the Visual Genome detector on Visual Genome annotations.")
    p.add_argument("--images", required=True, help="folder of the annotated images (file stem = image_id)")
    p.add_argument("--objects", required=True, help="Visual Genome objects.json")
    p.add_argument("--attributes", help="Visual Genome attributes.json (optional)")
    p.add_argument("--output", required=True,
                   help="weights to write (.pkl); the metrics (.json) and config (.yaml) go next to them")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--config", help=f"named config ({', '.join(NAMED_CONFIGS)}) or a Detectron2-style YAML")
    c.add_argument("--demo", nargs=3, metavar=("OBJECTS_VOCAB", "ATTRIBUTES_VOCAB", "IMAGE_SIZE"),
                   help="the demo world's detector config for these label files and image side")
    p.add_argument("--train-ids", help="file of training image ids, one a line (default: all not in val)")
    p.add_argument("--val-ids", help="file of validation image ids, one a line")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share held out when --val-ids is absent")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--skip-unknown-names", action="store_true",
                   help="drop objects / attributes whose names are not in the label files (default: error)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.demo:
            objects_vocab, attributes_vocab, side = args.demo
            if not side.isdigit():
                raise ValueError(f"--demo IMAGE_SIZE must be a number of pixels, got {side!r}")
            cfg = demo_detector_config(objects_vocab, attributes_vocab, int(side))
        else:
            cfg = DetectorConfig.load(args.config)
        result = train_detector(
            cfg, images=args.images, objects=args.objects, attributes=args.attributes, output=args.output,
            train_ids=_read_ids(args.train_ids), val_ids=_read_ids(args.val_ids),
            val_fraction=args.val_fraction,
            epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            device=args.device, num_workers=args.workers,
            unknown_names="skip" if args.skip_unknown_names else "error", progress=not args.no_progress)
        config_yaml = save_config_yaml(cfg, Path(args.output).with_suffix(".yaml"))
    except (ConfigError, AnnotationError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    map50 = "n/a" if result["map50"] is None else f"{result['map50']:.3f}"
    print(f"{result['weights']}: {result['steps']} steps on {result['train_images']} images in "
          f"{result['train_seconds']:.1f} s ({result['train_cpu_seconds']:.1f} CPU s), "
          f"val mAP@0.5 {map50} on "
          f"{result['val_images']} images; metrics {result['metrics']}; config {config_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
