"""A pretraining run SIGKILLed mid-way and resumed logs the same losses as one that never stopped."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.demo.feature_world import write_world
from tasks.pretrain import PretrainConfig, run
from tasks.training.runconfig import parse_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def flags(world, out: Path) -> list[str]:
    return ["--corpus", str(world.corpus), "--features", str(world.features),
            "--valid-corpus", str(world.corpus), "--valid-examples", "8", "--model", "tiny",
            "--output-dir", str(out), "--epochs", "6", "--batch-size", "8", "--lr", "2e-3",
            "--num-workers", "1", "--log-every", "1", "--ckpt-every", "3", "--keep-last", "2",
            "--no-progress", "--no-tensorboard", "--no-plots", "--device", "cpu"]


def table(path: Path, drop=("examples_per_s", "elapsed_s")) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_resume_after_sigkill_is_exact(tmp_path):
    world = write_world(tmp_path / "world", n_images=8, max_boxes=6, feature_dim=16)
    reference = tmp_path / "reference"
    run(parse_config(PretrainConfig, flags(world, reference)))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tasks.pretrain", *flags(world, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step-00000003.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(r["step"]) for r in table(out / "logs" / "train.csv"))
    assert killed_at < 24

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_at = int(done.stdout.split("at step ")[1].split(",")[0])
    assert 3 <= resumed_at <= killed_at

    assert table(out / "logs" / "train.csv") == table(reference / "logs" / "train.csv")
    assert table(out / "logs" / "eval.csv") == table(reference / "logs" / "eval.csv")
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
