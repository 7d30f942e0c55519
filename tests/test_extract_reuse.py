"""Reuse of earlier features by image content (extractor.reuse): only with equal settings, never wrong."""
import shutil

import h5py
import numpy as np
import pytest
from pipeline_helpers import feature_arrays, sample_images, tiny_detector_weights

from extractor.__main__ import main
from extractor.extract import extract_features
from extractor.reuse import Reuse, read_sidecar, sidecar_path
from extractor.store import FeatureWriter, merge

SETTINGS = {"config": "tiny", "boxes": 5, "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """Four photos, tiny weights, and a first extraction over them (the earlier output)."""
    root = tmp_path_factory.mktemp("reuse")
    images = sample_images(root / "images", count=4)
    weights = tiny_detector_weights(root / "tiny.pkl")
    summary = extract_features(images, weights, root / "first.h5", **SETTINGS)
    assert (summary["extracted"], summary["reused"]) == (4, 0)
    return root, images, weights, root / "first.h5"


def test_index_lists_each_stored_image_by_its_bytes(earlier):
    import hashlib

    root, images, _, first = earlier
    key, hashes = read_sidecar(first)
    assert key["weights_sha256"] == hashlib.sha256((root / "tiny.pkl").read_bytes()).hexdigest()
    assert (key["box_strategy"], key["max_boxes"], key["dtype"], key["device"]) == ("caffe", 5, "float16", "cpu")
    assert hashes == {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(images.iterdir())}


def test_same_settings_reuse_renamed_images_exactly(earlier, tmp_path):
    _, images, weights, first = earlier
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in sorted(images.iterdir()):
        shutil.copy(p, renamed / f"new_{p.name}")
    s = extract_features(renamed, weights, tmp_path / "again.h5", reuse=[first], **SETTINGS)
    assert (s["extracted"], s["reused"], s["stored"]) == (0, 4, 4)
    old, new = feature_arrays(first), feature_arrays(tmp_path / "again.h5")
    assert list(new["img_id"].astype(str)) == [f"new_{i}" for i in old["img_id"].astype(str)]
    for key in old:
        if key != "img_id":
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)


@pytest.mark.parametrize("change", [{"boxes": 6}, {"dtype": "float32"}, {"selection": "maxnms"}])
def test_other_settings_reuse_nothing(earlier, tmp_path, change):
    _, images, weights, first = earlier
    s = extract_features(images, weights, tmp_path / "other.h5", reuse=[first], **{**SETTINGS, **change})
    assert (s["extracted"], s["reused"]) == (4, 0)


def test_other_weights_reuse_nothing(earlier, tmp_path):
    import torch

    from extractor.detector.config import DetectorConfig
    from extractor.detector.model import VGDetector
    from extractor.detector.weights import save_detectron2_weights

    _, images, _, first = earlier
    torch.manual_seed(1)
    save_detectron2_weights(VGDetector(DetectorConfig.load("tiny")), tmp_path / "other.pkl")
    s = extract_features(images, tmp_path / "other.pkl", tmp_path / "o.h5", reuse=[first], **SETTINGS)
    assert (s["extracted"], s["reused"]) == (4, 0)


def test_changed_image_bytes_are_extracted_again(earlier, tmp_path):
    _, images, weights, first = earlier
    copy = shutil.copytree(images, tmp_path / "images")
    victim = sorted(copy.iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 1  # one bit inside the last chunk's CRC: same name, same size, other bytes
    victim.write_bytes(bytes(data))
    s = extract_features(copy, weights, tmp_path / "x.h5", reuse=[first], max_failure_ratio=0.5, **SETTINGS)
    assert (s["reused"], s["extracted"] + s["failed"]) == (3, 1)


def test_an_index_whose_file_is_gone_or_not_its_own_gives_nothing(earlier, tmp_path):
    """A kill between the index and the feature file, a file replaced by another, and a virtual file."""
    _, images, weights, first = earlier
    orphan = tmp_path / "orphan.h5"
    shutil.copy(sidecar_path(first), sidecar_path(orphan))  # the index exists, its file was never renamed
    replaced = tmp_path / "replaced.h5"
    shutil.copy(sidecar_path(first), sidecar_path(replaced))
    with FeatureWriter(replaced, max_boxes=5, feature_dim=feature_arrays(first)["features"].shape[2],
                       attrs={"box_strategy": "imported"}) as w:
        w.finalize()
    virtual = tmp_path / "virtual.h5"
    merge([first], virtual, virtual=True)
    shutil.copy(sidecar_path(first), sidecar_path(virtual))
    key, hashes = read_sidecar(first)
    assert Reuse([orphan, replaced, virtual], key).find(set(hashes.values())) == {}
    assert len(Reuse([orphan, first], key).find(set(hashes.values()))) == 4


def test_crash_between_index_and_file_then_rerun(earlier, tmp_path, monkeypatch):
    _, images, weights, _ = earlier
    out = tmp_path / "out.h5"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(FeatureWriter, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, weights, out, **SETTINGS)
    assert sidecar_path(out).is_file() and not out.exists()
    monkeypatch.undo()
    s = extract_features(images, weights, out, reuse=[out], **SETTINGS)
    assert (s["resumed"], s["reused"], s["extracted"], s["stored"]) == (4, 0, 0, 4)
    with h5py.File(out) as f:
        assert sorted(read_sidecar(out)[1]) == sorted(f["img_id"].asstr()[()])


def test_command_line_reuses_a_folder_of_earlier_outputs(earlier, tmp_path, capsys):
    root, images, weights, _ = earlier
    args = ["--images", str(images), "--weights", str(weights), "--config", "tiny", "--boxes", "5",
            "--workers", "0", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "cli.h5"), "--reuse", str(root)]) == 0
    assert "(0 extracted now, 4 reused, 0 resumed, 0 failed)" in capsys.readouterr().out
