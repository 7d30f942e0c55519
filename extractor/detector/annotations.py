"""The detector's ground truth: Visual Genome objects files read once for the whole project, as class ids.

``read_vg_objects`` streams ``objects.json`` / ``attributes.json`` (``[{image_id|id, objects|attributes:
[{object_id|id, x, y, w, h, names|name, attributes?}]}]``) as checked records; tasks.data.readers
re-exports it. ``read_vg_annotations`` turns those records into the class and attribute ids of a
detector's label files, with the images they belong to.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extractor.detector.labels import read_labels
from extractor.images import image_id, list_images
from extractor.jsonstream import At, field, first_field, iter_array, str_list


class AnnotationError(ValueError):
    """Annotations that cannot be trained on (unknown name, missing image, malformed record)."""


@dataclass(frozen=True, slots=True)
class VGObject:
    object_id: int
    x: float
    y: float
    w: float
    h: float
    names: tuple[str, ...]
    attributes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VGImageObjects:
    img_id: str
    objects: tuple[VGObject, ...]


def vg_image_id(rec: Any, at: At, *, optional: bool = False) -> str | None:
    """The image of a Visual Genome record: `image_id` (1.2+), `id` (1.0), or a nested `image` object."""
    key = first_field(rec, ("image_id", "id"), "int", at, optional=True)
    if key is None and isinstance(rec, dict) and isinstance(rec.get("image"), dict):
        key = first_field(rec["image"], ("image_id", "id"), "int", at, optional=True)
    if key is None:
        if optional:
            return None
        raise at.error("missing the image key ('image_id' or 'id')")
    return str(key)


def vg_records(path: Path, *items_keys: str) -> Iterator[tuple[int, At, str | None, list]]:
    """(record number, where, image id or None, items) of a Visual Genome file of per-image item lists."""
    for i, rec in enumerate(iter_array(path)):
        at = At(path, "record {}", i)
        key = next((k for k in items_keys if isinstance(rec, dict) and k in rec), items_keys[0])
        items = field(rec, key, "list", at)
        yield i, at, vg_image_id(rec, at, optional=True), items


def read_vg_objects(path: str | os.PathLike[str]) -> Iterator[VGImageObjects]:
    """Objects per image of objects.json or attributes.json.

    Images are [{image_id|id, objects: [...]}]; Visual Genome's attributes.json keeps the same
    objects under the key "attributes", which is read too.
    """
    path = Path(path)
    for i, at, img, objs in vg_records(path, "objects", "attributes"):
        if img is None:
            raise at.error("missing the image key ('image_id' or 'id')")
        out = []
        for j, o in enumerate(objs):
            oat = At(path, "record {} (image {}) objects[{}]", i, img, j)
            names = str_list(o, "names", oat)
            if not names and isinstance(o, dict) and o.get("name") is not None:
                names = (field(o, "name", "str", oat),)
            out.append(VGObject(
                object_id=first_field(o, ("object_id", "id"), "int", oat),
                x=field(o, "x", "number", oat), y=field(o, "y", "number", oat),
                w=field(o, "w", "number", oat), h=field(o, "h", "number", oat),
                names=names, attributes=str_list(o, "attributes", oat),
            ))
        yield VGImageObjects(img, tuple(out))


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

    extra: dict[tuple[str, int], tuple[str, ...]] = {}
    if attributes is not None and attr_ids is not None:
        for entry in read_vg_objects(attributes):
            if wanted is None or entry.img_id in wanted:
                for obj in entry.objects:
                    extra[(entry.img_id, obj.object_id)] = obj.attributes

    skipped = {"empty_boxes": 0, "unknown_objects": 0, "unknown_attributes": 0}

    def unknown(count: str, message: str) -> None:
        """A name the label files lack: counted under `count` and dropped (unknown_names="skip"), else refused."""
        if unknown_names != "skip":
            raise AnnotationError(message)
        skipped[count] += 1

    out: list[ImageAnnotation] = []
    seen: set[str] = set()
    for k, entry in enumerate(read_vg_objects(objects)):
        img = entry.img_id
        if wanted is not None and img not in wanted:
            continue
        if img in seen:
            raise AnnotationError(f"{objects}: image {img} appears twice (record {k})")
        seen.add(img)
        if img not in files:
            raise AnnotationError(f"{objects}: image {img} has no image file in {images}")
        boxes, labels, attrs = [], [], []
        for obj in entry.objects:
            oid = obj.object_id
            if not obj.names:
                raise AnnotationError(f"{objects}: image {img} object {oid} has no names")
            if obj.w <= 0 or obj.h <= 0:
                skipped["empty_boxes"] += 1
                continue
            name = obj.names[0].strip().lower()
            if name not in classes:
                unknown("unknown_objects", f"{objects}: image {img} object {oid}: name {obj.names[0]!r} is not in "
                                           f"the object vocabulary {object_vocab}")
                continue
            found: list[int] = []
            for a in (obj.attributes + extra.get((img, oid), ())) if attr_ids else ():
                key = a.strip().lower()
                if key not in attr_ids:
                    unknown("unknown_attributes", f"{where}: image {img} object {oid}: attribute {a!r} is not in "
                                                  f"the attribute vocabulary {attribute_vocab}")
                    continue
                if attr_ids[key] not in found:
                    found.append(attr_ids[key])
            x, y, w, h = float(obj.x), float(obj.y), float(obj.w), float(obj.h)
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
