"""TSV import / export on real LXMERT records: exact float32 round trip, both formats, named errors."""
import base64
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractor.store import FeatureReader, FeatureStoreError, FeatureWriter, ImageFeatures, validate
from extractor.store.tsv import TsvError, export_tsv, import_tsv, read_tsv

SAMPLE = Path(__file__).parent / "data" / "train2014_obj36_sample.tsv"


def b64(a, dtype):
    return base64.b64encode(np.asarray(a, dtype=dtype).tobytes()).decode()


def test_read_real_lxmert_records():
    recs = list(read_tsv(SAMPLE))
    assert len(recs) == 10
    first = recs[0]
    assert (first.img_id, first.img_h, first.img_w) == ("COCO_train2014_000000132417", 333, 500)
    assert first.num_boxes == 36
    assert first.boxes.dtype == np.float32 and first.features.shape == (36, 2048)
    assert first.objects_id.dtype == np.int64 and first.objects_id[:3].tolist() == [72, 291, 291]
    assert all(r.num_boxes == 36 and (r.boxes[:, 2] <= r.img_w).all() for r in recs)
    assert recs[-1].img_id == "COCO_train2014_000000201446"
    assert (recs[8].img_h, recs[8].img_w) == (640, 407)  # a portrait image: height and width not swapped


def test_import_export_lxmert_is_byte_exact(tmp_path):
    info = import_tsv(SAMPLE, tmp_path / "s.h5")
    assert info["images"] == 10 and validate(tmp_path / "s.h5", boxes=36, dim=2048) == []
    r = FeatureReader(tmp_path / "s.h5")
    assert r.attrs["feature_dtype"] == "float32" and r.attrs["box_strategy"] == "imported"
    assert r.get("COCO_train2014_000000132417").img_h == 333
    for want in read_tsv(SAMPLE):
        got = r.get(want.img_id)
        for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert export_tsv(tmp_path / "s.h5", tmp_path / "back.tsv") == 10
    assert (tmp_path / "back.tsv").read_bytes() == SAMPLE.read_bytes()


def test_caffe_format_round_trip(tmp_path):
    import_tsv(SAMPLE, tmp_path / "s.h5")
    export_tsv(tmp_path / "s.h5", tmp_path / "caffe.tsv", fmt="caffe")
    first_line = (tmp_path / "caffe.tsv").read_bytes().decode().split("\r\n")[0].split("\t")
    assert len(first_line) == 6 and first_line[:4] == ["COCO_train2014_000000132417", "500", "333", "36"]
    lxmert = {r.img_id: r for r in read_tsv(SAMPLE)}
    for rec in read_tsv(tmp_path / "caffe.tsv"):
        want = lxmert[rec.img_id]
        assert (rec.img_h, rec.img_w) == (want.img_h, want.img_w)
        np.testing.assert_array_equal(rec.boxes, want.boxes)
        np.testing.assert_array_equal(rec.features, want.features)
        assert (rec.objects_id == -1).all() and (rec.objects_conf == 0).all()  # no labels in this format
    import_tsv(tmp_path / "caffe.tsv", tmp_path / "c.h5")
    export_tsv(tmp_path / "c.h5", tmp_path / "caffe2.tsv", fmt="caffe")
    assert (tmp_path / "caffe2.tsv").read_bytes() == (tmp_path / "caffe.tsv").read_bytes()


def test_float16_import_and_box_limits(tmp_path):
    import_tsv(SAMPLE, tmp_path / "h.h5", dtype="float16", max_boxes=40)
    r = FeatureReader(tmp_path / "h.h5")
    assert r.max_boxes == 40 and r.get(0).features.dtype == np.float16
    want = next(read_tsv(SAMPLE))
    np.testing.assert_allclose(r.get(0).features.astype(np.float32), want.features, rtol=1e-3, atol=1e-3)
    with pytest.raises(TsvError, match=r"obj36_sample\.tsv:1: image COCO_train2014_000000132417: 36 boxes"):
        import_tsv(SAMPLE, tmp_path / "small.h5", max_boxes=10)
    with pytest.raises(FeatureStoreError, match="h.h5 already exists"):
        import_tsv(SAMPLE, tmp_path / "h.h5")
    import_tsv(SAMPLE, tmp_path / "h.h5", overwrite=True)
    assert FeatureReader(tmp_path / "h.h5").attrs["feature_dtype"] == "float32"


