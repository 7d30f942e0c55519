"""Pretraining throughput of the whole training path, ours against a plain transformers loop.

"ours" is what `python -m tasks.pretrain` runs: our LXMERT, our dataset (tokenisation and
masking in the DataLoader), and the shared loop (BertAdam, clipping, NaN checks, CSV logging).
"hf" is a plain loop (AdamW, clipping) around transformers' LxmertForPreTraining fed by the same
dataset and DataLoader. Both see the same synthetic world (tasks.demo.feature_world) in the real file
formats. Each run is its own process, so peak memory (RSS on CPU, allocated memory on CUDA) is
its own; the implementations alternate `--repeats` times and the median is reported, with the
process CPU time per example (the cores of a shared machine make wall time noisy).

`--compare-amp` times our loop in float32 (`amp none`) against bf16 autocast (or `--amp fp16` on CUDA)
instead: `--repeats` pairs of runs in alternating order, medians and the speed-up, the load average
around each run. Then the loss drift: one run of each for `--drift-steps` steps from the same seed on
the same batches (the dataset's masking and the dropout draws do not depend on the precision), the
two loss curves step by step, their largest and mean absolute difference and both final losses.

Both are clocked the same way: when a step's batch reaches the model, from step `--warmup` to
step `--warmup + --steps`, so the timed window holds `--steps` whole steps including data
loading. The model FLOPs of a step are counted once with torch's FlopCounterMode on our network
(MLM logits at masked words only); on CUDA the model FLOP utilisation is that rate over
`--peak-tflops`.

    python bench/train_throughput.py                      # CPU, small model, fp32
    python bench/train_throughput.py --model base --device cuda --amp bf16 --batch-size 256 --workers 8
    python bench/train_throughput.py --compare-amp --repeats 3 --drift-steps 100   # CPU fp32 vs bf16
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
from machine import cpu_description
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
    p.add_argument("--compare-amp", action="store_true",
                   help="our loop (not --impl) in float32 against --amp (bf16 unless fp16 is given), alternating, "
                        "and the loss drift")
    p.add_argument("--drift-steps", type=int, default=100, help="--compare-amp: steps of the two loss curves")
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
                "peak_mib": peak_memory(self.device), "load_average": os.getloadavg()[0]}


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
        losses: list[torch.Tensor] = []

        def timed(model: nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
            clock.tick(ctx.step)
            out = step(model, batch, ctx)
            losses.append(out.loss.detach().float())  # read after training: no extra host wait per step
            return out

        train(LxmertForPreTraining(config), data, cfg.train, collate_fn=collate_pretrain, step_fn=timed,
              loss_names=OBJECTIVES, export_fn=lambda model, directory: None)
    return {**clock.result(args), "losses": [float(x) for x in losses]}


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
    """One run of `impl` in a fresh process (later flags in argv override earlier ones)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", impl, "--world", world]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{impl} failed:\n{done.stderr[-3000:]}")
    if args.sync_debug:
        print(f"--- {impl}: where the host waited for the GPU ---\n{done.stderr}", file=sys.stderr)
    return json.loads(line[len("RESULT "):])


