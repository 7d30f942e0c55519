"""The one training loop shared by pretraining and fine-tuning.

Tasks hand it a model, a dataset, a collate function and a `step_fn` that turns a batch into a
loss; the loop owns everything else: DistributedDataParallel under torchrun (distributed.py), AMP,
gradient accumulation and clipping, the warm-up/decay schedule, checkpoints that resume exactly
(checkpoints.py), non-finite loss detection, and the logs (tqdm here; CSV, TensorBoard, PNG plots
in logs.py).

Reproducible data: datasets draw their randomness from the (seed, epoch, index) of each example
(`set_epoch` is called before every epoch), so the batches do not depend on worker scheduling
and a resumed run only needs the epoch and the number of batches already consumed.
"""
from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from extractor.fileio import atomic_write, writing
from extractor.precision import resolve_amp
from extractor.progress import ProgressFn, ProgressReporter
from tasks.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointWarning,
    export_into,
    export_model,
    list_checkpoints,
    load_agreed_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from tasks.training.distributed import DistEnv, all_finite, barrier, gather_objects, init_distributed
from tasks.training.logs import LossWindow, RunLogs
from tasks.training.optim import OPTIMIZERS, build_optimizer, warmup_linear_schedule

AMP_MODES = ("none", "auto", "bf16", "fp16")
FP16_DEVICES = ("cuda",)  # where amp=fp16 may train: fp16 needs loss scaling, and torch's GradScaler targets CUDA
# settings a resumed run may change without a warning (they do not alter what is computed)
_RESUMABLE_CHANGES = {"num_workers", "log_every", "ckpt_every", "keep_last", "resume", "progress",
                      "tensorboard", "plots"}


@dataclass
class TrainConfig:
    """How to train: shared by `python -m tasks.pretrain` and `python -m tasks.finetune`.

    The defaults are the loop's own; each stage's recipe (PretrainConfig, the benchmarks' fine-tuning
    recipes) sets the epochs, batch size, learning rate, warm-up and clipping of the paper."""

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
    amp: str = "none"                  # none | auto (bf16 where the device has it) | bf16 | fp16 (CUDA, GradScaler)
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
    amp: str = "none"  # the autocast mode that ran (`auto` resolved for the device)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf: the run stops; the newest checkpoint on disk is the last good one."""

    def __init__(self, step: int, epoch: int, batch_ids: list[str], parts: dict[str, float]) -> None:
        self.step, self.epoch, self.batch_ids, self.parts = step, epoch, batch_ids, parts
        shown = ", ".join(batch_ids[:20]) + (" ..." if len(batch_ids) > 20 else "")
        super().__init__(f"non-finite loss at optimiser step {step + 1} (epoch {epoch}); "
                         f"loss parts {parts}; batch ids: {shown}")


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


@dataclass
class _Plan:
    """How the data splits into optimiser steps for this job: the sampler, micro-batches, steps."""

    sampler: DistributedSampler
    micro_bs: int
    micro_per_epoch: int
    total_steps: int
    epochs: int


def _plan(cfg: TrainConfig, env: DistEnv, train_set: Dataset) -> _Plan:
    """Per-process micro-batches and the number of steps; errors name the setting that does not fit."""
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
    return _Plan(sampler, micro_bs, micro_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))


# ----------------------------------------------------------------------------- pieces of a step

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
    """The autocast context of an AMP mode (`none` gives a disabled one; `auto` is resolved for the device)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(amp, device))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclass
class _Micro:
    """What the non-finite check needs of one micro-batch: its example ids, loss and loss parts (on the device)."""

    ids: list[str]
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def _check_finite(env: DistEnv, micros: list[_Micro], step: int, epoch: int) -> None:
    """Stop every rank together when any rank's loss of this optimiser step is NaN/Inf, naming the
    examples of the offending micro-batches. Checked once per step, so the host waits for the device
    once per step, not after every micro-batch."""
    losses = torch.stack([m.loss for m in micros])
    if all_finite(env, losses):
        return
    bad = [m for m, ok in zip(micros, torch.isfinite(losses).tolist()) if not ok]
    ids = [i for m in bad for i in m.ids]
    parts = {k: float(v) for k, v in bad[0].parts.items()} if bad else {}
    gathered = gather_objects(env, (ids, parts))
    all_ids = [i for g in gathered for i in g[0]]
    all_parts = next((g[1] for g in gathered if g[1]), parts)
    raise NonFiniteLossError(step, epoch, all_ids, all_parts)


@dataclass
class _Progress:
    """Where the run is and what it has measured so far: all of it goes into every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)
    best_value: float | None = None
    best: dict[str, float] | None = None
    evals: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- the loop

