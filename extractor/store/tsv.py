"""TSV feature files in and out: LXMERT's 10-field format and the Caffe ``generate_tsv.py`` 6-field one.

LXMERT: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
features``; Caffe: ``image_id, image_w, image_h, num_boxes, boxes, features`` (width first). Arrays
are base64 of little-endian buffers: ids int64, confidences / boxes / features float32. Everything
streams one row at a time; nothing holds a whole file in memory.
"""
from __future__ import annotations

import base64
import binascii
import csv
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from extractor.fileio import atomic_output
from extractor.store.reader import FeatureReader
from extractor.store.schema import FeatureStoreError, ImageFeatures, img_id_problem
from extractor.store.writer import FeatureWriter

LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features")
CAFFE_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
_INTEGER = re.compile(r"-?[0-9]+")
LINE_END = "\r\n"  # what LXMERT's csv.DictWriter wrote; kept so exports match released files byte for byte


class TsvError(ValueError):
    """A TSV row that cannot be read; the message names the file and line."""


def _decode(text: str, dtype: str, count: int | None, what: str) -> np.ndarray:
    """A base64 little-endian buffer as an array, checked against the expected element count."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: bad base64 ({e})") from None
    size = np.dtype(dtype).itemsize
    if len(raw) % size or (count is not None and len(raw) != count * size):
        want = f"{count} x {size}" if count is not None else f"a multiple of {size}"
        raise ValueError(f"{what}: {len(raw)} bytes, want {want}")
    return np.frombuffer(raw, dtype=dtype).copy()


def _parse_int(text: str, what: str) -> int:
    """A decimal integer as csv wrote it: ASCII digits with an optional minus (no blanks, no "1_000")."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{what}: not an integer: {text[:40]!r}")
    return int(text)


