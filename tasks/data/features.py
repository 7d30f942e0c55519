"""Feature files as a training dataset sees them: several stores, images looked up by id, boxes capped."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from extractor.store import FeatureReader, ImageFeatures
from extractor.store.schema import PER_BOX

# Feature files are read into memory (once per process, shared by forked DataLoader workers) while
# their per-image arrays total at most this many bytes: the demo's 10 MB file reads each record from
# memory instead of HDF5, and its pretraining steps ran 1.15x faster on two cores (bench/preload_step.py);
# a full-size file (tens of GB) stays on disk, read per record.
PRELOAD_BYTES = 1 << 30


def open_stores(paths: Sequence[str], preload_bytes: int = PRELOAD_BYTES) -> list[FeatureReader]:
    """Readers over the feature files (safe to send to workers); one feature dimension for all. Files
    are preloaded into memory, in order, while their total stays within `preload_bytes`."""
    if not paths:
        raise ValueError("features: at least one HDF5 feature file is required")
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"features: no file at {p}")
    stores = [FeatureReader(p) for p in paths]
    dims = {s.feature_dim for s in stores}
    if len(dims) > 1:
        raise ValueError(f"features: files disagree on the feature dimension {sorted(dims)}")
    budget = preload_bytes
    for store in stores:
        size = store.nbytes()
        if size > budget:
            break
        store.preload()
        budget -= size
    return stores


def locate_images(stores: Sequence[FeatureReader], wanted: Iterable[str] | None = None
                  ) -> dict[str, tuple[int, int]]:
    """img_id -> (store, row) for the wanted ids (all ids when None); the first file holding an id wins."""
    wanted_set = None if wanted is None else set(wanted)
    where: dict[str, tuple[int, int]] = {}
    for s, reader in enumerate(stores):
        for row, img_id in enumerate(reader.ids):
            if (wanted_set is None or img_id in wanted_set) and img_id not in where:
                where[img_id] = (s, row)
    return where


def read_image(stores: Sequence[FeatureReader], store: int, row: int, max_boxes: int = 0) -> ImageFeatures:
    """One image with boxes normalised to [0, 1], keeping at most `max_boxes` boxes (0: all)."""
    rec = stores[store].get(int(row), normalize_boxes=True)
    if max_boxes and rec.num_boxes > max_boxes:
        for name in PER_BOX:
            setattr(rec, name, getattr(rec, name)[:max_boxes])
    return rec
