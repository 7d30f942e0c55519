"""The HDF5 feature store: the one owner of the feature-file schema (readers and writers live here)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1
FIELDS = ("img_id", "img_h", "img_w", "num_boxes", "boxes", "features",
          "objects_id", "objects_conf", "attrs_id", "attrs_conf")


@dataclass
class ImageFeatures:
    """One image's detections: arrays of length num_boxes, boxes in original-image pixels (x1, y1, x2, y2)."""

    img_id: str
    img_h: int
    img_w: int
    boxes: np.ndarray         # (n, 4) float32
    features: np.ndarray      # (n, D) float32 or float16
    objects_id: np.ndarray    # (n,) int64
    objects_conf: np.ndarray  # (n,) float32
    attrs_id: np.ndarray      # (n,) int64
    attrs_conf: np.ndarray    # (n,) float32

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])
