"""The HDF5 feature store: the one owner of the feature-file schema (readers and writers live here).

Layout of a file (schema version 1), row i = image i, K = max boxes, D = feature size:
``img_id`` (N,) UTF-8 string; ``img_h``, ``img_w``, ``num_boxes`` (N,) int32; ``boxes`` (N, K, 4)
float32 pixel x1 y1 x2 y2; ``features`` (N, K, D) float16 or float32; ``objects_id``, ``attrs_id``
(N, K) int64; ``objects_conf``, ``attrs_conf`` (N, K) float32 in [0, 1]. Rows past ``num_boxes``
are zero. See docs/feature-store.md for the crash-safety design and the failures file.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tasks.fileio import atomic_replace, atomic_write, remove_quietly, temporary_sibling, write_all, write_error

SCHEMA_VERSION = 1
FIELDS = ("img_id", "img_h", "img_w", "num_boxes", "boxes", "features",
          "objects_id", "objects_conf", "attrs_id", "attrs_conf")
FEATURE_DTYPES = ("float16", "float32")
# Attributes every file carries; the writer fills the ones the caller leaves out.
REQUIRED_ATTRS = ("schema_version", "feature_dtype", "detector_config", "weights_sha256", "box_strategy")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image (detectors clip to w - 1 or w)

_PER_IMAGE = ("img_h", "img_w", "num_boxes")
_PER_BOX = ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
_PART_RE = re.compile(r"part-(\d{6,})\.h5")
_STR = h5py.string_dtype("utf-8")
_BLOCK_BYTES = 32 << 20  # bytes of features per block when streaming over a file
# Bounds on what a file may declare, checked before anything is read, so a corrupt or hostile header cannot
# make a reader allocate gigabytes. Real files sit far inside them (LXMERT: K = 36 or 100, D = 2048).
MAX_BOXES = 4096  # K: detectors keep 10-100 boxes an image; even a 64 x 64 grid of cells is 4096
MAX_FEATURE_DIM = 65536  # D: region features are 1024-4096 wide (2048 for ResNet C5); 16x headroom
MAX_IMAGE_BYTES = 64 << 20  # one image's features (K * D * itemsize), what one get() reads; also the largest
# chunk of a compressed dataset, which HDF5 decompresses whole to read any part of it
_VLEN_BYTES = 16  # HDF5 stores a variable-length string as a 4-byte length and a 12-byte heap reference
_VIRTUAL_DEPTH = 4  # virtual datasets over virtual datasets, at most this deep
_ID_BYTES = 256  # budget per image id read in a block (the Python string, its slot, HDF5's buffer)
_CHUNK_BYTES = 8192  # HDF5's bookkeeping per chunk one read touches (about 6.5 KB measured with HDF5 2.0)
_MAX_ROW_CHUNKS = 1024  # chunks one image's row may be cut into (our writer: 1), so one get() stays cheap
_BOX_BYTES = 128  # budget per box of the per-box arrays other than features, with validate's masks
_REPEAT_BATCH = 1 << 16  # repeated id hashes re-checked per pass over the ids (strings held at once)
_COMMIT = "commit.json"  # in a parts dir: finalize is renaming its file (holds the file's inode)


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


def _layout(n: int, k: int, d: int, dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every dataset of an n-image file (the schema in one place)."""
    return {
        "img_id": ((n,), _STR),
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


def _create_datasets(f: h5py.File, n: int, k: int, d: int, dtype: str, *, chunked: bool,
                     compression: str | None = None, compression_opts: Any = None) -> None:
    """Create the schema's datasets; per-box arrays chunked one image per chunk when asked."""
    for name, (shape, dt) in _layout(n, k, d, dtype).items():
        per_box = name in _PER_BOX
        chunks = (1, *shape[1:]) if chunked and per_box and n > 0 else None
        f.create_dataset(name, shape=shape, dtype=dt, chunks=chunks, track_times=False,
                         compression=compression if chunks else None,
                         compression_opts=compression_opts if chunks else None)


class _Shielded:
    """The file h5py writes through (its fileobj driver), holding OS errors back from HDF5.

    HDF5 cannot close a file after one of its writes failed: the close may report success with data
    missing, or crash the process (a segfault in H5D_flush_all, seen with HDF5 2.0 on a full disk).
    So a failed write is kept in memory instead, HDF5 goes on and closes normally, and the caller
    raises the error (``check()``) after each block, so at most a block is held.
    """

    def __init__(self, tmp: Path, final: Path) -> None:
        self.final, self.pos, self.size = final, 0, 0
        self.error: OSError | None = None
        self.held: list[tuple[int, bytes]] = []  # (offset, bytes) written after the error
        try:
            self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise write_error(final, e) from e

    def _fail(self, e: OSError) -> None:
        self.error = self.error or e

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                write_all(self.fd, view, self.pos)
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            self.held.append((self.pos, bytes(view)))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def read(self, n: int = -1) -> bytes:
        n = max(0, self.size - self.pos) if n < 0 else n
        out = bytearray(n)  # past the end of the file reads as zeros, as with HDF5's own driver
        got = 0
        try:
            while got < n:
                chunk = os.pread(self.fd, n - got, self.pos + got)
                if not chunk:
                    break
                out[got: got + len(chunk)] = chunk
                got += len(chunk)
        except OSError as e:
            self._fail(e)
        for start, data in self.held:
            lo, hi = max(start, self.pos), min(start + len(data), self.pos + n)
            if lo < hi:
                out[lo - self.pos: hi - self.pos] = data[lo - start: hi - start]
        self.pos += n
        return bytes(out)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self._fail(e)
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; atomic_replace fsyncs the finished file."""

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as e:
            self._fail(e)

    def check(self) -> None:
        """Raise the first OS error of the writes so far, naming the final file."""
        if self.error is not None:
            raise write_error(self.final, self.error) from self.error


@contextmanager
def _h5_create(tmp: Path, final: Path) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """A new HDF5 file at ``tmp`` (for ``final``) and a check to call after each block written.

    OS errors surface as WriteError naming ``final``, from the check or at the end, never inside HDF5.
    """
    shield = _Shielded(tmp, final)
    try:
        with h5py.File(shield, "w") as f:
            yield f, shield.check
    finally:
        shield.close()
    shield.check()


def _normalize_attrs(attrs: dict[str, Any] | None) -> dict[str, Any]:
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


def _write_attrs(f: h5py.File, dtype: str, attrs: dict[str, Any]) -> None:
    """Write the file attributes in a fixed order so equal inputs give equal bytes."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["feature_dtype"] = dtype
    for key in sorted(attrs):
        f.attrs[key] = attrs[key]


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _schema_problems(f: h5py.File) -> list[str]:
    """Structural problems (datasets, shapes, dtypes, attributes, virtual sources); cheap, no data read."""
    missing = [k for k in FIELDS if k not in f or not isinstance(f[k], h5py.Dataset)]
    if missing:
        return [f"missing datasets: {', '.join(missing)}"]
    bad = []
    n = f["img_id"].shape[0] if f["img_id"].ndim == 1 else -1
    box, feat = f["boxes"], f["features"]
    k = box.shape[1] if box.ndim == 3 else -1
    d = feat.shape[2] if feat.ndim == 3 else -1
    if f["img_id"].ndim != 1 or h5py.check_string_dtype(f["img_id"].dtype) is None:
        bad.append(f"img_id: want (N,) strings, got {f['img_id'].shape} {f['img_id'].dtype}")
    if feat.dtype.name not in FEATURE_DTYPES:
        bad.append(f"features: want float16 or float32, got {feat.dtype}")
    for name, (shape, dt) in _layout(n, k, d, "float32").items():
        check_dtype = name not in ("img_id", "features")  # both checked above
        if f[name].shape != shape or (check_dtype and f[name].dtype != dt):
            want = f"{shape} {dt}" if check_dtype else str(shape)
            bad.append(f"{name}: want {want}, got {f[name].shape} {f[name].dtype}")
    if k == 0:
        bad.append("boxes: K (max boxes) is 0")
    version = f.attrs.get("schema_version")
    if version is None:
        bad.append("attribute schema_version is missing")
    elif not isinstance(_attr_value(version), int) or isinstance(_attr_value(version), bool):
        bad.append(f"attribute schema_version is not an integer: {version!r}")
    elif int(version) > SCHEMA_VERSION:
        bad.append(f"schema_version {int(version)} is newer than this code's {SCHEMA_VERSION}")
    for name in FIELDS:
        if f[name].is_virtual:
            for src in f[name].virtual_sources():
                if src.file_name != "." and not _source_path(f.filename, src.file_name).is_file():
                    bad.append(f"{name}: virtual dataset references missing file {src.file_name}")
    return bad


def _attr_problems(f: h5py.File) -> list[str]:
    """Problems with the descriptive attributes (validate reports them; the reader tolerates them)."""
    bad = [f"attribute {a} is missing" for a in REQUIRED_ATTRS[1:] if a not in f.attrs]
    dtype = _attr_value(f.attrs.get("feature_dtype"))
    if dtype is not None and dtype != f["features"].dtype.name:
        bad.append(f"attribute feature_dtype={dtype!r} but features are {f['features'].dtype}")
    if "detector_config" in f.attrs:
        try:
            json.loads(_attr_value(f.attrs["detector_config"]))
        except (TypeError, ValueError):
            bad.append("attribute detector_config is not JSON")
    return bad


def _bound_problems(f: h5py.File) -> list[str]:
    """K, D and one image's bytes against the module's limits, from the declared shapes alone."""
    box, feat = f["boxes"], f["features"]
    k, d = box.shape[1], feat.shape[2]
    bad = []
    if k > MAX_BOXES:
        bad.append(f"boxes declares shape {box.shape}: K = {k} exceeds the limit {MAX_BOXES}")
    if d > MAX_FEATURE_DIM:
        bad.append(f"features declares shape {feat.shape}: D = {d} exceeds the limit {MAX_FEATURE_DIM}")
    image = k * d * feat.dtype.itemsize
    if not bad and image > MAX_IMAGE_BYTES:
        bad.append(f"features declares shape {feat.shape}: one image takes {image} bytes, "
                   f"over the limit {MAX_IMAGE_BYTES}")
    return bad


def _item_bytes(ds: h5py.Dataset) -> int:
    """Bytes one element takes in the file (a variable-length string: its reference; the text is elsewhere)."""
    info = h5py.check_string_dtype(ds.dtype)
    return _VLEN_BYTES if info is not None and info.length is None else ds.dtype.itemsize


def _storage_problems(ds: h5py.Dataset, label: str, full: bool) -> list[str]:
    """What a (non-virtual) ``ds`` declares but its file does not hold (holes, external data); nothing read.

    Always: uncompressed bytes against the file's size, contiguous storage, compressed chunk size (all O(1)).
    ``full`` adds stored bytes of chunked data and the count of compressed chunks, O(chunks stored).
    """
    dcpl = ds.id.get_create_plist()
    if dcpl.get_external_count():
        return [f"{label} keeps its data in external files"]
    pieces = math.prod(-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:])) if ds.chunks else 1
    if pieces > _MAX_ROW_CHUNKS:
        return [f"{label}: chunks of shape {ds.chunks} cut one image into {pieces} pieces, "
                f"over the limit {_MAX_ROW_CHUNKS}"]
    if dcpl.get_nfilters():
        chunk = math.prod(ds.chunks) * _item_bytes(ds)
        if chunk > MAX_IMAGE_BYTES:
            return [f"{label}: compressed chunks of {chunk} bytes exceed the limit {MAX_IMAGE_BYTES}"]
        need = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        have = ds.id.get_num_chunks() if full else need
        if have < need:
            return [f"{label} declares shape {ds.shape} in {need} chunks but stores {have} "
                    "(unwritten parts read as fill values)"]
        return []
    declared = math.prod(ds.shape) * _item_bytes(ds)
    size = os.path.getsize(ds.file.filename)
    if declared > size:
        return [f"{label} declares shape {ds.shape} ({declared} bytes) but the file has {size}"]
    if full or ds.chunks is None:
        stored = ds.id.get_storage_size()
        if stored < declared:
            return [f"{label} declares shape {ds.shape} but stores {stored} of its {declared} bytes "
                    "(unwritten parts read as fill values)"]
    return []