def _checked(row: list[str]) -> list[str]:
    """The row, refused when it holds bytes that are not UTF-8 (read as surrogate escapes), naming the field."""
    names = LXMERT_FIELDS if len(row) == len(LXMERT_FIELDS) else CAFFE_FIELDS if len(row) == len(CAFFE_FIELDS) \
        else None
    for i, field in enumerate(row):
        if field.isascii():
            continue
        bad = next((j for j, c in enumerate(field) if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            name = f"field {i + 1} ({names[i]})" if names else f"field {i + 1}"
            raise ValueError(f"{name}: not UTF-8 text (byte 0x{ord(field[bad]) - 0xdc00:02x} at character {bad + 1})")
    return row


def _row_to_record(row: list[str]) -> ImageFeatures:
    """One TSV row (either format, told apart by its field count) as a record."""
    if len(row) == len(LXMERT_FIELDS):
        img_id, h, w, oid, oconf, aid, aconf, nb, boxes, feats = row
    elif len(row) == len(CAFFE_FIELDS):
        img_id, w, h, nb, boxes, feats = row
        oid = oconf = aid = aconf = None
    else:
        raise ValueError(f"{len(row)} fields; want {len(LXMERT_FIELDS)} (LXMERT) "
                         f"or {len(CAFFE_FIELDS)} (Caffe)")
    problem = img_id_problem(img_id)
    if problem:
        raise ValueError(problem)
    n = _parse_int(nb, "num_boxes")
    if n < 0:
        raise ValueError(f"num_boxes is negative: {n}")
    f = _decode(feats, "<f4", None, "features")
    if n and f.size % n:
        raise ValueError(f"features: {f.size} floats do not split into {n} boxes")
    box_array = _decode(boxes, "<f4", 4 * n, "boxes").reshape(n, 4)  # before any array sized by num_boxes
    if oid is None:  # the Caffe format has no labels: -1 ids (LXMERT's "ignore") and 0 confidence
        ids, confs = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        labels = (ids, confs, ids.copy(), confs.copy())
    else:
        labels = (_decode(oid, "<i8", n, "objects_id"), _decode(oconf, "<f4", n, "objects_conf"),
                  _decode(aid, "<i8", n, "attrs_id"), _decode(aconf, "<f4", n, "attrs_conf"))
    return ImageFeatures(
        img_id=img_id, img_h=_parse_int(h, "img_h"), img_w=_parse_int(w, "img_w"),
        boxes=box_array,
        features=f.reshape(n, -1) if n else f.reshape(0, 0),
        objects_id=labels[0], objects_conf=labels[1], attrs_id=labels[2], attrs_conf=labels[3])


def _rows(path: Path) -> Iterator[tuple[int, ImageFeatures]]:
    """(line number, record) pairs, errors naming the file and line.

    Bytes that are not UTF-8 are read as surrogate escapes, so csv keeps its line rules and the bad
    byte is reported with its line and field rather than as a bare UnicodeDecodeError.
    """
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter="\t")
        while True:
            try:
                row = next(reader, None)
                if row is None:
                    return
                rec = _row_to_record(_checked(row)) if row else None
            except (ValueError, csv.Error) as e:
                raise TsvError(f"{path}:{reader.line_num}: {e}") from None
            if rec is not None:
                yield reader.line_num, rec


def read_tsv(path: str | os.PathLike) -> Iterator[ImageFeatures]:
    """Stream the records of an LXMERT or Caffe TSV file (the format is told per row by field count)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file {path} does not exist")
    for _, rec in _rows(path):
        yield rec


def import_tsv(tsv: str | os.PathLike, h5: str | os.PathLike, dtype: str = "float32",
               max_boxes: int | None = None, attrs: dict[str, Any] | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Convert a TSV into a feature file through FeatureWriter (constant memory, resumable).

    float32 keeps the values exactly. ``max_boxes`` defaults to the largest num_boxes in the file
    (found by a first pass); records with more boxes than ``max_boxes`` are an error.
    """
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"TSV file {tsv} does not exist")
    if Path(h5).exists() and not overwrite:
        raise FeatureStoreError(f"{h5} already exists; pass overwrite=True to replace it")
    dim, most = None, 0
    for lineno, rec in _rows(tsv):
        most = max(most, rec.num_boxes)
        if dim is None and rec.num_boxes:
            dim = rec.features.shape[1]
        elif rec.num_boxes and rec.features.shape[1] != dim:
            raise TsvError(f"{tsv}:{lineno}: feature size {rec.features.shape[1]}, earlier rows have {dim}")
    if dim is None:
        raise TsvError(f"{tsv}: no row with boxes, cannot tell the feature size")
    info = {"box_strategy": "imported", "source": f"tsv:{tsv.name}", **(attrs or {})}
    with FeatureWriter(h5, max_boxes=max_boxes or most, feature_dim=dim, dtype=dtype, attrs=info) as w:
        done = w.done_ids()
        for lineno, rec in _rows(tsv):
            if rec.img_id in done:
                continue
            try:
                w.add(rec)
            except FeatureStoreError as e:
                raise TsvError(f"{tsv}:{lineno}: {e}") from None
        return w.finalize(overwrite=overwrite)


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def export_tsv(h5: str | os.PathLike, tsv: str | os.PathLike, fmt: str = "lxmert") -> int:
    """Write a feature file as an LXMERT (``fmt="lxmert"``) or Caffe (``"caffe"``) TSV, atomically.

    Streams image by image; features are written as float32. Returns the number of rows.
    """
    if fmt not in ("lxmert", "caffe"):
        raise ValueError(f"fmt must be 'lxmert' or 'caffe', got {fmt!r}")
    count = 0
    with FeatureReader(h5) as reader, atomic_output(tsv) as out:
        for rec in reader:
            if any(c in rec.img_id for c in "\t\r\n") or rec.img_id.startswith('"'):
                raise ValueError(f"{h5}: image id {rec.img_id!r} cannot be a TSV field "
                                 "(it holds a tab or line break, or starts with a quote that csv would "
                                 "read as quoting)")
            n = str(rec.num_boxes)
            boxes, feats = _b64(rec.boxes, "<f4"), _b64(rec.features, "<f4")
            if fmt == "lxmert":
                fields = [rec.img_id, str(rec.img_h), str(rec.img_w),
                          _b64(rec.objects_id, "<i8"), _b64(rec.objects_conf, "<f4"),
                          _b64(rec.attrs_id, "<i8"), _b64(rec.attrs_conf, "<f4"), n, boxes, feats]
            else:
                fields = [rec.img_id, str(rec.img_w), str(rec.img_h), n, boxes, feats]
            out.write(("\t".join(fields) + LINE_END).encode("utf-8"))
            count += 1
    return count
