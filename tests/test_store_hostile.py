"""Hostile feature files (tiny on disk, huge declared shapes) are refused by name, fast and without allocating;
validate's memory does not grow with the file; sound files (chunked, compressed, virtual) keep passing."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
from pipeline_helpers import REPO, env_for, luigi_cmd, write_config

import extractor.store as store
from extractor.store import (
    FeatureReader,
    FeatureStoreError,
    FeatureWriter,
    ImageFeatures,
    blocks,
    merge,
    validate,
    validation,
)

K, D = 4, 8
STR = h5py.string_dtype("utf-8")
WIDE_D = 2 ** 29
LONG_N = 10 ** 7


def record(i: int, n: int = 2) -> ImageFeatures:
    rng = np.random.default_rng(i)
    boxes = np.tile(np.array([[1, 2, 30, 20]], np.float32), (n, 1))
    return ImageFeatures(f"im{i}", 50, 60, boxes, rng.standard_normal((n, D)).astype(np.float32),
                         np.arange(n), np.full(n, 0.5, np.float32), np.arange(n), np.full(n, 0.25, np.float32))


def write(path: Path, ids, **kw) -> Path:
    with FeatureWriter(path, max_boxes=K, feature_dim=D, dtype="float32", **kw) as w:
        for i in ids:
            w.add(record(i))
        w.finalize()
    return path


def schema_file(path: Path, n: int, k: int = K, d: int = D, *, data: bool = False, chunked: bool = True,
                **features_kw) -> Path:
    """A file with the schema's datasets and attributes; written (zeros, unique ids) only when ``data``."""
    shapes = {"img_id": ((n,), STR), "img_h": ((n,), "i4"), "img_w": ((n,), "i4"), "num_boxes": ((n,), "i4"),
              "boxes": ((n, k, 4), "f4"), "features": ((n, k, d), "f4"), "objects_id": ((n, k), "i8"),
              "objects_conf": ((n, k), "f4"), "attrs_id": ((n, k), "i8"), "attrs_conf": ((n, k), "f4")}
    with h5py.File(path, "w") as f:
        for name, (shape, dt) in shapes.items():
            kw = dict(features_kw) if name == "features" else {}
            if chunked and len(shape) > 1:
                kw.setdefault("chunks", (1, *shape[1:]))
            ds = f.create_dataset(name, shape=shape, dtype=dt, **kw)
            if data:
                ds[...] = np.array([f"im{i}" for i in range(n)], object) if name == "img_id" else np.full(
                    shape, 10 if name in ("img_h", "img_w") else 0, dt)
        f.attrs.update({"schema_version": 1, "feature_dtype": "float32", "detector_config": "{}",
                        "weights_sha256": "", "box_strategy": "test"})
    return path


def wide_file(path: Path) -> Path:
    """The issue's first file: 3 images whose features declare D = 2^29 (8 GiB a row), nothing of it stored."""
    return schema_file(path, 3, d=WIDE_D, chunks=(1, K, 2 ** 16))


def long_file(path: Path) -> Path:
    """The issue's second file: 10^7 images declared, nothing stored."""
    return schema_file(path, LONG_N)


HOSTILE = {
    "wide": (wide_file, f"features declares shape (3, {K}, {WIDE_D}): D = {WIDE_D} exceeds the limit 65536"),
    "long": (long_file, f"img_id declares shape ({LONG_N},) ({16 * LONG_N} bytes) but the file has"),
}

# Runs one store call in a fresh interpreter whose address space may grow by LIMIT_MB at most, and reports
# the outcome, the seconds it took and how much its peak RSS grew.
CHILD = textwrap.dedent("""
    import json, re, resource, sys, time
    import extractor.store as store
    action, path, other, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if block:
        store.blocks.BLOCK_BYTES = block

    def status(field):  # bytes; VmHWM is this image's peak RSS (ru_maxrss starts at the forking parent's)
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + LIMIT_MB * 2**20,) * 2)
    rss0, t0 = status("VmHWM"), time.perf_counter()
    try:
        if action == "validate":
            out = {"result": store.validate(path)}
        elif action == "merge":
            out = {"result": store.merge([path, other], other + ".merged.h5")}
        else:
            r = store.FeatureReader(path)
            out = {"result": [len(r.ids) if action == "ids" else r.index("im0") if action == "index" else 0]}
            r.get(0)
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.perf_counter() - t0
    out["rss_growth_mb"] = (status("VmHWM") - rss0) / 2**20
    print(json.dumps(out))
""")
LIMIT_MB = 400


