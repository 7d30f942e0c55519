"""The data seam: every input comes from a task's parameters or from the one sources file in use, the demo world
only when chosen (`[pipeline] sources = demo`), and luigi.cfg's values win over the profile layered under it."""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import luigi
import pytest
import yaml
from pipeline_helpers import REPO, run_luigi, write_config

from extractor.detector.config import DetectorConfig
from pipeline import tasks as pt
from pipeline.sources import known_keys
from tasks.demo import PRESETS, SOURCES, SOURCES_FILE, generate_world, world_path
from tasks.demo.detector import demo_detector_config
from tasks.demo.sources import DETECTOR_CONFIG


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("w") / "world"
    generate_world(root, seed=0, config=PRESETS["tiny"])
    return root


def _set(section: str, key: str, value: str | None) -> None:
    cfg = luigi.configuration.get_config()
    if value is not None:
        cfg.set(section, key, value)
    elif cfg.has_option(section, key):
        cfg.remove_option(section, key)


@contextmanager
def sources_setting(value: str | None) -> Iterator[None]:
    """luigi.cfg's [pipeline] sources for a with-block (None: unset), restored after it."""
    old = luigi.configuration.get_config().get("pipeline", "sources", None)
    _set("pipeline", "sources", value)
    try:
        yield
    finally:
        _set("pipeline", "sources", old)


def sources_file(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def errors_of(task: luigi.Task) -> tuple[luigi.LuigiStatusCode, str]:
    """Run `task` with the local scheduler; (status, every error message joined)."""
    found: list[str] = []

    def record(failed: luigi.Task, exc: BaseException) -> None:
        found.append(str(exc))

    for event in (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK):
        luigi.Task.event_handler(event)(record)
    try:
        result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="CRITICAL")
    finally:
        for event in (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK):
            luigi.Task.remove_event_handler(event, record)
    return result.status, "\n".join(found)


