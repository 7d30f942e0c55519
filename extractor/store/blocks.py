"""Reading a feature file in bounded blocks: the memory budget, ids block by block, exact repeats by hash.

The budget constants are read through this module (``blocks.BLOCK_BYTES``) so a test can shrink them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import h5py
import numpy as np

BLOCK_BYTES = 32 << 20  # bytes of features per block when streaming over a file
_VLEN_BYTES = 16  # HDF5 stores a variable-length string as a 4-byte length and a 12-byte heap reference
ID_BYTES = 256  # budget per image id read in a block (the Python string, its slot, HDF5's buffer)
CHUNK_BYTES = 8192  # HDF5's bookkeeping per chunk one read touches (about 6.5 KB measured with HDF5 2.0)
BOX_BYTES = 128  # budget per box of the per-box arrays other than features, with validate's masks
REPEAT_BATCH = 1 << 16  # repeated id hashes re-checked per pass over the ids (strings held at once)


def item_bytes(ds: h5py.Dataset) -> int:
    """Bytes one element takes in the file (a variable-length string: its reference; the text is elsewhere)."""
    info = h5py.check_string_dtype(ds.dtype)
    return _VLEN_BYTES if info is not None and info.length is None else ds.dtype.itemsize


def row_chunk_bytes(ds: h5py.Dataset) -> int:
    """HDF5's bookkeeping per row read (chunks touched times CHUNK_BYTES); a virtual row counts as one chunk."""
    if ds.is_virtual:
        return CHUNK_BYTES
    if ds.chunks is None:
        return 0
    pieces = math.prod(-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:]))
    return -(-CHUNK_BYTES * pieces // ds.chunks[0])


def id_blocks(f: h5py.File) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, ids as an array of str) block by block, so reading ids never holds more than a block extra."""
    ds = f["img_id"]
    n = ds.shape[0]
    step = max(1, BLOCK_BYTES // (ID_BYTES + item_bytes(ds) + row_chunk_bytes(ds)))
    for start in range(0, n, step):
        yield start, ds.asstr()[start: min(n, start + step)]


def read_ids(f: h5py.File) -> list[str]:
    """All image ids of an open file in row order (the reader's id list), read block by block."""
    out: list[str] = []
    for _, ids in id_blocks(f):
        out.extend(ids.tolist())
    return out


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of ids: Python's SipHash, keyed at random per process, so a file cannot aim collisions."""
    return np.fromiter(map(hash, ids), np.int64, count=len(ids))


def repeats(hashes: np.ndarray, blocks: Callable[[], Iterable[tuple[Any, np.ndarray]]]
             ) -> Iterator[tuple[str, Any, Any]]:
    """Each id present twice or more, once: (id, label of its first block, label of its second); exact.

    Sorts ``hashes`` (one per id, in row order) in place, then re-reads the ids (``blocks()`` yields
    (label, ids) in the same order) and compares the strings of those whose hash repeats, at most
    REPEAT_BATCH hashes a pass. Memory: the 8 bytes an id of ``hashes``, plus the repeated ids of one batch.
    """
    hashes.sort()
    twice = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    for start in range(0, len(twice), REPEAT_BATCH):
        batch = twice[start: start + REPEAT_BATCH]
        first: dict[str, Any] = {}
        told: set[str] = set()
        for label, ids in blocks():
            for img_id in ids[np.isin(id_hashes(ids), batch)].tolist():
                if img_id not in first:
                    first[img_id] = label
                elif img_id not in told:
                    told.add(img_id)
                    yield img_id, first[img_id], label
