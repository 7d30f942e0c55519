"""Two gloo processes under torchrun reach the parameters of one process on the combined batch."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.demo.feature_world import write_world
from tasks.finetune import main as finetune_main
from tasks.pretrain import PretrainConfig, run
from tasks.training.runconfig import parse_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out: Path) -> list[float]:
    """Total and matching loss of every logged step (means over both processes for DDP)."""
    with (out / "logs" / "train.csv").open(newline="") as f:
        return [float(r[k]) for r in csv.DictReader(f) for k in ("loss", "matched")]


def test_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    # equal box counts and per-example mean losses (matching, visual): the mean over two halves of
    # a batch is the mean over the batch, so DDP's averaged gradient is the single process's
    world = write_world(tmp_path / "world", n_images=8, max_boxes=6, feature_dim=16, vary_boxes=False)
    args = ["--corpus", str(world.corpus), "--features", str(world.features), "--model", "tiny",
            "--dropout", "0", "--no-mlm", "--no-qa", "--epochs", "2", "--batch-size", "8", "--lr", "2e-3",
            "--num-workers", "0", "--log-every", "1", "--ckpt-every", "0", "--no-progress",
            "--no-tensorboard", "--no-plots", "--device", "cpu"]
    single = tmp_path / "single"
    run(parse_config(PretrainConfig, [*args, "--output-dir", str(single)]))

    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.pretrain", *args, "--output-dir", str(ddp)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    state = torch.load(ddp / "checkpoints" / "step-00000008.pt", weights_only=True)
    assert state["world_size"] == 2 and state["micro_batch_size"] == 4 and len(state["rng"]) == 2
    got = load_file(ddp / "final" / "model.safetensors")
    want = load_file(single / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=2e-5, rtol=1e-4), key
    # the comparison is not trivial: the second epoch moved the weights
    halfway = torch.load(ddp / "checkpoints" / "step-00000004.pt", weights_only=True)["model"]
    moved = max(float((halfway[k] - state["model"][k]).abs().max()) for k in halfway)
    assert moved > 1e-3
    assert len(losses(ddp)) == 16 and losses(ddp) == pytest.approx(losses(single), rel=1e-4)


def test_fine_tuning_under_torchrun_matches_one_process_and_predicts_every_question(tmp_path):
    # the last cross layer's vision branch gets no gradient from a QA loss: DDP must allow that
    world = write_world(tmp_path / "world", n_images=8, max_boxes=6, feature_dim=16)
    args = ["vqa", "--train-files", str(world.vqa), "--valid-files", str(world.vqa),
            "--annotations", str(world.vqa_annotations), "--features", str(world.features), "--model", "tiny",
            "--dropout", "0", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--eval-batch-size", "3",
            "--num-workers", "0", "--no-progress", "--no-tensorboard", "--no-plots", "--device", "cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert finetune_main([*args, "--output-dir", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.finetune", *args, "--output-dir", str(ddp)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(ddp / "final" / "model.safetensors")
    want = load_file(single / "final" / "model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=2e-5, rtol=1e-4) for k in want)
    submitted = [p["question_id"] for p in json.loads((ddp / "valid_predict.json").read_text())]
    assert sorted(submitted) == sorted(q["question_id"] for q in json.loads(world.vqa.read_text()))
    assert json.loads((ddp / "metrics.json").read_text())["valid"]["predicted"] == 16
