"""What reading feature files into memory buys a pretraining step, against per-record HDF5 reads.

The demo's pretraining as `python -m tasks.pretrain` runs it (the `demo` network, batch 64, one
DataLoader worker, the shared loop, `--amp auto`), on a synthetic world of demo-sized features
(tasks.demo.feature_world: 10 boxes of 256-d per image), with the feature file read per record
from HDF5 (`disk`, tasks.data.features.open_stores with preload_bytes=0) or from memory (`memory`,
the default for files up to PRELOAD_BYTES). The two alternate in one process, `--rounds` times;
each is timed over `--steps` steps after `--warmup`, and the medians and the speed-up are printed
with the machine. The records are the same in both (tests/test_store_roundtrip.py), so the losses are.

    python bench/preload_step.py                       # 2 rounds of 60 steps, torch's default threads
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from machine import cpu_description
from train_throughput import SENTENCES_PER_IMAGE, Clock, pretrain_config

from model import LxmertForPreTraining
from tasks.data.answers import default_pretrain_table
from tasks.data.features import PRELOAD_BYTES, open_stores
from tasks.data.tokenization import load_tokenizer
from tasks.pretrain import OBJECTIVES, PretrainCorpus, PretrainDataset, collate_pretrain, make_step, model_config
from tasks.training.loop import StepContext, StepOutput, train


def measure(args: argparse.Namespace, preload_bytes: int, out: Path) -> dict:
    """One timed run of the loop with the feature file on disk or in memory."""
    cfg = pretrain_config(args, out)
    torch.manual_seed(cfg.train.seed)
    stores = open_stores(cfg.features, preload_bytes=preload_bytes)
    table = default_pretrain_table()
    data = PretrainDataset(PretrainCorpus(cfg.corpus, stores, table), stores, load_tokenizer(), cfg, cfg.train.seed)
    clock, step = Clock(args, torch.device("cpu")), make_step(cfg)

    def timed(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
        clock.tick(ctx.step)
        return step(model, batch, ctx)

    model = LxmertForPreTraining(model_config(cfg, stores[0].feature_dim, len(table)))
    result = train(model, data, cfg.train, collate_fn=collate_pretrain, step_fn=timed, loss_names=OBJECTIVES,
                   export_fn=lambda model, directory: None)
    return {**clock.result(args), "preloaded": stores[0].preloaded, "amp": result.amp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (the demo profile's 1)")
    p.add_argument("--amp", default="auto", choices=["none", "auto", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--out", default="", help="also write the results here (JSON)")
    args = p.parse_args()
    args.model, args.device = "demo", "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = {"disk": 0, "memory": PRELOAD_BYTES}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        from tasks.demo.feature_world import write_world

        n_images = math.ceil((args.warmup + args.steps + 2) * args.batch_size / SENTENCES_PER_IMAGE) + 1
        args.world = Path(tmp) / "world"
        write_world(args.world, n_images=n_images, max_boxes=10, feature_dim=256, vary_boxes=False)
        for r in range(args.rounds):
            for mode, budget in modes.items():
                runs[mode].append(measure(args, budget, Path(tmp) / f"run-{mode}-{r}"))
                print(mode, json.dumps(runs[mode][-1]), flush=True)
    medians = {mode: statistics.median(x["examples_per_s"] for x in rs) for mode, rs in runs.items()}
    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "workers": args.workers, "amp": runs["disk"][0]["amp"], "steps": args.steps,
              "examples_per_s": medians, "speedup": medians["memory"] / medians["disk"], "runs": runs}
    print(f"CPU: {result['cpu']}; {result['threads']} threads, amp {result['amp']}, batch {args.batch_size}, "
          f"{args.workers} worker(s): disk {medians['disk']:.1f}, memory {medians['memory']:.1f} examples/s, "
          f"{result['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
