"""What a pretraining step of the demo network costs at other widths, and under torch.compile.

Sizing question behind it (docs/demo.md, "What the demo run learns"): a wider network might leave
the matching plateau in fewer steps, but each step costs more; torch.compile might make every step
cheaper. One pretraining step (five losses, backward, fused AdamW) on demo-shaped batches (batch 64,
20 tokens, 10 boxes of 256-d features) under the AMP mode the demo profile runs (`auto`: bf16 where
the CPU has bf16 instructions), for the `demo` preset at 128 wide (what the demo runs), 192 and 256
wide (4 heads, 4x feed-forward), and with `--compile` the 128-wide network under torch.compile's
default mode. The settings alternate in one process, `--repeats` rounds of `--steps` timed steps
each (the first compiled call, which compiles, is timed apart); median ms/step of each.

    python bench/demo_width.py [--compile]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from demo_step import alternate, setting, step
from machine import cpu_model

from tasks.training.loop import autocast, resolve_amp
from tasks.training.weights import MODEL_PRESETS

WIDTHS = (128, 192, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--compile", action="store_true", help="also the 128-wide network under torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    preset = dict(MODEL_PRESETS["demo"])
    settings, compile_s = {}, None
    for width in WIDTHS:
        MODEL_PRESETS["demo"] = dict(preset, hidden_size=width, intermediate_size=4 * width)
        settings[str(width)] = setting(114, (7, 9))
    MODEL_PRESETS["demo"] = preset
    if args.compile:
        net, opt, batch = setting(114, (7, 9))
        compiled = torch.compile(net)
        settings["128 compiled"] = (compiled, opt, batch)

    runs = {name: functools.partial(step, *s) for name, s in settings.items()}
    amp = functools.partial(autocast, "auto", cpu)
    if args.compile:
        start = time.perf_counter()
        with amp():
            runs["128 compiled"]()
        compile_s = round(time.perf_counter() - start, 1)
    ms = alternate({name: (amp, run) for name, run in runs.items()}, args.steps, args.repeats)
    rows = {name: {"ms_per_step": round(t, 1), "vs_128": round(t / ms["128"], 2)} for name, t in ms.items()}
    print(json.dumps({"machine": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "amp": resolve_amp("auto", cpu), "batch": 64, "steps": args.steps, "repeats": args.repeats,
                      "first_compiled_step_s": compile_s, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
