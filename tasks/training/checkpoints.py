"""What training saves: checkpoints that resume exactly (atomic files with a sha256 manifest, the
newest good one found again after a crash, the RNG states of every process) and exported models.

A checkpoint counts only once its manifest `step-XXXXXXXX.json` exists beside `step-XXXXXXXX.pt`, so a
kill mid-write leaves the previous one as the newest; a damaged newer one is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.fileio import (
    FdWriter,
    atomic_directory,
    atomic_output,
    atomic_write,
    file_sha256,
    remove_quietly,
    writing,
)
from model.checkpoint import load_torch
from tasks.training.distributed import DistEnv, broadcast_object, gather_objects

CHECKPOINT_FORMAT = 1


class CheckpointWarning(UserWarning):
    """A checkpoint on disk could not be used and an older one was taken instead."""


class _HashingWriter:
    """File wrapper hashing bytes as torch.save writes them, so saving reads nothing back."""

    def __init__(self, f: FdWriter) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()




def checkpoint_path(directory: Path, step: int) -> Path:
    """The file holding the checkpoint taken after optimiser step `step`."""
    return directory / f"step-{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int) -> Path:
    """Write `state` atomically (temp file, fsync, rename) with a manifest holding its sha256.

    A checkpoint counts only once its manifest exists, so a kill mid-write leaves the previous
    one as the newest. Older checkpoints beyond `keep_last` are removed afterwards.
    """
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    with writing(path):
        directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, tmp=path.with_suffix(".pt.tmp")) as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "file": path.name,
                "bytes": writer.size, "sha256": writer.sha.hexdigest(), "time": time.time()}
    try:
        atomic_write(path.with_suffix(".json"), json.dumps(manifest, indent=1), tmp=path.with_suffix(".json.tmp"))
    except BaseException:
        remove_quietly(path)  # a checkpoint without its manifest does not count: do not leave it behind
        raise
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [m.with_suffix(".pt") for m in directory.glob("step-*.json")]
    return sorted(found, key=lambda p: p.name)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file missing")
    size = path.stat().st_size
    if size != manifest["bytes"]:
        raise ValueError(f"{path}: {size} bytes on disk, manifest says {manifest['bytes']}")
    if file_sha256(path) != manifest["sha256"]:
        raise ValueError(f"{path}: sha256 differs from its manifest")
    state = load_torch(path)
    missing = {"model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch"} - set(state)
    if missing:
        raise ValueError(f"{path}: not a training checkpoint, missing {sorted(missing)}")
    return state


def load_latest_checkpoint(directory: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads back intact; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return _read_checkpoint(path), path
        except Exception as exc:  # any failure to read means: use the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({exc}); falling back to an older one",
                          CheckpointWarning, stacklevel=2)
    return None


def load_agreed_checkpoint(env: DistEnv, directory: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint every rank of the job resumes from: rank 0 picks the newest good one and the
    others load that file. Ranks listing a shared folder themselves may see it at different moments
    (a checkpoint still arriving over NFS) and would resume from different steps. A rank that cannot
    read rank 0's choice stops every rank with one line naming the file."""
    chosen = load_latest_checkpoint(directory) if env.is_main else None
    path = broadcast_object(env, str(chosen[1]) if chosen else None)
    error = None
    if path is not None and not env.is_main:
        try:
            chosen = _read_checkpoint(Path(path)), Path(path)
        except Exception as exc:  # any failure: the job cannot resume together
            error = f"{type(exc).__name__}: {exc}"
    failed = [(rank, e) for rank, e in enumerate(gather_objects(env, error)) if e]
    if failed:
        rank, e = failed[0]
        raise RuntimeError(f"{path}: the checkpoint rank 0 resumes from is unreadable on rank {rank} ({e})")
    return chosen


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy and torch generator states and, training on a GPU, that GPU's
    (its own device only: the job's other GPUs belong to other processes), as checkpointable data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved, so dropout continues as in an uninterrupted run; the saved GPU
    state goes to this process's device, whichever index the job's layout gives it now."""
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # checkpoints before this change held every visible GPU's state by index
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def export_model(model: nn.Module, directory: Path) -> None:
    """Save weights where other tools read them: `save_pretrained` when the model has it."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(directory))
    else:
        with atomic_output(directory / "model.pt") as f:  # through Python, so a full disk names its errno
            torch.save(model.state_dict(), f)


def export_into(export_fn: Callable[[nn.Module, Path], None], model: nn.Module, directory: Path) -> None:
    """Run export_fn into a temporary folder swapped onto `directory`, so a failed write leaves no half export."""
    with atomic_directory(directory) as tmp:
        export_fn(model, tmp)
