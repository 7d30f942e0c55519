"""This process's place in a torchrun job: device, rank, process group, the collective helpers the
loop and the evaluations share (NCCL on GPU, gloo on CPU; one process needs no group), and the body
of the `python -m` training commands that join and leave the job."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.checkpoint import CheckpointError
from model.config import ConfigError
from tasks.training.runconfig import save_json


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
    """`auto` picks CUDA when present; a CUDA request without a GPU is an error, not a fallback.

    Process `local_rank` of a machine takes GPU `local_rank` of those it sees, or the only one it sees
    when the launcher binds one GPU per process (CUDA_VISIBLE_DEVICES set per rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
        count = torch.cuda.device_count()
        if count == 1:
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise RuntimeError(f"device: LOCAL_RANK {local_rank} needs GPU {local_rank} but this process sees "
                               f"{count} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                               "start at most one process per visible GPU")
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


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op alone)."""
    if env.world_size > 1:
        dist.barrier()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, *tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (a no-op alone)."""
    if env.world_size > 1:
        for t in tensors:
            dist.all_reduce(t)


def all_finite(env: DistEnv, losses: torch.Tensor) -> bool:
    """Whether every value of `losses` is finite on every rank (all ranks must call it together):
    one reduction and one wait for the device."""
    ok = torch.isfinite(losses.detach()).all().to(torch.int32)
    if env.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable object; all ranks must call it together)."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start_run(cfg: Any, env: DistEnv | None = None) -> tuple[DistEnv, Path]:
    """What a training run does first: check `cfg`, join the job, write the config beside the run's
    outputs (rank 0, so the run can be repeated) and seed torch; returns the job and the output folder."""
    cfg.validate()
    env = env or init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
    torch.manual_seed(cfg.train.seed)
    return env, out


def run_command(cfg: Any, run: Callable[[Any, DistEnv], dict[str, Any]],
                summary: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The body of a `python -m` training command, alone or under torchrun: join the job, run `cfg`,
    print the summary of its metrics on rank 0, leave the job. Weights or sizes that do not fit exit 2
    with one line, no traceback."""
    try:
        env = init_distributed(cfg.train.device)
        metrics = run(cfg, env)
        if env.is_main:
            print(json.dumps(summary(metrics), indent=1, default=str))
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0
