"""Reruns follow the data (issue 14): a changed image folder reruns extraction over its new images only, and
two local runs without a scheduler share the work instead of failing."""
import filecmp
import json
import os
import subprocess

import cv2
import luigi
import numpy as np
from luigi.execution_summary import LuigiStatusCode
from pipeline_helpers import (
    REPO,
    env_for,
    feature_arrays,
    luigi_cmd,
    run_luigi,
    started,
    tiny_detector_weights,
    write_config,
)
from skimage import data as skdata

from pipeline.features import ExtractFeatures
from pipeline.fingerprint import forget_fingerprints

PHOTOS = (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket, skdata.immunohistochemistry)


def photos(folder, numbers) -> None:
    """Distinct small photos (a different crop of a skimage photo each), named like COCO images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in numbers:
        rgb = PHOTOS[i % len(PHOTOS)]()[2 * i:, 3 * i:]
        small = cv2.resize(rgb, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"COCO_val2014_{i:012d}.png"), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))


SETTINGS = {"config": "tiny", "boxes": 5, "decode_workers": 0, "amp": "none"}  # explicit: not the demo profile's


def extraction_args(images, weights, shards: int = 2) -> list[str]:
    """The command line of ExtractFeatures over `images` with the tiny detector."""
    settings = [x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["ExtractFeatures", *settings, "--shards", str(shards), "--images", str(images), "--weights",
            str(weights), "--local-scheduler"]


def shard_counts(work, log: str) -> list[tuple[int, int]]:
    """(extracted, reused) of each shard the run started, from the shards' summary.json."""
    out = []
    for sig in started(log, "ExtractFeaturesShard"):
        summary = json.loads((work / "ExtractFeaturesShard" / sig / "summary.json").read_text())
        out.append((summary["extracted"], summary["reused"]))
    return out


def test_grown_and_shrunk_folder_extracts_only_new_images_and_equals_a_fresh_run(tmp_path, monkeypatch, capsys,
                                                                                  one_thread):
    config = write_config(tmp_path / "cfg.cfg", "[core]\nautoload_range = false\n")
    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    images, work = tmp_path / "images", tmp_path / "work"
    photos(images, range(20))
    first = run_luigi(work, config, *extraction_args(images, weights))
    assert first.returncode == 0, first.stderr[-3000:]
    assert sum(e for e, _ in shard_counts(work, first.stdout + first.stderr)) == 20

    photos(images, range(20, 25))
    for gone in (3, 11):
        (images / f"COCO_val2014_{gone:012d}.png").unlink()
    second = run_luigi(work, config, *extraction_args(images, weights))  # the next cron run
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    counts = shard_counts(work, log)
    assert len(counts) == 2 and sum(e for e, _ in counts) == 5 and sum(r for _, r in counts) == 18
    for sig, (extracted, reused) in zip(started(log, "ExtractFeaturesShard"), counts):
        assert f"ExtractFeaturesShard {sig}: {extracted} extracted, {reused} reused from earlier outputs" in log
    [merged_sig] = started(log, "ExtractFeatures")
    merged = work / "ExtractFeatures" / merged_sig / "features.h5"
    assert json.loads((merged.parent / "summary.json").read_text())["extracted"] == 5
    assert len(list((work / "ExtractFeatures").iterdir())) == 2  # the first run's folder is kept as it was

    # from scratch over the 23 in a fresh work directory (in this process, on one thread like the runs above)
    task = ExtractFeatures(shards=2, images=str(images), weights=str(weights), **SETTINGS)
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "fresh"))
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    scratch = task.output_dir() / "features.h5"
    assert scratch.parent.name == merged_sig  # same inputs, same folder name in any work directory
    ids = feature_arrays(merged)["img_id"].astype(str)
    assert len(ids) == 23 and "COCO_val2014_000000000003" not in ids and "COCO_val2014_000000000024" in ids
    for key, value in feature_arrays(scratch).items():
        np.testing.assert_array_equal(feature_arrays(merged)[key], value, err_msg=key)
    assert filecmp.cmp(merged, scratch, shallow=False)  # byte for byte

    monkeypatch.setenv("LXMERT_WORKDIR", str(work))  # unchanged inputs: nothing starts
    forget_fingerprints()
    capsys.readouterr()
    result = luigi.build([task], local_scheduler=True, log_level="WARNING", detailed_summary=True)
    assert result.status == LuigiStatusCode.SUCCESS and "[lxmert]" not in capsys.readouterr().out
    assert "* 1 complete ones were encountered:\n    - 1 ExtractFeatures(" in result.summary_text


