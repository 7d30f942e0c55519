"""FeatureWriter / FeatureReader: values survive a round trip, bad records are refused by name."""
import json
import multiprocessing
import pickle

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractor.store import (
    SCHEMA_VERSION,
    FeatureReader,
    FeatureStoreError,
    FeatureWriter,
    ImageFeatures,
    failures_path,
    merge,
    parts_dir,
    validate,
)

K, D = 6, 8


def make_record(i: int, n: int | None = None, h: int = 60, w: int = 80, d: int = D) -> ImageFeatures:
    """A valid record whose values depend only on i (so reruns produce equal data)."""
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, K + 1)) if n is None else n
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0, w / 2, n), y1 + rng.uniform(0, h / 2, n)], 1)
    return ImageFeatures(
        img_id=f"img{i:04d}", img_h=h, img_w=w, boxes=boxes.astype(np.float32),
        features=rng.standard_normal((n, d)).astype(np.float32),
        objects_id=rng.integers(0, 1600, n), objects_conf=rng.uniform(0, 1, n).astype(np.float32),
        attrs_id=rng.integers(0, 400, n), attrs_conf=rng.uniform(0, 1, n).astype(np.float32))


def write(path, records, dtype="float32", order=None, **kw):
    with FeatureWriter(path, max_boxes=K, feature_dim=D, dtype=dtype, **kw) as w:
        for r in records:
            w.add(r)
        return w.finalize(order=order)


def assert_same(a: ImageFeatures, b: ImageFeatures, atol: float = 0.0) -> None:
    assert (a.img_id, a.img_h, a.img_w, a.num_boxes) == (b.img_id, b.img_h, b.img_w, b.num_boxes)
    for name in ("boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32),
                               atol=atol, rtol=0)


def test_round_trip_float32_exact_and_layout(tmp_path):
    recs = [make_record(i) for i in range(20)]
    out = tmp_path / "f.h5"
    summary = write(out, recs, attrs={"detector_config": {"depth": 101}, "weights_sha256": "ab" * 32,
                                      "box_strategy": "caffe"}, flush_every=3)
    assert summary == {"path": str(out), "images": 20, "failures": 0, "missing": 0}
    assert not parts_dir(out).exists() and failures_path(out).read_text() == ""
    r = FeatureReader(out)
    assert len(r) == 20 and r.ids == [x.img_id for x in recs]
    assert (r.max_boxes, r.feature_dim) == (K, D)
    assert r.attrs == {"schema_version": SCHEMA_VERSION, "feature_dtype": "float32",
                       "detector_config": {"depth": 101}, "weights_sha256": "ab" * 32,
                       "box_strategy": "caffe"}
    for i, rec in enumerate(recs):
        assert_same(r.get(rec.img_id), rec)
        assert_same(r.get(i), rec)
        assert r.get(i).features.dtype == np.float32
    with h5py.File(out) as f:
        assert f["features"].chunks == (1, K, D) and f["boxes"].chunks == (1, K, 4)
        assert f["features"].compression is None
        assert f["img_h"].dtype == np.int32 and f["objects_id"].dtype == np.int64
        nb = f["num_boxes"][()]
        for i in range(20):  # rows past num_boxes are zero
            assert not f["features"][i, nb[i]:].any() and not f["objects_id"][i, nb[i]:].any()
    assert validate(out) == []


def test_float16_default_within_half_precision(tmp_path):
    recs = [make_record(i, n=K) for i in range(5)]
    write(tmp_path / "h.h5", recs, dtype="float16")
    r = FeatureReader(tmp_path / "h.h5")
    assert r.attrs["feature_dtype"] == "float16"
    for rec in recs:
        got = r.get(rec.img_id)
        assert got.features.dtype == np.float16
        assert_same(got, rec, atol=4e-3)


def test_order_then_unlisted_in_insertion_order(tmp_path):
    recs = [make_record(i) for i in range(6)]
    with FeatureWriter(tmp_path / "o.h5", max_boxes=K, feature_dim=D, flush_every=2) as w:
        for r in recs:
            w.add(r)
        w.add_failure("/imgs/bad1.jpg", "bad1", "truncated")
        w.add_failure("/imgs/bad0.jpg", "bad0", "not an image")
        summary = w.finalize(order=["img0004", "bad0", "unknown", "img0001", "bad1"])
    assert (summary["images"], summary["failures"], summary["missing"]) == (6, 2, 1)
    assert FeatureReader(tmp_path / "o.h5").ids == ["img0004", "img0001", "img0000", "img0002", "img0003",
                                                   "img0005"]
    lines = [json.loads(x) for x in failures_path(tmp_path / "o.h5").read_text().splitlines()]
    assert lines == [{"path": "/imgs/bad0.jpg", "img_id": "bad0", "reason": "not an image"},
                     {"path": "/imgs/bad1.jpg", "img_id": "bad1", "reason": "truncated"}]