def run_child(action: str, path: Path, other: Path | str = "", block: int = 0) -> dict:
    """``action`` on ``path`` in a subprocess capped at LIMIT_MB more address space: its JSON report."""
    code = CHILD.replace("LIMIT_MB", str(LIMIT_MB))
    proc = subprocess.run([sys.executable, "-c", code, action, str(path), str(other), str(block)],
                          cwd=REPO, env={**env_for(path.parent, path), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("action", ["validate", "get", "ids", "index", "merge"])
def test_hostile_files_are_refused_fast_without_allocating(kind, action, tmp_path):
    build, message = HOSTILE[kind]
    path = build(tmp_path / f"{kind}.h5")
    assert path.stat().st_size < 40_000  # tiny on disk
    good = write(tmp_path / "good.h5", [100])
    out = run_child(action, path, good)
    if action == "validate":
        text = out["result"][0] if "result" in out else out["error"]
    else:
        assert out.get("error", "").startswith("FeatureStoreError: "), out
        text = out["error"].removeprefix("FeatureStoreError: ")
    assert text.startswith(f"{path}: {message}"), out
    assert "\n" not in text
    assert out["seconds"] < 1.0 and out["rss_growth_mb"] < 100, out
    assert not Path(f"{good}.merged.h5").exists()


def test_validate_memory_does_not_grow_with_the_images(tmp_path):
    small = schema_file(tmp_path / "small.h5", 20_000, data=True, chunked=False)
    big = schema_file(tmp_path / "big.h5", 200_000, data=True, chunked=False)
    block = 1 << 20  # blocks far smaller than the big file (200,000 ids of ~8 characters alone take ~15 MB)
    reports = [run_child("validate", p, block=block) for p in (small, big)]
    assert [r["result"] for r in reports] == [[], []]
    growth = [r["rss_growth_mb"] for r in reports]
    # 180,000 more images may add their hashes (8 bytes each, 1.4 MB) and HDF5's metadata cache warming up
    # (bounded, about 6 MB), not the ids themselves (holding them all grew by 31 MB more)
    assert growth[1] - growth[0] < 15, growth


def test_validate_bounds_the_chunks_one_read_touches(tmp_path):
    # one chunk per image and per dataset, as FeatureWriter writes; K * D so small that the byte budget alone
    # would read all 20,000 images at once and HDF5 would track 20,000 chunks a read (130 MB more)
    path = schema_file(tmp_path / "f.h5", 20_000, data=True)
    out = run_child("validate", path)
    assert out["result"] == [] and out["rss_growth_mb"] < 80, out


def test_validate_finds_duplicates_exactly_across_blocks(tmp_path, monkeypatch):
    path = schema_file(tmp_path / "dups.h5", 50, data=True, chunked=False)
    with h5py.File(path, "r+") as f:
        ids = f["img_id"].asstr()[()]
        ids[40], ids[41], ids[49], ids[3] = "im2", "im2", "im7", ""
        f["img_id"][...] = ids.astype(object)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1)  # every id in its own block
    monkeypatch.setattr(blocks, "REPEAT_BATCH", 1)  # one repeated hash per pass over the ids
    assert validate(path) == ["img_id has duplicates: 2 id(s), e.g. im2, im7", "img_id has empty strings"]


def test_validate_splits_an_image_along_its_boxes(tmp_path, monkeypatch):
    path = write(tmp_path / "f.h5", range(3))
    with h5py.File(path, "r+") as f:
        f["features"][1, 2, 0] = 5.0  # past num_boxes = 2, in the second box block
        f["attrs_id"][1, 3] = 9  # and in the second box block too: still one image
        f["boxes"][2, 0, 2] = 500.0  # outside the image, first box block
    calls = []
    real = validation._check_block

    def spy(f, rows, boxes, *args):
        calls.append((rows.stop - rows.start, boxes.stop - boxes.start))
        return real(f, rows, boxes, *args)

    monkeypatch.setattr(validation, "_check_block", spy)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 2 * (D * 7 + blocks.BOX_BYTES))  # two boxes of an image
    assert validate(path) == ["rows past num_boxes are not zero: 1 image(s), e.g. im1",
                              "boxes are not pixel x1 y1 x2 y2 inside the image: 1 image(s), e.g. im2"]
    assert calls == [(1, 2)] * 6


