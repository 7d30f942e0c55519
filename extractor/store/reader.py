"""Opening a feature file safely (schema, bounds, storage and virtual sources checked from metadata) and
FeatureReader, random access by img_id or row."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extractor.store.blocks import item_bytes, read_ids
from extractor.store.schema import (
    FEATURE_DTYPES,
    FIELDS,
    MAX_BOXES,
    MAX_FEATURE_DIM,
    MAX_IMAGE_BYTES,
    PER_BOX,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    FeatureStoreError,
    ImageFeatures,
    attr_value,
    dataset_layout,
)

_VIRTUAL_DEPTH = 4  # virtual datasets over virtual datasets, at most this deep
_MAX_ROW_CHUNKS = 1024  # chunks one image's row may be cut into (our writer: 1), so one get() stays cheap


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
    for name, (shape, dt) in dataset_layout(n, k, d, "float32").items():
        check_dtype = name not in ("img_id", "features")  # both checked above
        if f[name].shape != shape or (check_dtype and f[name].dtype != dt):
            want = f"{shape} {dt}" if check_dtype else str(shape)
            bad.append(f"{name}: want {want}, got {f[name].shape} {f[name].dtype}")
    if k == 0:
        bad.append("boxes: K (max boxes) is 0")
    version = f.attrs.get("schema_version")
    if version is None:
        bad.append("attribute schema_version is missing")
    elif not isinstance(attr_value(version), int) or isinstance(attr_value(version), bool):
        bad.append(f"attribute schema_version is not an integer: {version!r}")
    elif int(version) > SCHEMA_VERSION:
        bad.append(f"schema_version {int(version)} is newer than this code's {SCHEMA_VERSION}")
    for name in FIELDS:
        if f[name].is_virtual:
            for src in f[name].virtual_sources():
                if src.file_name != "." and not _source_path(f.filename, src.file_name).is_file():
                    bad.append(f"{name}: virtual dataset references missing file {src.file_name}")
    return bad


def attr_problems(f: h5py.File) -> list[str]:
    """Problems with the descriptive attributes (validate reports them; the reader tolerates them)."""
    bad = [f"attribute {a} is missing" for a in REQUIRED_ATTRS[1:] if a not in f.attrs]
    dtype = attr_value(f.attrs.get("feature_dtype"))
    if dtype is not None and dtype != f["features"].dtype.name:
        bad.append(f"attribute feature_dtype={dtype!r} but features are {f['features'].dtype}")
    if "detector_config" in f.attrs:
        try:
            json.loads(attr_value(f.attrs["detector_config"]))
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
        chunk = math.prod(ds.chunks) * item_bytes(ds)
        if chunk > MAX_IMAGE_BYTES:
            return [f"{label}: compressed chunks of {chunk} bytes exceed the limit {MAX_IMAGE_BYTES}"]
        need = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        have = ds.id.get_num_chunks() if full else need
        if have < need:
            return [f"{label} declares shape {ds.shape} in {need} chunks but stores {have} "
                    "(unwritten parts read as fill values)"]
        return []
    declared = math.prod(ds.shape) * item_bytes(ds)
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


def size_problems(f: h5py.File, full: bool) -> list[str]:
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


def open_checked(path: Path) -> h5py.File:
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
        sizes = [] if problems else size_problems(f, full=False)
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


class FeatureReader:
    """Random access to a feature file by img_id or row, cheap to create and to send to workers.

    The constructor only checks that the file exists; the HDF5 handle opens on first use, once per
    process (a DataLoader worker, forked or spawned, opens its own), and pickling drops it.
    `preload()` reads a small file into memory once: later reads never touch HDF5 (per-row HDF5
    reads cost more CPU than the demo network's step), forked workers share the arrays, and pickling
    drops them (a spawned worker reads the file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature file {self.path} does not exist")
        self._mem: dict[str, np.ndarray] | None = None
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
        self._mem = None
        self._reset()

    def _h5(self) -> h5py.File:
        """This process's handle, opened (and schema-checked) on first use."""
        if self._file is None or self._pid != os.getpid():
            self._reset()
            self._file = open_checked(self.path)
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

    def nbytes(self) -> int:
        """Bytes the per-image arrays take in memory (what `preload` would hold)."""
        self._h5()
        return sum(int(np.prod(self._ds[name].shape)) * self._ds[name].dtype.itemsize for name in FIELDS
                   if name != "img_id") + 64 * len(self)

    def preload(self) -> None:
        """Read every per-image array into memory (once); `get` then serves rows from it, the same values."""
        if self._mem is not None:
            return
        self._h5()
        try:
            mem = {name: self._ds[name][()] for name in FIELDS if name != "img_id"}
        except OSError as e:
            raise FeatureStoreError(f"{self.path}: cannot read the file into memory ({e})") from e
        mem["img_id"] = np.array(self.ids, dtype=object)
        self._mem = mem

    @property
    def preloaded(self) -> bool:
        """Whether reads come from memory (this process's `preload`) rather than from HDF5."""
        return self._mem is not None

    def __len__(self) -> int:
        if self._mem is not None:
            return len(self._mem["img_id"])
        self._h5()
        return int(self._ds["img_id"].shape[0])

    @property
    def ids(self) -> list[str]:
        """All image ids in row order (read once, on first use)."""
        if self._ids is None:
            self._ids = [str(i) for i in self._mem["img_id"]] if self._mem is not None else read_ids(self._h5())
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
        if self._mem is not None:
            return int(self._mem["boxes"].shape[1])
        self._h5()
        return int(self._ds["boxes"].shape[1])

    @property
    def feature_dim(self) -> int:
        if self._mem is not None:
            return int(self._mem["features"].shape[2])
        self._h5()
        return int(self._ds["features"].shape[2])

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes as plain values, detector_config parsed from JSON."""
        out = {key: attr_value(v) for key, v in self._h5().attrs.items()}
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
        mem = self._mem
        try:
            n = int((mem or self._ds)["num_boxes"][i])
            if not 0 <= n <= self.max_boxes:
                raise FeatureStoreError(
                    f"{self.path}: row {i} has num_boxes={n} outside [0, {self.max_boxes}]")
            if mem is not None:  # copies, as HDF5 reads are: a caller may change its record
                rec = ImageFeatures(
                    img_id=str(mem["img_id"][i]), img_h=int(mem["img_h"][i]), img_w=int(mem["img_w"][i]),
                    **{name: mem[name][i, :n].copy() for name in PER_BOX})
            else:
                ds = self._ds
                rec = ImageFeatures(
                    img_id=ds["img_id"].asstr()[i], img_h=int(ds["img_h"][i]), img_w=int(ds["img_w"][i]),
                    **{name: ds[name][i, :n] for name in PER_BOX})
        except OSError as e:
            raise FeatureStoreError(f"{self.path}: cannot read row {i} ({e})") from e
        if normalize_boxes:
            scale = np.array([rec.img_w, rec.img_h, rec.img_w, rec.img_h], np.float32)
            rec.boxes = np.clip(rec.boxes / scale, 0.0, 1.0)
        return rec

    def __iter__(self) -> Iterator[ImageFeatures]:
        for i in range(len(self)):
            yield self.get(i)
