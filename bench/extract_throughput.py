"""Feature-extraction throughput: the batch-1 loop against the batched pipeline, and fp32 against bf16.

Real photos (scikit-image) are resized to 600/1000 and run through the R101 detector with random
weights saved in the Detectron2 pickle format (the speed does not depend on the weight values).
Each configuration runs ``extract_features`` end to end (decode, detect, select, write HDF5) in its
own subprocess so that its peak memory is its own; images/s counts the extraction loop only (not
the model load). On CUDA the bf16-autocast run is compared with fp32: the share of stored boxes
that match (IoU > 0.95) and the feature drift on matched boxes.

``--compare-amp`` measures bf16 autocast against float32 in ONE process, the two alternating for
``--rounds`` rounds (medians reported, the machine's load average beside them): on the released
architecture at full size (random weights: speed only), and on a TRAINED detector, the demo world's,
trained here first (or ``--detector`` naming a TrainDetector folder), whose drift counts: the share of
float32's stored boxes that bf16 matches at IoU > 0.9, the mean cosine of their RoI features and the
agreement of their top classes, on real photos and on the world's own validation images.

    python bench/extract_throughput.py                          # CPU, 4 images, batch 2
    python bench/extract_throughput.py --device cuda --count 64 --batch-size 8 --workers 6
    python bench/extract_throughput.py --compare-amp --count 2 --rounds 3     # CPU bf16 vs fp32
    python bench/extract_throughput.py --compare-amp --device cuda --count 64 --batch-size 8 --workers 6
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from machine import cpu_description
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


def amp_drift(reference: Path, other: Path, ids: list[str] | None = None) -> dict[str, float]:
    """bf16 against float32 stored features: share of the reference's boxes the other matches at IoU > 0.9,
    the mean cosine of the matched boxes' features and the share of matched boxes with the same top class."""
    from extractor.store import FeatureReader

    a, b = FeatureReader(reference), FeatureReader(other)
    total, cosines, same_class = 0, [], []
    for img_id in ids if ids is not None else a.ids:
        ra, rb = a.get(img_id), b.get(img_id)
        total += ra.num_boxes
        if not ra.num_boxes or not rb.num_boxes:
            continue
        best, j = box_iou(torch.from_numpy(ra.boxes), torch.from_numpy(rb.boxes)).max(dim=1)
        for i in torch.nonzero(best > 0.9).flatten().tolist():
            fa, fb = ra.features[i].astype(np.float64), rb.features[int(j[i])].astype(np.float64)
            cosines.append(float(fa @ fb / max(np.linalg.norm(fa) * np.linalg.norm(fb), 1e-30)))
            same_class.append(int(ra.objects_id[i]) == int(rb.objects_id[int(j[i])]))
    return {"boxes": total, "matched": len(cosines) / max(total, 1),
            "mean_cosine": float(np.mean(cosines)) if cosines else float("nan"),
            "min_cosine": float(np.min(cosines)) if cosines else float("nan"),
            "top_class_agreement": float(np.mean(same_class)) if same_class else float("nan")}


def alternate(args: argparse.Namespace, images: Path, weights: Path, config: str, root: Path) -> dict:
    """float32 and bf16 extractions of the same images in this process, alternating (the order flips every
    round); medians of images/s over the rounds, the load average around each run, the two last outputs."""
    from extractor.extract import extract_features

    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    loads: list[float] = []
    outputs = {name: root / f"{name}.h5" for name in speeds}
    for r in range(args.rounds):
        for name in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            loads.append(os.getloadavg()[0])
            s = extract_features(images, weights, outputs[name], config=config, boxes=36, dtype="float32",
                                 device=args.device, amp="bf16" if name == "bf16" else None,
                                 batch_size=args.batch_size, num_workers=args.workers, overwrite=True,
                                 progress=False)
            speeds[name].append(s["images_per_second"])
            print(f"  round {r + 1} {name}: {s['images_per_second']:.3f} img/s (load {loads[-1]:.1f})", flush=True)
    ratios = [b / f for f, b in zip(speeds["fp32"], speeds["bf16"])]
    return {"fp32_img_s": statistics.median(speeds["fp32"]), "bf16_img_s": statistics.median(speeds["bf16"]),
            "speedup": statistics.median(ratios), "speedups": ratios, "runs": speeds,
            "load_average": [min(loads), max(loads)], "outputs": outputs}


