"""validate: every problem of a feature file, streamed in bounded blocks, counted per kind with examples."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from extractor.store import blocks
from extractor.store.blocks import id_blocks, id_hashes, repeats, row_chunk_bytes
from extractor.store.reader import attr_problems, open_checked, size_problems
from extractor.store.schema import BOX_TOLERANCE, FIELDS, PER_BOX, FeatureStoreError


class _Tally:
    """Per-kind problem counts with a few example ids, so a bad million-image file gives short output."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[int, list[str]]] = {}

    def add(self, kind: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            count, examples = self.kinds.get(kind, (0, []))
            self.kinds[kind] = (count + len(ids), (examples + ids)[:5])

    def lines(self) -> list[str]:
        return [f"{kind}: {count} image(s), e.g. {', '.join(ex)}" for kind, (count, ex) in self.kinds.items()]


def validate(path: str | os.PathLike, boxes: int | None = None, dim: int | None = None) -> list[str]:
    """Every problem of a feature file (schema, bounds, storage, padding, NaN/Inf, duplicates); [] when sound.

    Shapes over the bounds, or that the file does not hold (unwritten chunks that would read as fill values),
    are refused before any data is read. The rest streams in blocks of about BLOCK_BYTES (images, or part
    of one image's boxes when one image alone is larger), so memory does not grow with the file but for
    8 bytes an image: duplicate ids are found in a sorted array of 64-bit hashes, the ids whose hash repeats
    re-read and compared exactly.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        f = open_checked(path)
    except FeatureStoreError as e:
        return [str(e)]
    with f:
        stored = size_problems(f, full=True)
        if stored:
            return [f"{path}: {problem}" for problem in stored]
        bad = attr_problems(f)
        k, d = f["boxes"].shape[1], f["features"].shape[2]
        if boxes is not None and k != boxes:
            bad.append(f"K = {k}, expected {boxes}")
        if dim is not None and d != dim:
            bad.append(f"D = {d}, expected {dim}")
        try:
            return bad + _check_values(f, k, d)
        except OSError as e:
            return [*bad, f"{path}: cannot read the data ({e})"]


def _block_shape(f: h5py.File, k: int, d: int) -> tuple[int, int]:
    """(images, boxes) per block of validate, so a block, its checks and HDF5's bookkeeping fit BLOCK_BYTES.

    Holds whatever K and D are: one image larger than the budget is read a few boxes at a time.
    """
    per_box = d * (f["features"].dtype.itemsize + 3) + blocks.BOX_BYTES  # features and masks; the other arrays
    per_block = max(1, blocks.BLOCK_BYTES // per_box)
    if per_block < k:
        return 1, per_block
    per_image = blocks.ID_BYTES + max(row_chunk_bytes(f[name]) for name in FIELDS)  # datasets are read one by one
    return max(1, min(per_block // k, blocks.BLOCK_BYTES // per_image)), k


def _check_values(f: h5py.File, k: int, d: int) -> list[str]:
    """Value problems of every image, block by block, and the duplicate and empty ids."""
    n = f["img_id"].shape[0]
    rows, box_step = _block_shape(f, k, d)
    hashes = np.empty(n, np.int64)
    empty = False
    tally = _Tally()
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        ids = f["img_id"].asstr()[sl]
        hashes[sl] = id_hashes(ids)
        empty = empty or bool((ids == "").any())
        _check_rows(f, sl, ids, k, box_step, tally)
    bad = []
    count, examples = 0, []
    for img_id, _, _ in repeats(hashes, lambda: ((None, block[1]) for block in id_blocks(f))):
        count, examples = count + 1, sorted([*examples, img_id])[:5]
    if count:
        bad.append(f"img_id has duplicates: {count} id(s), e.g. {', '.join(examples)}")
    if empty:
        bad.append("img_id has empty strings")
    return bad + tally.lines()


_BOX_KINDS = ("boxes are not pixel x1 y1 x2 y2 inside the image", "rows past num_boxes are not zero",
              "non-finite features", "objects_conf outside [0, 1]", "attrs_conf outside [0, 1]")


def _check_rows(f: h5py.File, rows: slice, ids: np.ndarray, k: int, box_step: int, tally: _Tally) -> None:
    """Value checks on a block of images, their boxes read box_step at a time; each kind counted once an image."""
    nb = f["num_boxes"][rows].astype(np.int64)
    h = f["img_h"][rows].astype(np.float64)
    w = f["img_w"][rows].astype(np.float64)
    tally.add("num_boxes outside [0, K]", ids[(nb < 0) | (nb > k)])
    tally.add("img_h or img_w not positive", ids[(h <= 0) | (w <= 0)])
    found = {kind: np.zeros(len(ids), bool) for kind in _BOX_KINDS}
    for start in range(0, k, box_step):
        for kind, hit in _check_block(f, rows, slice(start, min(k, start + box_step)), nb, h, w).items():
            found[kind] |= hit
    for kind, hit in found.items():
        tally.add(kind, ids[hit])


def _check_block(f: h5py.File, rows: slice, boxes: slice, nb: np.ndarray, h: np.ndarray,
                 w: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image masks of each per-box problem on a block of rows and boxes: bounds, padding, finiteness."""
    valid = np.arange(boxes.start, boxes.stop)[None, :] < nb[:, None]  # (B, boxes) True for real boxes
    arrays = {name: f[name][rows, boxes] for name in PER_BOX}

    def per_image(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(mask.shape[0], -1).any(axis=1)

    b = arrays["boxes"].astype(np.float64)
    with np.errstate(invalid="ignore"):
        out = ((b[..., 0] < -BOX_TOLERANCE) | (b[..., 1] < -BOX_TOLERANCE)
               | (b[..., 2] > w[:, None] + BOX_TOLERANCE) | (b[..., 3] > h[:, None] + BOX_TOLERANCE)
               | (b[..., 2] < b[..., 0]) | (b[..., 3] < b[..., 1]) | ~np.isfinite(b).all(axis=-1))
    pad = np.zeros(len(nb), bool)
    for a in arrays.values():
        m = ~valid if a.ndim == 2 else ~valid[..., None]
        pad |= per_image((a != 0) & m)
    found = {_BOX_KINDS[0]: per_image(out & valid), _BOX_KINDS[1]: pad,
             _BOX_KINDS[2]: per_image(~np.isfinite(arrays["features"]))}
    for kind, name in zip(_BOX_KINDS[3:], ("objects_conf", "attrs_conf")):
        c = arrays[name]
        with np.errstate(invalid="ignore"):
            found[kind] = per_image(~((c >= 0) & (c <= 1)))
    return found