def good_row(img_id="a", n=2, d=3):
    return [img_id, "10", "20", b64(range(n), "<i8"), b64([0.5] * n, "<f4"), b64(range(n), "<i8"),
            b64([0.1] * n, "<f4"), str(n), b64([[0, 0, 5, 5]] * n, "<f4"), b64(np.ones((n, d)), "<f4")]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[:9], "9 fields; want 10 (LXMERT) or 6 (Caffe)"),
    (lambda r: r[:7] + ["two"] + r[8:], "num_boxes: not an integer: 'two'"),
    (lambda r: r[:1] + ["ten"] + r[2:], "img_h: not an integer"),
    (lambda r: r[:8] + ["@@@@"] + r[9:], "boxes: bad base64"),
    (lambda r: r[:8] + [b64([1, 2, 3], "<f4")] + r[9:], "boxes: 12 bytes, want 8 x 4"),
    (lambda r: r[:3] + [b64([1], "<i8")] + r[4:], "objects_id: 8 bytes, want 2 x 8"),
    (lambda r: r[:9] + [b64(np.ones(5), "<f4")], "features: 5 floats do not split into 2 boxes"),
    (lambda r: r[:1] + [" 10"] + r[2:], "img_h: not an integer: ' 10'"),
    (lambda r: r[:2] + ["2_0"] + r[3:], "img_w: not an integer: '2_0'"),
    (lambda r: ["a\x00b"] + r[1:], "img_id 'a\\x00b' contains a NUL character, which HDF5 strings cannot hold"),
])
def test_bad_rows_name_file_and_line(tmp_path, edit, message):
    p = tmp_path / "bad.tsv"
    p.write_text("\t".join(good_row("ok")) + "\r\n" + "\t".join(edit(good_row("b"))) + "\r\n")
    it = read_tsv(p)
    assert next(it).img_id == "ok"  # rows stream: the good first row arrives before the error
    with pytest.raises(TsvError, match=r"bad\.tsv:2: " + re.escape(message)):
        next(it)