def train(model: nn.Module, train_set: Dataset, cfg: TrainConfig, *,
          collate_fn: Callable[[list[Any]], dict[str, Any]],
          step_fn: StepFn,
          loss_names: Sequence[str] = (),
          eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
          best_metric: tuple[str, str] | None = None,
          export_fn: Callable[[nn.Module, Path], None] = export_model,
          find_unused_parameters: bool = True,
          extra: dict[str, Any] | None = None,
          env: DistEnv | None = None,
          on_progress: ProgressFn | None = None) -> TrainResult:
    """Train `model` on `train_set` as `cfg` says and return a summary (complete on rank 0).

    `step_fn(model, batch, ctx)` runs the forward pass of the unwrapped model and returns the
    loss (DDP wraps model and step together); `batch` is the collated dict moved to the device
    and must carry `ids` (example ids, named if a loss turns non-finite). `loss_names` are the
    parts logged besides the total. `eval_fn(model, epoch)` runs on every rank after each epoch;
    `best_metric=(name, "max"|"min")` keeps the best model under `best/`. The final model goes
    to `final/` via `export_fn`. `extra` (plain data, e.g. the network's config) is stored in
    every checkpoint. `find_unused_parameters` stays on for LXMERT: the last cross layer's
    vision branch never reaches a QA / NLVR2 loss, and a pretraining batch may lack some
    objective's targets. `on_progress` (rank 0) gets the step, the last logged loss and the pace every few
    seconds (extractor.progress).
    """
    cfg.validate()
    env = env or init_distributed(cfg.device)
    if cfg.amp == "fp16" and env.device.type not in FP16_DEVICES:
        raise ValueError("amp: fp16 needs CUDA; use bf16 or none on CPU")
    run = _Run(model, train_set, cfg, env, collate_fn=collate_fn, step_fn=step_fn, loss_names=loss_names,
               eval_fn=eval_fn, best_metric=best_metric, export_fn=export_fn, extra=extra)
    return run.train(find_unused_parameters, on_progress if env.is_main else None)