def test_two_local_runs_without_lock_share_the_work_and_both_succeed(tmp_path):
    config = write_config(tmp_path / "cfg.cfg", "[core]\nautoload_range = false\n")
    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    photos(tmp_path / "images", range(4))
    work = tmp_path / "work"
    cmd = luigi_cmd(*extraction_args(tmp_path / "images", weights), "--no-lock")
    runs = [subprocess.Popen(cmd, cwd=REPO, env=env_for(work, config), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    built = [sig for log in logs for sig in started(log, "ExtractFeaturesShard")]
    assert len(built) == 2 and len(set(built)) == 2  # each shard built once, by one of the two runs
    assert sum(len(started(log, "ExtractFeatures")) for log in logs) == 1
    [merged] = (work / "ExtractFeatures").glob("*/features.h5")
    assert len(feature_arrays(merged)["img_id"]) == 4
    assert not list(work.glob("*/*.partial"))


def test_a_run_waits_for_the_live_holder_of_an_output_then_builds_it(tmp_path, monkeypatch):
    """Deterministic form of the race above: this test holds shard 0's lock while a run starts."""
    from pipeline.base import exclusive, workdir
    from pipeline.features import ExtractFeaturesShard

    config = write_config(tmp_path / "cfg.cfg", "[core]\nautoload_range = false\n")
    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    photos(tmp_path / "images", range(2))
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    shard = ExtractFeaturesShard(images=str(tmp_path / "images"), weights=str(weights), **SETTINGS, shard=0,
                                 shards=1)
    lock = workdir() / ".locks" / f"ExtractFeaturesShard-{shard.output_dir().name}.lock"
    with exclusive(lock, "test"):
        run = subprocess.Popen(luigi_cmd(*extraction_args(tmp_path / "images", weights, shards=1)), cwd=REPO,
                               env=env_for(tmp_path / "work", config), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        waiting = ""
        for line in run.stdout:
            waiting += line
            if "waiting for it" in line:
                break
        assert not shard.output_dir().exists()
    log = waiting + run.communicate(timeout=300)[0]
    assert run.returncode == 0, log
    assert f"is being built by pid {os.getpid()} (lock {lock}); waiting for it" in log
    assert started(log, "ExtractFeaturesShard") == [shard.output_dir().name]
    assert (shard.output_dir() / "features.h5").is_file()


def test_a_shard_killed_after_finishing_its_file_publishes_it_on_rerun(tmp_path, monkeypatch, one_thread):
    """A kill between the feature file's rename and the folder's publication: the rerun rebuilds the file
    from itself (its index) instead of refusing the existing file."""
    from extractor.extract import extract_features
    from pipeline.features import ExtractFeaturesShard

    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    photos(tmp_path / "images", range(3))
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    shard = ExtractFeaturesShard(images=str(tmp_path / "images"), weights=str(weights), **SETTINGS)
    finished = shard.partial_dir() / "features.h5"
    finished.parent.mkdir(parents=True)
    extract_features(tmp_path / "images", weights, finished, config="tiny", boxes=5, num_workers=0, progress=False)
    reference = feature_arrays(finished)
    assert luigi.build([shard], local_scheduler=True, log_level="WARNING")
    summary = json.loads((shard.output_dir() / "summary.json").read_text())
    assert (summary["extracted"], summary["reused"], summary["stored"]) == (0, 3, 3)
    for key, value in feature_arrays(shard.output_dir() / "features.h5").items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
