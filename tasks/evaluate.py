"""Score predictions with the official metrics: `python -m tasks.evaluate {vqa,gqa,nlvr2} ...`.

Prints one JSON object on stdout. Bad input (a missing or malformed file, predictions that miss
questions or name unknown ones) exits with status 2 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from extractor.jsonstream import DataFormatError
from tasks.benchmarks import BENCHMARKS, PredictionError


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per benchmark, its options from the benchmark's record."""
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    for name, benchmark in BENCHMARKS.items():
        command = sub.add_parser(name, help=benchmark.metric_help)
        benchmark.add_evaluate_arguments(command)
        command.add_argument("--allow-missing", action="store_true",
                             help="score questions without a prediction as wrong instead of failing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one evaluation; 0 on success, 2 on bad input."""
    options = vars(build_parser().parse_args(argv))
    benchmark = BENCHMARKS[options.pop("task")]
    try:
        result = benchmark.evaluate(**options)
    except (DataFormatError, PredictionError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