def with_features(path: Path, n: int = 2, k: int = K, d: int = D, rows: Sequence[int] = (), **create) -> Path:
    """A sound n-image file whose features dataset is created again with ``create``; only ``rows`` written."""
    schema_file(path, n, k, d, data=True, chunked=False)
    with h5py.File(path, "r+") as f:
        del f["features"]
        ds = f.create_dataset("features", **{"shape": (n, k, d), "dtype": "f4", **create})
        for i in rows:
            ds[i] = 0.0
    return path


def _external(path: Path) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(bytes(2 * K * D * 4))
    return with_features(path, external=[(str(raw), 0, 2 * K * D * 4)])


@pytest.mark.parametrize("build, message", [
    (lambda p: schema_file(p, 2, k=5000, d=1), "boxes declares shape (2, 5000, 4): K = 5000 exceeds the limit 4096"),
    (lambda p: schema_file(p, 2, k=4096, d=8192),
     "features declares shape (2, 4096, 8192): one image takes 134217728 bytes, over the limit 67108864"),
    (_external, "features keeps its data in external files"),
    # chunks may be wider than an extendible dataset: a reader would decompress the whole 64 MiB chunk
    (lambda p: with_features(p, rows=(0, 1), maxshape=(None, K, None), chunks=(1, K, 2 ** 22 + 1),
                             compression="gzip"),
     "features: compressed chunks of 67108880 bytes exceed the limit 67108864"),
    # one get() would make HDF5 track 2048 chunks (about 6.5 KB each)
    (lambda p: with_features(p, k=64, d=32, chunks=(1, 1, 1)),
     "features: chunks of shape (1, 1, 1) cut one image into 2048 pieces, over the limit 1024"),
])
def test_reader_bounds_name_file_dataset_and_limit(build, message, tmp_path):
    path = build(tmp_path / "f.h5")
    with pytest.raises(FeatureStoreError) as e:
        FeatureReader(path).get(0)
    assert str(e.value).startswith(f"{path}: {message}")
    assert validate(path)[0].startswith(f"{path}: {message}")


@pytest.mark.parametrize("kw, message", [
    ({}, f"features declares shape (4, {K}, {D}) but stores {3 * K * D * 4} of its {4 * K * D * 4} bytes"),
    ({"compression": "gzip"}, f"features declares shape (4, {K}, {D}) in 4 chunks but stores 3"),
])
def test_validate_refuses_rows_that_were_never_written(kw, message, tmp_path):
    path = with_features(tmp_path / "f.h5", 4, rows=(0, 1, 3), chunks=(1, K, D), **kw)  # row 2 reads as zeros
    assert len(FeatureReader(path)) == 4  # the reader's checks stay O(1) per dataset; validate reads every chunk
    assert validate(path) == [f"{path}: {message} (unwritten parts read as fill values)"]


def test_compressed_chunked_and_virtual_files_keep_passing(tmp_path):
    a = write(tmp_path / "a.h5", range(3), compression="gzip")
    b = write(tmp_path / "b.h5", range(3, 5))
    empty = write(tmp_path / "empty.h5", [])
    with h5py.File(a) as f:
        assert f["features"].compression == "gzip"
    v = tmp_path / "v.h5"
    merge([a, empty, b], v, virtual=True)
    c = write(tmp_path / "c.h5", [5])
    vv = tmp_path / "vv.h5"
    merge([v, c], vv, virtual=True)  # a virtual file over a virtual file
    for p in (a, b, empty, v, vv):
        assert validate(p) == [], p
    r = FeatureReader(vv)
    assert r.ids == [f"im{i}" for i in range(6)]
    np.testing.assert_array_equal(r.get("im4").features, record(4).features)


def _virtual(path: Path, source: Path, n: int) -> Path:
    """A virtual file of ``n`` rows that maps only the source's rows onto its first ones."""
    with h5py.File(source) as s:
        shapes = {name: (s[name].shape, s[name].dtype) for name in store.FIELDS}
        m = s["img_id"].shape[0]
    with h5py.File(path, "w") as f:
        for name, (shape, dt) in shapes.items():
            layout = h5py.VirtualLayout(shape=(n, *shape[1:]), dtype=dt)
            layout[:m] = h5py.VirtualSource(str(source), name, shape=shape)
            f.create_virtual_dataset(name, layout, fillvalue=None if name == "img_id" else 0)
        f.attrs.update({"schema_version": 1, "feature_dtype": "float32", "detector_config": "{}",
                        "weights_sha256": "", "box_strategy": "test"})
    return path