def test_order_with_duplicate_is_refused(tmp_path):
    with FeatureWriter(tmp_path / "o.h5", max_boxes=K, feature_dim=D) as w:
        w.add(make_record(0))
        with pytest.raises(ValueError, match="img0000"):
            w.finalize(order=["img0000", "img0000"])


def test_normalize_boxes(tmp_path):
    rec = make_record(3, n=2, h=50, w=100)
    rec.boxes = np.array([[0, 0, 100, 50], [10, 5, 50, 25]], np.float32)
    write(tmp_path / "n.h5", [rec])
    got = FeatureReader(tmp_path / "n.h5").get("img0003", normalize_boxes=True)
    np.testing.assert_allclose(got.boxes, [[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]], rtol=1e-6)


def test_zero_boxes_and_empty_file(tmp_path):
    write(tmp_path / "z.h5", [make_record(1, n=0)])
    got = FeatureReader(tmp_path / "z.h5").get(0)
    assert got.num_boxes == 0 and got.features.shape == (0, D)
    write(tmp_path / "e.h5", [])
    r = FeatureReader(tmp_path / "e.h5")
    assert len(r) == 0 and r.ids == [] and "x" not in r
    assert validate(tmp_path / "e.h5") == []


@pytest.mark.parametrize("change, message", [
    (lambda r: setattr(r, "boxes", r.boxes[:, :3]), "boxes must have shape"),
    (lambda r: setattr(r, "features", r.features[:, :-1]), "features must be floats of shape"),
    (lambda r: setattr(r, "objects_id", r.objects_id.astype(np.float32)), "objects_id must be integers"),
    (lambda r: r.features.__setitem__((0, 0), np.nan), "features has NaN"),
    (lambda r: r.boxes.__setitem__((0, 2), np.inf), "boxes has NaN or Inf"),
    (lambda r: r.features.__setitem__((0, 0), 1e6), "overflows float16"),
    (lambda r: r.objects_conf.__setitem__(0, 1.5), "objects_conf outside"),
    (lambda r: r.attrs_conf.__setitem__(0, -0.1), "attrs_conf outside"),
    (lambda r: r.boxes.__setitem__((0, 2), 200.0), "box 0"),
    (lambda r: r.boxes.__setitem__(0, [30, 10, 20, 40]), "box 0"),
    (lambda r: setattr(r, "img_h", 0), "img_h must be a positive integer"),
    (lambda r: setattr(r, "img_w", 80.0), "img_w must be a positive integer"),
])
def test_bad_records_refused_naming_image(tmp_path, change, message):
    rec = make_record(7, n=4)
    change(rec)
    with FeatureWriter(tmp_path / "b.h5", max_boxes=K, feature_dim=D) as w:
        with pytest.raises(FeatureStoreError, match=rf"image img0007: .*{message}"):
            w.add(rec)
        assert w.done_ids() == set()


@pytest.mark.parametrize("img_id, message", [
    ("img\x000007", r"img_id 'img\\x000007' contains a NUL character, which HDF5 strings cannot hold"),
    ("img\udcff", r"img_id 'img\\udcff' is not valid UTF-8"),
    ("", "img_id must be a non-empty string"),
])
def test_ids_hdf5_cannot_hold_are_refused_at_add_not_at_flush(tmp_path, img_id, message):
    """A NUL used to pass add() and crash the flush ("VLEN strings do not support embedded NULLs"),
    a lone surrogate (a non-UTF-8 file name) with a UnicodeEncodeError; both are refused by name."""
    rec = make_record(7, n=2)
    rec.img_id = img_id
    with FeatureWriter(tmp_path / "b.h5", max_boxes=K, feature_dim=D) as w:
        with pytest.raises(FeatureStoreError, match=f"^record {message}"):
            w.add(rec)
        w.add(make_record(1))
        w.finalize()
    assert FeatureReader(tmp_path / "b.h5").ids == ["img0001"]


def test_other_control_characters_are_stored_and_merged_intact(tmp_path):
    """Ids and paths with a tab, U+2028 or DEL are kept as they are; the merged failures file keeps one
    entry a line (str.splitlines used to cut entries at U+2028)."""
    odd = ["tab\there", "line\u2028sep", "del\x7f", "nel\x85"]
    for k, img_id in enumerate(odd):
        rec = make_record(k, n=1)
        rec.img_id = img_id
        with FeatureWriter(tmp_path / f"s{k}.h5", max_boxes=K, feature_dim=D) as w:
            w.add(rec)
            w.add_failure(f"{img_id}.jpg", f"{img_id}-bad", "not an image")
            w.finalize()
    merge([tmp_path / f"s{k}.h5" for k in range(len(odd))], tmp_path / "m.h5")
    assert FeatureReader(tmp_path / "m.h5").ids == odd
    lines = failures_path(tmp_path / "m.h5").read_text(encoding="utf-8").split("\n")
    assert [json.loads(x)["img_id"] for x in lines if x] == [f"{i}-bad" for i in odd]


