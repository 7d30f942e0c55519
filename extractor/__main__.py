"""Command line: ``python -m extractor --images DIR_OR_LIST --weights W --output OUT.h5 [options]``."""
from __future__ import annotations

import argparse
import sys

from extractor.detector.config import NAMED_CONFIGS, RESIZE_MODES, ConfigError
from extractor.detector.model import DEFAULT_REGION_CHUNK
from extractor.detector.selection import STRATEGIES
from extractor.detector.weights import UnsafePickleError, WeightsError
from extractor.extract import FEATURE_DTYPES, ExtractionError, extract_features
from extractor.images import DEFAULT_MAX_PIXELS
from extractor.store import FeatureStoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m extractor",
        description="Extract Visual Genome Faster R-CNN region features into an HDF5 feature file.")
    p.add_argument("--images", required=True,
                   help="folder of images, a list file (one path a line) or one image")
    p.add_argument("--weights", required=True, help="Detectron2-format weights (.pkl pickle or torch file)")
    p.add_argument("--output", required=True, help="HDF5 file to write")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--boxes", type=int, help="keep exactly N boxes per image (default 36)")
    n.add_argument("--min-boxes", type=int, help="adaptive: at least this many boxes (default 10)")
    p.add_argument("--max-boxes", type=int, help="adaptive: at most this many boxes (default 100)")
    p.add_argument("--selection", choices=STRATEGIES, default="caffe", help="box selection rule")
    p.add_argument("--config", default="VG-R101-C4",
                   help=f"named config ({', '.join(NAMED_CONFIGS)}) or a Detectron2-style YAML file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=1, help="images per detector call")
    p.add_argument("--workers", type=int, default=None, help="image decoding workers (default: a few)")
    p.add_argument("--dtype", choices=FEATURE_DTYPES, default="float16", help="stored feature dtype")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16"), default=None,
                   help="autocast: bf16 or fp16 on CUDA, bf16 on CPUs with bf16 instructions (AVX-512 BF16, AMX), "
                        "auto: bf16 where the device has it, else float32; the RPN and the predictors stay float32")
    p.add_argument("--resize", choices=RESIZE_MODES, default=None,
                   help="input rule: caffe (bottom-up-attention's generate_tsv.py, the released features) or "
                        "detectron2 (py-bottom-up-attention's); default: the config's (caffe for VG-R101-C4 / "
                        "VG-R50-C4, detectron2 for tiny and detectors trained here)")
    p.add_argument("--tf32", action="store_true",
                   help="let CUDA run float32 convolutions and matmuls in TF32 (faster on Ampere and later; the "
                        "features then differ from the CPU's by TF32 rounding)")
    p.add_argument("--region-chunk", type=int, default=DEFAULT_REGION_CHUNK,
                   help=f"regions res5 runs on at once (memory only; default {DEFAULT_REGION_CHUNK})")
    p.add_argument("--max-failure-ratio", type=float, default=0.05,
                   help="stop when more than this share of the images cannot be read")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"list larger images as failures ('too large') without decoding them (default "
                        f"{DEFAULT_MAX_PIXELS:,}, about 1 GiB of memory per decoding worker)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--reuse", action="append", default=[], metavar="PATH",
                   help="an earlier output (feature file, or a folder searched for them; repeatable): images "
                        "whose bytes it holds with the same weights and settings are copied, not extracted")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.boxes is not None and args.max_boxes is not None:
        print("error: --boxes and --max-boxes cannot be combined (fixed N vs adaptive)", file=sys.stderr)
        return 2
    try:
        s = extract_features(
            args.images, args.weights, args.output, config=args.config, boxes=args.boxes,
            min_boxes=args.min_boxes, max_boxes=args.max_boxes, selection=args.selection, device=args.device,
            batch_size=args.batch_size, num_workers=args.workers, dtype=args.dtype, amp=args.amp,
            max_failure_ratio=args.max_failure_ratio, max_pixels=args.max_pixels, overwrite=args.overwrite,
            reuse=args.reuse, resize=args.resize, tf32=args.tf32, region_chunk=args.region_chunk,
            progress=not args.no_progress)
    except (ConfigError, ExtractionError, WeightsError, UnsafePickleError, FeatureStoreError,
            FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{s['output']}: {s['stored']} images stored ({s['extracted']} extracted now, "
          f"{s['reused']} reused, {s['resumed']} resumed, {s['failed']} failed), "
          f"{s['boxes_per_image']:.1f} boxes/image, "
          f"{s['images_per_second']:.2f} img/s on {s['device']} ({s['amp'] or 'float32'}), config {s['config']} "
          f"({s['resize']} resize), "
          f"{s['box_strategy']} {s['boxes']} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
