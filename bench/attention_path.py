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

import contextlib
import functools
import json
from collections.abc import Iterator

import torch
from demo_step import alternate, setting, step, timing_args
from machine import cpu_description

import model.layers as layers


@contextlib.contextmanager
def forced(explicit: bool, bf16: bool) -> Iterator[None]:
    """Every attention through the explicit softmax (True) or SDPA (False), under bf16 autocast or not."""
    saved = layers.explicit_attention
    layers.explicit_attention = lambda q, p: explicit
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
    args = timing_args(__doc__)
    net, opt, batch = setting(114, (7, 9), dropout=0.0)
    settings = {f"{dtype} {mode}, {path}": (functools.partial(forced, path == "explicit", dtype == "bf16"),
                                             functools.partial(run, net, opt, batch))
                for dtype in ("fp32", "bf16") for mode, run in (("train step", step), ("eval forward", evaluate))
                for path in ("sdpa", "explicit")}
    ms = alternate(settings, args.steps, args.repeats)
    rows = {name: {"ms": round(t, 1), "speedup_over_sdpa": round(ms[name.replace("explicit", "sdpa")] / t, 2)}
            for name, t in ms.items()}
    print(json.dumps({"machine": cpu_description(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "steps": args.steps, "repeats": args.repeats,
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