def _loop(path: Path) -> Path:
    """A sound file whose features are a virtual dataset that maps onto itself."""
    schema_file(path, 2, data=True, chunked=False)
    with h5py.File(path, "r+") as f:
        del f["features"]
        layout = h5py.VirtualLayout(shape=(2, K, D), dtype="f4")
        layout[:] = h5py.VirtualSource(".", "features", shape=(2, K, D))
        f.create_virtual_dataset("features", layout, fillvalue=0)
    return path


@pytest.mark.parametrize("build, message", [
    (lambda p: _virtual(p, write(p.with_name("good.h5"), [0, 1]), LONG_N),
     f"img_id: virtual dataset maps 2 of its {LONG_N} rows"),
    (lambda p: _virtual(p, long_file(p.with_name("long.h5")), LONG_N), "img_id (virtual source"),
    (_loop, "features: virtual datasets nested deeper than 4"),
])
def test_virtual_files_are_bounded_by_their_sources(build, message, tmp_path):
    path = build(tmp_path / "v.h5")
    with pytest.raises(FeatureStoreError) as e:
        len(FeatureReader(path).ids)
    assert str(e.value).startswith(f"{path}: {message}")
    assert validate(path)[0].startswith(f"{path}: {message}")


# Room for the pipeline's imports (torch, luigi: ~4 GB of address space) and a little more, not for 8 GiB.
LUIGI_AS = 6 << 30


@pytest.mark.parametrize("kind", HOSTILE)
def test_validate_features_task_refuses_hostile_files(kind, tmp_path):
    build, message = HOSTILE[kind]
    path = build(tmp_path / f"{kind}.h5")
    work = tmp_path / "work"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LUIGI_AS, LUIGI_AS))

    proc = subprocess.run(luigi_cmd("ValidateFeatures", "--features", str(path), "--local-scheduler"),
                          cwd=REPO, env=env_for(work, write_config(tmp_path / "luigi.cfg")),
                          capture_output=True, text=True, timeout=90, preexec_fn=cap)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ValidateFeatures: {path} has 1 problem(s):\n  {path}: {message}" in out, out[-3000:]
    assert "MemoryError" not in out


def test_validate_reports_an_unreadable_chunk_naming_the_file(tmp_path):
    path = write(tmp_path / "f.h5", range(3), compression="gzip")
    with h5py.File(path) as f:
        info = f["features"].id.get_chunk_info(1)
    with open(path, "r+b") as raw:  # a damaged compressed chunk: HDF5 fails to inflate it
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    problems = validate(path)
    assert problems[-1].startswith(f"{path}: cannot read the data (") and "\n" not in problems[-1], problems


@pytest.mark.parametrize("kw, message", [
    ({"max_boxes": store.MAX_BOXES + 1, "feature_dim": 8}, "max_boxes = 4097 exceeds"),
    ({"max_boxes": 4, "feature_dim": store.MAX_FEATURE_DIM + 1}, "feature_dim = 65537 exceeds"),
    ({"max_boxes": 4096, "feature_dim": 8192, "dtype": "float32"}, "max_boxes x feature_dim bytes = 134217728"),
])
def test_writer_refuses_shapes_the_reader_would_refuse(kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        FeatureWriter(tmp_path / "f.h5", **kw)
    assert not (tmp_path / "f.h5.parts").exists()


def test_finalize_and_merge_blocks_count_the_chunks_they_touch(tmp_path, monkeypatch):
    """With tiny K x D a block by feature bytes alone spans millions of images (a chunk each); the chunk cost
    bounds it, and the copies still give every row."""
    rows_per_write = []
    real = h5py.Dataset.__setitem__

    def spy(self, key, value):
        if self.name == "/features" and isinstance(key, slice):
            rows_per_write.append(len(range(*key.indices(self.shape[0]))))
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", spy)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 3 * blocks.CHUNK_BYTES * len(store.schema.PER_BOX))
    paths = []
    for s in range(2):
        with FeatureWriter(tmp_path / f"s{s}.h5", max_boxes=K, feature_dim=D, flush_every=2) as w:
            for i in range(5 * s, 5 * s + 5):
                w.add(record(i))
            w.finalize()
        paths.append(tmp_path / f"s{s}.h5")
    merge(paths, tmp_path / "m.h5")
    assert rows_per_write and max(rows_per_write) <= 3
    with FeatureReader(tmp_path / "m.h5") as r:
        assert r.ids == [f"im{i}" for i in range(10)]
        np.testing.assert_array_equal(r.get("im7").features, record(7).features.astype(np.float16))
    assert validate(tmp_path / "m.h5") == []
