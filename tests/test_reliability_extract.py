"""Extraction under bad files and SIGKILL: valid images get their true features, bad ones are listed with
reasons, and a luigi ExtractFeatures run killed at random moments reruns to the uninterrupted result
without ever publishing a partial output."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import luigi
import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import feature_arrays, sample_images, tiny_detector_weights
from skimage import data

from extractor.__main__ import main as extractor_cli
from extractor.detector.config import DetectorConfig
from extractor.detector.model import VGDetector
from extractor.detector.weights import load_detectron2_weights
from extractor.extract import BoxRule, ExtractionError, extract_features, to_record
from extractor.images import load_image
from extractor.store import FeatureReader, validate
from pipeline.features import ExtractFeatures

REPO = Path(__file__).resolve().parents[1]
BOXES = 8
MAX_SIZE = 160
# The tiny detector on small inputs with few proposals: a few images a second on one CPU thread.
FAST_CONFIG = f"""_BASE_: tiny
INPUT:
  MIN_SIZE_TEST: 96
  MAX_SIZE_TEST: {MAX_SIZE}
MODEL:
  RPN:
    POST_NMS_TOPK_TEST: 20
"""
BAD = {"corrupt": "corrupt", "empty": "empty file", "not_an_image": "not an image",
       "strip": "too thin: 2x600 resizes to", "truncated": "truncated"}  # stem: how its reason starts
GOOD = ["cmyk", "exif_rotated", "gray", "large", "one_pixel", "rgba", "sixteen_bit", "upright"]


@contextmanager
def one_thread() -> Iterator[None]:
    """The same arithmetic as the OMP_NUM_THREADS=1 subprocesses, so features compare exactly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def explicit(cls: type[luigi.Task], **given: Any) -> dict[str, Any]:
    """Every parameter of `cls` given (else its class default): the same task whatever luigi.cfg says."""
    return {name: given.get(name, param._default) for name, param in cls.get_params()}


def command_line(cls: type[luigi.Task], params: dict[str, Any]) -> list[str]:
    """`luigi --module pipeline.tasks <Task> --param value ...` for the same task."""
    flags = [x for name, param in cls.get_params()
             for x in ((f"--{name.replace('_', '-')}",) * bool(params[name]) if isinstance(param, luigi.BoolParameter)
                       else (f"--{name.replace('_', '-')}", param.serialize(params[name])))]  # a bool is a bare flag
    return [sys.executable, "-m", "luigi", "--module", "pipeline.tasks", cls.get_task_family(), *flags,
            "--local-scheduler"]


def build(task: luigi.Task) -> luigi.LuigiStatusCode:
    return luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="CRITICAL").status


def fast_config(path: Path) -> Path:
    path.write_text(FAST_CONFIG)
    return path


def bad_and_valid_images(folder: Path) -> Path:
    """Every kind of file a shared image folder holds: GOOD decode (rotations applied), BAD do not."""
    folder.mkdir()
    photo = data.coffee()[::2, ::2]  # 200 x 300, not square, so a lost rotation would show
    Image.fromarray(photo).save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored pixels are turned back
    Image.fromarray(np.rot90(photo).copy()).save(folder / "exif_rotated.png", exif=exif)
    Image.fromarray(data.camera()[::2, ::2]).save(folder / "gray.png")
    Image.fromarray(np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 0, np.uint8)])).save(
        folder / "rgba.png")
    rng = np.random.default_rng(0)
    Image.fromarray((data.camera().astype(np.uint16) << 8) | rng.integers(0, 256, (512, 512), np.uint16)).save(
        folder / "sixteen_bit.png")
    Image.fromarray(data.astronaut()[::2, ::2]).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.tile(data.astronaut(), (4, 5, 1))).save(folder / "large.jpg", quality=85)  # 2560x2048
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one_pixel.png")  # scaled up like any small image
    Image.new("RGB", (2, 600), (10, 20, 30)).save(folder / "strip.png")  # under 2 px once fitted to the limit
    jpeg = (folder / "upright.png").with_suffix(".jpg")
    Image.fromarray(photo).save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    png = bytearray((folder / "upright.png").read_bytes())
    png[300:400] = bytes(100)  # zeros inside the compressed stream
    (folder / "corrupt.png").write_bytes(bytes(png))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("a caption, not a picture\n")
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed")
    return {"images": bad_and_valid_images(root / "images"), "weights": tiny_detector_weights(root / "tiny.pkl"),
            "config": fast_config(root / "fast.yaml")}


