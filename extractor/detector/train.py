"""Train the Visual Genome detector (RPN, box head, attribute head) on Visual Genome annotations.

No pretrained weights can be fetched, so a detector for a new set of classes (the demo world's
shapes, colours and sizes) is trained here from random initialisation, end to end, with
torchvision's Faster R-CNN machinery (the losses: ``losses.py``; mAP and region accuracy:
``evaluation.py``). Training runs the model's parts (``backbone``,
``RegionProposalNetwork.head_outputs`` / ``select``, ``Res5RoIHeads.pool``, ``BoxPredictor``) with
gradients; ``VGDetector.forward`` stays the inference path, so trained weights extract exactly like
released ones. What it writes travels as one folder: the weights, their config YAML and the config's
label files beside them (``save_config_yaml``), and the metrics.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from extractor.detector.annotations import AnnotationError, ImageAnnotation, read_vg_annotations
from extractor.detector.config import NAMED_CONFIGS, ConfigError, DetectorConfig, save_config_yaml
from extractor.detector.evaluation import evaluate_map, region_accuracy
from extractor.detector.labels import ATTRIBUTES_FILE, OBJECTS_FILE
from extractor.detector.losses import LossSettings, detector_losses
from extractor.detector.model import Bottleneck, Conv2dNorm, VGDetector
from extractor.detector.samples import DetectionDataset, DetectionSample
from extractor.detector.weights import save_detectron2_weights
from extractor.fileio import atomic_write
from extractor.images import read_img_id_list
from extractor.progress import ProgressFn, ProgressReporter


def _as_list(items: list[DetectionSample]) -> list[DetectionSample]:
    return items


@torch.no_grad()
def init_frozen_norms(model: VGDetector, samples: Sequence[DetectionSample]) -> None:
    """Set every frozen BN to the statistics of its conv's output on a few images, then leave it frozen.

    Trained from scratch, a network whose normalisation never adapts starts badly scaled; this
    data-dependent start (what a pretrained frozen BN would hold) makes each conv's output zero-mean,
    unit-variance at step 0 and learns the shapes markedly faster (measured). Residual branches start at
    full scale (the inference init's 0.1 only suits unscaled random weights).
    """
    def set_stats(conv: nn.Module, args: tuple[Tensor, ...]) -> None:
        out = F.conv2d(args[0], conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        conv.norm.running_mean.copy_(out.mean(dim=(0, 2, 3)))
        conv.norm.running_var.copy_(out.var(dim=(0, 2, 3)).clamp(min=1e-2))  # a dead channel stays tame

    for m in model.modules():
        if isinstance(m, Bottleneck):
            m.conv3.norm.weight.fill_(1.0)
    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, Conv2dNorm)]
    try:
        dev = model.pixel_mean.device
        groups: dict[tuple[int, ...], list[DetectionSample]] = {}
        for s in samples:
            groups.setdefault(tuple(s.image.shape), []).append(s)
        images = max(groups.values(), key=len)  # the stem and res2..4 see one batch of equal-sized images
        c4 = model.backbone(model.normalize(torch.stack([s.image for s in images]).to(dev)))
        h, w = images[0].image.shape[-2:]
        regions = [torch.cat([s.boxes, s.boxes.new_tensor([[0, 0, w, h]])]).to(dev) for s in images]
        model.roi_heads(model.roi_heads.pool(c4, regions))  # res5 sees the objects and the whole image
    finally:
        for hook in hooks:
            hook.remove()


def _is_val(img_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id: stable when images are added or reordered."""
    h = int.from_bytes(hashlib.sha1(img_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _split(anns: list[ImageAnnotation], train_ids: list[str] | None, val_ids: list[str] | None,
           val_fraction: float, objects: Path) -> tuple[list[ImageAnnotation], list[ImageAnnotation]]:
    """(train, val): val_ids when given, else a hash-chosen val_fraction of the (train_ids) images."""
    if val_ids is not None:
        val_set = set(val_ids)
        overlap = sorted(val_set & set(train_ids or []))
        if overlap:
            raise ValueError(f"train_ids and val_ids share {len(overlap)} image(s): {overlap[:10]}")
        missing = sorted(val_set - {a.img_id for a in anns})
        if missing:
            raise AnnotationError(f"{objects}: {len(missing)} val image id(s) have no annotations: "
                                  f"{missing[:10]}")
        return [a for a in anns if a.img_id not in val_set], [a for a in anns if a.img_id in val_set]
    return ([a for a in anns if not _is_val(a.img_id, val_fraction)],
            [a for a in anns if _is_val(a.img_id, val_fraction)])


def train_detector(cfg: DetectorConfig | str | os.PathLike, *, images: str | os.PathLike,
                   objects: str | os.PathLike, attributes: str | os.PathLike | None = None,
                   output: str | os.PathLike, train_ids: Iterable[str | int] | None = None,
                   val_ids: Iterable[str | int] | None = None, val_fraction: float = 0.2,
                   metrics: str | os.PathLike | None = None, epochs: float = 10.0, steps: int | None = None,
                   batch_size: int = 4, lr: float = 5e-3, weight_decay: float = 1e-4, warmup_steps: int = 50,
                   flip: bool = True, losses: LossSettings = LossSettings(), seed: int = 0,
                   device: str = "cpu", num_workers: int = 0, unknown_names: str = "error",
                   progress: bool = True, config_file: str | os.PathLike | None = None,
                   on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train VGDetector(cfg) from random initialisation; save Detectron2-format weights and a metrics JSON.

    Validation images are ``val_ids`` when given, else a deterministic ``val_fraction`` of the
    (``train_ids``) images chosen by a hash of their id. ``steps`` overrides ``epochs``. AdamW with
    warm-up and cosine decay; on CPU the same seed and thread count give the same weights.
    Returns the metrics (mAP@0.5 and region accuracy on val, per-epoch mean losses, wall and CPU
    seconds), which are also written to ``metrics`` (default: ``output`` with suffix ``.json``).
    The config goes to ``config_file`` (default: ``output`` with suffix ``.yaml``) before training, its
    label files copied beside it, so the weights' folder is self-describing. `on_progress` gets the step,
    loss and pace every few seconds (extractor.progress).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    cfg = DetectorConfig.load(cfg)
    output = Path(output)
    metrics_path = Path(metrics) if metrics is not None else output.with_suffix(".json")
    config_path = Path(config_file) if config_file is not None else output.with_suffix(".yaml")
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("steps", 1 if steps is None else steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if steps is None and not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_list = None if train_ids is None else [str(i) for i in train_ids]
    val_list = None if val_ids is None else [str(i) for i in val_ids]
    anns, skipped = read_vg_annotations(
        images, objects, attributes, object_vocab=cfg.object_labels or OBJECTS_FILE,
        attribute_vocab=(cfg.attribute_labels or ATTRIBUTES_FILE) if cfg.attribute_on else None,
        ids=None if train_list is None else train_list + (val_list or []), unknown_names=unknown_names)
    train, val = _split(anns, train_list, val_list, val_fraction, Path(objects))
    if not train:
        raise AnnotationError(f"{objects}: no training images left (train_ids / val_ids / val_fraction)")

    save_config_yaml(cfg, config_path)

    dev = torch.device(device)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps if steps is not None else max(1, round(epochs * steps_per_epoch))
    warmup = min(warmup_steps, max(total // 5, 1))
    train_data, val_data = DetectionDataset(train, cfg), DetectionDataset(val, cfg)
    order = torch.Generator().manual_seed(seed)
    batches: list[list[tuple[int, bool]]] = []  # (image, mirrored) of every step, drawn up front
    while len(batches) < total:
        perm = torch.randperm(len(train), generator=order).tolist()
        mirror = (torch.rand(len(train), generator=order) < 0.5).tolist() if flip else [False] * len(train)
        batches += [[(i, mirror[i]) for i in perm[b: b + batch_size]]
                    for b in range(0, len(perm), batch_size)]
    batches = batches[:total]
    loader = DataLoader(train_data, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list)

    reporter = ProgressReporter(on_progress, "detector", total, "step", batch_size)
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeds init and sampling, leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = VGDetector(cfg).to(dev).train()
        init_frozen_norms(model, [train_data[key] for key in batches[0] + batches[min(1, total - 1)]])
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
        with tqdm(total=total, disable=not progress, desc="detector", unit="step") as bar:
            for step, batch in enumerate(loader):
                parts = detector_losses(model, batch, losses)
                loss = sum(parts.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"detector loss is {loss.item()} at step {step} "
                                             f"({ {k: v.item() for k, v in parts.items()} }); try a lower lr "
                                             f"than {lr}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for k, v in {**parts, "loss": loss}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
                    n = step + 1 - (history[-1]["step"] if history else 0)
                    history.append({"epoch": len(history) + 1, "step": step + 1,
                                    **{k: round(v / n, 5) for k, v in sums.items()}})
                    sums = {}
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
                reporter.update(step + 1, loss.item())
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    model.eval()
    result: dict[str, Any] = {"map50": None, "per_class": {}, "region_accuracy": {}}
    if len(val_data):
        result.update(evaluate_map(model, val_data))
        result["region_accuracy"] = region_accuracy(model, val_data)
    sha = save_detectron2_weights(model, output)  # written under a temporary name, then renamed
    result.update({
        "weights": str(output), "weights_sha256": sha, "metrics": str(metrics_path), "config": cfg.to_dict(),
        "train_images": len(train), "val_images": len(val), "skipped": skipped, "steps": total,
        "epochs": round(total / steps_per_epoch, 3), "batch_size": batch_size, "lr": lr, "seed": seed,
        "device": str(dev), "threads": torch.get_num_threads(), "train_seconds": round(train_wall, 2),
        "train_cpu_seconds": round(train_cpu, 2), "seconds": round(time.perf_counter() - wall, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2), "history": history})
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(metrics_path, result)
    return result


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extractor.detector.train",
                                description="Train the Visual Genome detector on Visual Genome annotations.")
    p.add_argument("--images", required=True, help="folder of the annotated images (file stem = image_id)")
    p.add_argument("--objects", required=True, help="Visual Genome objects.json")
    p.add_argument("--attributes", help="Visual Genome attributes.json (optional)")
    p.add_argument("--output", required=True,
                   help="weights to write (.pkl); the metrics (.json) and config (.yaml) go next to them")
    p.add_argument("--config", required=True,
                   help=f"named config ({', '.join(NAMED_CONFIGS)}) or a Detectron2-style YAML (the demo world "
                        "writes one for its classes)")
    p.add_argument("--train-ids", help="file of training image ids, one a line or a JSON list (default: all not in "
                                       "val)")
    p.add_argument("--val-ids", help="file of validation image ids, one a line or a JSON list")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share held out when --val-ids is absent")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--skip-unknown-names", action="store_true",
                   help="drop objects / attributes whose names are not in the label files (default: error)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ids = {name: read_img_id_list(path, numbers_as=None) if path else None
               for name, path in (("train_ids", args.train_ids), ("val_ids", args.val_ids))}
        result = train_detector(
            args.config, images=args.images, objects=args.objects, attributes=args.attributes, output=args.output,
            **ids,
            val_fraction=args.val_fraction,
            epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            device=args.device, num_workers=args.workers,
            unknown_names="skip" if args.skip_unknown_names else "error", progress=not args.no_progress)
    except (ConfigError, AnnotationError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    map50 = "n/a" if result["map50"] is None else f"{result['map50']:.3f}"
    config_yaml = Path(args.output).with_suffix(".yaml")
    print(f"{result['weights']}: {result['steps']} steps on {result['train_images']} images in "
          f"{result['train_seconds']:.1f} s ({result['train_cpu_seconds']:.1f} CPU s), "
          f"val mAP@0.5 {map50} on "
          f"{result['val_images']} images; metrics {result['metrics']}; config {config_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
