"""`python -m tasks.demo --out DIR [--seed 0] [--size demo|tiny] [--coco-train-images N ...]`: write a world.

Prints one JSON line: where the world is, how long it took and its stats.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from tasks.demo.world import PRESETS, WorldConfig, generate_world
from tasks.training.runconfig import add_arguments, from_dict


def main(argv: list[str] | None = None) -> int:
    """Parse the flags (a preset, then a JSON config, then single fields) and generate the world."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.demo",
        description="Write the demo world: synthetic COCO, VQA v2, Visual Genome, GQA and NLVR2 files.")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(PRESETS), default="demo", help="preset sizes to start from")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads drawing images (default: the CPU count, at most 4)")
    add_arguments(parser, WorldConfig)
    ns = vars(parser.parse_args(argv))
    out, seed, size = ns.pop("out"), ns.pop("seed"), ns.pop("size")
    overwrite, workers, config_path = ns.pop("overwrite"), ns.pop("workers"), ns.pop("config")
    data = dataclasses.asdict(PRESETS[size])
    if config_path is not None:
        if not config_path.is_file():
            parser.error(f"--config: no file at {config_path}")
        data.update(json.loads(config_path.read_text()))
    data.update(ns)
    try:
        config = from_dict(WorldConfig, data, "flags")
    except ValueError as e:
        parser.error(str(e))
    if out.exists() and not overwrite:
        parser.error(f"{out} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    manifest = generate_world(out, seed, config, overwrite=overwrite, workers=workers)
    print(json.dumps({"world": str(out.absolute()), "seconds": round(time.perf_counter() - start, 2),
                      "seed": seed, "stats": manifest["stats"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