def user_layout(world: Path, root: Path) -> Path:
    """The world's GQA and NLVR2 files copied into a user's own layout, named by a sources file there."""
    for rel, name in ((("gqa", "questions", "train"), "gqa/train.json"), (("gqa", "questions", "val"), "gqa/val.json"),
                      (("gqa", "choices", "val"), "gqa/choices.json"), (("nlvr2", "data", "train"), "nlvr2/a.jsonl"),
                      (("nlvr2", "data", "dev"), "nlvr2/b.jsonl"), (("vocab",), "vocab.txt")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(world_path(world, *rel), root / name)
    return sources_file(root / "sources.yaml", {
        "gqa": {"train_questions": ["gqa/train.json"], "valid_questions": "gqa/val.json",
                "valid_choices": str(root / "gqa/choices.json")},  # absolute paths work too
        "nlvr2": {"train_statements": "nlvr2/a.jsonl", "valid_statements": "nlvr2/b.jsonl"}, "vocab": "vocab.txt"})


# ------------------------------------------------------------------ the demo world is one source among others

def test_demo_sources_file_names_existing_world_files_and_the_demo_detector(world):
    written = yaml.safe_load((world / SOURCES_FILE).read_text())
    assert written == SOURCES
    keys = set(known_keys())

    def leaves(tree, prefix=""):
        for name, value in tree.items():
            yield from leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [(prefix + name, value)]

    found = dict(leaves(written))
    assert set(found) <= keys and "detector.weights" not in found  # the demo trains its detector
    for value in found.values():
        assert all((world / v).exists() for v in (value if isinstance(value, list) else [value]))
    # the detector the demo trains, from its portable YAML (labels relative to it), is the demo preset
    text = (world / DETECTOR_CONFIG).read_text()
    assert "OBJECTS: objects_vocab.txt" in text and str(world) not in text
    assert DetectorConfig.load(world / DETECTOR_CONFIG) == demo_detector_config(
        world / "labels/objects_vocab.txt", world / "labels/attributes_vocab.txt", 128)


def test_a_user_sources_file_feeds_the_data_tasks_like_parameters_do(world, wd, tmp_path):
    sources = user_layout(world, tmp_path / "mydata")
    with sources_setting(str(sources)):
        assert luigi.build([pt.BuildNLVR2Data(), pt.BuildGQAData()], local_scheduler=True, log_level="WARNING")
        nlvr2, gqa = pt.BuildNLVR2Data().output_dir(), pt.BuildGQAData().output_dir()
        fingerprints = json.loads((nlvr2 / "task.json").read_text())["fingerprints"]
        assert [f["path"] for f in fingerprints["train_statements"]] == [str(tmp_path / "mydata/nlvr2/a.jsonl")]
    explicit = pt.BuildNLVR2Data(train_statements=str(tmp_path / "mydata/nlvr2/a.jsonl"),
                                 valid_statements=str(tmp_path / "mydata/nlvr2/b.jsonl"))
    assert luigi.build([explicit], local_scheduler=True, log_level="WARNING")
    for name in ("train.json", "valid.json"):
        assert (nlvr2 / name).read_bytes() == (explicit.output_dir() / name).read_bytes()
    # the texts' vocabulary travels with them; files given as parameters keep none unless given one
    assert (nlvr2 / "vocab.txt").read_bytes() == (tmp_path / "mydata/vocab.txt").read_bytes()
    assert not (explicit.output_dir() / "vocab.txt").exists()
    # the folders are self-contained: the official scorer's files are copies inside them
    assert json.loads((nlvr2 / "official.json").read_text()) == {"data": "valid_statements.jsonl"}
    assert (nlvr2 / "valid_statements.jsonl").read_bytes() == (tmp_path / "mydata/nlvr2/b.jsonl").read_bytes()
    assert json.loads((gqa / "official.json").read_text()) == {"questions": "valid_questions.json",
                                                               "choices": "valid_choices.json"}
    assert (gqa / "valid_choices.json").read_bytes() == (tmp_path / "mydata/gqa/choices.json").read_bytes()
    assert pt.BuildGQAData.official(gqa)["questions"] == gqa / "valid_questions.json"


def test_a_changed_file_named_by_the_sources_gives_a_new_folder(world, wd, tmp_path):
    sources = user_layout(world, tmp_path / "mydata")
    with sources_setting(str(sources)):
        before = pt.BuildNLVR2Data().output_dir()
        statements = tmp_path / "mydata/nlvr2/a.jsonl"
        statements.write_text("".join(statements.read_text().splitlines(keepends=True)[:-1]))
        from pipeline.fingerprint import forget_fingerprints
        forget_fingerprints()
        assert pt.BuildNLVR2Data().output_dir() != before


# ------------------------------------------------------------------ with real data, a missing input is an error

@pytest.mark.parametrize("tree, fragment", [
    ({"nlvr2": {"train_statements": "a.jsonl"}},
     "BuildNLVR2Data: sources key 'nlvr2.valid_statements' (parameter 'valid_statements') is missing in {file}"),
    ({"nlvr2": {"train_statements": "a.jsonl", "valid": "b.jsonl"}},
     "BuildNLVR2Data: {file}: unknown key 'nlvr2.valid'; did you mean 'nlvr2.valid_statements'?"),
    ({"nlvr2": {"train_statements": "a.jsonl", "valid_statements": "nope.jsonl"}},
     "BuildNLVR2Data: sources key 'nlvr2.valid_statements' (parameter 'valid_statements') names file "
     "'{dir}/nope.jsonl', which does not exist"),
    ({"nlvr2": {"train_statements": ["a.jsonl"], "valid_statements": "b.jsonl"}},
     "BuildNLVR2Data: {file}: key 'nlvr2.train_statements' must be one path, got ['a.jsonl']"),
])
def test_a_missing_or_misnamed_input_is_one_line_naming_the_key_before_any_work(tree, fragment, world, wd, tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        shutil.copyfile(world_path(world, "nlvr2", "data", "dev"), tmp_path / name)
    sources = sources_file(tmp_path / "sources.yaml", tree)
    with sources_setting(str(sources)):
        status, errors = errors_of(pt.BuildNLVR2Data())
    assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED and not wd.exists()
    assert "  " + fragment.format(file=sources, dir=tmp_path) in errors.split("\n")  # one line


def test_extraction_without_detector_weights_in_the_sources_is_an_error(world, wd, tmp_path):
    sources = sources_file(tmp_path / "sources.yaml", {"images": str(world / "coco")})
    with sources_setting(str(sources)):
        status, errors = errors_of(pt.ExtractFeatures())
    assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED and not wd.exists()
    assert (f"ExtractFeatures / ExtractFeaturesShard: sources key 'detector.weights' (parameter 'weights') is "
            f"missing in {sources}") in errors


def test_sources_not_set_is_an_error_not_the_demo(wd):
    with sources_setting(None):
        status, errors = errors_of(pt.BuildVQAData())
    assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED and not wd.exists()
    assert "BuildVQAData: luigi.cfg: [pipeline] sources is not set: set it to your sources file" in errors


@pytest.mark.parametrize("task, fragment", [
    (lambda t: pt.ExtractFeatures(images=str(t)),
     "parameter 'weights' is required when images given (a task takes its input paths all from its parameters, "
     "--ExtractFeatures-weights, or all from the sources file)"),
    (lambda t: pt.TrainDetector(images=str(t)), "TrainDetector: parameter 'objects' is required when images given"),
    (lambda t: pt.BuildNLVR2Data(train=str(t / "a.jsonl")), "parameter 'valid_statements' is required"),
])
def test_inputs_given_in_part_are_not_completed_from_the_demo(task, fragment, world, wd, tmp_path):
    shutil.copyfile(world_path(world, "nlvr2", "data", "dev"), tmp_path / "a.jsonl")
    with sources_setting("demo"):
        status, errors = errors_of(task(tmp_path))
    assert status == luigi.LuigiStatusCode.SCHEDULING_FAILED and not wd.exists()
    assert fragment in errors


def test_no_task_outside_the_seam_asks_about_the_demo():
    """Only pipeline/sources.py knows that `demo` names the world GenerateDemoWorld writes."""
    for path in sorted((REPO / "pipeline").glob("*.py")):
        text = path.read_text()
        assert "uses_demo" not in text and "world_vocab" not in text, path
        if path.name not in ("sources.py", "tasks.py"):
            assert "GenerateDemoWorld" not in text and "tasks.demo" not in text, path


def test_an_extraction_finished_before_it_recorded_its_inputs_still_reports_them(tmp_path):
    """Given images and weights keep an extraction's folder across versions; the report still finds its images."""
    (tmp_path / "summary.json").write_text(json.dumps({"images": 6, "failed": 0, "shards": []}))
    (tmp_path / "task.json").write_text(json.dumps({"params": {"images": "/data/img", "weights": "/m/w.pkl",
                                                               "config": ""}}))
    assert pt.ExtractFeatures.inputs(tmp_path) == {"images": "/data/img", "weights": "/m/w.pkl",
                                                   "config": "VG-R101-C4", "detector": None}


# ------------------------------------------------------------------ old parameter names keep working

def test_old_data_parameter_names_are_aliases(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    new = pt.BuildNLVR2Data(train_statements=a, valid_statements=b)
    assert pt.BuildNLVR2Data(train=a, valid=b).task_id == new.task_id
    assert pt.BuildVQAData(val_questions=a).valid_questions == a
    assert pt.TrainDetector(val_ids=a).valid_ids == a
    both = pt.BuildNLVR2Data(train=a, train_statements=b, valid_statements=b)
    assert ("BuildNLVR2Data: parameters 'train' (the old name) and 'train_statements' are both given, with "
            "different values; give one") in both.input_problems()


# ------------------------------------------------------------------ the profile sits under luigi.cfg

def _values(cwd: Path, env: dict[str, str]) -> dict:
    code = ("import json; from pipeline import tasks as pt, settings; p = pt.PretrainLXMERT(); "
            "print(json.dumps({'epochs': p.epochs, 'lr': p.lr, 'model': p.model, 'boxes': pt.ExtractFeatures().boxes,"
            " 'problems': settings.problems()}))")
    env = {**{k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}, "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_luigi_cfg_values_win_over_the_profile_option_by_option(tmp_path):
    local = write_config(tmp_path / "luigi.cfg", "[pipeline]\nprofile = demo\n[PretrainLXMERT]\nepochs = 3\n")
    assert _values(tmp_path, {}) == {"epochs": 3, "lr": 1e-3, "model": "demo", "boxes": 10, "problems": []}
    # LUIGI_CONFIG_PATH is read beside ./luigi.cfg, after it: its values win, the others stay
    other = write_config(tmp_path / "other.cfg", "[PretrainLXMERT]\nlr = 0.5\n[ExtractFeatures]\nboxes = 36\n")
    assert _values(tmp_path, {"LUIGI_CONFIG_PATH": str(other)}) == {
        "epochs": 3, "lr": 0.5, "model": "demo", "boxes": 36, "problems": []}
    # no profile: the tasks' own defaults (the paper's recipe) under luigi.cfg
    local.write_text("[pipeline]\nprofile =\n[PretrainLXMERT]\nepochs = 3\n")
    assert _values(tmp_path, {}) == {"epochs": 3, "lr": 1e-4, "model": "base", "boxes": 36, "problems": []}
    local.write_text("[pipeline]\nprofile = demoo\n")
    assert _values(tmp_path, {})["problems"] == [
        "luigi.cfg: [pipeline] profile = 'demoo' is neither a profile (demo, or empty for none) nor a .cfg file"]


def test_the_shipped_luigi_cfg_holds_no_task_settings():
    """Task settings live in the profile, so a section a user appends to luigi.cfg is never a duplicate."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "luigi.cfg")
    assert parser.sections() == ["core", "retcode", "pipeline"]
    assert dict(parser["pipeline"]) == {"workdir": "work", "sources": "demo", "profile": "demo"}


def test_a_run_says_where_its_data_come_from_and_what_it_read_upstream(tmp_path):
    cfg = write_config(tmp_path / "tiny.cfg", "[GenerateDemoWorld]\npreset = tiny\n")
    proc = run_luigi(tmp_path / "work", cfg, "BuildNLVR2Data", "--local-scheduler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "[lxmert] data from [pipeline] sources = demo; settings from profile demo (" in out
    world = pt.GenerateDemoWorld(preset="tiny").signature()
    assert f": upstream GenerateDemoWorld {world} (preset=tiny)" in out
