"""The feature-file schema in one place: datasets, dtypes, attributes, bounds, the record and its errors.

Layout of a file (schema version 1), row i = image i, K = max boxes, D = feature size:
``img_id`` (N,) UTF-8 string; ``img_h``, ``img_w``, ``num_boxes`` (N,) int32; ``boxes`` (N, K, 4)
float32 pixel x1 y1 x2 y2; ``features`` (N, K, D) float16 or float32; ``objects_id``, ``attrs_id``
(N, K) int64; ``objects_conf``, ``attrs_conf`` (N, K) float32 in [0, 1]. Rows past ``num_boxes``
are zero. See docs/feature-store.md for the crash-safety design and the failures file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
FIELDS = ("img_id", "img_h", "img_w", "num_boxes", "boxes", "features",
          "objects_id", "objects_conf", "attrs_id", "attrs_conf")
FEATURE_DTYPES = ("float16", "float32")
# Attributes every file carries; the writer fills the ones the caller leaves out.
REQUIRED_ATTRS = ("schema_version", "feature_dtype", "detector_config", "weights_sha256", "box_strategy")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image (detectors clip to w - 1 or w)

PER_BOX = ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
STRING = h5py.string_dtype("utf-8")
# Bounds on what a file may declare, checked before anything is read, so a corrupt or hostile header cannot
# make a reader allocate gigabytes. Real files sit far inside them (LXMERT: K = 36 or 100, D = 2048).
MAX_BOXES = 4096  # K: detectors keep 10-100 boxes an image; even a 64 x 64 grid of cells is 4096
MAX_FEATURE_DIM = 65536  # D: region features are 1024-4096 wide (2048 for ResNet C5); 16x headroom
MAX_IMAGE_BYTES = 64 << 20  # one image's features (K * D * itemsize), what one get() reads; also the largest
# chunk of a compressed dataset, which HDF5 decompresses whole to read any part of it


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


class FeatureStoreError(Exception):
    """A feature file, parts directory or record that cannot be used as asked; the message names it."""


def failures_path(path: str | os.PathLike) -> Path:
    """Where finalize lists the images that could not be read: ``<path>.failures.jsonl``."""
    return Path(str(path) + ".failures.jsonl")


def parts_dir(path: str | os.PathLike) -> Path:
    """Where an unfinished write keeps its flushed part files: ``<path>.parts``."""
    return Path(str(path) + ".parts")


def dataset_layout(n: int, k: int, d: int, dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every dataset of an n-image file (the schema in one place)."""
    return {
        "img_id": ((n,), STRING),
        "img_h": ((n,), np.dtype(np.int32)),
        "img_w": ((n,), np.dtype(np.int32)),
        "num_boxes": ((n,), np.dtype(np.int32)),
        "boxes": ((n, k, 4), np.dtype(np.float32)),
        "features": ((n, k, d), np.dtype(dtype)),
        "objects_id": ((n, k), np.dtype(np.int64)),
        "objects_conf": ((n, k), np.dtype(np.float32)),
        "attrs_id": ((n, k), np.dtype(np.int64)),
        "attrs_conf": ((n, k), np.dtype(np.float32)),
    }


def create_datasets(f: h5py.File, n: int, k: int, d: int, dtype: str, *, chunked: bool,
                     compression: str | None = None, compression_opts: Any = None) -> None:
    """Create the schema's datasets; per-box arrays chunked one image per chunk when asked."""
    for name, (shape, dt) in dataset_layout(n, k, d, dtype).items():
        per_box = name in PER_BOX
        chunks = (1, *shape[1:]) if chunked and per_box and n > 0 else None
        f.create_dataset(name, shape=shape, dtype=dt, chunks=chunks, track_times=False,
                         compression=compression if chunks else None,
                         compression_opts=compression_opts if chunks else None)


def normalize_attrs(attrs: dict[str, Any] | None) -> dict[str, Any]:
    """Canonical file attributes: JSON detector_config, scalars only, the required ones present."""
    out: dict[str, Any] = {"detector_config": "{}", "weights_sha256": "", "box_strategy": ""}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"attrs: key {key!r} is not a string")
        if key in ("schema_version", "feature_dtype"):
            raise ValueError(f"attrs: {key!r} is set by the feature store, not by the caller")
        if key == "detector_config":
            try:
                cfg = json.loads(value) if isinstance(value, str) else value
                value = json.dumps(cfg, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"attrs['detector_config'] is not JSON-serialisable: {e}") from e
        elif isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"attrs[{key!r}]: want str, int, float or bool, got {type(value).__name__}")
        out[key] = value
    return out


def write_attrs(f: h5py.File, dtype: str, attrs: dict[str, Any]) -> None:
    """Write the file attributes in a fixed order so equal inputs give equal bytes."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["feature_dtype"] = dtype
    for key in sorted(attrs):
        f.attrs[key] = attrs[key]


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def img_id_problem(img_id: object) -> str | None:
    """Why an id cannot be an HDF5 string (empty, a NUL, not encodable as UTF-8), or None when it can."""
    if not isinstance(img_id, str) or not img_id:
        return f"img_id must be a non-empty string, got {img_id!r}"
    if "\0" in img_id:
        return f"img_id {img_id!r} contains a NUL character, which HDF5 strings cannot hold"
    try:
        img_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"img_id {img_id!r} is not valid UTF-8 (a file name in another encoding?)"
    return None
