"""FeatureWriter, the crash-safe writer: checked records go to atomically renamed part files, and
finalize assembles them into the feature file; a killed run resumes from its parts."""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extractor.fileio import atomic_replace, atomic_write, remove_quietly, temporary_sibling, try_lock
from extractor.store import blocks
from extractor.store.blocks import read_ids
from extractor.store.h5file import h5_create
from extractor.store.schema import (
    BOX_TOLERANCE,
    FEATURE_DTYPES,
    FIELDS,
    MAX_BOXES,
    MAX_FEATURE_DIM,
    MAX_IMAGE_BYTES,
    PER_BOX,
    SCHEMA_VERSION,
    STRING,
    FeatureStoreError,
    ImageFeatures,
    create_datasets,
    dataset_layout,
    failures_path,
    img_id_problem,
    normalize_attrs,
    parts_dir,
    write_attrs,
)

_PART_RE = re.compile(r"part-(\d{6,})\.h5")
_COMMIT = "commit.json"  # in a parts dir: finalize is renaming its file (holds the file's inode)


class _Record:
    """A checked record, cast to the file's dtypes, not yet padded (keeps the buffer small)."""

    __slots__ = ("img_id", "img_h", "img_w", "arrays")

    def __init__(self, img_id: str, img_h: int, img_w: int, arrays: dict[str, np.ndarray]):
        self.img_id, self.img_h, self.img_w, self.arrays = img_id, img_h, img_w, arrays


