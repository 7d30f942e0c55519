"""Progress of long jobs: the throttled figures (extractor.progress), what reaches luigid and the terminal
from a Luigi task run, the training loop's and the detector's reports, and a launched command's lines."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import luigi
import luigi.scheduler
import pytest
import torch
from pipeline_helpers import sample_images, tiny_detector_weights
from test_detector_train import _config, _write_world
from test_loop import Toy, collate, config, step

from extractor import progress
from extractor.detector.train import train_detector
from extractor.progress import LINE_PREFIX, Progress, ProgressReporter, duration
from pipeline import progress as pipeline_progress
from pipeline.features import ExtractFeatures
from pipeline.progress import TaskProgress, stream_child
from tasks.training.loop import train


class FakeClock:
    """Each read moves time on by `tick` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_reporter_reports_at_most_every_few_seconds_and_always_at_the_end(monkeypatch):
    clock = FakeClock(2.0)
    monkeypatch.setattr(progress, "clock", clock)
    seen: list[Progress] = []
    reporter = ProgressReporter(seen.append, "pretrain", total=10, unit="step", examples_per_unit=32, every=5.0)
    for done in range(1, 11):
        reporter.update(done, loss=1.0 / done)
    # clock reads at 2 s steps: the first update reports, then every third one (6 s >= 5 s), and the last
    assert [p.done for p in seen] == [1, 4, 7, 10]
    last = seen[-1]
    assert last.elapsed_s == pytest.approx(20.0) and last.fraction == 1.0 and last.eta_s == 0.0
    assert last.rate == pytest.approx(10 * 32 / 20.0) and last.loss == pytest.approx(0.1)
    assert seen[1].eta_s == pytest.approx(6 * 8.0 / 4)  # 8 s for 4 steps, 6 left
    assert seen[1].message() == "pretrain step 4/10 (40.0%), loss 0.2500, 16.0 ex/s, 12 s left"
    assert Progress.from_json(last.to_json()) == last
    assert [duration(s) for s in (44.6, 125, 11220)] == ["45 s", "2 min 05 s", "3 h 07 min"]


def test_a_resumed_job_counts_its_pace_from_where_it_started(monkeypatch):
    monkeypatch.setattr(progress, "clock", FakeClock(10.0))
    seen: list[Progress] = []
    reporter = ProgressReporter(seen.append, "extract", total=100, unit="img", start=90)
    reporter.update(90)
    reporter.update(95)
    assert seen[0].rate is None and seen[0].eta_s is None  # nothing done in this process yet
    assert seen[1].rate == pytest.approx(5 / 20.0) and seen[1].eta_s == pytest.approx(5 * 4.0)
    assert seen[1].message() == "extract img 95/100 (95.0%), 0.2 img/s, 20 s left"


@pytest.fixture
def scheduler_calls(monkeypatch) -> list[tuple[str, str, Any]]:
    """What the workers tell the scheduler (luigid's task list shows it): (what, task id, value)."""
    calls: list[tuple[str, str, Any]] = []
    originals = {name: getattr(luigi.scheduler.Scheduler, name)
                 for name in ("set_task_status_message", "set_task_progress_percentage")}

    def recorder(name):
        def record(self, task_id, value):
            calls.append((name, task_id, value))
            return originals[name](self, task_id, value)
        return record

    for name in originals:
        monkeypatch.setattr(luigi.scheduler.Scheduler, name, recorder(name))
    return calls


def test_extraction_task_reports_to_luigid_and_prints_lines(tmp_path, monkeypatch, capsys, scheduler_calls):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setattr(progress, "clock", FakeClock(6.0))
    task = ExtractFeatures(images=str(sample_images(tmp_path / "images", count=6)),
                           weights=str(tiny_detector_weights(tmp_path / "tiny.pkl")), config="tiny", boxes=5,
                           decode_workers=0, shards=1)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    [shard] = [t for t in luigi.task.flatten(task.requires())]
    messages = [v for what, tid, v in scheduler_calls if what == "set_task_status_message" and tid == shard.task_id]
    percents = [v for what, tid, v in scheduler_calls
                if what == "set_task_progress_percentage" and tid == shard.task_id]
    assert messages[0].startswith("extract img 1/6 (16.7%)") and messages[-1].startswith("extract img 6/6 (100.0%)")
    assert len(messages) == 6 and percents == [16.7, 33.3, 50.0, 66.7, 83.3, 100.0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ": extract img" in ln]
    label = f"[lxmert] ExtractFeaturesShard {shard.output_dir().name}: "
    # two clock reads per image (the job's reporter, the task's printer): 12 s apart, so every image is
    # reported to luigid and every other one printed (20 s apart at least), and the last
    assert [ln.split(" (")[0] for ln in lines] == [label + f"extract img {n}/6" for n in (1, 3, 5, 6)]
    assert "img/s" in lines[-1] and "left" in lines[-1]


