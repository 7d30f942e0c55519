"""Detectron2-format weights: round trip, both file formats, key errors, and no code execution on load."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from extractor.detector.config import DetectorConfig
from extractor.detector.model import VGDetector
from extractor.detector.weights import (
    UnsafePickleError,
    WeightsError,
    load_detectron2_weights,
    read_weights,
    safe_load_pickle,
    save_detectron2_weights,
)


def _tiny(seed: int) -> VGDetector:
    torch.manual_seed(seed)
    return VGDetector(DetectorConfig.load("tiny"))


def _arrays(model: VGDetector) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _dump(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _assert_same_state(a: VGDetector, b: VGDetector) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pickle_round_trip_and_sha256(tmp_path):
    src, dst = _tiny(1), _tiny(2)
    path = tmp_path / "w.pkl"
    sha = save_detectron2_weights(src, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    raw = safe_load_pickle(path)
    assert raw["__author__"] == "lxmert-pipeline" and raw["matching_heuristics"] is False
    assert isinstance(raw["model"]["backbone.stem.conv1.weight"], np.ndarray)
    assert not torch.equal(src.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                           dst.state_dict()["roi_heads.box_predictor.cls_score.weight"])
    assert load_detectron2_weights(dst, path) == sha
    _assert_same_state(src, dst)


def test_torch_files_and_bare_dicts_load(tmp_path):
    src = _tiny(1)
    wrapped, bare = tmp_path / "w.pth", tmp_path / "bare.pth"
    torch.save({"model": src.state_dict(), "iteration": 7}, wrapped)
    torch.save(src.state_dict(), bare)
    for path in (wrapped, bare):
        dst = _tiny(2)
        load_detectron2_weights(dst, path)
        _assert_same_state(src, dst)


def test_numpy1_module_paths_and_protocol2_pickles_load(tmp_path):
    """py-bottom-up-attention files were written by numpy 1 (numpy.core.multiarray) with latin-1 bytes."""
    src = _tiny(1)
    blob = pickle.dumps({"model": _arrays(src), "__author__": "x"}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" in blob
    path = tmp_path / "old.pkl"
    path.write_bytes(blob)
    dst = _tiny(2)
    load_detectron2_weights(dst, path)
    _assert_same_state(src, dst)


def test_missing_misshaped_and_unexpected_keys_are_named(tmp_path):
    model = _tiny(1)
    arrays = _arrays(model)
    del arrays["backbone.res3.0.conv2.norm.running_var"]
    arrays["roi_heads.box_predictor.cls_score.weight"] = np.zeros((5, 256), np.float32)
    arrays["roi_heads.box_predictor.mask_head.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.pkl"
    _dump(path, {"model": arrays})
    with pytest.raises(WeightsError) as e:
        load_detectron2_weights(model, path)
    msg = str(e.value)
    assert "1 missing key(s): backbone.res3.0.conv2.norm.running_var" in msg
    assert "roi_heads.box_predictor.cls_score.weight (5, 256) (model wants (1601, 256))" in msg
    assert "1 unexpected key(s): roi_heads.box_predictor.mask_head.weight" in msg
    assert str(path) in msg


def test_weights_of_a_named_config_name_it_when_another_config_is_given(tmp_path):
    path = tmp_path / "w.pkl"
    save_detectron2_weights(_tiny(1), path)
    five = VGDetector(DetectorConfig.load("tiny").replace(name="five", num_classes=5, num_attributes=4))
    with pytest.raises(WeightsError) as e:
        load_detectron2_weights(five, path)
    assert str(e.value) == (f"{path} has 1600 classes and 400 attributes; the config five has 5 classes and "
                            "4 attributes: pass --config tiny")


def test_harmless_keys_are_skipped_and_pixel_mean_is_checked(tmp_path):
    src = _tiny(1)
    arrays = _arrays(src)
    arrays["backbone.res2.0.conv1.norm.num_batches_tracked"] = np.array(5)
    arrays["proposal_generator.anchor_generator.cell_anchors.0"] = np.zeros((12, 4), np.float32)
    arrays["pixel_mean"] = np.array([102.9801, 115.9465, 122.7717], np.float32).reshape(3, 1, 1)
    arrays["pixel_std"] = np.ones((3, 1, 1), np.float32)
    path = tmp_path / "w.pkl"
    _dump(path, {"model": arrays})
    dst = _tiny(2)
    load_detectron2_weights(dst, path)
    _assert_same_state(src, dst)
    arrays["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32)
    _dump(path, {"model": arrays})
    with pytest.raises(WeightsError, match="pixel_mean .* differs from the config"):
        load_detectron2_weights(dst, path)


class _CreatesFile:
    """Unpickling this calls open(target, 'w'), which would create the file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    _dump(path, {"model": {"backbone.stem.conv1.weight": _CreatesFile(str(marker))}})
    with pytest.raises(UnsafePickleError) as e:
        safe_load_pickle(path)
    assert str(path) in str(e.value) and "refused to load global io.open" in str(e.value)
    with pytest.raises(UnsafePickleError):
        load_detectron2_weights(_tiny(1), path)
    assert not marker.exists()


def test_malicious_torch_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _CreatesFile(str(marker))}}, path)
    with pytest.raises(UnsafePickleError, match="weights_only"):
        read_weights(path)
    assert not marker.exists()


def test_non_numeric_or_misshaped_containers_are_refused(tmp_path):
    path = tmp_path / "w.pkl"
    _dump(path, {"model": {"a": np.array(["x", 1], dtype=object)}})
    with pytest.raises(WeightsError, match="a has dtype object"):
        read_weights(path)
    _dump(path, [1, 2, 3])
    with pytest.raises(WeightsError, match="expected"):
        read_weights(path)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        read_weights(tmp_path / "nope.pkl")