def _check_record(rec: ImageFeatures, k: int, d: int, dtype: str) -> _Record:
    """Refuse records that would break the schema, naming the image and the field."""
    img_id = rec.img_id
    if problem := img_id_problem(img_id):
        raise FeatureStoreError(f"record {problem}")

    def fail(msg: str) -> FeatureStoreError:
        return FeatureStoreError(f"image {img_id}: {msg}")

    size = {}
    for name in ("img_h", "img_w"):
        v = getattr(rec, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 < int(v) < 2 ** 31:
            raise fail(f"{name} must be a positive integer, got {v!r}")
        size[name] = int(v)
    boxes = np.asarray(rec.boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise fail(f"boxes must have shape (n, 4), got {boxes.shape}")
    n = boxes.shape[0]
    if n > k:
        raise fail(f"{n} boxes, more than max_boxes={k}")
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    want = {"boxes": ((n, 4), "f", f32), "features": ((n, d), "f", np.dtype(dtype)),
            "objects_id": ((n,), "iu", i64), "objects_conf": ((n,), "f", f32),
            "attrs_id": ((n,), "iu", i64), "attrs_conf": ((n,), "f", f32)}
    arrays = {}
    for name, (shape, kinds, dt) in want.items():
        a = np.asarray(getattr(rec, name))
        if name == "features" and n == 0 and a.size == 0:
            a = a.reshape(0, d)
        if a.shape != shape or a.dtype.kind not in kinds:
            kind = "integers" if kinds == "iu" else "floats"
            raise fail(f"{name} must be {kind} of shape {shape}, got {a.dtype} {a.shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise fail(f"{name} has NaN or Inf values")
        with np.errstate(over="ignore"):  # overflow is reported just below, by name
            cast = a.astype(dt)  # a copy: the caller may reuse its buffers after add()
        if dt.kind == "f" and not np.isfinite(cast).all():
            raise fail(f"{name} overflows {dt.name} (|value| > {np.finfo(dt).max})")
        if dt.kind == "i" and a.dtype.kind == "u" and (a > np.iinfo(dt).max).any():
            raise fail(f"{name} has values beyond int64")
        arrays[name] = cast
    for name in ("objects_conf", "attrs_conf"):
        c = arrays[name]
        if n and (c.min() < 0 or c.max() > 1):
            raise fail(f"{name} outside [0, 1]: min {c.min():.4g}, max {c.max():.4g}")
    b, w, h = arrays["boxes"], size["img_w"], size["img_h"]
    bad = ((b[:, 0] < -BOX_TOLERANCE) | (b[:, 1] < -BOX_TOLERANCE) | (b[:, 2] > w + BOX_TOLERANCE)
           | (b[:, 3] > h + BOX_TOLERANCE) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise fail(f"box {j} {b[j].tolist()} is not pixel x1 y1 x2 y2 inside the {w}x{h} image")
    return _Record(img_id, size["img_h"], size["img_w"], arrays)


def _acquire(parts: Path) -> int:
    """Lock a parts directory against a second live writer (the kernel drops it if we are killed)."""
    fd = try_lock(parts / ".lock")
    if fd is None:
        raise FeatureStoreError(f"{parts}: another writer is using this output")
    return fd


def _committed(parts: Path, final: Path) -> bool:
    """Whether finalize already renamed its file onto ``final`` (the marker holds that file's inode)."""
    try:
        inode = json.loads((parts / _COMMIT).read_text())["inode"]
        return final.stat().st_ino == inode
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def _clear(parts: Path) -> None:
    """Empty a parts directory but its lock file, the commit marker last (a kill midway is redone)."""
    for p in parts.iterdir():
        if p.name not in (".lock", _COMMIT):
            p.unlink()
    (parts / _COMMIT).unlink(missing_ok=True)


def _remove_parts(parts: Path) -> None:
    """Delete a parts directory; the marker goes last, so a kill midway leaves it recognisable."""
    _clear(parts)
    (parts / ".lock").unlink()
    parts.rmdir()


def remove_stale_parts(path: str | os.PathLike) -> bool:
    """Delete ``<path>.parts`` left by a finalize killed between its rename and its clean-up.

    Safe to call whenever ``path`` exists: parts of a live or unfinished run are left alone.
    Returns True when something was removed.
    """
    parts = parts_dir(path)
    if not parts.is_dir():
        return False
    try:
        fd = _acquire(parts)
    except FeatureStoreError:
        return False
    try:
        if not _committed(parts, Path(path)) and {p.name for p in parts.iterdir()} != {".lock"}:
            return False  # parts of an unfinished run (a leftover holding only the lock goes too)
        _remove_parts(parts)
        return True
    finally:
        os.close(fd)


class FeatureWriter:
    """Crash-safe writer: records go to atomically renamed part files, finalize assembles the file.

    A SIGKILL at any point loses at most the records added since the last flush; reopening a
    writer on the same path resumes (``done_ids()`` says what to skip). Use from one thread.
    """

    def __init__(self, path: str | os.PathLike, *, max_boxes: int, feature_dim: int,
                 dtype: str = "float16", attrs: dict[str, Any] | None = None, flush_every: int = 64,
                 compression: str | None = None, compression_opts: Any = None):
        self.path = Path(path)
        for name, v in (("max_boxes", max_boxes), ("feature_dim", feature_dim), ("flush_every", flush_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        # the reader refuses files past these bounds, so the writer must not make them
        for name, v, limit in (("max_boxes", max_boxes, MAX_BOXES), ("feature_dim", feature_dim, MAX_FEATURE_DIM),
                               ("max_boxes x feature_dim bytes", max_boxes * feature_dim * np.dtype(dtype).itemsize,
                                MAX_IMAGE_BYTES)):
            if v > limit:
                raise ValueError(f"{name} = {v} exceeds the feature store's limit {limit}")
        self.max_boxes, self.feature_dim, self.dtype = max_boxes, feature_dim, dtype
        self.attrs = normalize_attrs(attrs)
        self.flush_every = flush_every
        self.compression, self.compression_opts = compression, compression_opts
        self.parts = parts_dir(self.path)
        self._records: list[_Record] = []
        self._failures: list[dict[str, str]] = []
        self._done: set[str] = set()
        self._part_files: list[tuple[Path, list[str], list[str]]] = []  # (file, image ids, failed ids)
        self.parts.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _acquire(self.parts)
        try:
            if _committed(self.parts, self.path):
                _clear(self.parts)  # a finalize was killed after its rename: these parts are stale
            self._clean_temporaries()
            self._check_meta()
            self._scan_parts()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clean_temporaries(self) -> None:
        """Remove what a killed writer left half-written: temporary parts and temporary final files."""
        (self.parts / _COMMIT).unlink(missing_ok=True)
        for p in self.parts.glob("*.tmp"):
            p.unlink()
        for final in (self.path, failures_path(self.path)):
            for p in final.parent.glob(f".{final.name}.tmp-*"):
                p.unlink()

    def _check_meta(self) -> None:
        """Record this run's settings, or refuse parts that were written with different ones."""
        meta = {"schema_version": SCHEMA_VERSION, "max_boxes": self.max_boxes,
                "feature_dim": self.feature_dim, "dtype": self.dtype, "attrs": self.attrs}
        meta_file = self.parts / "meta.json"
        if not meta_file.exists():
            if any(self.parts.glob("part-*.h5")):
                raise FeatureStoreError(f"{self.parts}: part files without meta.json; delete the directory")
            atomic_write(meta_file, json.dumps(meta, sort_keys=True), tmp=meta_file.with_name("meta.json.tmp"))
            return
        try:
            old = json.loads(meta_file.read_text())
        except ValueError as e:
            raise FeatureStoreError(f"{meta_file}: unreadable ({e}); delete {self.parts}") from e
        diff = [f"{key}: parts have {old.get(key)!r}, this writer {meta[key]!r}"
                for key in meta if old.get(key) != meta[key]]
        if diff:
            raise FeatureStoreError(
                f"{self.parts} holds an unfinished run with other settings ({'; '.join(diff)}); "
                f"resume it with the same settings or delete {self.parts}")

    def _scan_parts(self) -> None:
        """Learn which images finished in earlier runs from the part files they left."""
        found = []
        for p in self.parts.iterdir():
            m = _PART_RE.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
        for _, p in sorted(found):
            try:
                with h5py.File(p, "r") as f:
                    ids = read_ids(f)
                    failed = [json.loads(s)["img_id"] for s in f["failures"].asstr()[()]]
            except (OSError, KeyError, ValueError) as e:
                raise FeatureStoreError(f"{p}: unreadable part file ({e}); delete {self.parts}") from e
            self._part_files.append((p, ids, failed))
            self._done.update(ids)
            self._done.update(failed)
        self._next_part = sorted(found)[-1][0] + 1 if found else 0

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise FeatureStoreError(f"{self.path}: writer is closed")

    def done_ids(self) -> set[str]:
        """Ids already recorded (features or failure) by this or an earlier run: a rerun skips them."""
        return set(self._done)

    def _claim(self, img_id: str) -> None:
        if img_id in self._done:
            raise FeatureStoreError(f"{self.path}: image {img_id} was already added")

    def add(self, record: ImageFeatures) -> None:
        """Check and buffer one image's detections; flushes a part every flush_every entries."""
        self._check_open()
        rec = _check_record(record, self.max_boxes, self.feature_dim, self.dtype)
        self._claim(rec.img_id)
        self._done.add(rec.img_id)
        self._records.append(rec)
        self._maybe_flush()

    def add_failure(self, path: str | os.PathLike, img_id: str, reason: str) -> None:
        """Record an image that could not be processed; it goes to the failures file at finalize."""
        self._check_open()
        if not isinstance(img_id, str) or not img_id:
            raise FeatureStoreError(f"failure for {path}: img_id must be a non-empty string, got {img_id!r}")
        self._claim(img_id)
        self._done.add(img_id)
        self._failures.append({"path": str(path), "img_id": img_id, "reason": str(reason)})
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._records) + len(self._failures) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one part file (temporary name, fsync, rename)."""
        self._check_open()
        if not self._records and not self._failures:
            return
        final = self.parts / f"part-{self._next_part:06d}.h5"
        tmp = final.with_name(final.name + ".tmp")
        recs, k, d = self._records, self.max_boxes, self.feature_dim
        try:
            with h5_create(tmp, final) as (f, _):
                create_datasets(f, len(recs), k, d, self.dtype, chunked=False)
                if recs:
                    f["img_id"][:] = [r.img_id for r in recs]
                    f["img_h"][:] = [r.img_h for r in recs]
                    f["img_w"][:] = [r.img_w for r in recs]
                    f["num_boxes"][:] = [r.arrays["boxes"].shape[0] for r in recs]
                    for name in PER_BOX:
                        shape, dt = dataset_layout(len(recs), k, d, self.dtype)[name]
                        block = np.zeros(shape, dt)
                        for i, r in enumerate(recs):
                            block[i, : len(r.arrays[name])] = r.arrays[name]
                        f[name][...] = block
                lines = [json.dumps(x, ensure_ascii=False) for x in self._failures]
                f.create_dataset("failures", data=np.array(lines, dtype=object), shape=(len(lines),),
                                 dtype=STRING)
            atomic_replace(tmp, final)
        except BaseException:
            remove_quietly(tmp)
            raise
        self._part_files.append((final, [r.img_id for r in recs], [x["img_id"] for x in self._failures]))
        self._next_part += 1
        self._records, self._failures = [], []

    def close(self) -> None:
        """Flush what is buffered and release the output; the parts stay for finalize or a resume."""
        if self._lock_fd is None:
            return
        try:
            self.flush()
        finally:
            self._unlock()

    def finalize(self, order: Sequence[str] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
        """Assemble the parts into ``path`` (in ``order``, then the rest as added) and the failures file.

        The file is written under a temporary name in the same folder, fsynced and renamed, so the
        final path never holds a partial file; the parts are removed last. Refuses an existing
        ``path`` unless ``overwrite``. Returns ``{"path", "images", "failures", "missing"}``, where
        missing counts the ids of ``order`` that were neither added nor recorded as failures.
        """
        self.flush()
        if self.path.exists() and not overwrite:
            raise FeatureStoreError(f"{self.path} already exists; pass overwrite=True to replace it")
        where: dict[str, tuple[int, int]] = {}
        failed: dict[str, tuple[int, int]] = {}
        for pi, (_, ids, fids) in enumerate(self._part_files):
            where.update((img_id, (pi, row)) for row, img_id in enumerate(ids))
            failed.update((img_id, (pi, row)) for row, img_id in enumerate(fids))
        images = _ordered(where, order)
        fail_ids = _ordered(failed, order)
        tmp = temporary_sibling(self.path)
        try:
            with h5_create(tmp, self.path) as (out, check):
                create_datasets(out, len(images), self.max_boxes, self.feature_dim, self.dtype, chunked=True,
                                 compression=self.compression, compression_opts=self.compression_opts)
                write_attrs(out, self.dtype, self.attrs)
                with _PartCache() as cache:
                    self._copy_rows(out, images, where, cache, check)
                    lines = self._failure_lines(fail_ids, failed, cache)
            atomic_write(failures_path(self.path), "".join(line + "\n" for line in lines),
                         tmp=temporary_sibling(failures_path(self.path)))
            atomic_write(self.parts / _COMMIT, json.dumps({"inode": tmp.stat().st_ino}),
                         tmp=self.parts / (_COMMIT + ".tmp"))
            atomic_replace(tmp, self.path)
        except BaseException:
            remove_quietly(tmp)
            if not _committed(self.parts, self.path):
                remove_quietly(self.parts / _COMMIT)
            raise
        _remove_parts(self.parts)
        self._unlock()
        missing = sum(1 for i in order if i not in where and i not in failed) if order is not None else 0
        return {"path": str(self.path), "images": len(images), "failures": len(lines), "missing": missing}

    def _copy_rows(self, out: h5py.File, images: list[str], where: dict[str, tuple[int, int]],
                   cache: _PartCache, check: Callable[[], None]) -> None:
        """Copy rows from the parts into the output in blocks, reading each part's rows in one go."""
        per_image = (self.max_boxes * self.feature_dim * np.dtype(self.dtype).itemsize
                     + blocks.CHUNK_BYTES * len(PER_BOX))  # one chunk per image and per-box dataset
        step = max(1, blocks.BLOCK_BYTES // per_image)  # so HDF5's bookkeeping is bounded too
        for start in range(0, len(images), step):
            chunk = images[start: start + step]
            layout = dataset_layout(len(chunk), self.max_boxes, self.feature_dim, self.dtype)
            block = {name: np.empty(shape, object if name == "img_id" else dt)
                     for name, (shape, dt) in layout.items()}
            by_part: dict[int, list[tuple[int, int]]] = {}
            for j, img_id in enumerate(chunk):
                pi, row = where[img_id]
                by_part.setdefault(pi, []).append((row, j))
            for pi, pairs in by_part.items():
                pairs.sort()
                rows, dest = [r for r, _ in pairs], [j for _, j in pairs]
                src = cache.get(self._part_files[pi][0])
                for name in FIELDS:
                    ds = src[name].asstr() if name == "img_id" else src[name]
                    block[name][dest] = ds[rows]
            for name in FIELDS:
                out[name][start: start + len(chunk)] = block[name]
            check()

    def _failure_lines(self, fail_ids: list[str], failed: dict[str, tuple[int, int]],
                       cache: _PartCache) -> list[str]:
        """The failures file's lines (one JSON object each) in the same order rule as the images."""
        lines = []
        for img_id in fail_ids:
            pi, row = failed[img_id]
            lines.append(cache.get(self._part_files[pi][0])["failures"].asstr()[row])
        return lines


def _ordered(present: dict[str, Any], order: Sequence[str] | None) -> list[str]:
    """Ids of ``present`` in ``order`` first, then the others in insertion order (stable)."""
    if order is None:
        return list(present)
    seen: set[str] = set()
    out = []
    for img_id in order:
        if img_id in seen:
            raise ValueError(f"order: image id {img_id!r} appears twice")
        seen.add(img_id)
        if img_id in present:
            out.append(img_id)
    out.extend(i for i in present if i not in seen)
    return out


class _PartCache:
    """A few open part files at a time (parts are read in near-sequential order)."""

    def __init__(self, size: int = 4):
        self.size, self.files = size, OrderedDict()

    def get(self, path: Path) -> h5py.File:
        if path in self.files:
            self.files.move_to_end(path)
        else:
            self.files[path] = h5py.File(path, "r")
            if len(self.files) > self.size:
                self.files.popitem(last=False)[1].close()
        return self.files[path]

    def __enter__(self) -> _PartCache:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()
