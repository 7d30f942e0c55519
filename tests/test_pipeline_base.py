"""The Luigi base machinery: content-addressed outputs, atomic completion, locks, input checks."""
import os
import threading
import time
from pathlib import Path

import luigi
import pytest

from pipeline.base import InputPathError, InputPathParameter, PipelineTask, exclusive, workdir

RUNS: list[str] = []


class ToySource(PipelineTask):
    size = luigi.IntParameter(default=3)
    data = InputPathParameter(default="", kind="file", optional=True)

    def build(self, out: Path) -> None:
        RUNS.append(f"source{self.size}")
        (out / "numbers.txt").write_text(" ".join(str(i) for i in range(self.size)))


class ToySum(PipelineTask):
    size = luigi.IntParameter(default=3)
    data = InputPathParameter(default="", kind="file", optional=True)
    label = luigi.Parameter(default="x", significant=False)

    def dependencies(self):
        return ToySource(size=self.size, data=self.data)

    def build(self, out: Path) -> None:
        RUNS.append(f"sum{self.size}")
        numbers = (self.input_dirs() / "numbers.txt").read_text().split()
        (out / "sum.txt").write_text(str(sum(int(n) for n in numbers)))


@pytest.fixture()
def wd(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "w"))
    RUNS.clear()
    return tmp_path / "w"


def test_workdir_env_overrides(wd):
    assert workdir() == wd


def test_runs_once_atomically_and_reruns_nothing(wd):
    assert luigi.build([ToySum(size=4)], local_scheduler=True, log_level="WARNING")
    out = ToySum(size=4).output_dir()
    assert (out / "sum.txt").read_text() == "6"
    assert (out / "task.json").exists()
    assert out.parent.parent == wd and not out.with_name(out.name + ".partial").exists()
    assert RUNS == ["source4", "sum4"]
    assert luigi.build([ToySum(size=4)], local_scheduler=True, log_level="WARNING")
    assert RUNS == ["source4", "sum4"]


def test_new_settings_new_folder_including_upstream(wd, tmp_path):
    a, b = ToySum(size=3), ToySum(size=5)
    assert a.output_dir() != b.output_dir()
    assert ToySum(size=3, label="other").output_dir() == a.output_dir()  # insignificant parameter
    data = tmp_path / "d.txt"
    data.write_text("1")
    # the same ToySum parameters over a different upstream input give a different folder
    assert ToySum(size=3, data=str(data)).output_dir() != a.output_dir()
    assert ToySource(size=3).output_dir().parent.name == "ToySource"


def test_missing_input_stops_everything_before_work(wd, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputPathError, match=r"ToySource: parameter 'data' names file '.*nope.txt'"):
        ToySum(size=2, data=str(missing)).requires()
    result = luigi.build([ToySum(size=2, data=str(missing))], local_scheduler=True,
                         detailed_summary=True, log_level="CRITICAL")
    assert result.scheduling_succeeded is False
    assert RUNS == []
    assert not (wd / "ToySource").exists()


def test_partial_folder_is_resumed_not_published(wd):
    task = ToySource(size=2)
    partial = task.partial_dir()
    partial.mkdir(parents=True)
    (partial / "checkpoint").write_text("kept")
    task.run()
    assert (task.output_dir() / "checkpoint").read_text() == "kept"
    assert task.complete()


def test_exclusive_lock_waits_for_the_holder_naming_it(tmp_path, capsys):
    lock, held, order = tmp_path / "t.lock", threading.Event(), []

    def holder():
        with exclusive(lock, "TaskA"):
            held.set()
            time.sleep(0.5)
            order.append("holder done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with exclusive(lock, "TaskA"):  # a second open file description: flock makes it wait
        order.append("second holds")
    thread.join()
    assert order == ["holder done", "second holds"]
    assert f"TaskA is being built by pid {os.getpid()} (lock {lock}); waiting for it" in capsys.readouterr().out