def test_bad_files_are_listed_and_valid_images_get_their_true_features(mixed, tmp_path, monkeypatch):
    out = tmp_path / "direct.h5"
    s = extract_features(mixed["images"], mixed["weights"], out, config=mixed["config"], boxes=BOXES,
                         num_workers=0, max_failure_ratio=0.5, progress=False)
    assert (s["images"], s["extracted"], s["failed"], s["stored"]) == (13, 8, 5, 8)
    assert validate(out, boxes=BOXES, dim=256) == []
    failures = [json.loads(line) for line in (tmp_path / "direct.h5.failures.jsonl").read_text().splitlines()]
    assert sorted(f["img_id"] for f in failures) == sorted(BAD)
    for f in failures:
        assert f["reason"].startswith(BAD[f["img_id"]])
        assert f["path"] == str(next(mixed["images"].glob(f"{f['img_id']}.*")))

    reader = FeatureReader(out)
    assert reader.ids == GOOD  # folder order, bad files left out
    model = VGDetector(DetectorConfig.load(mixed["config"]))
    load_detectron2_weights(model, mixed["weights"])
    model.eval()
    for img_id in GOOD:  # each stored record is the detector's output on the decoded image
        image = load_image(next(mixed["images"].glob(f"{img_id}.*")))
        with torch.inference_mode():
            det = model([model.prepare(image)])[0]
        want = to_record(img_id, image.shape[:2], det, BoxRule("caffe", BOXES, BOXES), "float16")
        got = reader.get(img_id)
        assert (got.img_h, got.img_w) == image.shape[:2]
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
        np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32),
                                   rtol=2e-3, atol=1e-3)
        np.testing.assert_array_equal(got.objects_id, want.objects_id)
    assert (reader.get("large").img_w, reader.get("large").img_h) == (2560, 2048)  # boxes in original pixels
    assert reader.get("large").boxes[:, 2].max() > MAX_SIZE  # scaled back from the resized image
    assert (reader.get("one_pixel").img_w, reader.get("one_pixel").img_h) == (1, 1)
    upright, rotated = reader.get("upright"), reader.get("exif_rotated")
    assert (rotated.img_h, rotated.img_w) == (upright.img_h, upright.img_w) == (200, 300)
    np.testing.assert_allclose(rotated.boxes, upright.boxes, atol=1e-3)
    np.testing.assert_allclose(rotated.features.astype(np.float32), upright.features.astype(np.float32),
                               atol=1e-3)

    # the ExtractFeatures task over the same folder completes with the same file and failures list
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    task = ExtractFeatures(**explicit(ExtractFeatures, images=str(mixed["images"]), weights=str(mixed["weights"]),
                                      config=str(mixed["config"]), boxes=BOXES, max_failure_ratio=0.5,
                                      decode_workers=0))
    assert build(task) == luigi.LuigiStatusCode.SUCCESS
    published = ExtractFeatures.path(task.output_dir())
    direct = feature_arrays(out)
    assert {k: v.tolist() for k, v in feature_arrays(published).items()} == {k: v.tolist() for k, v in direct.items()}
    assert (published.parent / "features.h5.failures.jsonl").read_text() == (
        tmp_path / "direct.h5.failures.jsonl").read_text()
    summary = json.loads((task.output_dir() / "summary.json").read_text())
    assert (summary["images"], summary["failed"]) == (8, 5)


