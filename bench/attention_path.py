"""Which attention a CPU should run: scaled_dot_product_attention (SDPA) or an explicit softmax.

The `demo` network on demo-shaped batches (bench/demo_step.py's) with dropout 0, in float32 and under
bf16 autocast: one training step (forward with all five losses, backward, fused AdamW) and one
evaluation forward (no_grad), each with every attention forced through SDPA and through the explicit
softmax (`model.layers.explicit_attention` replaced for the timing). With dropout, the CPU speed path
always takes the explicit softmax (its 16-bit masks); this decides the rest. Settings alternate in one
process, `--repeats` rounds of `--steps` timed steps each; the median ms of each is printed with the
explicit softmax's speed-up over SDPA.

    python bench/attention_path.py
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import torch
from demo_step import setting, step
from machine import cpu_description

import model.layers as layers


@contextlib.contextmanager
def forced(explicit: bool) -> Iterator[None]:
    """Every attention through the explicit softmax (True) or SDPA (False) for the block."""
    saved = layers.explicit_attention
    layers.explicit_attention = lambda q, p: explicit
    try:
        yield
    finally:
        layers.explicit_attention = saved


def evaluate(net: torch.nn.Module, _: torch.optim.Optimizer, batch: dict) -> None:
    """One evaluation forward, as fine-tuning's evaluation and `tasks.ask` run it."""
    net.eval()
    with torch.no_grad():
        net(**batch)
    net.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net, _, batch = setting(114, (7, 9))
    config = net.config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    net = type(net)(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    settings = {f"{dtype} {mode}, {path}": (dtype, run, path == "explicit")
                for dtype in ("fp32", "bf16") for mode, run in (("train step", step), ("eval forward", evaluate))
                for path in ("sdpa", "explicit")}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (dtype, run, explicit) in settings.items():
            with forced(explicit), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                run(net, opt, batch)  # warm
                start = time.perf_counter()
                for _ in range(args.steps):
                    run(net, opt, batch)
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
    rows = {}
    for name, t in times.items():
        base = statistics.median(times[name.replace("explicit", "sdpa")])
        rows[name] = {"ms": round(statistics.median(t), 1), "speedup_over_sdpa": round(base / statistics.median(t), 2)}
    print(json.dumps({"machine": cpu_description(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "steps": args.steps, "repeats": args.repeats,
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
