"""Pretraining throughput of the whole training path, ours against a plain transformers loop.

"ours" is what `python -m tasks.pretrain` runs: our LXMERT, our dataset (tokenisation and
masking in the DataLoader), and the shared loop (BertAdam, clipping, NaN checks, CSV logging).
"hf" is a plain loop (AdamW, clipping) around transformers' LxmertForPreTraining fed by the same
dataset and DataLoader. Both see the same synthetic world (tasks.demo.feature_world) in the real file
formats. Each run is its own process, so peak memory (RSS on CPU, allocated memory on CUDA) is
its own; the implementations alternate `--repeats` times and the median is reported, with the
process CPU time per example (the cores of a shared machine make wall time noisy).

Both are clocked the same way: when a step's batch reaches the model, from step `--warmup` to
step `--warmup + --steps`, so the timed window holds `--steps` whole steps including data
loading. The model FLOPs of a step are counted once with torch's FlopCounterMode on our network
(MLM logits at masked words only); on CUDA the model FLOP utilisation is that rate over
`--peak-tflops`.

    python bench/train_throughput.py                      # CPU, small model, fp32
    python bench/train_throughput.py --model base --device cuda --amp bf16 --batch-size 256 --workers 8
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_peaks import peak_tflops
from torch import nn

from tasks.data.answers import default_pretrain_table
from tasks.data.batches import model_inputs
from tasks.data.features import open_stores
from tasks.data.tokenization import load_tokenizer
from tasks.pretrain import (
    OBJECTIVES,
    PretrainConfig,
    PretrainCorpus,
    PretrainDataset,
    collate_pretrain,
    make_step,
    model_config,
    targets,
)
from tasks.training.distributed import resolve_device
from tasks.training.loop import StepContext, StepOutput, TrainConfig, autocast, to_device, train

ROOT = Path(__file__).resolve().parents[1]
SENTENCES_PER_IMAGE = 4  # tasks.demo.feature_world: two captions and two questions per image


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", help="preset: tiny, small, base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="runs of each implementation (median reported)")
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--impl", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for the AMP dtype (default: bench/gpu_peaks.py's for a known GPU)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: warn where our loop makes the host wait for the GPU (torch's sync debug mode)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Clock:
    """Wall and process CPU time when the batches of the first and last timed steps arrive."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.first, self.last, self.device = args.warmup, args.warmup + args.steps, device
        self.marks: dict[int, tuple[float, float]] = {}

    def tick(self, step: int) -> None:
        if step in (self.first, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks[step] = (time.perf_counter(), time.process_time())

    def result(self, args: argparse.Namespace) -> dict:
        (w0, c0), (w1, c1) = self.marks[self.first], self.marks[self.last]
        n = args.steps * args.batch_size
        return {"examples_per_s": n / (w1 - w0), "cpu_ms_per_example": 1000 * (c1 - c0) / n,
                "peak_mib": peak_memory(self.device)}


def pretrain_config(args: argparse.Namespace, out: Path) -> PretrainConfig:
    world = args.world
    # one step past the window, whose arrival closes it
    return PretrainConfig(
        corpus=[str(world / "corpus.json")], features=[str(world / "features.h5")], model=args.model,
        train=TrainConfig(output_dir=str(out), max_steps=args.warmup + args.steps + 1,
                          batch_size=args.batch_size, num_workers=args.workers, log_every=1, ckpt_every=0,
                          progress=False, tensorboard=False, plots=False, amp=args.amp, device=args.device,
                          resume=False))


def peak_memory(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocations, else resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dataset(cfg: PretrainConfig) -> tuple[PretrainDataset, Any]:
    """The pretraining dataset of the world and our network's config for it."""
    stores = open_stores(cfg.features)
    table = default_pretrain_table()
    corpus = PretrainCorpus(cfg.corpus, stores, table)
    data = PretrainDataset(corpus, stores, load_tokenizer(), cfg, cfg.train.seed)
    return data, model_config(cfg, stores[0].feature_dim, len(table))


def run_ours(args: argparse.Namespace) -> dict:
    """Our loop as `python -m tasks.pretrain` runs it, minus the final model export (safetensors
    serialises the model in memory, which is not training memory)."""
    from model import LxmertForPreTraining

    device = resolve_device(args.device)
    clock = Clock(args, device)
    if args.sync_debug and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")  # each place the host waits for the GPU warns once
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pretrain_config(args, Path(tmp) / "run")
        torch.manual_seed(cfg.train.seed)
        data, config = dataset(cfg)
        step = make_step(cfg)

        def timed(model: nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
            clock.tick(ctx.step)
            return step(model, batch, ctx)

        train(LxmertForPreTraining(config), data, cfg.train, collate_fn=collate_pretrain, step_fn=timed,
              loss_names=OBJECTIVES, export_fn=lambda model, directory: None)
    return clock.result(args)


def run_hf(args: argparse.Namespace) -> dict:
    """A plain loop around transformers' model on the same dataset and DataLoader."""
    import transformers
    from torch.utils.data import DataLoader, RandomSampler

    cfg = pretrain_config(args, Path("unused"))
    device = resolve_device(args.device)
    clock = Clock(args, device)
    torch.manual_seed(cfg.train.seed)
    data, ours = dataset(cfg)
    hf_config = transformers.LxmertConfig(**{k: v for k, v in ours.to_dict().items() if k != "model_type"})
    model = transformers.LxmertForPreTraining(hf_config).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, sampler=sampler,
                        collate_fn=collate_pretrain, drop_last=True, pin_memory=device.type == "cuda")
    batches = iter(loader)
    for step in range(args.warmup + args.steps + 1):
        batch = to_device(next(batches), device)
        clock.tick(step)
        with autocast(args.amp, device):
            loss = model(**model_inputs(batch), **targets(batch, cfg, epoch=0)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError(f"hf: non-finite loss at step {step}")
    return clock.result(args)


def flops_per_example(args: argparse.Namespace) -> float:
    """Model FLOPs of one example's forward and backward in our network (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model import LxmertForPreTraining

    cfg = pretrain_config(args, Path("unused"))
    data, config = dataset(cfg)
    n = 8
    batch = collate_pretrain([data[i] for i in range(n)])
    model = LxmertForPreTraining(config)
    counter = FlopCounterMode(display=False)
    with counter:
        model(**model_inputs(batch), **targets(batch, cfg, epoch=0)).loss.backward()
    return counter.get_total_flops() / n


def measure(args: argparse.Namespace, impl: str, world: str, argv: list[str]) -> dict:
    """One run of `impl` in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--world", world, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{impl} failed:\n{done.stderr[-3000:]}")
    if args.sync_debug:
        print(f"--- {impl}: where the host waited for the GPU ---\n{done.stderr}", file=sys.stderr)
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = run_ours(args) if args.child == "ours" else run_hf(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    from tasks.demo.feature_world import write_world

    runs: dict[str, list[dict]] = {impl: [] for impl in args.impl}
    with tempfile.TemporaryDirectory() as tmp:
        n_images = math.ceil((args.warmup + args.steps + 2) * args.batch_size / SENTENCES_PER_IMAGE) + 1
        write_world(tmp, n_images=n_images, max_boxes=args.boxes, feature_dim=args.feature_dim,
                    vary_boxes=False)
        args.world = Path(tmp)
        flops = flops_per_example(args)
        for _ in range(args.repeats):
            for impl in args.impl:
                runs[impl].append(measure(args, impl, tmp, argv))
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or peak_tflops(gpu, args.amp)
    results = {}
    for impl, rs in runs.items():
        r = {key: statistics.median(x[key] for x in rs) for key in rs[0]}
        r["examples_per_s_runs"] = [x["examples_per_s"] for x in rs]
        r["model_tflops_per_s"] = r["examples_per_s"] * flops / 1e12
        if peak:
            r["mfu"] = r["model_tflops_per_s"] / peak
        results[impl] = r
    report = {
        "setup": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
                  "warmup": args.warmup, "repeats": args.repeats, "boxes": args.boxes,
                  "feature_dim": args.feature_dim, "device": str(device), "amp": args.amp,
                  "workers": args.workers, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "gpu": gpu,
                  "model_gflops_per_example": flops / 1e9},
        "results": results,
    }
    print(f"{'impl':6} {'examples/s':>11} {'CPU ms/ex':>10} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for impl, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{impl:6} {r['examples_per_s']:11.2f} {r['cpu_ms_per_example']:10.1f} {r['peak_mib']:9.0f} "
              f"{r['model_tflops_per_s']:8.3f} {mfu:>6}")
    if "ours" in results and "hf" in results:
        ratio = results["ours"]["examples_per_s"] / results["hf"]["examples_per_s"]
        print(f"speed-up ours / hf: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
