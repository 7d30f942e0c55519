"""Annotated images as the detector trains on them: decoded, resized by the test-time rule, maybe mirrored."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from extractor.detector.annotations import AnnotationError, ImageAnnotation
from extractor.detector.config import DetectorConfig
from extractor.detector.model import image_to_tensor, resize_image
from extractor.images import ImageReadError, load_image


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
