"""validate() finds each kind of damage; the reader refuses broken files by name; merge joins shards."""
import shutil

import h5py
import numpy as np
import pytest

from extractor.store import (
    FeatureReader,
    FeatureStoreError,
    FeatureWriter,
    ImageFeatures,
    merge,
    remove_stale_parts,
    validate,
)

K, D = 5, 4


def record(i: int, n: int = 3) -> ImageFeatures:
    rng = np.random.default_rng(i)
    boxes = np.tile(np.array([[1, 2, 30, 20]], np.float32), (n, 1)) + i
    return ImageFeatures(f"im{i}", 50, 60, boxes, rng.standard_normal((n, D)).astype(np.float32),
                         np.arange(n), np.full(n, 0.5, np.float32), np.arange(n) + 1,
                         np.full(n, 0.25, np.float32))


def write(path, ids, attrs=None, k=K, dtype="float16"):
    with FeatureWriter(path, max_boxes=k, feature_dim=D, dtype=dtype, attrs=attrs) as w:
        for i in ids:
            w.add(record(i))
        w.finalize()
    return path


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "good.h5", range(4), attrs={"box_strategy": "caffe"})


def damage(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def replace_dataset(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


def put(name, index, value):
    return lambda f: f[name].__setitem__(index, value)


def set_attr(name, value):
    return lambda f: f.attrs.__setitem__(name, value)


def retype(name, fn):
    return lambda f: replace_dataset(f, name, fn(f[name][()]))


PAD = "rows past num_boxes are not zero: 1 image(s)"
BOX = "boxes are not pixel x1 y1 x2 y2 inside the image: 1"


@pytest.mark.parametrize("fn, problem", [
    (put("features", (1, 4, 0), 1.0), f"{PAD}, e.g. im1"),
    (put("objects_id", (2, 3), 7), f"{PAD}, e.g. im2"),
    (put("boxes", (0, 0, 2), 500.0), f"{BOX} image(s), e.g. im0"),
    (put("boxes", (3, 1, 0), 40.0), f"{BOX} image(s), e.g. im3"),
    (put("features", (2, 0, 1), np.nan), "non-finite features: 1 image(s), e.g. im2"),
    (put("features", (0, 0, 1), np.inf), "non-finite features: 1 image(s), e.g. im0"),
    (put("objects_conf", (1, 0), 1.5), "objects_conf outside [0, 1]: 1 image(s), e.g. im1"),
    (put("attrs_conf", (1, 0), np.nan), "attrs_conf outside [0, 1]"),
    (put("num_boxes", 0, K + 1), "num_boxes outside [0, K]: 1 image(s), e.g. im0"),
    (put("img_h", 3, 0), "img_h or img_w not positive: 1 image(s), e.g. im3"),
    (put("img_id", 2, "im0"), "img_id has duplicates: 1 id(s), e.g. im0"),
    (lambda f: f.attrs.__delitem__("weights_sha256"), "attribute weights_sha256 is missing"),
    (set_attr("feature_dtype", "float32"), "attribute feature_dtype='float32' but"),
    (set_attr("detector_config", "{oops"), "attribute detector_config is not JSON"),
    (set_attr("schema_version", 99), "schema_version 99 is newer than this code's 1"),
    (lambda f: f.attrs.__delitem__("schema_version"), "attribute schema_version is missing"),
    (lambda f: f.__delitem__("attrs_conf"), "missing datasets: attrs_conf"),
    (retype("boxes", lambda a: a.astype(np.float64)), "boxes: want (4, 5, 4) float32"),
    (retype("img_w", lambda a: a.astype(np.int64)), "img_w: want (4,) int32"),
    (retype("objects_id", lambda a: a[:3]), "objects_id: want (4, 5) int64, got (3, 5)"),
    (retype("features", lambda a: a.astype(np.int32)), "features: want float16"),
])
def test_validate_finds_each_problem(good, fn, problem):
    assert validate(good) == []
    damage(good, fn)
    problems = validate(good)
    assert any(problem in p for p in problems), problems


def test_validate_expected_sizes_and_missing_file(good, tmp_path):
    assert validate(good, boxes=K, dim=D) == []
    assert validate(good, boxes=36, dim=2048) == ["K = 5, expected 36", "D = 4, expected 2048"]
    assert validate(tmp_path / "absent.h5") == [f"{tmp_path / 'absent.h5'} does not exist"]


def test_validate_streams_in_blocks(good, monkeypatch):
    from extractor.store import blocks
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1)  # one image per block
    damage(good, lambda f: f["features"].__setitem__((3, 4, 0), 2.0))
    assert validate(good) == ["rows past num_boxes are not zero: 1 image(s), e.g. im3"]


def test_reader_refuses_truncated_file_naming_it(good, tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = FeatureReader(cut)  # the constructor only checks existence
    with pytest.raises(FeatureStoreError, match=r"cut\.h5: not a readable HDF5 feature file"):
        len(r)
    assert "cut.h5: not a readable HDF5 feature file" in validate(cut)[0]


def test_reader_refuses_non_hdf5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("this is text")
    with pytest.raises(FeatureStoreError, match=r"notes\.h5: not a readable HDF5"):
        FeatureReader(p).get(0)


@pytest.mark.parametrize("fn, message", [
    (lambda f: f.__delitem__("features"), "missing datasets: features"),
    (lambda f: f.attrs.__setitem__("schema_version", 2), "schema_version 2 is newer"),
    (lambda f: replace_dataset(f, "boxes", f["boxes"][()].astype(np.float64)), "boxes: want"),
])
def test_reader_refuses_schema_mismatch_naming_file(good, fn, message):
    damage(good, fn)
    r = FeatureReader(good)
    with pytest.raises(FeatureStoreError, match=rf"good\.h5: does not follow the .*schema: .*{message}"):
        r.get(0)


def test_merge_copies_in_order(tmp_path):
    a, b = write(tmp_path / "a.h5", [0, 1]), write(tmp_path / "b.h5", [2, 3, 4])
    line = '{"path": "x.jpg", "img_id": "x", "reason": "empty file"}\n'
    (tmp_path / "a.h5.failures.jsonl").write_text(line)
    (tmp_path / "b.h5.failures.jsonl").unlink()  # a shard without a failures file contributes none
    assert merge([a, b], tmp_path / "m.h5") == {"path": str(tmp_path / "m.h5"), "images": 5, "failures": 1}
    assert (tmp_path / "m.h5.failures.jsonl").read_text() == (tmp_path / "a.h5.failures.jsonl").read_text()
    r = FeatureReader(tmp_path / "m.h5")
    assert r.ids == ["im0", "im1", "im2", "im3", "im4"]
    np.testing.assert_array_equal(r.get("im3").features, FeatureReader(b).get("im3").features)
    assert validate(tmp_path / "m.h5") == []
    with h5py.File(tmp_path / "m.h5") as f:
        assert not f["features"].is_virtual and f["features"].chunks == (1, K, D)
    with pytest.raises(FeatureStoreError, match="m.h5 already exists"):
        merge([a, b], tmp_path / "m.h5")


def test_merge_virtual_references_shards(tmp_path):
    a, b = write(tmp_path / "a.h5", [0, 1]), write(tmp_path / "b.h5", [2])
    merge([a, b], tmp_path / "v.h5", virtual=True)
    with h5py.File(tmp_path / "v.h5") as f:
        assert f["features"].is_virtual
    r = FeatureReader(tmp_path / "v.h5")
    assert r.ids == ["im0", "im1", "im2"]
    np.testing.assert_array_equal(r.get("im2").boxes, record(2).boxes)
    assert validate(tmp_path / "v.h5") == []
    r.close()
    shutil.move(b, tmp_path / "moved.h5")  # a moved shard must not read back as zeros
    with pytest.raises(FeatureStoreError, match="virtual dataset references missing file .*b.h5"):
        FeatureReader(tmp_path / "v.h5").get(0)


def test_merge_refusals_name_the_files(tmp_path):
    a = write(tmp_path / "a.h5", [0, 1])
    with pytest.raises(FeatureStoreError, match=r"image im1 is in both .*a\.h5 and .*dup\.h5"):
        merge([a, write(tmp_path / "dup.h5", [1, 2])], tmp_path / "m.h5")
    with pytest.raises(FeatureStoreError, match=r"k7\.h5 has \(K, D, dtype\) = \(7, 4, 'float16'\)"):
        merge([a, write(tmp_path / "k7.h5", [3], k=7)], tmp_path / "m.h5")
    with pytest.raises(FeatureStoreError, match=r"f32\.h5 has \(K, D, dtype\)"):
        merge([a, write(tmp_path / "f32.h5", [3], dtype="float32")], tmp_path / "m.h5")
    with pytest.raises(FeatureStoreError, match=r"other\.h5 and .*a\.h5 differ in attributes \['box_str"):
        merge([a, write(tmp_path / "other.h5", [3], attrs={"box_strategy": "maxnms"})], tmp_path / "m.h5")
    with pytest.raises(FileNotFoundError, match="gone.h5"):
        merge([a, tmp_path / "gone.h5"], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists() and not list(tmp_path.glob(".m.h5.tmp*"))


def test_remove_stale_parts_only_after_a_committed_finalize(tmp_path):
    out = write(tmp_path / "f.h5", [0])
    assert remove_stale_parts(out) is False  # nothing there
    w = FeatureWriter(tmp_path / "g.h5", max_boxes=K, feature_dim=D)
    w.add(record(1))
    w.close()  # an unfinished run: its parts must stay
    (tmp_path / "g.h5").write_bytes(out.read_bytes())
    assert remove_stale_parts(tmp_path / "g.h5") is False
    assert (tmp_path / "g.h5.parts" / "part-000000.h5").exists()


def test_remove_stale_parts_takes_a_lock_only_leftover(tmp_path):
    out = write(tmp_path / "f.h5", [0])
    (tmp_path / "f.h5.parts").mkdir()
    (tmp_path / "f.h5.parts" / ".lock").touch()  # what a kill at the very end of a clean-up leaves
    assert remove_stale_parts(out) is True and not (tmp_path / "f.h5.parts").exists()