def _virtual_rows(ds: h5py.Dataset, label: str) -> tuple[str | None, list[tuple[str, str, Any, int]]]:
    """(problem, mappings): every row mapped exactly once by blocks of whole rows, else the problem."""
    dcpl = ds.id.get_create_plist()
    n, rest = ds.shape[0], ds.shape[1:]
    spans, maps = [], []
    for i in range(dcpl.get_virtual_count()):
        vspace = dcpl.get_virtual_vspace(i)
        try:
            lo, hi = vspace.get_select_bounds()
            points = vspace.get_select_npoints()
        except (ValueError, RuntimeError, OSError):
            return f"{label}: virtual mapping {i} has no bounded selection", []
        if any(lo[1:]) or tuple(x + 1 for x in hi[1:]) != rest or points != (hi[0] - lo[0] + 1) * math.prod(rest):
            return f"{label}: virtual mapping {i} is not a block of whole rows", []
        spans.append((lo[0], hi[0]))
        maps.append((dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i), dcpl.get_virtual_srcspace(i),
                     points))
    covered, end = 0, -1
    for lo, hi in sorted(spans):
        if lo <= end:
            return f"{label}: virtual mappings overlap at row {lo}", []
        covered, end = covered + hi - lo + 1, hi
    if covered != n:
        return f"{label}: virtual dataset maps {covered} of its {n} rows", []
    return None, maps