def failure_reasons(output: Path) -> dict[str, str]:
    lines = Path(str(output) + ".failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(x)["img_id"]: json.loads(x)["reason"] for x in lines}


def test_broken_symlinks_and_images_over_max_pixels_are_failure_entries(mixed, tmp_path, monkeypatch):
    """Dangling and looping links used to vanish from the listing; now each is a failure counted against
    max_failure_ratio, a link to a good image is extracted as that image, and max_pixels decides "too large"."""
    folder = tmp_path / "images"
    folder.mkdir()
    photo = data.coffee()[::2, ::2]  # 200 x 300 = 60,000 pixels
    Image.fromarray(photo).save(folder / "upright.png")
    Image.fromarray(np.tile(photo, (2, 2, 1))).save(folder / "big.png")  # 400 x 600 = 240,000 pixels
    os.symlink("upright.png", folder / "link.png")
    os.symlink("gone.jpg", folder / "dangling.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    run = dict(weights=mixed["weights"], config=mixed["config"], boxes=BOXES, num_workers=0, progress=False)

    with pytest.raises(ExtractionError, match=r"3 of 5 images could not be read, more than max_failure_ratio=0\.4"):
        extract_features(folder, output=tmp_path / "strict.h5", max_pixels=100_000, max_failure_ratio=0.4, **run)
    s = extract_features(folder, output=tmp_path / "small.h5", max_pixels=100_000, max_failure_ratio=0.6, **run)
    assert (s["images"], s["stored"], s["failed"]) == (5, 2, 3)
    assert failure_reasons(tmp_path / "small.h5") == {
        "big": "too large: 600x400 pixels > 100000", "dangling": "dangling symlink -> gone.jpg",
        "loop": "symlink loop"}
    reader = FeatureReader(tmp_path / "small.h5")
    assert reader.ids == ["link", "upright"]
    np.testing.assert_array_equal(reader.get("link").features, reader.get("upright").features)

    s = extract_features(folder, output=tmp_path / "raised.h5", max_pixels=240_000, max_failure_ratio=0.6, **run)
    assert (s["stored"], s["failed"]) == (3, 2) and FeatureReader(tmp_path / "raised.h5").get("big").img_w == 600
    with pytest.raises(ExtractionError, match="max_pixels must be a positive integer, got 0"):
        extract_features(folder, output=tmp_path / "zero.h5", max_pixels=0, **run)
    assert extractor_cli(["--images", str(folder), "--weights", str(mixed["weights"]), "--config", str(mixed["config"]),
                          "--output", str(tmp_path / "cli.h5"), "--boxes", str(BOXES), "--workers", "0",
                          "--max-failure-ratio", "0.6", "--max-pixels", "100000", "--no-progress"]) == 0
    assert failure_reasons(tmp_path / "cli.h5") == failure_reasons(tmp_path / "small.h5")

    # the luigi parameter reaches the shards
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    task = ExtractFeatures(**explicit(ExtractFeatures, images=str(folder), weights=str(mixed["weights"]),
                                      config=str(mixed["config"]), boxes=BOXES, max_failure_ratio=0.6,
                                      max_pixels=100_000, decode_workers=0))
    assert build(task) == luigi.LuigiStatusCode.SUCCESS
    assert failure_reasons(ExtractFeatures.path(task.output_dir())) == failure_reasons(tmp_path / "small.h5")


# ------------------------------------------------------------------ SIGKILL during the luigi task

FAMILIES = ("ExtractFeaturesShard", "ExtractFeatures")


def final_folders(workdir: Path) -> list[Path]:
    return [d for family in FAMILIES if (workdir / family).is_dir()
            for d in (workdir / family).iterdir() if not d.name.endswith(".partial")]


def attributes(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}


def assert_same_features(path: Path, reference: Path) -> None:
    got, want = feature_arrays(path), feature_arrays(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), (path, name)
    assert attributes(path) == attributes(reference)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Any]:
    """Eight photos in two shards, extracted once without interruption (in this process, one thread)."""
    root = tmp_path_factory.mktemp("kill")
    params = explicit(ExtractFeatures, images=str(sample_images(root / "images", 8)),
                      weights=str(tiny_detector_weights(root / "tiny.pkl")),
                      config=str(fast_config(root / "fast.yaml")), boxes=BOXES, decode_workers=0, shards=2)
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("LXMERT_WORKDIR", str(root / "reference"))
        start = time.perf_counter()
        assert build(ExtractFeatures(**params)) == luigi.LuigiStatusCode.SUCCESS
        seconds = time.perf_counter() - start
    (root / "luigi.cfg").write_text("[core]\nautoload_range = false\n")
    return {"params": params, "workdir": root / "reference", "seconds": seconds, "config": root / "luigi.cfg"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_rerun_gives_the_uninterrupted_file(seed, uninterrupted, tmp_path,
                                                                           monkeypatch, capsys):
    ref, work = uninterrupted, tmp_path / "work"
    env = {**os.environ, "LXMERT_WORKDIR": str(work), "LUIGI_CONFIG_PATH": str(ref["config"]),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command_line(ExtractFeatures, ref["params"]), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (work / ".locks").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # imports take seconds; the first task's lock marks the start of the work
    kill_at = time.monotonic() + random.Random(seed).uniform(0.0, 0.8 * ref["seconds"])
    while time.monotonic() < kill_at and proc.poll() is None:
        for folder in final_folders(work):  # a published folder is complete at every moment
            assert (folder / "task.json").is_file(), folder
        time.sleep(0.002)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert running, stderr[-3000:]

    for folder in final_folders(work):  # what the kill left: finished folders equal the reference ones
        assert (folder / "task.json").is_file()
        assert_same_features(folder / "features.h5", ref["workdir"] / folder.parent.name / folder.name / "features.h5")
    partial = [d for family in FAMILIES for d in (work / family).glob("*.partial")]
    for folder in partial:  # a feature file inside an unfinished folder is itself complete or absent
        if (folder / "features.h5").exists():
            assert validate(folder / "features.h5", boxes=BOXES) == []

    monkeypatch.setenv("LXMERT_WORKDIR", str(work))
    capsys.readouterr()
    with one_thread():
        assert build(ExtractFeatures(**ref["params"])) == luigi.LuigiStatusCode.SUCCESS
    out = capsys.readouterr().out
    for folder in partial:
        assert f"{folder.parent.name} {folder.name.removesuffix('.partial')}: resuming" in out
    task = ExtractFeatures(**ref["params"])
    final, reference = ExtractFeatures.path(task.output_dir()), ExtractFeatures.path(
        ref["workdir"] / "ExtractFeatures" / task.output_dir().name)
    assert_same_features(final, reference)
    assert final.read_bytes() == reference.read_bytes()  # the store promises identical bytes, too
    assert not list(work.glob("*/*.partial"))
    assert all((folder / "task.json").is_file() for folder in final_folders(work))