def trained_detector(args: argparse.Namespace, root: Path) -> tuple[Path, Path, list[Path], dict]:
    """(weights, config YAML, the world's validation images, its training figures): --detector's, or the demo
    detector trained here (then with its mAP@0.5)."""
    from extractor.detector.train import train_detector
    from extractor.images import list_images, read_img_id_list
    from tasks.demo.layout import LAYOUT
    from tasks.demo.sources import DETECTOR_CONFIG
    from tasks.demo.world import generate_world

    world = root / "world"
    generate_world(world, seed=0)
    val_ids = read_img_id_list(world / LAYOUT["splits"]["vg_val"], numbers_as=None)
    val_images = [p for p in list_images(world / LAYOUT["vg"]["images"]) if p.stem in set(map(str, val_ids))]
    if args.detector:
        folder = Path(args.detector)
        return folder / "weights.pkl", folder / "config.yaml", val_images, {"detector": str(folder)}
    print(f"training the demo detector for {args.train_steps} steps ...", flush=True)
    result = train_detector(world / DETECTOR_CONFIG, images=world / LAYOUT["vg"]["images"],
                            objects=world / LAYOUT["vg"]["objects"], attributes=world / LAYOUT["vg"]["attributes"],
                            output=root / "detector" / "weights.pkl", val_ids=val_ids, steps=args.train_steps,
                            progress=False)
    print(f"  mAP@0.5 {result['map50']:.3f} on {result['val_images']} validation images, "
          f"{result['train_seconds']:.0f} s", flush=True)
    figures = {"train_steps": args.train_steps, "map50": result["map50"], "val_images": result["val_images"],
               "train_seconds": result["train_seconds"]}
    return root / "detector" / "weights.pkl", root / "detector" / "weights.yaml", val_images, figures


def compare_amp(args: argparse.Namespace, device_name: str) -> None:
    """bf16 autocast against float32: speed on the released architecture, speed and drift on a trained one."""
    report: dict = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos, weights = make_inputs(root / "released", args.count, args.config)
        print(f"{args.config}, random weights, {args.count} photos:", flush=True)
        released = alternate(args, photos, weights, args.config, root / "released")
        released["drift"] = amp_drift(released.pop("outputs")["fp32"], root / "released" / "bf16.h5")
        report[args.config] = released

        weights, config, val_images, training = trained_detector(args, root)
        mixed = root / "trained" / "images"
        mixed.mkdir(parents=True)
        for p in sorted(photos.iterdir()):
            (mixed / p.name).symlink_to(p)
        world_ids = []
        for p in val_images[: args.world_images]:
            (mixed / f"world_{p.name}").symlink_to(p)
            world_ids.append(f"world_{p.stem}")
        print(f"trained demo detector, {args.count} photos + {len(world_ids)} world images:", flush=True)
        trained = alternate(args, mixed, weights, str(config), root / "trained")
        outputs = trained.pop("outputs")
        photo_ids = [p.stem for p in sorted(photos.iterdir())]
        trained["drift_photos"] = amp_drift(outputs["fp32"], outputs["bf16"], photo_ids)
        trained["drift_world"] = amp_drift(outputs["fp32"], outputs["bf16"], world_ids)
        trained["detector"] = training
        report["trained demo detector"] = trained
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=4, help="images per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored features")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the batched pipeline")
    p.add_argument("--workers", type=int, default=2, help="decoding workers of the batched pipeline")
    p.add_argument("--config", default="VG-R101-C4")
    p.add_argument("--compare-amp", action="store_true", help="bf16 against float32 in one process, alternating")
    p.add_argument("--rounds", type=int, default=3, help="--compare-amp: alternating rounds (medians reported)")
    p.add_argument("--detector", help="--compare-amp: a TrainDetector folder (weights.pkl, config.yaml) to use "
                                      "instead of training the demo detector here")
    p.add_argument("--train-steps", type=int, default=400, help="--compare-amp: steps of the demo detector")
    p.add_argument("--world-images", type=int, default=16, help="--compare-amp: world validation images")
    p.add_argument("--out", help="--compare-amp: also write the results as JSON here")
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
    cpu = cpu_description()
    name = torch.cuda.get_device_name(args.device) if cuda else cpu
    if args.compare_amp:
        compare_amp(args, name)
        return
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