def test_too_many_boxes_and_duplicates_refused(tmp_path):
    with FeatureWriter(tmp_path / "b.h5", max_boxes=3, feature_dim=D) as w:
        with pytest.raises(FeatureStoreError, match="img0001: 5 boxes, more than max_boxes=3"):
            w.add(make_record(1, n=5))
        w.add(make_record(2, n=3))
        with pytest.raises(FeatureStoreError, match="img0002 was already added"):
            w.add(make_record(2, n=3))
        with pytest.raises(FeatureStoreError, match="img0002 was already added"):
            w.add_failure("x.jpg", "img0002", "corrupt")
        w.add_failure("y.jpg", "y", "corrupt")
        with pytest.raises(FeatureStoreError, match="y was already added"):
            w.add_failure("y.jpg", "y", "corrupt")


def test_writer_arguments_checked(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        FeatureWriter(tmp_path / "a.h5", max_boxes=K, feature_dim=D, dtype="float64")
    with pytest.raises(ValueError, match="max_boxes"):
        FeatureWriter(tmp_path / "a.h5", max_boxes=0, feature_dim=D)
    with pytest.raises(ValueError, match="schema_version"):
        FeatureWriter(tmp_path / "a.h5", max_boxes=K, feature_dim=D, attrs={"schema_version": 2})
    with pytest.raises(ValueError, match="attrs\\['extra'\\]"):
        FeatureWriter(tmp_path / "a.h5", max_boxes=K, feature_dim=D, attrs={"extra": [1, 2]})


def test_finalize_refuses_existing_file_unless_overwrite(tmp_path):
    out = tmp_path / "f.h5"
    write(out, [make_record(0)])
    with FeatureWriter(out, max_boxes=K, feature_dim=D, dtype="float32") as w:
        w.add(make_record(1))
        with pytest.raises(FeatureStoreError, match="already exists; pass overwrite=True"):
            w.finalize()
        assert FeatureReader(out).ids == ["img0000"]  # untouched
        w.finalize(overwrite=True)
    assert FeatureReader(out).ids == ["img0001"]


def test_closed_writer_refuses_adds(tmp_path):
    w = FeatureWriter(tmp_path / "c.h5", max_boxes=K, feature_dim=D)
    w.finalize()
    with pytest.raises(FeatureStoreError, match="writer is closed"):
        w.add(make_record(0))


def test_second_live_writer_refused(tmp_path):
    with FeatureWriter(tmp_path / "c.h5", max_boxes=K, feature_dim=D):
        with pytest.raises(FeatureStoreError, match="another writer is using this output"):
            FeatureWriter(tmp_path / "c.h5", max_boxes=K, feature_dim=D)


def test_resume_in_process_and_settings_mismatch(tmp_path):
    out = tmp_path / "r.h5"
    recs = [make_record(i) for i in range(10)]
    with FeatureWriter(out, max_boxes=K, feature_dim=D, flush_every=4, attrs={"box_strategy": "caffe"}) as w:
        for r in recs[:6]:
            w.add(r)
        w.add_failure("bad.jpg", "bad", "empty file")
    for kw, what in [({"max_boxes": K + 1}, "max_boxes"), ({"feature_dim": D + 1}, "feature_dim"),
                     ({"dtype": "float32"}, "dtype"), ({"attrs": {"box_strategy": "maxnms"}}, "attrs")]:
        args = {"max_boxes": K, "feature_dim": D, "attrs": {"box_strategy": "caffe"}, **kw}
        with pytest.raises(FeatureStoreError, match=rf"unfinished run with other settings \({what}"):
            FeatureWriter(out, **args)
    with FeatureWriter(out, max_boxes=K, feature_dim=D, flush_every=4, attrs={"box_strategy": "caffe"}) as w:
        assert w.done_ids() == {r.img_id for r in recs[:6]} | {"bad"}
        for r in recs[6:]:
            w.add(r)
        w.finalize(order=[r.img_id for r in recs])
    assert FeatureReader(out).ids == [r.img_id for r in recs]


def test_reader_refuses_missing_and_bad_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        FeatureReader(tmp_path / "nope.h5")
    write(tmp_path / "f.h5", [make_record(0), make_record(1)])
    r = FeatureReader(tmp_path / "f.h5")
    with pytest.raises(KeyError, match="'zzz' is not in .*f.h5"):
        r.get("zzz")
    with pytest.raises(IndexError, match="row 2 out of range"):
        r.get(2)
    assert r.get(-1).img_id == "img0001"
    assert "img0001" in r and "zzz" not in r and 3 not in r
    assert r.index("img0001") == 1


def test_reader_opens_nothing_until_used_and_pickles_without_handle(tmp_path):
    write(tmp_path / "f.h5", [make_record(i) for i in range(4)])
    r = FeatureReader(tmp_path / "f.h5")
    assert r._file is None
    assert r.get(2).img_id == "img0002" and r._file is not None
    clone = pickle.loads(pickle.dumps(r))
    assert clone._file is None and clone.get("img0003").img_id == "img0003"
    r.close()
    assert r._file is None and r.get(0).img_id == "img0000"  # reopens


def _worker_get(reader_and_key):
    reader, key = reader_and_key
    rec = reader.get(key)
    return rec.img_id, float(rec.features.sum())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_in_worker_processes(tmp_path, method):
    recs = [make_record(i, n=K) for i in range(6)]
    write(tmp_path / "f.h5", recs)
    r = FeatureReader(tmp_path / "f.h5")
    r.get(0)  # parent handle open before the workers start (the fork hazard)
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.map(_worker_get, [(r, x.img_id) for x in recs])
    assert got == [(x.img_id, float(x.features.sum())) for x in recs]
    assert r.get(5).img_id == "img0005"  # parent handle still fine


record_strategy = st.builds(
    lambda n, h, w, seed, fill: (n, h, w, seed, fill),
    st.integers(0, K), st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 2 ** 31), st.floats(0, 1))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(record_strategy, min_size=1, max_size=6), flush=st.integers(1, 4))
