"""A full disk under the real pipeline: the Luigi task fails the Luigi way (exit code 30, the one-line
message naming the file and the errno), keeps its finished parts, and the rerun after space is freed
publishes the bytes of an undisturbed run. The faults are injected into the Luigi subprocess
(tests/faults.py through sitecustomize); the last test fills a real tmpfs where mounting is allowed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from faults import ENV, Faults, sitecustomize_dir
from pipeline_helpers import REPO, run_luigi, sample_images, tiny_detector_weights, write_config

from extractor.store.tsv import import_tsv

CONFIG = """
[core]
autoload_range = false
[retcode]
missing_data = 20
task_failed = 30
scheduling_error = 35
unhandled_exception = 40
already_running = 0
not_run = 0
"""
# The tiny detector on small inputs with few proposals: a few images a second on one CPU thread.
FAST_DETECTOR = """_BASE_: tiny
INPUT:
  MIN_SIZE_TEST: 96
  MAX_SIZE_TEST: 160
MODEL:
  RPN:
    POST_NMS_TOPK_TEST: 20
"""
TSV = REPO / "tests" / "data" / "train2014_obj36_sample.tsv"


def temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp" in p.name)


def published(workdir: Path, family: str) -> Path:
    [folder] = [d for d in (workdir / family).iterdir() if not d.name.endswith(".partial")]
    return folder


def with_fault(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, faults: Faults | None) -> None:
    """The next run_luigi subprocess starts with these faults installed (None: a healthy disk)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(sitecustomize_dir(tmp_path / "site")), str(REPO)]))
    if faults is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, faults.to_env())


def test_import_tsv_full_disk_in_finalize_exits_30_and_the_rerun_publishes_the_same_file(tmp_path, monkeypatch):
    config = write_config(tmp_path / "luigi.cfg", CONFIG)
    args = ("ImportTSVFeatures", "--local-scheduler", "--tsv", str(TSV))
    import_tsv(TSV, tmp_path / "healthy.h5", dtype="float32")  # what the task writes on a healthy disk
    work = tmp_path / "work"
    with_fault(monkeypatch, tmp_path, Faults(work, "pwrite", 2, match="/.features.h5.tmp-"))
    failed = run_luigi(work, config, *args)
    assert failed.returncode == 30, failed.stderr[-3000:]
    [partial] = (work / "ImportTSVFeatures").glob("*.partial")
    line = (f"cannot write {partial}/features.h5: No space left on device (ENOSPC); free space and rerun: "
            "finished work is kept")
    assert line in failed.stderr
    assert re.search(r"ImportTSVFeatures.*failed", failed.stderr + failed.stdout, re.IGNORECASE)
    assert "Segmentation fault" not in failed.stderr
    assert temporaries(work) == [] and not (partial / "features.h5").exists()
    assert list((partial / "features.h5.parts").glob("part-*.h5"))  # the imported rows are kept

    with_fault(monkeypatch, tmp_path, None)
    rerun = run_luigi(work, config, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    folder = published(work, "ImportTSVFeatures")
    assert (folder / "features.h5").read_bytes() == (tmp_path / "healthy.h5").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["features.h5", "features.h5.failures.jsonl", "summary.json",
                                                        "task.json"]


@pytest.mark.slow
def test_extract_features_full_disk_in_finalize_then_at_task_json_then_rerun(tmp_path, monkeypatch):
    """The case of issue 14: ENOSPC while finalize writes the feature file (main crashed there, exit 139)."""
    config = write_config(tmp_path / "luigi.cfg", CONFIG)
    (tmp_path / "fast.yaml").write_text(FAST_DETECTOR)
    args = ("ExtractFeatures", "--local-scheduler", "--images", str(sample_images(tmp_path / "images", 4)),
            "--weights", str(tiny_detector_weights(tmp_path / "tiny.pkl")), "--config", str(tmp_path / "fast.yaml"),
            "--boxes", "8", "--decode-workers", "0")
    with_fault(monkeypatch, tmp_path, None)
    healthy = run_luigi(tmp_path / "healthy", config, *args)
    assert healthy.returncode == 0, healthy.stderr[-3000:]

    work = tmp_path / "work"
    with_fault(monkeypatch, tmp_path, Faults(work, "pwrite", 3, match="/.features.h5.tmp-"))
    failed = run_luigi(work, config, *args)
    assert failed.returncode == 30, failed.stderr[-3000:]
    [partial] = (work / "ExtractFeaturesShard").glob("*.partial")
    assert f"cannot write {partial}/features.h5: No space left on device (ENOSPC)" in failed.stderr
    assert temporaries(work) == [] and list((partial / "features.h5.parts").glob("part-*.h5"))

    with_fault(monkeypatch, tmp_path, Faults(work, "write", 1, match="task.json"))  # features done, then full
    failed = run_luigi(work, config, *args)
    assert failed.returncode == 30, failed.stderr[-3000:]
    assert f"cannot write {partial}/task.json: No space left on device (ENOSPC)" in failed.stderr
    assert (partial / "features.h5").is_file() and temporaries(work) == []

    with_fault(monkeypatch, tmp_path, None)
    rerun = run_luigi(work, config, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    got = published(work, "ExtractFeatures") / "features.h5"
    assert got.read_bytes() == (published(tmp_path / "healthy", "ExtractFeatures") / "features.h5").read_bytes()
    assert not list(work.glob("*/*.partial"))


EXTRACT = """
import sys
from extractor.extract import extract_features
extract_features(sys.argv[1], sys.argv[2], sys.argv[3], config=sys.argv[4], boxes=8, num_workers=0,
                 dtype="float32", progress=False)
"""


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (root only; skipped where mounting is not permitted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def extract(tmp_path: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", EXTRACT, str(tmp_path / "images"), str(tmp_path / "tiny.pkl"),
                           str(out), str(tmp_path / "fast.yaml")], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_real_full_tmpfs_fails_cleanly_in_a_part_and_in_finalize_and_recovers(tmpfs, tmp_path):
    sample_images(tmp_path / "images", 6)
    tiny_detector_weights(tmp_path / "tiny.pkl")
    (tmp_path / "fast.yaml").write_text(FAST_DETECTOR)
    done = extract(tmp_path, tmp_path / "reference.h5")
    assert done.returncode == 0, done.stderr[-3000:]
    size = (tmp_path / "reference.h5").stat().st_size
    out = tmpfs / "features.h5"
    # room for half the part file (the flush fails), then for the part but not the final file (finalize fails)
    for free, failing in ((size // 2, "features.h5.parts/part-000000.h5"), (size * 3 // 2, "features.h5")):
        stat = os.statvfs(tmpfs)
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - free))
        done = extract(tmp_path, out)
        assert done.returncode == 1, (done.returncode, done.stderr[-3000:])  # an exception, no segfault (139)
        last = done.stderr.strip().splitlines()[-1]
        assert last == (f"extractor.fileio.WriteError: cannot write {tmpfs}/{failing}: No space left on device "
                        "(ENOSPC); free space and rerun: finished work is kept"), done.stderr[-3000:]
        assert temporaries(tmpfs) == [] and not out.exists()
        if failing == "features.h5":
            assert (tmpfs / "features.h5.parts" / "part-000000.h5").is_file()  # the extracted images are kept
        filler.unlink()  # space freed: the rerun resumes
        done = extract(tmp_path, out)
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.read_bytes() == (tmp_path / "reference.h5").read_bytes()
        assert sorted(p.name for p in tmpfs.iterdir()) == [
            "features.h5", "features.h5.failures.jsonl", "features.h5.images.jsonl"]
        for p in tmpfs.iterdir():
            p.unlink()