@pytest.mark.parametrize("fields, at, message", [
    (good_row("okay1"), 0, "field 1 (img_id): not UTF-8 text (byte 0xe9 at character 4)"),
    (good_row("okay1"), 9, "field 10 (features): not UTF-8 text (byte 0xe9 at character 4)"),
    (good_row("okay1")[:1] + good_row("okay1")[2:3] + good_row("okay1")[1:2] + good_row("okay1")[7:], 0,
     "field 1 (image_id): not UTF-8 text"),
    (good_row("okay1")[:4], 2, "field 3: not UTF-8 text (byte 0xe9 at character 3)"),
])
def test_bytes_that_are_not_utf8_name_file_line_and_field(tmp_path, fields, at, message):
    """A Latin-1 byte (0xe9) in any field: one error naming the file, line and field, not a UnicodeDecodeError."""
    raw = [f.encode() for f in fields]
    raw[at] = raw[at][:3] + b"\xe9" + raw[at][3:]
    p = tmp_path / "latin1.tsv"
    p.write_bytes(b"\t".join(x.encode() for x in good_row("first")) + b"\r\n\r\n" + b"\t".join(raw) + b"\r\n")
    with pytest.raises(TsvError, match=r"latin1\.tsv:3: " + re.escape(message)):
        list(read_tsv(p))
    with pytest.raises(TsvError, match=r"latin1\.tsv:3: "):
        import_tsv(p, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_huge_num_boxes_is_refused_before_allocating(tmp_path):
    """A Caffe row declaring 10^12 boxes over empty buffers fails on the box count, not in np.full."""
    p = tmp_path / "caffe.tsv"
    p.write_text("\t".join(["a", "20", "10", str(10 ** 12), "", ""]) + "\r\n")
    with pytest.raises(TsvError, match=r"caffe\.tsv:1: boxes: 0 bytes, want 4000000000000 x 4"):
        list(read_tsv(p))


def test_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    p = tmp_path / "bom.tsv"
    p.write_bytes(b"\xef\xbb\xbf" + "\t".join(good_row("COCO_1")).encode() + b"\r\n")
    assert [r.img_id for r in read_tsv(p)] == ["COCO_1"]


def test_export_refuses_ids_a_tsv_cannot_carry(tmp_path):
    for img_id in ("a\tb", "a\nb", '"quoted'):
        d = tmp_path / str(abs(hash(img_id)))
        d.mkdir()
        with FeatureWriter(d / "a.h5", max_boxes=1, feature_dim=3, dtype="float32") as w:
            w.add(ImageFeatures(img_id, 10, 20, np.zeros((1, 4), np.float32), np.ones((1, 3), np.float32),
                                np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros(1, np.int64),
                                np.zeros(1, np.float32)))
            w.finalize()
        with pytest.raises(ValueError, match=re.escape(f"image id {img_id!r} cannot be a TSV field")):
            export_tsv(d / "a.h5", d / "a.tsv")
        assert not (d / "a.tsv").exists()


def test_import_refuses_inconsistent_feature_size(tmp_path):
    p = tmp_path / "mixed.tsv"
    p.write_text("\t".join(good_row("a", d=3)) + "\n" + "\t".join(good_row("b", d=4)) + "\n")
    with pytest.raises(TsvError, match=r"mixed\.tsv:2: feature size 4, earlier rows have 3"):
        import_tsv(p, tmp_path / "m.h5")
    with pytest.raises(FileNotFoundError, match="absent.tsv"):
        list(read_tsv(tmp_path / "absent.tsv"))


def test_export_refuses_unknown_format(tmp_path):
    import_tsv(SAMPLE, tmp_path / "s.h5")
    with pytest.raises(ValueError, match="fmt must be 'lxmert' or 'caffe'"):
        export_tsv(tmp_path / "s.h5", tmp_path / "x.tsv", fmt="csv")
    assert not (tmp_path / "x.tsv").exists()


@st.composite
def records(draw):
    n_images = draw(st.integers(1, 4))
    out = []
    for j in range(n_images):
        n = draw(st.integers(1, 5))
        h, w = draw(st.integers(1, 900)), draw(st.integers(1, 900))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        xs = np.sort(rng.uniform(0, w, (n, 2)), axis=1)
        ys = np.sort(rng.uniform(0, h, (n, 2)), axis=1)
        out.append(ImageFeatures(
            f"img-{j}", h, w, np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).astype(np.float32),
            rng.standard_normal((n, 7)).astype(np.float32) * 1e3, rng.integers(0, 1600, n),
            rng.uniform(0, 1, n).astype(np.float32), rng.integers(0, 400, n),
            rng.uniform(0, 1, n).astype(np.float32)))
    return out


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=records(), fmt=st.sampled_from(["lxmert", "caffe"]))
def test_round_trip_property(tmp_path_factory, recs, fmt):
    d = tmp_path_factory.mktemp("tsv")
    with FeatureWriter(d / "a.h5", max_boxes=5, feature_dim=7, dtype="float32") as w:
        for r in recs:
            w.add(r)
        w.finalize()
    export_tsv(d / "a.h5", d / "a.tsv", fmt=fmt)
    back = list(read_tsv(d / "a.tsv"))
    assert [r.img_id for r in back] == [r.img_id for r in recs]
    for got, want in zip(back, recs):
        assert (got.img_h, got.img_w) == (want.img_h, want.img_w)
        np.testing.assert_array_equal(got.features, want.features)
        np.testing.assert_array_equal(got.boxes, want.boxes)
        if fmt == "lxmert":
            np.testing.assert_array_equal(got.objects_id, want.objects_id)
            np.testing.assert_array_equal(got.attrs_conf, want.attrs_conf)
    import_tsv(d / "a.tsv", d / "b.h5", max_boxes=5)
    export_tsv(d / "b.h5", d / "b.tsv", fmt=fmt)
    assert (d / "b.tsv").read_bytes() == (d / "a.tsv").read_bytes()
