"""merge: shard files joined into one feature file (copied, or mapped as a virtual dataset), atomically."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from extractor.fileio import atomic_replace, atomic_write, remove_quietly, temporary_sibling
from extractor.store import blocks
from extractor.store.blocks import id_blocks, id_hashes, repeats
from extractor.store.h5file import h5_create
from extractor.store.reader import open_checked
from extractor.store.schema import (
    FIELDS,
    PER_BOX,
    FeatureStoreError,
    attr_value,
    create_datasets,
    dataset_layout,
    failures_path,
    write_attrs,
)


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
        with open_checked(p) as f:
            shape = (f["boxes"].shape[1], f["features"].shape[2], f["features"].dtype.name)
            attrs = {key: attr_value(v) for key, v in f.attrs.items() if key != "schema_version"}
            if shapes and shape != shapes[0]:
                raise FeatureStoreError(f"merge: {p} has (K, D, dtype) = {shape}, {paths[0]} has {shapes[0]}")
            if shapes and attrs != attrs0:
                keys = sorted(key for key in attrs.keys() | attrs0.keys()
                              if attrs.get(key) != attrs0.get(key))
                raise FeatureStoreError(f"merge: {p} and {paths[0]} differ in attributes {keys}")
            shapes.append(shape)
            attrs0 = attrs0 or attrs
            h = np.empty(f["img_id"].shape[0], np.int64)
            for start, ids in id_blocks(f):
                h[start: start + len(ids)] = id_hashes(ids)
            hashes.append(h)
            counts.append(len(h))

    def shard_ids() -> Iterator[tuple[Path, np.ndarray]]:
        for p in paths:
            with h5py.File(p, "r") as f:
                yield from ((p, ids) for _, ids in id_blocks(f))

    repeat = next(repeats(np.concatenate(hashes), shard_ids), None)  # 8 bytes an image, not the ids
    if repeat:
        raise FeatureStoreError(f"merge: image {repeat[0]} is in both {repeat[1]} and {repeat[2]}")
    k, d, dtype = shapes[0]
    total = sum(counts)
    extra = {key: v for key, v in attrs0.items() if key != "feature_dtype"}
    tmp = temporary_sibling(output)
    try:
        with h5_create(tmp, output) as (out, check):
            if virtual:
                _write_virtual(out, paths, counts, k, d, dtype)
            else:
                create_datasets(out, total, k, d, dtype, chunked=True)
                offset = 0
                for p, n in zip(paths, counts):
                    _copy_file_rows(p, out, offset, n, k * d * np.dtype(dtype).itemsize, check)
                    offset += n
            write_attrs(out, dtype, extra)
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
    step = max(1, blocks.BLOCK_BYTES // (bytes_per_image + blocks.CHUNK_BYTES * len(PER_BOX)))  # chunks a block touches
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
    for name, (shape, dt) in dataset_layout(total, k, d, dtype).items():
        layout = h5py.VirtualLayout(shape=shape, dtype=dt)
        offset = 0
        for p, n in zip(paths, counts):
            if n:
                layout[offset: offset + n] = h5py.VirtualSource(str(p.resolve()), name, shape=(n, *shape[1:]))
            offset += n
        out.create_virtual_dataset(name, layout, fillvalue=None if name == "img_id" else 0)
