"""A `PretrainLXMERT` luigi run SIGKILLed mid-training: the rerun resumes from the newest checkpoint in the
task's `.partial` folder and logs exactly the losses of a run that never stopped; a corrupt newest
checkpoint is skipped with a warning and the previous one is used."""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import REPO, env_for, luigi_cmd, write_config
from safetensors.torch import load_file

from tasks.demo.feature_world import write_world

# train.csv gets a row every 10 steps (TrainConfig's default); a row averages the losses since the previous
# one. Checkpoints every 7 steps (and at the ends of the 10-step epochs) fall inside open logging windows,
# so the rows after a resume match only because the checkpoint carries the window's sums.
LOG_EVERY = 10
STEPS = 60
# lock_pid_dir: the reference and the killed run start at once with the same command line, and Luigi's
# process lock (keyed on the command line, /tmp/luigi by default) would make the second exit 0 unrun.
CONFIG = """
[core]
autoload_range = false
lock_pid_dir = {locks}
[PretrainLXMERT]
features = ["{world}/features.h5"]
corpus = ["{world}/corpus.json"]
valid_corpus = ["{world}/corpus.json"]
valid_examples = 8
model = tiny
epochs = 6
batch_size = 4
lr = 2e-3
ckpt_every = 7
num_workers = 0
device = cpu
"""
COMMAND = luigi_cmd("PretrainLXMERT", "--local-scheduler")
TIMING = ("examples_per_s", "elapsed_s")


def table(path: Path) -> list[dict[str, str]]:
    """A log CSV without its timing columns."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def task_dir(work: Path, suffix: str = "") -> list[Path]:
    return list((work / "PretrainLXMERT").glob(f"*{suffix}"))


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints (those with a manifest), oldest first."""
    return sorted(int(m.stem.split("-")[1]) for m in (folder / "checkpoints").glob("step-*.json"))


def rerun(root: Path, name: str) -> str:
    """Run the task again in workdir `root/name` with its config; the combined output."""
    done = subprocess.run(COMMAND, cwd=REPO, env=env_for(root / name, root / f"{name}.cfg"), capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def resumed_step(output: str) -> tuple[str, int]:
    """The checkpoint file and step the loop says it resumed from."""
    [(path, step)] = re.findall(r"resuming from (\S+) at step (\d+),", output)
    return Path(path).name, int(step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny synthetic world; the uninterrupted reference run and, at the same time, a run SIGKILLed once
    it has two checkpoints (its `.partial` folder copied aside for the corrupt-checkpoint test)."""
    root = tmp_path_factory.mktemp("pretrain_kill")
    world = write_world(root / "world", n_images=10, max_boxes=6, feature_dim=16)
    for name in ("reference", "killed", "corrupt"):
        write_config(root / f"{name}.cfg", CONFIG.format(world=world.features.parent, locks=root / f"{name}-locks"))
    logs = {name: root / f"{name}.log" for name in ("reference", "killed")}
    procs = {}
    for name, log in logs.items():
        with log.open("w") as f:
            procs[name] = subprocess.Popen(COMMAND, cwd=REPO, env=env_for(root / name, root / f"{name}.cfg"),
                                           stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    killed = procs["killed"]
    try:
        deadline = time.monotonic() + 180
        while killed.poll() is None and time.monotonic() < deadline:
            folders = task_dir(root / "killed")
            assert all(p.name.endswith(".partial") for p in folders), folders  # never a final folder mid-run
            if any((p / "checkpoints" / "step-00000014.json").exists() for p in folders):
                break
            time.sleep(0.01)
        assert killed.poll() is None, "ended before its second checkpoint:\n" + logs["killed"].read_text()[-3000:]
        os.killpg(killed.pid, signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        assert procs["reference"].wait(timeout=300) == 0, logs["reference"].read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    [partial] = task_dir(root / "killed", ".partial")
    snapshot = root / "corrupt" / "PretrainLXMERT" / partial.name
    shutil.copytree(partial, snapshot)
    return root, partial


def test_sigkill_then_rerun_resumes_and_logs_the_uninterrupted_losses(runs):
    root, partial = runs
    [reference] = task_dir(root / "reference")
    assert len(table(reference / "logs" / "train.csv")) == STEPS // LOG_EVERY
    # the kill left only the partial folder: nothing at the final output path
    assert task_dir(root / "killed") == [partial]
    assert not partial.with_name(partial.name.removesuffix(".partial")).exists()
    assert not (partial / "task.json").exists() and not (partial / "final").exists()
    newest = checkpoint_steps(partial)[-1]
    assert 14 <= newest < STEPS

    output = rerun(root, "killed")
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert task_dir(root / "killed") == [final] and final.name == reference.name
    assert f"[lxmert] PretrainLXMERT {final.name}: resuming" in output
    assert resumed_step(output) == (f"step-{newest:08d}.pt", newest)
    assert (final / "task.json").is_file() and (final / "metrics.json").is_file()

    got, want = table(final / "logs" / "train.csv"), table(reference / "logs" / "train.csv")
    assert [int(r["step"]) for r in got] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [r for r in got if int(r["step"]) > newest] == [r for r in want if int(r["step"]) > newest]
    assert got == want
    assert table(final / "logs" / "eval.csv") == table(reference / "logs" / "eval.csv")
    got_w, want_w = (load_file(d / "final" / "model.safetensors") for d in (final, reference))
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(runs):
    root, _ = runs
    [reference] = task_dir(root / "reference")
    [snapshot] = task_dir(root / "corrupt", ".partial")
    *_, previous, newest = checkpoint_steps(snapshot)
    damaged = snapshot / "checkpoints" / f"step-{newest:08d}.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated, its manifest intact

    output = rerun(root, "corrupt")
    assert re.search(rf"CheckpointWarning: checkpoint \S+{damaged.name} is unreadable .*falling back", output)
    assert resumed_step(output) == (f"step-{previous:08d}.pt", previous)
    [final] = task_dir(root / "corrupt")
    assert final.name == reference.name and (final / "task.json").is_file()
    assert table(final / "logs" / "train.csv") == table(reference / "logs" / "train.csv")
