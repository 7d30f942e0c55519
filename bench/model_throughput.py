"""One pretraining step (forward, backward, AdamW) of LXMERT base: ours against transformers'.

Both models hold identical weights and see identical batches with all five objectives' targets;
steps alternate between them in one process and the median of several is reported, with the
process CPU time (the cores may be shared) and the achieved FLOP rate / model FLOP utilisation.

    python bench/model_throughput.py                      # CPU, fp32, batch 32
    python bench/model_throughput.py --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from gpu_peaks import peak_tflops
from machine import cpu_model
from torch.utils.flop_counter import FlopCounterMode

from model import LxmertConfig, LxmertForPreTraining

CLS, SEP, MASK = 101, 102, 103


def make_batch(cfg: LxmertConfig, batch: int, seq: int, boxes: int, g: torch.Generator) -> dict:
    """A realistic pretraining batch: padded sentences, 15% masked words (80/10/10), 15% masked boxes
    (80% zeroed, 10% swapped, 10% kept), half mismatched pairs, answers for the matched ones."""
    lengths = torch.randint(8, seq + 1, (batch,), generator=g)
    real = torch.arange(seq)[None, :] < lengths[:, None]
    ids = torch.randint(1000, cfg.vocab_size, (batch, seq), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[~real] = 0
    inner = real & (ids != CLS) & (ids != SEP)
    masked = inner & (torch.rand(batch, seq, generator=g) < 0.15)
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    how = torch.rand(batch, seq, generator=g)
    ids = torch.where(masked & (how < 0.8), torch.full_like(ids, MASK), ids)
    swap = masked & (how >= 0.8) & (how < 0.9)
    ids = torch.where(swap, torch.randint(1000, cfg.vocab_size, (batch, seq), generator=g), ids)

    feats = torch.randn(batch, boxes, cfg.visual_feat_dim, generator=g).relu()
    xy = torch.rand(batch, boxes, 2, 2, generator=g).sort(dim=2).values
    pos = xy.transpose(2, 3).flatten(2)  # x1, y1, x2, y2 in [0, 1]
    box_masked = torch.rand(batch, boxes, generator=g) < 0.15
    how = torch.rand(batch, boxes, generator=g)
    inputs_feats = feats.clone()
    inputs_feats[box_masked & (how < 0.8)] = 0
    swap = box_masked & (how >= 0.8) & (how < 0.9)
    inputs_feats[swap] = feats.flatten(0, 1)[torch.randperm(batch * boxes, generator=g)[: int(swap.sum())]]

    matched = (torch.rand(batch, generator=g) < 0.5).long()
    ans = torch.where(matched == 1, torch.randint(0, cfg.num_qa_labels, (batch,), generator=g), -100)
    return {
        "input_ids": ids,
        "attention_mask": real.long(),
        "visual_feats": inputs_feats,
        "visual_pos": pos,
        "labels": labels,
        "obj_labels": {
            "obj": (torch.randint(0, cfg.num_object_labels, (batch, boxes), generator=g),
                    torch.rand(batch, boxes, generator=g)),
            "attr": (torch.randint(0, cfg.num_attr_labels, (batch, boxes), generator=g),
                     torch.rand(batch, boxes, generator=g)),
            "feat": (feats, box_masked.float()),
        },
        "matched_label": matched,
        "ans": ans,
    }


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a nested batch of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return tuple(to_device(v, device) for v in batch)


@dataclass
class Runner:
    """A model, its optimiser and the timings of its steps."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    wall: list[float]
    cpu: list[float]
    flops: int = 0


def train_step(run: Runner, batch: dict, autocast: Callable[[], contextlib.AbstractContextManager],
               sync: Callable[[], None]) -> float:
    """Forward, backward, AdamW; returns the loss."""
    with autocast():
        loss = run.model(**batch).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    sync()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model (FLOPs are counted here)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak of the device for MFU (default: bench/gpu_peaks.py's for a known GPU)")
    p.add_argument("--layers", type=int, nargs=3, default=None, metavar=("L", "X", "R"),
                   help="smaller layer counts for a quick run (default: base 9 5 5)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LxmertConfig()
    if args.layers:
        cfg = LxmertConfig(l_layers=args.layers[0], x_layers=args.layers[1], r_layers=args.layers[2])
    torch.manual_seed(0)
    theirs = transformers.LxmertForPreTraining(transformers.LxmertConfig(**cfg.to_dict())).to(device)
    ours = LxmertForPreTraining(cfg).to(device)
    ours.load_state_dict(theirs.state_dict())
    batch = to_device(make_batch(cfg, args.batch, args.seq, args.boxes, torch.Generator().manual_seed(0)),
                      device)

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    with torch.no_grad():  # same weights, same batch, eval mode: the losses must agree
        theirs.eval(), ours.eval()
        with autocast():
            diff = abs(float(theirs(**batch).loss) - float(ours(**batch).loss))
    print(f"eval-mode loss difference, identical weights: {diff:.2e}")
    theirs.train(), ours.train()

    runners = [
        # What a transformers user gets: AdamW's default (the per-tensor loop on CPU, foreach on CUDA).
        Runner("transformers", theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4), [], []),
        Runner("ours", ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True), [], []),
    ]
    for i in range(args.warmup + args.steps):
        for run in runners if i % 2 == 0 else runners[::-1]:
            count = i == 0 and args.warmup > 0
            counter = FlopCounterMode(display=False) if count else contextlib.nullcontext()
            wall, cpu = time.perf_counter(), time.process_time()
            with counter:
                train_step(run, batch, autocast, sync)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if count:
                run.flops = counter.get_total_flops()
            if i >= args.warmup:
                run.wall.append(wall)
                run.cpu.append(cpu)
                print(f"  step {i - args.warmup}: {run.name:12s} {wall:7.3f} s wall {cpu:7.2f} s cpu",
                      flush=True)

    name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    peak = args.peak_tflops or (peak_tflops(name, args.dtype) if cuda else None)
    print(f"\ndevice {name}, {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, "
          f"{args.seq} tokens, {args.boxes} boxes, layers {cfg.l_layers}/{cfg.x_layers}/{cfg.r_layers}, "
          f"{args.steps} steps each (median / min: the min is the least disturbed by other processes)")
    for run in runners:
        wall, cpu = statistics.median(run.wall), statistics.median(run.cpu)
        rate = run.flops / min(run.wall) / 1e12
        mfu = f", MFU {100 * rate / peak:.1f}%" if peak else ""
        print(f"{run.name:12s} wall {wall:7.3f} / {min(run.wall):7.3f} s/step   "
              f"cpu {cpu:7.2f} / {min(run.cpu):7.2f} s/step   "
              f"{run.flops / 1e9:7.1f} GFLOP/step, {rate * 1e3:7.1f} GFLOP/s at the min{mfu}")
    theirs, ours = runners
    # Steps i of both models ran back to back, so their ratio shares the same background load.
    paired = statistics.median(t / o for t, o in zip(theirs.wall, ours.wall))
    paired_cpu = statistics.median(t / o for t, o in zip(theirs.cpu, ours.cpu))
    print(f"speed-up (transformers / ours): median of paired steps {paired:.2f}x wall, "
          f"{paired_cpu:.2f}x cpu; "
          f"min / min {min(theirs.wall) / min(ours.wall):.2f}x wall, "
          f"{min(theirs.cpu) / min(ours.cpu):.2f}x cpu")

if __name__ == "__main__":
    main()
