"""The one training loop shared by pretraining and fine-tuning.

Tasks hand it a model, a dataset, a collate function and a `step_fn` that turns a batch into a
loss; the loop owns everything else: DistributedDataParallel under torchrun (NCCL on GPU, gloo
on CPU), AMP, gradient accumulation and clipping, the warm-up/decay schedule, checkpoints that
resume exactly, non-finite loss detection, and the logs (tqdm, CSV, TensorBoard, PNG plots).

Reproducible data: datasets draw their randomness from the (seed, epoch, index) of each example
(`set_epoch` is called before every epoch), so the batches do not depend on worker scheduling
and a resumed run only needs the epoch and the number of batches already consumed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from extractor.fileio import (
    FdWriter,
    append_text,
    atomic_directory,
    atomic_output,
    atomic_write,
    file_sha256,
    remove_quietly,
    writing,
)
from model.checkpoint import load_torch
from tasks.training.optim import OPTIMIZERS, build_optimizer, warmup_linear_schedule

CHECKPOINT_FORMAT = 1
AMP_MODES = ("none", "bf16", "fp16")
# settings a resumed run may change without a warning (they do not alter what is computed)
_RESUMABLE_CHANGES = {"num_workers", "log_every", "ckpt_every", "keep_last", "resume", "progress",
                      "tensorboard", "plots"}


@dataclass
class TrainConfig:
    """How to train: shared by `python -m tasks.pretrain` and `python -m tasks.finetune`."""

    output_dir: str = "runs/train"
    epochs: int = 1
    max_steps: int = 0                 # > 0: stop after this many optimiser steps; the schedule spans them
    batch_size: int = 256              # examples per optimiser step, summed over processes and accumulation
    grad_accum: int = 1                # micro-batches per optimiser step
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    optimizer: str = "bertadam"        # bertadam (the original) | adamw
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    param_clip: float = 1.0            # bertadam only: per-tensor gradient norm clip inside the step; 0 = off
    clip_grad_norm: float = 1.0        # global gradient norm clip; 0 = off
    amp: str = "none"                  # none | bf16 | fp16 (fp16 uses a GradScaler; CUDA only)
    device: str = "auto"               # auto | cpu | cuda
    seed: int = 9595
    num_workers: int = 2
    log_every: int = 10                # optimiser steps between CSV / TensorBoard rows
    ckpt_every: int = 1000             # steps between checkpoints (epoch ends always); 0 = ends only
    keep_last: int = 3                 # checkpoints kept on disk
    resume: bool = True                # continue from the newest good checkpoint in output_dir
    progress: bool = True              # tqdm bar on rank 0
    tensorboard: bool = True
    plots: bool = True

    def validate(self) -> None:
        """Reject settings that would fail later, naming the parameter."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: unknown {self.optimizer!r}, expected one of {OPTIMIZERS}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: unknown {self.amp!r}, expected one of {AMP_MODES}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.ckpt_every < 0 or self.num_workers < 0:
            raise ValueError("max_steps, ckpt_every, num_workers: must be >= 0")


@dataclass
class StepOutput:
    """What a task's step function returns: the loss to minimise and its named parts for the logs."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """Where the loop is, for objectives that switch on at a given epoch."""

    epoch: int
    step: int


StepFn = Callable[[nn.Module, dict[str, Any], StepContext], StepOutput]


@dataclass
class TrainResult:
    """Summary of a finished run (complete on rank 0)."""

    step: int
    epoch: int
    last_losses: dict[str, float]
    evals: list[dict[str, float]]
    best: dict[str, float] | None
    output_dir: Path


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf: the run stops; the newest checkpoint on disk is the last good one."""

    def __init__(self, step: int, epoch: int, batch_ids: list[str], parts: dict[str, float]) -> None:
        self.step, self.epoch, self.batch_ids, self.parts = step, epoch, batch_ids, parts
        shown = ", ".join(batch_ids[:20]) + (" ..." if len(batch_ids) > 20 else "")
        super().__init__(f"non-finite loss at optimiser step {step + 1} (epoch {epoch}); "
                         f"loss parts {parts}; batch ids: {shown}")


class CheckpointWarning(UserWarning):
    """A checkpoint on disk could not be used and an older one was taken instead."""


# ----------------------------------------------------------------------------- distribution

@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; a CUDA request without a GPU is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device: unknown {name!r}, expected auto, cpu or cuda")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment (NCCL on GPU, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group so torchrun sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- checkpoints

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


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data