def _source_path(vfile: str, name: str) -> Path:
    """Where HDF5 finds a virtual source: absolute, or next to the virtual file, else from the cwd."""
    here = Path(vfile).parent / name
    return Path(name) if Path(name).is_absolute() or not here.is_file() else here


def _maps_inside(space: Any, points: int, shape: tuple[int, ...]) -> bool:
    """Whether a virtual mapping's source selection lies inside the source (else it reads fill values)."""
    if space.get_select_type() == h5py.h5s.SEL_ALL:  # the whole source, at its extent when read
        return math.prod(shape) == points
    _, hi = space.get_select_bounds()
    return len(hi) == len(shape) and all(x < m for x, m in zip(hi, shape))


def _virtual_problems(items: list[tuple[h5py.Dataset, str, str, bool]], depth: int) -> list[str]:
    """Virtual datasets bounded by their sources: rows mapped once, onto source rows that exist and are stored.

    ``items``: (dataset, name in the feature file, label, full). Each source file is opened once for all
    the datasets that map onto it, so a merge of many shards stays cheap to open.
    """
    if depth >= _VIRTUAL_DEPTH:
        return [f"{items[0][1]}: virtual datasets nested deeper than {_VIRTUAL_DEPTH}"]
    bad: list[str] = []
    by_file: dict[Path, list[tuple[str, str, Any, int, str, bool]]] = {}
    for ds, name, label, full in items:
        problem, maps = _virtual_rows(ds, label)
        if problem:
            bad.append(problem)
        for file_name, dset_name, space, points in maps:
            where = Path(ds.file.filename) if file_name == "." else _source_path(ds.file.filename, file_name)
            by_file.setdefault(where, []).append((name, f"{name} (virtual source {where}:{dset_name})",
                                                  space, points, dset_name, full))
    for where, uses in by_file.items():
        try:
            src = h5py.File(where, "r")
        except (OSError, ValueError) as e:
            bad.append(f"{uses[0][1]}: cannot open the source ({e})")
            continue
        try:
            nested = []
            for name, label, space, points, dset_name, full in uses:
                sds = src.get(dset_name)
                if not isinstance(sds, h5py.Dataset):
                    bad.append(f"{label} is missing")
                    continue
                if not _maps_inside(space, points, sds.shape):
                    bad.append(f"{label}: maps {points} values that do not fit the source's shape {sds.shape}")
                elif sds.is_virtual:
                    nested.append((sds, name, label, full))
                else:
                    bad += _storage_problems(sds, label, full)
            if nested:
                bad += _virtual_problems(nested, depth + 1)
        finally:
            src.close()
    return bad


