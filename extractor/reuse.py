"""Reuse of features from earlier outputs, so a rerun over a grown folder runs the detector on new images only.

Every feature file the driver writes gets a sidecar ``<file>.images.jsonl``: a header line holding the
extraction key (everything that changes an image's features: detector weights and config, the input
resize rule, box rule, dtype, autocast, TF32, device type, ``REUSE_VERSION``) and one line
``[img_id, sha256 of the image file]`` per image. A later run with the same key copies the rows of images
whose bytes it finds in such a file instead of extracting them again. Nothing is copied aside: the index
is the sidecars of the outputs that exist, so reuse costs no disk, and deleting an old output only forgoes
what it could have given.
The sidecar is written (temporary file, fsync, rename) before the feature file it describes, by the run
that computed the rows, and a source is used only when its attributes agree with the key, so a kill at
any moment never leaves an index line that gives wrong features.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py

from extractor.fileio import atomic_write, file_sha256
from extractor.store import FeatureReader, FeatureStoreError, ImageFeatures

REUSE_VERSION = 1
"""Part of every key: raise it when decoding, the detector's maths or box selection change what the same
image, weights and settings give, so features computed before are no longer reused."""

KEY_ATTRS = ("weights_sha256", "detector_config", "resize", "box_strategy", "min_boxes", "max_boxes", "amp",
             "tf32")


def extraction_key(attrs: Mapping[str, Any], dtype: str, device: str) -> dict[str, Any]:
    """What decides an image's features besides its bytes: the feature file's attributes, dtype, device type
    (as JSON gives it back, so a key read from an index compares equal)."""
    key = {"version": REUSE_VERSION, **{k: attrs[k] for k in KEY_ATTRS}, "dtype": dtype, "device": device}
    return json.loads(json.dumps(key, sort_keys=True))


def content_hash(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes, None when it cannot be read (its decoding then fails and says why)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def content_hashes(paths: Sequence[str | os.PathLike], threads: int = 4) -> list[str | None]:
    """content_hash of each path, a few at a time (hashlib releases the GIL, reading overlaps)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(content_hash, paths))


def sidecar_path(features: str | os.PathLike) -> Path:
    """The index of a feature file: ``<file>.images.jsonl``."""
    return Path(str(features) + ".images.jsonl")


def write_sidecar(features: str | os.PathLike, key: Mapping[str, Any], hashes: Mapping[str, str]) -> None:
    """Write the index of `features` (img_id -> image sha256) atomically and durably."""
    lines = [json.dumps({"key": dict(key)}, sort_keys=True)]
    lines += [json.dumps([img_id, sha]) for img_id, sha in hashes.items()]
    atomic_write(sidecar_path(features), "".join(line + "\n" for line in lines))


def read_sidecar(features: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]] | None:
    """(key, {img_id: sha256}) of a feature file's index; None when it has none or it is unreadable."""
    try:
        with open(sidecar_path(features), encoding="utf-8") as f:
            key = json.loads(f.readline())["key"]
            return key, {img_id: sha for img_id, sha in map(json.loads, f)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def merge_sidecars(inputs: Sequence[str | os.PathLike], output: str | os.PathLike) -> bool:
    """Index a merged file by its inputs' indexes; False (nothing written) unless all have one, same key."""
    found = [read_sidecar(p) for p in inputs]
    if not found or any(f is None or f[0] != found[0][0] for f in found):
        return False
    write_sidecar(output, found[0][0], {i: sha for _, hashes in found for i, sha in hashes.items()})
    return True


def _usable(path: Path, key: Mapping[str, Any]) -> bool:
    """The file exists, is a plain feature file (a virtual one reads zeros once its sources are gone),
    and its attributes are the key's."""
    try:
        with h5py.File(path, "r") as f:
            if f["features"].is_virtual:
                return False
        with FeatureReader(path) as reader:
            attrs = reader.attrs
    except (OSError, KeyError, FeatureStoreError):
        return False
    if not all(k in attrs for k in (*KEY_ATTRS, "feature_dtype")):
        return False
    return extraction_key(attrs, attrs["feature_dtype"], key["device"]) == dict(key)


def feature_files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """The indexed feature files among `sources` (files, or folders searched below), newest index first."""
    found = set()
    for src in map(Path, sources):
        candidates = src.rglob("*.images.jsonl") if src.is_dir() else [sidecar_path(src)]
        found.update(Path(str(c)[: -len(".images.jsonl")]) for c in candidates if c.is_file())
    return sorted(found, key=lambda p: (-sidecar_path(p).stat().st_mtime_ns, str(p)))


class Reuse:
    """Finds and copies earlier features of images by their bytes, from indexed files with the same key."""

    def __init__(self, sources: Iterable[str | os.PathLike], key: Mapping[str, Any]):
        self.files, self.key = feature_files(sources), dict(key)

    def find(self, wanted: set[str]) -> dict[str, tuple[Path, str]]:
        """{image sha256: (feature file, img_id there)} for the wanted hashes some source holds."""
        hits: dict[str, tuple[Path, str]] = {}
        for path in self.files:
            if len(hits) == len(wanted):
                break
            index = read_sidecar(path)
            if index is None or index[0] != self.key or not _usable(path, self.key):
                continue
            for img_id, sha in index[1].items():
                if sha in wanted and sha not in hits:
                    hits[sha] = (path, img_id)
        return hits

    @staticmethod
    def records(wanted: Mapping[str, tuple[Path, str]]) -> Iterable[ImageFeatures]:
        """The features of each new img_id -> (file, old img_id), under the new id; rows that cannot be read
        (a source removed or damaged meanwhile) are left out, so the caller extracts those images."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for new_id, (path, old_id) in wanted.items():
            by_file.setdefault(path, []).append((new_id, old_id))
        for path, pairs in by_file.items():
            try:
                with FeatureReader(path) as reader:
                    for new_id, old_id in pairs:
                        if old_id in reader:
                            yield replace(reader.get(old_id), img_id=new_id)
            except (OSError, FeatureStoreError):
                continue
