"""The Luigi DAG: it resolves, the reduced demo chain runs end to end, reruns redo only what is missing."""
import json
from contextlib import contextmanager

import luigi
import luigi.tools.deps
import numpy as np
import pytest
from pipeline_helpers import (
    feature_arrays,
    run_luigi,
    sample_images,
    started,
    tiny_detector_weights,
    write_config,
)

from pipeline import tasks as pt


def test_runall_resolves_to_the_whole_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "w"))
    found = {t.get_task_family() for t in luigi.tools.deps.find_deps(pt.RunAll(), None)}
    assert found == {"RunAll", "Report", "ValidateFeatures", "GenerateDemoWorld", "TrainDetector",
                     "ExtractFeatures", "ExtractFeaturesShard", "BuildPretrainCorpus", "BuildVQAData",
                     "BuildGQAData", "BuildNLVR2Data", "PretrainLXMERT", "FinetuneVQA", "FinetuneGQA",
                     "FinetuneNLVR2", "EvaluateVQA", "EvaluateGQA", "EvaluateNLVR2", "MeasurePointing"}
    evaluations = [t for t in luigi.tools.deps.find_deps(pt.RunAll(), "EvaluateVQA")
                   if t.get_task_family() == "EvaluateVQA"]
    assert sorted(t.init for t in evaluations) == ["pretrained", "scratch"]


@contextmanager
def config_value(section: str, key: str, value: str):
    """Set one luigi.cfg value for the duration of a with-block."""
    config = luigi.configuration.get_config()
    if not config.has_section(section):
        config.add_section(section)
    old = config.get(section, key, None)
    config.set(section, key, value)
    try:
        yield
    finally:
        if old is None:
            config.remove_option(section, key)
        else:
            config.set(section, key, old)


def test_every_output_sits_under_the_workdir_and_depends_on_upstream_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "w"))
    for task in luigi.tools.deps.find_deps(pt.RunAll(), None):
        assert str(task.output().path).startswith(str(tmp_path / "w"))
    # a new detector setting gives new folders all the way down, so old results are never reused
    before = pt.FinetuneVQA().output_dir()
    with config_value("TrainDetector", "seed", "7"):
        assert pt.FinetuneVQA().output_dir() != before
    assert pt.FinetuneVQA().output_dir() == before
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "elsewhere"))
    assert pt.FinetuneVQA().output_dir() == tmp_path / "elsewhere" / before.relative_to(tmp_path / "w")


def test_reduced_demo_chain_runs_end_to_end(demo_run):
    root, _, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [result] = (root / "work" / "RunAll").glob("*/result.json")
    report = json.loads(result.read_text())["report"]
    summary = json.loads((root / "work" / "Report" / report.split("/")[-1] / "summary.json").read_text())
    assert set(summary) == {"seconds", "detector", "vqa", "gqa", "nlvr2", "grounding"}
    assert summary["seconds"] > 0 and 0 <= summary["detector"]["map50"] <= 1
    for task in ("vqa", "gqa", "nlvr2"):
        assert set(summary[task]) == {"pretrained", "scratch", "majority"}
        assert all(0 <= summary[task][k] <= 100 for k in summary[task])
    grounding = summary["grounding"]  # matching after every pretraining epoch, pointing of both GQA models
    assert len(grounding["matching"]["per_epoch"]) >= 1 and 0 <= grounding["matching"]["last_epoch"] <= 100
    assert set(grounding["pointing"]) == {"pretrained", "scratch", "chance"}
    assert all(0 <= v <= 100 for v in grounding["pointing"].values())
    report_dir = result.parents[2] / "Report" / report.split("/")[-1]
    assert "| VQA v2 (accuracy, official) |" in (report_dir / "report.md").read_text()
    assert len(list((report_dir / "examples").glob("*.jpg"))) == 3 * 8
    [validation] = (root / "work" / "ValidateFeatures").glob("*/report.json")
    assert json.loads(validation.read_text())["problems"] == []
    # nothing is left half-written: every task folder is complete, no partial folder remains
    assert not list((root / "work").glob("*/*.partial"))
    assert all((d / "task.json").is_file() for d in (root / "work").glob("[A-Z]*/*"))


def test_finished_tasks_are_never_redone(demo_run):
    root, config, first = demo_run
    assert first.returncode == 0
    again = run_luigi(root / "work", config, "RunAll", "--local-scheduler")
    assert again.returncode == 0 and "[lxmert]" not in again.stdout + again.stderr


@pytest.fixture()
def extraction_inputs(tmp_path):
    images = sample_images(tmp_path / "images", count=6)
    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    config = write_config(tmp_path / "cfg.cfg", "[core]\nautoload_range = false\n")
    args = ["--images", str(images), "--weights", str(weights), "--config", "tiny", "--boxes", "5",
            "--decode-workers", "0", "--local-scheduler"]
    return tmp_path, config, args


def test_rerun_after_deleting_one_shard_redoes_only_that_shard(extraction_inputs):
    root, config, args = extraction_inputs
    work = root / "work"
    first = run_luigi(work, config, "ExtractFeatures", "--shards", "3", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = sorted(started(first.stdout + first.stderr, "ExtractFeaturesShard"))
    assert len(shards) == 3
    [merged] = (work / "ExtractFeatures").glob("*/features.h5")
    reference = feature_arrays(merged)
    assert len(reference["img_id"]) == 6
    # the one-shard run holds the same features: sharding changes nothing but who computes them
    single = run_luigi(root / "single", config, "ExtractFeatures", "--shards", "1", *args)
    assert single.returncode == 0
    [one] = (root / "single" / "ExtractFeatures").glob("*/features.h5")
    for key, value in feature_arrays(one).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)

    import shutil
    shutil.rmtree(merged.parent)
    shutil.rmtree(work / "ExtractFeaturesShard" / shards[1])
    rerun = run_luigi(work, config, "ExtractFeatures", "--shards", "3", *args)
    assert rerun.returncode == 0
    assert started(rerun.stdout + rerun.stderr, "ExtractFeaturesShard") == [shards[1]]
    assert started(rerun.stdout + rerun.stderr, "ExtractFeatures") != []
    for key, value in feature_arrays(merged).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