def loss_drift(reference: list[float], other: list[float]) -> dict:
    """Two loss curves of the same batches compared step by step."""
    diff = [abs(a - b) for a, b in zip(reference, other, strict=True)]
    tail = max(1, len(diff) // 10)
    return {"steps": len(diff), "max_abs_diff": max(diff), "mean_abs_diff": statistics.fmean(diff),
            "final_loss_fp32": reference[-1], "final_loss_amp": other[-1],
            "last_tenth_mean_fp32": statistics.fmean(reference[-tail:]),
            "last_tenth_mean_amp": statistics.fmean(other[-tail:]),
            "loss_fp32": reference, "loss_amp": other}


def compare_amp(args: argparse.Namespace, world: str, argv: list[str]) -> dict:
    """Our loop in float32 against args.amp: paired runs in alternating order, then one loss curve each."""
    runs: dict[str, list[dict]] = {"none": [], args.amp: []}
    for r in range(args.repeats):
        for amp in ("none", args.amp) if r % 2 == 0 else (args.amp, "none"):
            runs[amp].append(measure(args, "ours", world, [*argv, "--amp", amp]))
            print(f"  round {r + 1} {amp}: {runs[amp][-1]['examples_per_s']:.2f} examples/s "
                  f"(load {runs[amp][-1]['load_average']:.1f})", flush=True)
    curve = [*argv, "--warmup", "0", "--steps", str(args.drift_steps - 1)]
    losses = {amp: measure(args, "ours", world, [*curve, "--amp", amp])["losses"] for amp in runs}
    speeds = {amp: [x["examples_per_s"] for x in rs] for amp, rs in runs.items()}
    return {
        "fp32_examples_per_s": statistics.median(speeds["none"]),
        "amp_examples_per_s": statistics.median(speeds[args.amp]),
        "speedup": statistics.median(b / f for f, b in zip(speeds["none"], speeds[args.amp])),
        "fp32_cpu_ms_per_example": statistics.median(x["cpu_ms_per_example"] for x in runs["none"]),
        "amp_cpu_ms_per_example": statistics.median(x["cpu_ms_per_example"] for x in runs[args.amp]),
        "runs": speeds, "load_average": [min(x["load_average"] for rs in runs.values() for x in rs),
                                         max(x["load_average"] for rs in runs.values() for x in rs)],
        "drift": loss_drift(losses["none"], losses[args.amp]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = run_ours(args) if args.child == "ours" else run_hf(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.compare_amp and args.drift_steps < 2:
        raise SystemExit(f"--drift-steps must be at least 2, got {args.drift_steps}")
    if args.compare_amp and args.amp == "none":
        args.amp = "bf16"
    from tasks.demo.feature_world import write_world

    runs: dict[str, list[dict]] = {impl: [] for impl in args.impl}
    with tempfile.TemporaryDirectory() as tmp:
        steps = max(args.warmup + args.steps + 2, args.drift_steps + 1 if args.compare_amp else 0)
        n_images = math.ceil(steps * args.batch_size / SENTENCES_PER_IMAGE) + 1
        write_world(tmp, n_images=n_images, max_boxes=args.boxes, feature_dim=args.feature_dim,
                    vary_boxes=False)
        args.world = Path(tmp)
        if args.compare_amp:
            return report_amp(args, compare_amp(args, tmp, argv))
        flops = flops_per_example(args)
        for _ in range(args.repeats):
            for impl in args.impl:
                runs[impl].append(measure(args, impl, tmp, argv))
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or peak_tflops(gpu, args.amp)
    results = {}
    for impl, rs in runs.items():
        r = {key: statistics.median(x[key] for x in rs) for key in rs[0] if key != "losses"}
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
                  "cpu": cpu_description(), "gpu": gpu,
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


def report_amp(args: argparse.Namespace, result: dict) -> int:
    """Print and save --compare-amp's figures."""
    device = resolve_device(args.device)
    report = {
        "setup": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                  "repeats": args.repeats, "drift_steps": args.drift_steps, "boxes": args.boxes,
                  "feature_dim": args.feature_dim, "device": str(device), "amp": args.amp, "workers": args.workers,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_description(),
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": result,
    }
    d = result["drift"]
    print(f"{report['setup']['cpu']}; load average {result['load_average'][0]:.1f}-{result['load_average'][1]:.1f}")
    print(f"fp32 {result['fp32_examples_per_s']:.2f} examples/s, {args.amp} {result['amp_examples_per_s']:.2f}: "
          f"{result['speedup']:.2f}x (median of {args.repeats} pairs)")
    print(f"loss over {d['steps']} steps: max |diff| {d['max_abs_diff']:.4f}, mean {d['mean_abs_diff']:.4f}; final "
          f"fp32 {d['final_loss_fp32']:.4f}, {args.amp} {d['final_loss_amp']:.4f}; mean of the last tenth "
          f"{d['last_tenth_mean_fp32']:.4f} / {d['last_tenth_mean_amp']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