def test_training_loop_reports_steps_and_the_logged_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "clock", FakeClock(6.0))
    seen: list[Progress] = []
    torch.manual_seed(0)
    result = train(torch.nn.Linear(4, 1), Toy(), config(tmp_path, log_every=2), collate_fn=collate, step_fn=step,
                   loss_names=["abs"], on_progress=seen.append)
    assert [p.done for p in seen] == list(range(1, 9)) and all(p.total == 8 and p.unit == "step" for p in seen)
    assert seen[0].loss is None  # no row logged yet: the loop reads no loss off the device between rows
    assert seen[1].loss == pytest.approx(seen[2].loss) and seen[-1].loss == pytest.approx(result.last_losses["loss"])
    assert seen[-1].rate == pytest.approx(8 * 8 / (6.0 * 8))


def test_detector_training_reports_steps_and_loss(tmp_path, monkeypatch):
    _write_world(tmp_path, n=6)
    monkeypatch.setattr(progress, "clock", FakeClock(6.0))
    seen: list[Progress] = []
    train_detector(_config(tmp_path), images=tmp_path / "images", objects=tmp_path / "objects.json",
                   output=tmp_path / "w.pkl", steps=3, batch_size=2, val_fraction=0.0, progress=False,
                   on_progress=seen.append)
    assert [(p.stage, p.done, p.total) for p in seen] == [("detector", n, 3) for n in (1, 2, 3)]
    assert all(p.loss is not None and p.loss > 0 for p in seen)


def test_a_launched_command_hands_its_progress_lines_to_the_task(capsys):
    sent = Progress("train", 3, 10, "step", 12.0, 40.0, 0.5, 4.0)
    child = f"print('hello'); print({LINE_PREFIX + sent.to_json()!r}); print('bye')"
    seen: list[Progress] = []
    stream_child([sys.executable, "-c", child], {}, seen.append)
    assert seen == [sent] and capsys.readouterr().out == "hello\nbye\n"
    with pytest.raises(subprocess.CalledProcessError):
        stream_child([sys.executable, "-c", "import sys; sys.exit(3)"], {}, seen.append)


def test_every_long_task_of_runall_prints_its_progress(demo_run):
    _, _, proc = demo_run
    assert proc.returncode == 0
    for family, what in (("TrainDetector", "detector step"), ("ExtractFeaturesShard", "extract img"),
                         ("PretrainLXMERT", "train step"), ("FinetuneVQA", "train step"),
                         ("FinetuneGQA", "train step"), ("FinetuneNLVR2", "train step")):
        lines = re.findall(rf"\[lxmert\] {family} [0-9a-f]+: {what} (\d+)/(\d+) \(100\.0%\)", proc.stdout)
        assert lines and all(done == total for done, total in lines), family  # each run reports its last unit


def test_a_task_run_outside_a_luigi_worker_still_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    task = ExtractFeatures(images=str(tmp_path), weights=str(tmp_path / "w.pkl"), config="tiny", boxes=5, shards=1)
    assert task.set_status_message is None  # Luigi sets it only in a worker
    TaskProgress(task)(Progress("extract", 1, 2, "img", 1.0))
    assert capsys.readouterr().out == f"[lxmert] ExtractFeatures {task.output_dir().name}: extract img 1/2 (50.0%)\n"


def test_a_silent_job_still_gets_a_line_every_few_seconds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setattr(pipeline_progress, "SILENT_AFTER", 0.2)
    task = ExtractFeatures(images=str(tmp_path), weights=str(tmp_path / "w.pkl"), config="tiny", boxes=5, shards=1)
    label = f"[lxmert] ExtractFeatures {task.output_dir().name}: "
    with TaskProgress(task) as report:
        time.sleep(0.5)  # a job starting up: nothing reported yet
        starting = capsys.readouterr().out.splitlines()
        report(Progress("train", 3, 10, "step", 1.0, loss=2.5))
        time.sleep(0.5)  # a long step, or an evaluation
        silent = capsys.readouterr().out.splitlines()
    time.sleep(0.3)
    assert starting and all(re.fullmatch(re.escape(label) + r"running, no figures yet \(\d s in\)", ln)
                            for ln in starting)
    assert silent[0] == label + "train step 3/10 (30.0%), loss 2.5000" and len(silent) >= 2
    assert all(ln == label + "train step 3/10 (30.0%), loss 2.5000 (reported 0 s ago, still running)"
               for ln in silent[1:])
    assert capsys.readouterr().out == ""  # the watcher stops with the job