def _size_problems(f: h5py.File, full: bool) -> list[str]:
    """Declared shapes the file cannot back: over the bounds, beyond its size, unwritten, or badly mapped.

    The reader runs the O(1) checks, plus the full ones on img_id, whose length is what its memory grows
    with; validate runs them all (``full``), as it reads every chunk anyway.
    """
    bad = _bound_problems(f)
    if bad:
        return bad
    virtual = [(f[name], name, name, full or name == "img_id") for name in FIELDS if f[name].is_virtual]
    for name in FIELDS:
        if not f[name].is_virtual:
            bad += _storage_problems(f[name], name, full or name == "img_id")
    return bad + (_virtual_problems(virtual, 0) if virtual else [])


def _open_checked(path: Path) -> h5py.File:
    """Open a feature file read-only, refusing non-HDF5, truncated, schema-mismatched or hostile files.

    Nothing but metadata is read: shapes over the bounds or beyond what the file holds are refused first.
    """
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise FeatureStoreError(f"{path}: not a readable HDF5 feature file ({e})") from e
    sizes: list[str] = []
    try:
        problems = _schema_problems(f)
        sizes = [] if problems else _size_problems(f, full=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        problems = [f"unreadable structure ({e})"]
    if problems:
        f.close()
        raise FeatureStoreError(f"{path}: does not follow the feature-store schema: {'; '.join(problems)}")
    if sizes:
        f.close()
        more = f" (and {len(sizes) - 1} more problem(s))" if len(sizes) > 1 else ""
        raise FeatureStoreError(f"{path}: {sizes[0]}{more}")
    return f


def _row_chunk_bytes(ds: h5py.Dataset) -> int:
    """HDF5's bookkeeping per row read (chunks touched times _CHUNK_BYTES); a virtual row counts as one chunk."""
    if ds.is_virtual:
        return _CHUNK_BYTES
    if ds.chunks is None:
        return 0
    pieces = math.prod(-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:]))
    return -(-_CHUNK_BYTES * pieces // ds.chunks[0])


def _id_blocks(f: h5py.File) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, ids as an array of str) block by block, so reading ids never holds more than a block extra."""
    ds = f["img_id"]
    n = ds.shape[0]
    step = max(1, _BLOCK_BYTES // (_ID_BYTES + _item_bytes(ds) + _row_chunk_bytes(ds)))
    for start in range(0, n, step):
        yield start, ds.asstr()[start: min(n, start + step)]


def _read_ids(f: h5py.File) -> list[str]:
    """All image ids of an open file in row order (the reader's id list), read block by block."""
    out: list[str] = []
    for _, ids in _id_blocks(f):
        out.extend(ids.tolist())
    return out


def _hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of ids: Python's SipHash, keyed at random per process, so a file cannot aim collisions."""
    return np.fromiter(map(hash, ids), np.int64, count=len(ids))


def _repeats(hashes: np.ndarray, blocks: Callable[[], Iterable[tuple[Any, np.ndarray]]]
             ) -> Iterator[tuple[str, Any, Any]]:
    """Each id present twice or more, once: (id, label of its first block, label of its second); exact.

    Sorts ``hashes`` (one per id, in row order) in place, then re-reads the ids (``blocks()`` yields
    (label, ids) in the same order) and compares the strings of those whose hash repeats, at most
    _REPEAT_BATCH hashes a pass. Memory: the 8 bytes an id of ``hashes``, plus the repeated ids of one batch.
    """
    hashes.sort()
    twice = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    for start in range(0, len(twice), _REPEAT_BATCH):
        batch = twice[start: start + _REPEAT_BATCH]
        first: dict[str, Any] = {}
        told: set[str] = set()
        for label, ids in blocks():
            for img_id in ids[np.isin(_hashes(ids), batch)].tolist():
                if img_id not in first:
                    first[img_id] = label
                elif img_id not in told:
                    told.add(img_id)
                    yield img_id, first[img_id], label


class _Record:
    """A checked record, cast to the file's dtypes, not yet padded (keeps the buffer small)."""

    __slots__ = ("img_id", "img_h", "img_w", "arrays")

    def __init__(self, img_id: str, img_h: int, img_w: int, arrays: dict[str, np.ndarray]):
        self.img_id, self.img_h, self.img_w, self.arrays = img_id, img_h, img_w, arrays


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
    fd = os.open(parts / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FeatureStoreError(f"{parts}: another writer is using this output") from None
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
        self.attrs = _normalize_attrs(attrs)
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
                    ids = _read_ids(f)
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
            with _h5_create(tmp, final) as (f, _):
                _create_datasets(f, len(recs), k, d, self.dtype, chunked=False)
                if recs:
                    f["img_id"][:] = [r.img_id for r in recs]
                    f["img_h"][:] = [r.img_h for r in recs]
                    f["img_w"][:] = [r.img_w for r in recs]
                    f["num_boxes"][:] = [r.arrays["boxes"].shape[0] for r in recs]
                    for name in _PER_BOX:
                        shape, dt = _layout(len(recs), k, d, self.dtype)[name]
                        block = np.zeros(shape, dt)
                        for i, r in enumerate(recs):
                            block[i, : len(r.arrays[name])] = r.arrays[name]
                        f[name][...] = block
                lines = [json.dumps(x, ensure_ascii=False) for x in self._failures]
                f.create_dataset("failures", data=np.array(lines, dtype=object), shape=(len(lines),),
                                 dtype=_STR)
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
            with _h5_create(tmp, self.path) as (out, check):
                _create_datasets(out, len(images), self.max_boxes, self.feature_dim, self.dtype, chunked=True,
                                 compression=self.compression, compression_opts=self.compression_opts)
                _write_attrs(out, self.dtype, self.attrs)
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
        per_image = self.max_boxes * self.feature_dim * np.dtype(self.dtype).itemsize + _CHUNK_BYTES * len(_PER_BOX)
        step = max(1, _BLOCK_BYTES // per_image)  # one chunk per image and per-box dataset: bound HDF5's bookkeeping
        for start in range(0, len(images), step):
            chunk = images[start: start + step]
            layout = _layout(len(chunk), self.max_boxes, self.feature_dim, self.dtype)
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


class FeatureReader:
    """Random access to a feature file by img_id or row, cheap to create and to send to workers.

    The constructor only checks that the file exists; the HDF5 handle opens on first use, once per
    process (a DataLoader worker, forked or spawned, opens its own), and pickling drops it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature file {self.path} does not exist")
        self._reset()

    def _reset(self) -> None:
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._ds: dict[str, h5py.Dataset] = {}
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._reset()

    def _h5(self) -> h5py.File:
        """This process's handle, opened (and schema-checked) on first use."""
        if self._file is None or self._pid != os.getpid():
            self._reset()
            self._file = _open_checked(self.path)
            self._pid = os.getpid()
            self._ds = {name: self._file[name] for name in FIELDS}
        return self._file

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's handle (a later access reopens it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._reset()

    def __len__(self) -> int:
        self._h5()
        return int(self._ds["img_id"].shape[0])

    @property
    def ids(self) -> list[str]:
        """All image ids in row order (read once, on first use)."""
        if self._ids is None:
            self._ids = _read_ids(self._h5())
        return self._ids

    def index(self, img_id: str) -> int:
        """Row of an image id; KeyError naming the id and the file when absent."""
        if self._index is None:
            self._index = {img_id: i for i, img_id in enumerate(self.ids)}
        try:
            return self._index[img_id]
        except KeyError:
            raise KeyError(f"image {img_id!r} is not in {self.path}") from None

    def __contains__(self, img_id: object) -> bool:
        if not isinstance(img_id, str):
            return False
        try:
            self.index(img_id)
        except KeyError:
            return False
        return True

    @property
    def max_boxes(self) -> int:
        self._h5()
        return int(self._ds["boxes"].shape[1])

    @property
    def feature_dim(self) -> int:
        self._h5()
        return int(self._ds["features"].shape[2])

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes as plain values, detector_config parsed from JSON."""
        out = {key: _attr_value(v) for key, v in self._h5().attrs.items()}
        if "detector_config" in out:
            try:
                out["detector_config"] = json.loads(out["detector_config"])
            except (TypeError, ValueError) as e:
                raise FeatureStoreError(f"{self.path}: attribute detector_config is not JSON ({e})") from e
        return out

    def get(self, key: str | int, normalize_boxes: bool = False) -> ImageFeatures:
        """One image's record, arrays trimmed to num_boxes; boxes divided by width/height if asked."""
        n_rows = len(self)
        if isinstance(key, str):
            i = self.index(key)
        elif isinstance(key, int | np.integer) and not isinstance(key, bool):
            i = int(key) + (n_rows if key < 0 else 0)
            if not 0 <= i < n_rows:
                raise IndexError(f"row {key} out of range for {self.path} ({n_rows} images)")
        else:
            raise TypeError(f"get() takes an img_id string or a row number, got {type(key).__name__}")
        ds = self._ds
        try:
            n = int(ds["num_boxes"][i])
            if not 0 <= n <= self.max_boxes:
                raise FeatureStoreError(
                    f"{self.path}: row {i} has num_boxes={n} outside [0, {self.max_boxes}]")
            rec = ImageFeatures(
                img_id=ds["img_id"].asstr()[i], img_h=int(ds["img_h"][i]), img_w=int(ds["img_w"][i]),
                boxes=ds["boxes"][i, :n], features=ds["features"][i, :n],
                objects_id=ds["objects_id"][i, :n], objects_conf=ds["objects_conf"][i, :n],
                attrs_id=ds["attrs_id"][i, :n], attrs_conf=ds["attrs_conf"][i, :n])
        except OSError as e:
            raise FeatureStoreError(f"{self.path}: cannot read row {i} ({e})") from e
        if normalize_boxes:
            scale = np.array([rec.img_w, rec.img_h, rec.img_w, rec.img_h], np.float32)
            rec.boxes = np.clip(rec.boxes / scale, 0.0, 1.0)
        return rec

    def __iter__(self) -> Iterator[ImageFeatures]:
        for i in range(len(self)):
            yield self.get(i)


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
    are refused before any data is read. The rest streams in blocks of about _BLOCK_BYTES (images, or part
    of one image's boxes when one image alone is larger), so memory does not grow with the file but for
    8 bytes an image: duplicate ids are found in a sorted array of 64-bit hashes, the ids whose hash repeats
    re-read and compared exactly.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        f = _open_checked(path)
    except FeatureStoreError as e:
        return [str(e)]
    with f:
        stored = _size_problems(f, full=True)
        if stored:
            return [f"{path}: {problem}" for problem in stored]
        bad = _attr_problems(f)
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
    """(images, boxes) per block of validate, so a block, its checks and HDF5's bookkeeping fit _BLOCK_BYTES.

    Holds whatever K and D are: one image larger than the budget is read a few boxes at a time.
    """
    per_box = d * (f["features"].dtype.itemsize + 3) + _BOX_BYTES  # features and masks; the other arrays
    per_block = max(1, _BLOCK_BYTES // per_box)
    if per_block < k:
        return 1, per_block
    per_image = _ID_BYTES + max(_row_chunk_bytes(f[name]) for name in FIELDS)  # datasets are read one by one
    return max(1, min(per_block // k, _BLOCK_BYTES // per_image)), k


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
        hashes[sl] = _hashes(ids)
        empty = empty or bool((ids == "").any())
        _check_rows(f, sl, ids, k, box_step, tally)
    bad = []
    count, examples = 0, []
    for img_id, _, _ in _repeats(hashes, lambda: ((None, block[1]) for block in _id_blocks(f))):
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
    arrays = {name: f[name][rows, boxes] for name in _PER_BOX}

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


def merge(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, virtual: bool = False,
          overwrite: bool = False) -> dict[str, Any]:
    """Join shard files (same K, D, dtype and attributes, no shared ids) into one file, atomically.

    The shards' failures files, where present, are concatenated into ``<output>.failures.jsonl``.
    ``virtual=True`` writes an HDF5 virtual-dataset file that maps onto the shards by absolute path
    instead of copying: the shards must then stay where they are. Returns {"path", "images", "failures"}.
    """
    output = Path(output)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("merge: inputs is empty")
    if output.exists() and not overwrite:
        raise FeatureStoreError(f"{output} already exists; pass overwrite=True to replace it")
    if any(p.resolve() == output.resolve() for p in paths):
        raise ValueError(f"merge: output {output} is also an input")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"merge: input {p} does not exist")
    shapes, counts, hashes = [], [], []
    attrs0: dict[str, Any] = {}
    for p in paths:
        with _open_checked(p) as f:
            shape = (f["boxes"].shape[1], f["features"].shape[2], f["features"].dtype.name)
            attrs = {key: _attr_value(v) for key, v in f.attrs.items() if key != "schema_version"}
            if shapes and shape != shapes[0]:
                raise FeatureStoreError(f"merge: {p} has (K, D, dtype) = {shape}, {paths[0]} has {shapes[0]}")
            if shapes and attrs != attrs0:
                keys = sorted(key for key in attrs.keys() | attrs0.keys()
                              if attrs.get(key) != attrs0.get(key))
                raise FeatureStoreError(f"merge: {p} and {paths[0]} differ in attributes {keys}")
            shapes.append(shape)
            attrs0 = attrs0 or attrs
            h = np.empty(f["img_id"].shape[0], np.int64)
            for start, ids in _id_blocks(f):
                h[start: start + len(ids)] = _hashes(ids)
            hashes.append(h)
            counts.append(len(h))

    def id_blocks() -> Iterator[tuple[Path, np.ndarray]]:
        for p in paths:
            with h5py.File(p, "r") as f:
                yield from ((p, ids) for _, ids in _id_blocks(f))

    repeat = next(_repeats(np.concatenate(hashes), id_blocks), None)  # 8 bytes an image, not the ids
    if repeat:
        raise FeatureStoreError(f"merge: image {repeat[0]} is in both {repeat[1]} and {repeat[2]}")
    k, d, dtype = shapes[0]
    total = sum(counts)
    extra = {key: v for key, v in attrs0.items() if key != "feature_dtype"}
    tmp = temporary_sibling(output)
    try:
        with _h5_create(tmp, output) as (out, check):
            if virtual:
                _write_virtual(out, paths, counts, k, d, dtype)
            else:
                _create_datasets(out, total, k, d, dtype, chunked=True)
                offset = 0
                for p, n in zip(paths, counts):
                    _copy_file_rows(p, out, offset, n, k * d * np.dtype(dtype).itemsize, check)
                    offset += n
            _write_attrs(out, dtype, extra)
        lines = [line for p in paths if failures_path(p).is_file()
                 for line in failures_path(p).read_text(encoding="utf-8").split("\n") if line.strip()]
        atomic_write(failures_path(output), "".join(line + "\n" for line in lines),
                     tmp=temporary_sibling(failures_path(output)))
        atomic_replace(tmp, output)
    except BaseException:
        remove_quietly(tmp)
        raise
    return {"path": str(output), "images": total, "failures": len(lines)}


def _copy_file_rows(src_path: Path, out: h5py.File, offset: int, n: int, bytes_per_image: int,
                    check: Callable[[], None]) -> None:
    """Copy a shard's rows into the output at ``offset`` in bounded blocks (``check`` after each)."""
    step = max(1, _BLOCK_BYTES // (bytes_per_image + _CHUNK_BYTES * len(_PER_BOX)))  # chunks a block touches
    with h5py.File(src_path, "r") as src:
        for start in range(0, n, step):
            stop = min(n, start + step)
            for name in FIELDS:
                ds = src[name].asstr() if name == "img_id" else src[name]
                out[name][offset + start: offset + stop] = ds[start:stop]
            check()


def _write_virtual(out: h5py.File, paths: list[Path], counts: list[int], k: int, d: int, dtype: str) -> None:
    """Datasets that map row ranges onto the shards (absolute paths) instead of copying them."""
    total = sum(counts)
    for name, (shape, dt) in _layout(total, k, d, dtype).items():
        layout = h5py.VirtualLayout(shape=shape, dtype=dt)
        offset = 0
        for p, n in zip(paths, counts):
            if n:
                layout[offset: offset + n] = h5py.VirtualSource(str(p.resolve()), name, shape=(n, *shape[1:]))
            offset += n
        out.create_virtual_dataset(name, layout, fillvalue=None if name == "img_id" else 0)

