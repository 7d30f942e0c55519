"""Faster R-CNN training losses of the detector: RPN objectness and boxes, RoI classes and boxes, attributes.

The losses follow torchvision's RPN and ``fastrcnn_loss`` on torchvision's ``Matcher``,
``BalancedPositiveNegativeSampler`` and the model's own ``BoxCoder``s, with one difference that matters:
our predictor keeps background as the LAST class (Detectron2's order), so background is label
``num_classes``, not 0. The attribute head learns on positive regions given their ground-truth class,
as bottom-up-attention trained it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import box_iou

from extractor.detector.model import VGDetector
from extractor.detector.samples import DetectionSample

SMOOTH_L1_BETA = 1.0 / 9  # torchvision's choice for both box losses


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