class _Run:
    """One call of `train`: setup here, then `train` resumes, runs the epochs and ends the run."""

    def __init__(self, model: nn.Module, train_set: Dataset, cfg: TrainConfig, env: DistEnv, *,
                 collate_fn: Callable[[list[Any]], dict[str, Any]], step_fn: StepFn, loss_names: Sequence[str],
                 eval_fn: Callable[[nn.Module, int], dict[str, float]] | None,
                 best_metric: tuple[str, str] | None, export_fn: Callable[[nn.Module, Path], None],
                 extra: dict[str, Any] | None) -> None:
        self.model, self.train_set, self.cfg, self.env = model, train_set, cfg, env
        self.collate_fn, self.step_fn, self.eval_fn = collate_fn, step_fn, eval_fn
        self.best_metric, self.export_fn, self.extra = best_metric, export_fn, extra or {}
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.plan = _plan(cfg, env, train_set)
        model.to(env.device)
        self.optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adam_eps,
                                         param_clip=cfg.param_clip)
        self.scheduler = warmup_linear_schedule(self.optimizer, self.plan.total_steps, cfg.warmup_ratio)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
        self.progress = _Progress()
        self.names = ["loss", *loss_names]
        self.window = LossWindow(self.names, env.device)
        self.grad_norm = torch.zeros((), device=env.device)
        self.run_start = time.perf_counter()
        self.objective: nn.Module = _Objective(model, step_fn)
        self.micros: list[_Micro] = []  # the micro-batches of the optimiser step being accumulated
        self.logs: RunLogs | None = None

    # ------------------------------------------------------------------ start and end

    def train(self, find_unused_parameters: bool, on_progress: ProgressFn | None = None) -> TrainResult:
        """Resume, run the epochs, export the final model; a NaN loss is recorded, then raised."""
        cfg, env, p = self.cfg, self.env, self.progress
        resumed = self.resume()
        if env.world_size > 1:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.objective = DistributedDataParallel(self.objective, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)
        if env.is_main:
            self.logs = RunLogs(self.out, self.names, p.step if resumed else None, cfg.tensorboard)
        self.bar = tqdm(total=self.plan.total_steps, initial=p.step, disable=not (env.is_main and cfg.progress),
                        dynamic_ncols=True, desc="train")
        self.reporter = ProgressReporter(on_progress, "train", self.plan.total_steps, "step", cfg.batch_size,
                                         start=p.step)
        try:
            while p.step < self.plan.total_steps and p.epoch < self.plan.epochs:
                self.run_epoch()
            if env.is_main:
                export_into(self.export_fn, self.model, self.out / "final")
            barrier(env)
        except NonFiniteLossError as exc:
            if env.is_main:
                self.record_nonfinite(exc)
            raise
        finally:
            self.bar.close()
            if self.logs is not None:
                self.logs.close(self.names if cfg.plots else None)
        return TrainResult(step=p.step, epoch=p.epoch, last_losses=p.last_losses, evals=p.evals, best=p.best,
                           output_dir=self.out, amp=resolve_amp(cfg.amp, env.device))

    def resume(self) -> bool:
        """Continue from the newest good checkpoint (when `resume` is on); seeds every generator."""
        cfg, env, p = self.cfg, self.env, self.progress
        resumed = load_agreed_checkpoint(env, self.ckpt_dir) if cfg.resume else None
        seed_everything(cfg.seed + env.rank)
        if resumed is None:
            return False
        state, path = resumed
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when written without fp16: a run switching to fp16 starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        p.step, p.epoch, p.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        p.best_value, p.best, p.evals = state.get("best_value"), state.get("best"), list(state.get("evals", []))
        p.last_losses = dict(state.get("last_losses", {}))
        changed = sorted(k for k, v in asdict(cfg).items()
                         if k not in _RESUMABLE_CHANGES and state["config"].get(k) != v)
        if changed:
            warnings.warn(f"{path}: resuming with different settings {changed} than the run that wrote it",
                          CheckpointWarning, stacklevel=4)
        micro_bs = self.plan.micro_bs
        if state["world_size"] == env.world_size and state["micro_batch_size"] == micro_bs:
            set_rng_state(state["rng"][env.rank], env.device)
        else:
            warnings.warn(f"{path}: written by {state['world_size']} process(es) with micro-batch "
                          f"{state['micro_batch_size']}; resuming with {env.world_size} x {micro_bs}, "
                          "so data order and dropout differ from an uninterrupted run", CheckpointWarning,
                          stacklevel=4)
            seen = p.batch_in_epoch * state["micro_batch_size"] * state["world_size"]
            p.batch_in_epoch = min(seen // (micro_bs * env.world_size), self.plan.micro_per_epoch)
            p.batch_in_epoch -= p.batch_in_epoch % cfg.grad_accum
            seed_everything(cfg.seed + env.rank + 7919 * p.step)
        self.window.restore(state.get("log_window"), env)
        if env.is_main:
            print(f"resuming from {path} at step {p.step}, epoch {p.epoch}, batch {p.batch_in_epoch}", flush=True)
        return True

    def record_nonfinite(self, exc: NonFiniteLossError) -> None:
        """logs/nonfinite.json: the bad step, its examples and loss parts, and the last good checkpoint."""
        good = list_checkpoints(self.ckpt_dir)
        report = {"step": exc.step + 1, "epoch": exc.epoch, "batch_ids": exc.batch_ids,
                  "parts": exc.parts, "last_good_checkpoint": str(good[-1]) if good else None}
        with writing(self.out / "logs"):
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "logs" / "nonfinite.json", json.dumps(report, indent=1))

    # ------------------------------------------------------------------ one epoch

    def run_epoch(self) -> None:
        """Train the rest of the current epoch (or up to the last step), then do its end-of-epoch work."""
        cfg, env, p, plan = self.cfg, self.env, self.progress, self.plan
        plan.sampler.set_epoch(p.epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(p.epoch)
        rest = _SkipSampler(plan.sampler, p.batch_in_epoch * plan.micro_bs)
        loader = DataLoader(self.train_set, batch_size=plan.micro_bs, sampler=rest,
                            num_workers=cfg.num_workers, collate_fn=self.collate_fn, drop_last=True,
                            pin_memory=env.device.type == "cuda",
                            generator=epoch_generator(cfg.seed, p.epoch, env.rank))
        self.model.train()
        batches = iter(loader)
        for micro in range(p.batch_in_epoch, plan.micro_per_epoch):
            last_micro = (micro + 1) % cfg.grad_accum == 0
            self.forward_backward(to_device(next(batches), env.device), last_micro)
            if not last_micro:
                continue
            lr = self.optimizer_step()
            p.step += 1
            p.batch_in_epoch = micro + 1
            self.window.steps += 1
            self.bar.update(1)
            if p.step % cfg.log_every == 0 or p.step == plan.total_steps:
                self.log_row(lr)
            self.reporter.update(p.step, p.last_losses.get("loss"))  # the last logged loss: no device sync
            if p.step == plan.total_steps:
                break
            if cfg.ckpt_every and p.step % cfg.ckpt_every == 0 and p.batch_in_epoch < plan.micro_per_epoch:
                self.checkpoint()
        del batches, loader
        if p.batch_in_epoch == plan.micro_per_epoch or p.step == plan.total_steps:
            self.end_epoch()

    def forward_backward(self, batch: dict[str, Any], last_micro: bool) -> None:
        """One micro-batch: loss, scaled backward; DDP syncs on the last only. Nothing here waits for
        the device: the loss is checked for NaN / Inf with the step's other micro-batches."""
        cfg, env, p = self.cfg, self.env, self.progress
        sync = self.objective.no_sync() if env.world_size > 1 and not last_micro else nullcontext()
        with sync:
            with autocast(cfg.amp, env.device):
                result = self.objective(batch, StepContext(epoch=p.epoch, step=p.step))
            loss = result.loss.float()
            self.scaler.scale(loss / cfg.grad_accum).backward()
        self.window.add(loss, result.parts)
        self.micros.append(_Micro([str(i) for i in batch.get("ids", [])], loss.detach(), result.parts))

    def optimizer_step(self) -> float:
        """Stop on a non-finite loss of the step (before any update), clip, step, advance the schedule;
        returns the learning rate the step used."""
        cfg, p = self.cfg, self.progress
        micros, self.micros = self.micros, []
        _check_finite(self.env, micros, p.step, p.epoch)
        if cfg.clip_grad_norm > 0 or cfg.amp == "fp16":
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad_norm > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def log_row(self, lr: float) -> None:
        """Close the loss window into one CSV / TensorBoard row (rank 0) and the bar's postfix."""
        p, steps, start = self.progress, self.window.steps, self.window.start
        p.last_losses = self.window.close(self.env)
        rate = steps * self.cfg.batch_size / max(time.perf_counter() - start, 1e-9)
        if self.logs is not None:
            self.logs.train_row({"step": p.step, "epoch": p.epoch, "lr": lr, **p.last_losses,
                                 "examples_per_s": rate, "grad_norm": float(self.grad_norm),
                                 "elapsed_s": time.perf_counter() - self.run_start})
            self.bar.set_postfix(loss=f"{p.last_losses['loss']:.4f}", ex_s=f"{rate:.1f}")

    def end_epoch(self) -> None:
        """Evaluate (keeping the best model), move to the next epoch when this one is done, checkpoint."""
        p = self.progress
        if self.eval_fn is not None:
            self.evaluate()
        if p.batch_in_epoch == self.plan.micro_per_epoch:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        self.checkpoint()

    def evaluate(self) -> None:
        """Run eval_fn on every rank, log it, and export the model to best/ when it improves."""
        p, env = self.progress, self.env
        metrics = self.eval_fn(self.model, p.epoch)
        self.model.train()
        p.evals.append({"epoch": p.epoch, "step": p.step, **metrics})
        if self.logs is not None:
            self.logs.eval_row(p.step, p.epoch, metrics)
        if self.best_metric is None:
            return
        name, mode = self.best_metric
        value = metrics[name]
        if p.best_value is None or (value > p.best_value if mode == "max" else value < p.best_value):
            p.best_value, p.best = value, {"epoch": p.epoch, "step": p.step, **metrics}
            if env.is_main:
                export_into(self.export_fn, self.model, self.out / "best")
            barrier(env)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Every rank joins the RNG and window gathers; rank 0 writes."""
        state = self.state_dict()
        if self.env.is_main:
            save_checkpoint(state, self.ckpt_dir, self.progress.step, self.cfg.keep_last)
        barrier(self.env)

    def state_dict(self) -> dict[str, Any]:
        p, env = self.progress, self.env
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": gather_objects(env, rng_state(env.device)), "step": p.step,
                "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "micro_batch_size": self.plan.micro_bs,
                "world_size": env.world_size, "seed": self.cfg.seed, "best_value": p.best_value, "best": p.best,
                "evals": p.evals, "last_losses": p.last_losses, "config": asdict(self.cfg), "extra": self.extra,
                "log_window": gather_objects(env, self.window.state())}
