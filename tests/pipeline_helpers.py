"""Helpers for tests that run the Luigi pipeline in subprocesses (a tiny config, a small image folder)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
from skimage import data as skdata

REPO = Path(__file__).resolve().parent.parent

# The reduced demo chain: the tiny world, a briefly trained detector, the tiny network, one epoch each.
TINY_CFG = """
[core]
autoload_range = false
[GenerateDemoWorld]
preset = tiny
[TrainDetector]
epochs = 2
[ExtractFeatures]
boxes = 8
decode_workers = 0
[BuildPretrainCorpus]
answers = build
[BuildVQAData]
answers = build
[BuildGQAData]
answers = build
[PretrainLXMERT]
model = tiny
epochs = 1
batch_size = 16
lr = 1e-3
num_workers = 0
[FinetuneVQA]
epochs = 1
batch_size = 16
num_workers = 0
[FinetuneGQA]
epochs = 1
batch_size = 16
num_workers = 0
[FinetuneNLVR2]
epochs = 1
batch_size = 16
num_workers = 0
"""


def write_config(path: Path, text: str = TINY_CFG) -> Path:
    path.write_text(text)
    return path


def env_for(workdir: Path, config: Path) -> dict[str, str]:
    """Environment of a pipeline subprocess: its own work directory and config, few threads."""
    return {**os.environ, "LXMERT_WORKDIR": str(workdir), "LUIGI_CONFIG_PATH": str(config),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def luigi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "luigi", "--module", "pipeline.tasks", *args]


def run_luigi(workdir: Path, config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `luigi --module pipeline.tasks ARGS` from the repository root; returns the finished process."""
    return subprocess.run(luigi_cmd(*args), cwd=REPO, env=env_for(workdir, config), capture_output=True,
                          text=True, timeout=timeout)


def started(output: str, family: str) -> list[str]:
    """Signatures of the `family` tasks a run started (the pipeline prints one line per task)."""
    return re.findall(rf"\[lxmert\] {family} ([0-9a-f]+): (?:started|resuming)", output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(folder: Path, count: int = 6) -> Path:
    """Real photos from scikit-image, a few sizes, as PNG files named like COCO images."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry()]
    for i in range(count):
        rgb = photos[i % len(photos)]
        scale = 0.35 + 0.1 * (i % 3)
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"COCO_val2014_{i + 1:012d}.png"), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    return folder


def tiny_detector_weights(path: Path) -> Path:
    """Random weights of the tiny detector in the Detectron2 pickle format."""
    import torch

    from extractor.detector.config import DetectorConfig
    from extractor.detector.model import VGDetector
    from extractor.detector.weights import save_detectron2_weights

    torch.manual_seed(0)
    save_detectron2_weights(VGDetector(DetectorConfig.load("tiny")), path)
    return path


def feature_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a feature file, for comparing two runs."""
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}
