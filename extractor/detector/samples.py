"""Annotated images as the detector trains on them: decoded, resized by the test-time rule (the config's
resize mode, so training and extraction see images alike), maybe mirrored."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from extractor.detector.annotations import AnnotationError, ImageAnnotation
from extractor.detector.config import DetectorConfig
from extractor.detector.model import preprocess
from extractor.images import ImageReadError, load_image


@dataclass
class DetectionSample:
    """One resized image and its ground truth in resized pixels, what the losses and the mAP consume."""

    img_id: str
    image: Tensor  # (3, h, w) the detector's input: uint8 BGR (detectron2 resize) or normalised float (caffe)
    boxes: Tensor  # (n, 4) float32 x1 y1 x2 y2
    classes: Tensor  # (n,) int64
    attributes: Tensor  # (n, k) int64, -1 padded


class DetectionDataset(Dataset):
    """Decodes, resizes (test-time rule) and optionally mirrors annotated images; items are (index, flip)."""

    def __init__(self, annotations: Sequence[ImageAnnotation], cfg: DetectorConfig) -> None:
        self.annotations = list(annotations)
        self.cfg = cfg

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
        tensor, scale = preprocess(image, self.cfg)
        rh, rw = tensor.shape[-2:]
        factor = torch.tensor([rw / w, rh / h, rw / w, rh / h]) if scale is None else scale
        boxes = torch.from_numpy(ann.boxes) * factor
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, rw)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, rh)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # drop boxes outside the image
        if flip:
            tensor = tensor.flip(-1)
            boxes = torch.stack([rw - boxes[:, 2], boxes[:, 1], rw - boxes[:, 0], boxes[:, 3]], dim=1)
        return DetectionSample(ann.img_id, tensor, boxes[keep],
                               torch.from_numpy(ann.classes)[keep], torch.from_numpy(ann.attributes)[keep])
