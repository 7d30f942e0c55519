"""Feature-extraction throughput: the batch-1 loop against the batched pipeline, and fp32 against bf16.

Real photos (scikit-image) are resized to 600/1000 and run through the R101 detector with random
weights saved in the Detectron2 pickle format (the speed does not depend on the weight values).
Each configuration runs ``extract_features`` end to end (decode, detect, select, write HDF5) in its
own subprocess so that its peak memory is its own; images/s counts the extraction loop only (not
the model load). On CUDA the bf16-autocast run is compared with fp32: the share of stored boxes
that match (IoU > 0.95) and the feature drift on matched boxes.

    python bench/extract_throughput.py                          # CPU, 4 images, batch 2
    python bench/extract_throughput.py --device cuda --count 64 --batch-size 8 --workers 6
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data
from torchvision.ops import box_iou

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "coins", "immunohistochemistry")


def make_inputs(root: Path, count: int, config: str) -> tuple[Path, Path]:
    """count JPEG photos of assorted sizes and random weights for config, written under root."""
    from extractor.detector.config import DetectorConfig
    from extractor.detector.model import VGDetector
    from extractor.detector.weights import save_detectron2_weights

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        Image.fromarray(photo[..., :3]).save(images / f"{i:04d}_{PHOTOS[i % len(PHOTOS)]}.jpg", quality=92)
    torch.manual_seed(0)
    weights = root / "weights.pkl"
    save_detectron2_weights(VGDetector(DetectorConfig.load(config)), weights)
    return images, weights


def run_one(args: argparse.Namespace) -> None:
    """Child process: one extraction, then one JSON line with its summary and peak memory."""
    from extractor.extract import extract_features

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = extract_features(args.images, args.weights, args.output, config=args.config, boxes=36,
                         device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                         dtype=args.dtype, amp=args.amp, progress=False)
    s["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
    print(json.dumps(s))


def spawn(args: argparse.Namespace, images: Path, weights: Path, output: Path, batch: int, workers: int,
          amp: str | None) -> dict:
    cmd = [sys.executable, __file__, "--_child", "--images", str(images), "--weights", str(weights),
           "--output", str(output), "--config", args.config, "--device", args.device, "--dtype", args.dtype,
           "--batch-size", str(batch), "--workers", str(workers)]
    if amp:
        cmd += ["--amp", amp]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def drift(reference: Path, other: Path) -> tuple[float, float, float]:
    """Matched-box share, mean and max relative L2 feature difference between two feature files."""
    from extractor.store import FeatureReader

    a, b = FeatureReader(reference), FeatureReader(other)
    matched = total = 0
    rel: list[float] = []
    for img_id in a.ids:
        ra, rb = a.get(img_id), b.get(img_id)
        total += ra.num_boxes
        if not ra.num_boxes or not rb.num_boxes:
            continue
        iou = box_iou(torch.from_numpy(ra.boxes), torch.from_numpy(rb.boxes))
        best, j = iou.max(dim=1)
        for i in torch.nonzero(best > 0.95).flatten().tolist():
            fa = ra.features[i].astype(np.float32)
            fb = rb.features[int(j[i])].astype(np.float32)
            rel.append(float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fa), 1e-12)))
            matched += 1
    if not rel:
        return matched / max(total, 1), float("nan"), float("nan")
    return matched / max(total, 1), float(np.mean(rel)), max(rel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=4, help="images per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored features")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the batched pipeline")
    p.add_argument("--workers", type=int, default=2, help="decoding workers of the batched pipeline")
    p.add_argument("--config", default="VG-R101-C4")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--amp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        run_one(args)
        return

    cuda = args.device.startswith("cuda")
    cpu = f"{platform.machine()}, {os.cpu_count()} cores"
    name = torch.cuda.get_device_name(args.device) if cuda else cpu
    from extractor.detector.config import DetectorConfig

    cfg = DetectorConfig.load(args.config)
    print(f"device: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"config {cfg.name} at {cfg.min_size_test}/{cfg.max_size_test}, {cfg.rpn_post_nms_topk} proposals, "
          f"{args.count} images, 36 boxes (caffe), {args.dtype} stored")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, weights = make_inputs(root, args.count, args.config)
        runs = [("batch-1 loop", 1, 0, None), (f"pipeline b={args.batch_size} w={args.workers}",
                                                args.batch_size, args.workers, None)]
        if cuda:
            runs.append((f"pipeline b={args.batch_size} bf16", args.batch_size, args.workers, "bf16"))
        rows, outputs = [], []
        for label, batch, workers, amp in runs:
            out = root / f"run{len(outputs)}.h5"
            s = spawn(args, images, weights, out, batch, workers, amp)
            outputs.append(out)
            rows.append((label, s["images_per_second"], s["seconds"], s["peak_rss_mb"], s["peak_gpu_mb"]))
        print(f"{'run':<28}{'img/s':>9}{'seconds':>10}{'peak RSS MB':>13}{'peak GPU MB':>13}")
        for label, ips, sec, rss, gpu in rows:
            print(f"{label:<28}{ips:>9.3f}{sec:>10.1f}{rss:>13.0f}{gpu:>13.0f}")
        print(f"speed-up of the pipeline over the batch-1 loop: {rows[1][1] / rows[0][1]:.2f}x")
        share, mean_rel, max_rel = drift(outputs[0], outputs[1])
        print(f"pipeline vs batch-1 loop: {share:.1%} of boxes match, feature drift (relative L2) "
              f"mean {mean_rel:.2e} max {max_rel:.2e}")
        if cuda:
            share, mean_rel, max_rel = drift(outputs[1], outputs[2])
            print(f"bf16 vs fp32: {share:.1%} of boxes match, feature drift (relative L2) "
                  f"mean {mean_rel:.2e} max {max_rel:.2e}")


if __name__ == "__main__":
    main()