class _SkipSampler(Sampler[int]):
    """The base sampler's order minus its first `skip` indices: the rest of a resumed epoch."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)  # type: ignore[arg-type]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts / lists / tuples to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A generator for a DataLoader's worker seeds, fixed by (seed, epoch, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + rank) % 2**63)


# ----------------------------------------------------------------------------- logs

class _Logs:
    """Rank 0's CSV of every logged step, TensorBoard events and, at the end, PNG plots."""

    def __init__(self, root: Path, columns: list[str], resume_step: int | None, tensorboard: bool) -> None:
        self.dir = root / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train_csv = self.dir / "train.csv"
        self.eval_csv = self.dir / "eval.csv"
        self.columns = ["step", "epoch", "lr", *columns, "examples_per_s", "grad_norm", "elapsed_s"]
        for path in (self.train_csv, self.eval_csv):
            self._truncate(path, resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step + 1 if resume_step is not None else None
            with writing(self.dir / "tb"):
                self.tb = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=purge)

    @staticmethod
    def _truncate(path: Path, resume_step: int | None) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if not path.exists():
            return
        if resume_step is None:
            path.unlink()
            return
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= resume_step] if rows else []
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write(path, text.getvalue())

    @staticmethod
    def _append(path: Path, columns: list[str], row: dict[str, Any]) -> None:
        """Add a row (and the header to a new file) in one write, all or nothing, so no half row is left."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        if not path.exists():
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})
        append_text(path, text.getvalue())

    def train_row(self, row: dict[str, Any]) -> None:
        self._append(self.train_csv, self.columns, row)
        if self.tb is not None:
            with writing(self.dir / "tb"):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value != "" and value is not None:
                        self.tb.add_scalar(f"train/{key}", value, row["step"])

    def eval_row(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        columns = ["step", "epoch", *sorted(metrics)]
        if self.eval_csv.exists():
            with self.eval_csv.open(newline="") as f:
                columns = next(csv.reader(f))
        self._append(self.eval_csv, columns, {"step": step, "epoch": epoch, **metrics})
        if self.tb is not None:
            with writing(self.dir / "tb"):
                for key, value in metrics.items():
                    self.tb.add_scalar(f"eval/{key}", value, step)

    def close(self, plot_columns: Sequence[str] | None) -> None:
        if self.tb is not None:
            with writing(self.dir / "tb"):
                self.tb.close()
        if plot_columns:
            plot_curves(self.train_csv, self.dir.parent / "plots", plot_columns)


def plot_curves(csv_path: Path, out_dir: Path, columns: Sequence[str]) -> list[Path]:
    """One PNG per loss column of a training CSV (step on x), for a glance without TensorBoard."""
    from matplotlib.figure import Figure

    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for column in columns:
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
        if not points:
            continue
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(column)
        ax.set_title(f"training {column}")
        ax.grid(True, alpha=0.3)
        path = out_dir / f"{column}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write(path, png.getvalue())
        written.append(path)
    return written


# ----------------------------------------------------------------------------- the loop

class _Objective(nn.Module):
    """The model with its step function: what DistributedDataParallel wraps.

    DDP waits for a gradient of every parameter reachable from its module's outputs; returning
    only the loss (and detached parts) keeps unused model outputs, such as word logits of a
    batch without masked words, from stalling the gradient reduction.
    """

    def __init__(self, model: nn.Module, step_fn: StepFn) -> None:
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
        out = self.step_fn(self.model, batch, ctx)
        return StepOutput(out.loss, {k: v.detach() for k, v in out.parts.items()})


def autocast(amp: str, device: torch.device) -> torch.autocast:
    """The autocast context of an AMP mode (`none` gives a disabled one)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def export_model(model: nn.Module, directory: Path) -> None:
    """Save weights where other tools read them: `save_pretrained` when the model has it."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(directory))
    else:
        with atomic_output(directory / "model.pt") as f:  # through Python, so a full disk names its errno
            torch.save(model.state_dict(), f)


def _export(export_fn: Callable[[nn.Module, Path], None], model: nn.Module, directory: Path) -> None:
    """Run export_fn into a temporary folder swapped onto `directory`, so a failed write leaves no half export."""
    with atomic_directory(directory) as tmp:
        export_fn(model, tmp)


def train(model: nn.Module, train_set: Dataset, cfg: TrainConfig, *,
          collate_fn: Callable[[list[Any]], dict[str, Any]],
          step_fn: StepFn,
          loss_names: Sequence[str] = (),
          eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
          best_metric: tuple[str, str] | None = None,
          export_fn: Callable[[nn.Module, Path], None] = export_model,
          find_unused_parameters: bool = True,
          extra: dict[str, Any] | None = None,
          env: DistEnv | None = None) -> TrainResult:
    """Train `model` on `train_set` as `cfg` says and return a summary (complete on rank 0).

    `step_fn(model, batch, ctx)` runs the forward pass of the unwrapped model and returns the
    loss (DDP wraps model and step together); `batch` is the collated dict moved to the device
    and must carry `ids` (example ids, named if a loss turns non-finite). `loss_names` are the
    parts logged besides the total. `eval_fn(model, epoch)` runs on every rank after each epoch;
    `best_metric=(name, "max"|"min")` keeps the best model under `best/`. The final model goes
    to `final/` via `export_fn`. `extra` (plain data, e.g. the network's config) is stored in
    every checkpoint. `find_unused_parameters` stays on for LXMERT: the last cross layer's
    vision branch never reaches a QA / NLVR2 loss, and a pretraining batch may lack some
    objective's targets.
    """
    cfg.validate()
    env = env or init_distributed(cfg.device)
    device = env.device
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs CUDA; use bf16 or none on CPU")
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    per_step = env.world_size * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by world_size x grad_accum "
                         f"= {env.world_size} x {cfg.grad_accum}")
    micro_bs = cfg.batch_size // per_step

    sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    micro_per_epoch = (len(sampler) // micro_bs) // cfg.grad_accum * cfg.grad_accum
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size: {cfg.batch_size} exceeds the {len(train_set)} training examples")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    model.to(device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adam_eps,
                                param_clip=cfg.param_clip)
    scheduler = warmup_linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")

    step, epoch, batch_in_epoch = 0, 0, 0
    last_losses: dict[str, float] = {}
    best_value: float | None = None
    best: dict[str, float] | None = None
    evals: list[dict[str, float]] = []
    resumed = load_latest_checkpoint(ckpt_dir) if cfg.resume else None
    seed_everything(cfg.seed + env.rank)
    if resumed is not None:
        state, path = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best_value, best, evals = state.get("best_value"), state.get("best"), list(state.get("evals", []))
        last_losses = dict(state.get("last_losses", {}))
        changed = sorted(k for k, v in asdict(cfg).items()
                         if k not in _RESUMABLE_CHANGES and state["config"].get(k) != v)
        if changed:
            warnings.warn(f"{path}: resuming with different settings {changed} than the run that wrote it",
                          CheckpointWarning, stacklevel=2)
        if state["world_size"] == env.world_size and state["micro_batch_size"] == micro_bs:
            _set_rng_state(state["rng"][env.rank])
        else:
            warnings.warn(f"{path}: written by {state['world_size']} process(es) with micro-batch "
                          f"{state['micro_batch_size']}; resuming with {env.world_size} x {micro_bs}, "
                          "so data order and dropout differ from an uninterrupted run", CheckpointWarning,
                          stacklevel=2)
            seen = batch_in_epoch * state["micro_batch_size"] * state["world_size"]
            batch_in_epoch = min(seen // (micro_bs * env.world_size), micro_per_epoch)
            batch_in_epoch -= batch_in_epoch % cfg.grad_accum
            seed_everything(cfg.seed + env.rank + 7919 * step)
        if env.is_main:
            print(f"resuming from {path} at step {step}, epoch {epoch}, batch {batch_in_epoch}", flush=True)

    objective: nn.Module = _Objective(model, step_fn)
    if env.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids,
                                            find_unused_parameters=find_unused_parameters)
    names = ["loss", *loss_names]
    logs = _Logs(out, names, step if resumed else None, cfg.tensorboard) if env.is_main else None
    bar = tqdm(total=total_steps, initial=step, disable=not (env.is_main and cfg.progress),
               dynamic_ncols=True, desc="train")

    def state_dict() -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": gather_objects(env, _rng_state()), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "micro_batch_size": micro_bs,
                "world_size": env.world_size, "seed": cfg.seed, "best_value": best_value, "best": best,
                "evals": evals, "last_losses": last_losses, "config": asdict(cfg), "extra": extra or {},
                # the open logging window, so the first row after a resume averages the same steps
                "log_window": gather_objects(env, (sums.tolist(), counts.tolist(), window_steps))}

    def checkpoint() -> None:
        state = state_dict()  # every rank joins the RNG gather; rank 0 writes
        if env.is_main:
            save_checkpoint(state, ckpt_dir, step, cfg.keep_last)
        _barrier(env)

    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    counts = torch.zeros(len(names), dtype=torch.float64, device=device)
    window_start, run_start, window_steps = time.perf_counter(), time.perf_counter(), 0
    window = resumed[0].get("log_window") if resumed is not None else None
    if window is not None and len(window) == env.world_size and len(window[env.rank][0]) == len(names):
        saved_sums, saved_counts, window_steps = window[env.rank]
        sums += torch.tensor(saved_sums, dtype=torch.float64, device=device)
        counts += torch.tensor(saved_counts, dtype=torch.float64, device=device)
    grad_norm = torch.zeros((), device=device)
    try:
        while step < total_steps and epoch < epochs:
            sampler.set_epoch(epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            rest = _SkipSampler(sampler, batch_in_epoch * micro_bs)
            loader = DataLoader(train_set, batch_size=micro_bs, sampler=rest,
                                num_workers=cfg.num_workers, collate_fn=collate_fn, drop_last=True,
                                pin_memory=device.type == "cuda",
                                generator=epoch_generator(cfg.seed, epoch, env.rank))
            model.train()
            batches = iter(loader)
            for micro in range(batch_in_epoch, micro_per_epoch):
                batch = to_device(next(batches), device)
                last_micro = (micro + 1) % cfg.grad_accum == 0
                sync = objective.no_sync() if env.world_size > 1 and not last_micro else nullcontext()
                with sync:
                    with autocast(cfg.amp, device):
                        result = objective(batch, StepContext(epoch=epoch, step=step))
                    loss = result.loss.float()
                    _check_finite(env, loss, result, batch, step, epoch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                with torch.no_grad():
                    sums[0] += loss.detach()
                    counts[0] += 1
                    for i, name in enumerate(loss_names, start=1):
                        if name in result.parts:
                            sums[i] += result.parts[name].detach().float()
                            counts[i] += 1
                if not last_micro:
                    continue
                if cfg.clip_grad_norm > 0 or cfg.amp == "fp16":
                    scaler.unscale_(optimizer)
                if cfg.clip_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch = micro + 1
                window_steps += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    last_losses = _reduce_window(env, names, sums, counts)
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    if env.is_main and logs is not None:
                        logs.train_row({"step": step, "epoch": epoch, "lr": lr, **last_losses,
                                        "examples_per_s": rate, "grad_norm": float(grad_norm),
                                        "elapsed_s": time.perf_counter() - run_start})
                        bar.set_postfix(loss=f"{last_losses['loss']:.4f}", ex_s=f"{rate:.1f}")
                    sums.zero_()
                    counts.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                if step == total_steps:
                    break
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and batch_in_epoch < micro_per_epoch:
                    checkpoint()
            del batches, loader
            if batch_in_epoch == micro_per_epoch or step == total_steps:
                if eval_fn is not None:
                    metrics = eval_fn(model, epoch)
                    model.train()
                    evals.append({"epoch": epoch, "step": step, **metrics})
                    if env.is_main and logs is not None:
                        logs.eval_row(step, epoch, metrics)
                    if best_metric is not None:
                        name, mode = best_metric
                        value = metrics[name]
                        if best_value is None or (value > best_value if mode == "max"
                                                  else value < best_value):
                            best_value, best = value, {"epoch": epoch, "step": step, **metrics}
                            if env.is_main:
                                _export(export_fn, model, out / "best")
                            _barrier(env)
                if batch_in_epoch == micro_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                checkpoint()
        if env.is_main:
            _export(export_fn, model, out / "final")
        _barrier(env)
    except NonFiniteLossError as exc:
        if env.is_main:
            good = list_checkpoints(ckpt_dir)
            report = {"step": exc.step + 1, "epoch": exc.epoch, "batch_ids": exc.batch_ids,
                      "parts": exc.parts, "last_good_checkpoint": str(good[-1]) if good else None}
            with writing(out / "logs"):
                (out / "logs").mkdir(parents=True, exist_ok=True)
            atomic_write(out / "logs" / "nonfinite.json", json.dumps(report, indent=1))
        raise
    finally:
        bar.close()
        if logs is not None:
            logs.close(names if cfg.plots else None)
    return TrainResult(step=step, epoch=epoch, last_losses=last_losses, evals=evals, best=best,
                       output_dir=out)


def _check_finite(env: DistEnv, loss: torch.Tensor, result: StepOutput, batch: dict[str, Any],
                  step: int, epoch: int) -> None:
    """Stop every rank together when any rank's loss is NaN/Inf, naming the offending examples."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if env.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if bool(ok.item()):
        return
    local_bad = not bool(torch.isfinite(loss.detach()).item())
    ids = [str(i) for i in batch.get("ids", [])] if local_bad else []
    parts = {k: float(v.detach()) for k, v in result.parts.items()} if local_bad else {}
    gathered = gather_objects(env, (ids, parts))
    all_ids = [i for g in gathered for i in g[0]]
    all_parts = next((g[1] for g in gathered if g[1]), parts)
    raise NonFiniteLossError(step, epoch, all_ids, all_parts)


def _reduce_window(env: DistEnv, names: list[str], sums: torch.Tensor,
                   counts: torch.Tensor) -> dict[str, float]:
    """Mean of each logged loss over the window and over all ranks."""
    packed = torch.stack([sums, counts])
    if env.world_size > 1:
        dist.all_reduce(packed)
    return {name: float(packed[0, i] / packed[1, i]) for i, name in enumerate(names) if packed[1, i] > 0}