def test_round_trip_property(tmp_path_factory, specs, flush):
    out = tmp_path_factory.mktemp("prop") / "p.h5"
    recs = []
    for j, (n, h, w, seed, fill) in enumerate(specs):
        rng = np.random.default_rng(seed)
        xs = np.sort(rng.uniform(-1, w + 1, (n, 2)), axis=1)
        ys = np.sort(rng.uniform(-1, h + 1, (n, 2)), axis=1)
        recs.append(ImageFeatures(
            f"id{j}", h, w, np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).astype(np.float32),
            (rng.standard_normal((n, D)) * 100).astype(np.float32), rng.integers(-1, 1600, n),
            np.full(n, fill, np.float32), rng.integers(-1, 400, n), np.full(n, 1 - fill, np.float32)))
    write(out, recs, flush_every=flush)
    r = FeatureReader(out)
    for rec in recs:
        assert_same(r.get(rec.img_id), rec)
    assert validate(out) == []


def test_preloaded_reader_serves_the_same_records_from_memory(tmp_path):
    """preload() reads the file once; every row, with and without box normalisation, equals the file's
    record, records are copies, and a forked DataLoader worker reads from memory (the file is gone)."""
    import torch

    recs = [make_record(i) for i in range(7)] + [make_record(7, n=0)]
    write(tmp_path / "f.h5", recs)
    disk, mem = FeatureReader(tmp_path / "f.h5"), FeatureReader(tmp_path / "f.h5")
    mem.preload()
    assert mem.preloaded and not disk.preloaded and mem.nbytes() >= sum(r.features.nbytes for r in recs)
    for i in range(len(recs)):
        for normalize in (False, True):
            a, b = disk.get(i, normalize_boxes=normalize), mem.get(i, normalize_boxes=normalize)
            assert_same(a, b)
            assert all(getattr(a, k).dtype == getattr(b, k).dtype for k in ("boxes", "features", "objects_id"))
    mem.get(1).features[:] = 99  # a caller's change stays in its record
    assert_same(mem.get(1), disk.get(1))
    assert (mem.ids, mem.feature_dim, mem.max_boxes, len(mem)) == (disk.ids, disk.feature_dim, disk.max_boxes,
                                                                  len(disk))
    (tmp_path / "f.h5").rename(tmp_path / "gone.h5")

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(recs)

        def __getitem__(self, i):
            return float(mem.get(i).features.sum())

    loader = torch.utils.data.DataLoader(Rows(), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")
    assert list(loader) == [float(r.features.sum()) for r in recs]
    clone = pickle.loads(pickle.dumps(mem))  # pickling (a spawned worker) drops the memory: it reads the file
    assert not clone.preloaded
    with pytest.raises(FeatureStoreError, match="not a readable HDF5 feature file"):
        clone.get(0)


def test_open_stores_preloads_small_files_within_the_budget(tmp_path):
    from tasks.data.features import open_stores

    for name in ("a", "b"):
        write(tmp_path / f"{name}.h5", [make_record(i) for i in range(3)])
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    size = FeatureReader(paths[0]).nbytes()
    assert [s.preloaded for s in open_stores(paths)] == [True, True]
    assert [s.preloaded for s in open_stores(paths, preload_bytes=size)] == [True, False]
    assert [s.preloaded for s in open_stores(paths, preload_bytes=0)] == [False, False]
