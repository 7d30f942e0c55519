"""Feature extraction driver: images -> detector -> box selection -> HDF5 feature store.

The command line and the Luigi tasks both call ``extract_features``. Decoding and resizing run in
DataLoader workers, the detector on the main thread, and HDF5 writes on a writer thread, so the
device waits for neither. A rerun resumes: images the feature store already holds are skipped.
Images whose bytes an earlier output with the same detector and settings holds are copied from it
(``reuse``, see extractor.reuse), so a grown folder costs only its new images.
Unreadable images are listed in ``<output>.failures.jsonl``; they are committed to the store only
when the run finishes within ``max_failure_ratio``, so a run that stops for too many failures
retries them next time.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extractor.detector.config import DetectorConfig
from extractor.detector.model import MIN_RESIZED_SIDE, Detections, VGDetector, image_to_tensor, resize_image
from extractor.detector.selection import STRATEGIES, best_labels, select_caffe, select_maxnms
from extractor.detector.weights import load_detectron2_weights
from extractor.images import DEFAULT_MAX_PIXELS, ImageReadError, image_id, list_images, load_image
from extractor.progress import ProgressFn, ProgressReporter
from extractor.reuse import Reuse, content_hash, content_hashes, extraction_key, write_sidecar
from extractor.store import FeatureStoreError, FeatureWriter, ImageFeatures, remove_stale_parts

FEATURE_DTYPES = ("float16", "float32")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ExtractionError(RuntimeError):
    """Extraction stopped: bad parameters, or more unreadable images than allowed."""


@dataclass
class BoxRule:
    """How many boxes an image keeps and by which selection rule."""

    strategy: str
    min_boxes: int
    max_boxes: int

    def span(self) -> str:
        """'36' for a fixed count, '10-100' for an adaptive one."""
        if self.min_boxes == self.max_boxes:
            return str(self.max_boxes)
        return f"{self.min_boxes}-{self.max_boxes}"


def box_rule(strategy: str, boxes: int | None, min_boxes: int | None, max_boxes: int | None) -> BoxRule:
    """Resolve ``boxes`` (fixed N) or ``min_boxes``/``max_boxes`` (adaptive); 36 fixed when none is given."""
    if strategy not in STRATEGIES:
        raise ExtractionError(f"selection must be one of {STRATEGIES}, got {strategy!r}")
    if boxes is not None and (min_boxes is not None or max_boxes is not None):
        raise ExtractionError("give either boxes (fixed N) or min_boxes/max_boxes (adaptive), not both")
    if boxes is not None:
        lo = hi = boxes
    elif min_boxes is None and max_boxes is None:
        lo = hi = 36
    else:
        lo = 10 if min_boxes is None else min_boxes
        hi = 100 if max_boxes is None else max_boxes
    for name, v in (("boxes" if boxes is not None else "min_boxes", lo), ("max_boxes", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExtractionError(f"{name} must be a positive integer, got {v!r}")
    if lo > hi:
        raise ExtractionError(f"min_boxes ({lo}) is larger than max_boxes ({hi})")
    return BoxRule(strategy, lo, hi)


def to_record(img_id: str, original_size: tuple[int, int], det: Detections, rule: BoxRule,
              dtype: str) -> ImageFeatures:
    """Select one image's boxes and turn them into a feature-store record in original-image pixels."""
    if rule.strategy == "caffe":
        keep, boxes = select_caffe(det.proposals, det.scores, min_boxes=rule.min_boxes,
                                   max_boxes=rule.max_boxes)
    else:
        keep, boxes = select_maxnms(det.boxes, det.scores, min_boxes=rule.min_boxes, max_boxes=rule.max_boxes)
    h, w = original_size
    rh, rw = det.image_size
    scale = boxes.new_tensor([w / rw, h / rh, w / rw, h / rh])
    boxes = boxes.float() * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    obj_id, obj_conf = best_labels(det.scores[keep])
    if det.attr_scores is not None:
        attr_id, attr_conf = best_labels(det.attr_scores[keep])
    else:
        attr_id, attr_conf = torch.full_like(obj_id, -1), torch.zeros_like(obj_conf)  # -1: no label
    return ImageFeatures(
        img_id=img_id, img_h=h, img_w=w,
        boxes=boxes.cpu().numpy().astype(np.float32),
        features=det.features[keep].cpu().numpy().astype(dtype),
        objects_id=obj_id.cpu().numpy().astype(np.int64),
        objects_conf=obj_conf.float().cpu().numpy().astype(np.float32),
        attrs_id=attr_id.cpu().numpy().astype(np.int64),
        attrs_conf=attr_conf.float().cpu().numpy().astype(np.float32))


@dataclass
class _Item:
    """What a loader worker hands back for one image: the resized tensor, or why there is none."""

    path: str
    img_id: str
    image: torch.Tensor | None
    original_size: tuple[int, int]
    error: str | None
    sha256: str | None = None  # the file's bytes after decoding: equal to the hash before, it vouches for them

    def pin_memory(self) -> _Item:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can overlap compute."""
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self


class _ImageDataset(Dataset):
    """Decode and resize in the DataLoader workers; a bad image becomes an _Item with an error."""

    def __init__(self, paths: Sequence[Path], min_size: int, max_size: int, max_pixels: int) -> None:
        self.paths, self.min_size, self.max_size, self.max_pixels = list(paths), min_size, max_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item:
        path = self.paths[i]
        try:
            image = load_image(path, self.max_pixels)
        except ImageReadError as e:
            return _Item(str(path), image_id(path), None, (0, 0), e.reason)
        h, w = image.shape[:2]
        resized = resize_image(image, self.min_size, self.max_size)
        if min(resized.shape[:2]) < MIN_RESIZED_SIDE:
            reason = (f"too thin: {w}x{h} resizes to {resized.shape[1]}x{resized.shape[0]}, "
                      f"under {MIN_RESIZED_SIDE} px")
            return _Item(str(path), image_id(path), None, (h, w), reason)
        return _Item(str(path), image_id(path), image_to_tensor(resized), (h, w), None, content_hash(path))


def _collate(items: list[_Item]) -> list[_Item]:
    return items


class _WriterThread(threading.Thread):
    """Moves records from a queue into the FeatureWriter so HDF5 writes never stall the detector."""

    def __init__(self, writer: FeatureWriter, maxsize: int = 256) -> None:
        super().__init__(name="feature-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue[ImageFeatures | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (rec := self.queue.get()) is not None:
            if self.error is None:  # after an error keep draining so the producer never blocks
                try:
                    self.writer.add(rec)
                except BaseException as e:  # handed to the main thread, which re-raises it
                    self.error = e

    def put(self, rec: ImageFeatures) -> None:
        self.check()
        self.queue.put(rec)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Write what is queued, then end the thread (errors stay in .error for check())."""
        self.queue.put(None)
        self.join()


def _resolve_device(device: str | torch.device, amp: str | None) -> tuple[torch.device, Any]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractionError(f"device={device!r} but CUDA is not available here")
    if amp is None:
        return dev, contextlib.nullcontext
    if amp not in AMP_DTYPES:
        raise ExtractionError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if dev.type != "cuda":
        raise ExtractionError(f"amp={amp!r} needs device='cuda' (got {device!r})")
    return dev, lambda: torch.autocast("cuda", dtype=AMP_DTYPES[amp])


def default_workers() -> int:
    """Decoding workers when none are asked for: a few, leaving a core to the detector."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _reuse_earlier(writer: FeatureWriter, todo: Sequence[tuple[Path, str]], sha: dict[str, str | None],
                   sources: Sequence[str | os.PathLike], key: dict[str, Any]) -> set[str]:
    """Copy into `writer` the earlier features of the todo images whose bytes `sources` hold; their ids."""
    if not sources or not todo:
        return set()
    hits = Reuse(sources, key).find({sha[i] for _, i in todo if sha[i]})
    copied = set()
    for rec in Reuse.records({i: hits[sha[i]] for _, i in todo if sha[i] in hits}):
        writer.add(rec)
        copied.add(rec.img_id)
    return copied


def extract_features(images: str | os.PathLike | Sequence[str | os.PathLike], weights: str | os.PathLike,
                     output: str | os.PathLike, *, config: str | os.PathLike | DetectorConfig = "VG-R101-C4",
                     boxes: int | None = None, min_boxes: int | None = None, max_boxes: int | None = None,
                     selection: str = "caffe", device: str = "cpu", batch_size: int = 1,
                     num_workers: int | None = None, dtype: str = "float16", amp: str | None = None,
                     max_failure_ratio: float = 0.05, max_pixels: int = DEFAULT_MAX_PIXELS,
                     overwrite: bool = False, reuse: Sequence[str | os.PathLike] = (),
                     progress: bool = True, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Extract region features of ``images`` into the HDF5 file ``output``; returns a summary dict.

    images: a folder, a list file or a list of paths. boxes=N keeps exactly N per image (36 when
    nothing is given); min_boxes/max_boxes keep between them (adaptive, the caffe rule's threshold).
    reuse: earlier feature files or folders of them; images whose bytes they hold (with the same weights
    and settings) are copied, not extracted. The output gets its own index (``<output>.images.jsonl``).
    Raises ExtractionError when more than max_failure_ratio of the images cannot be read. Images over
    max_pixels are listed as failures ("too large"), see extractor.images.DEFAULT_MAX_PIXELS. `on_progress`
    gets the images done (stored before, reused, extracted or failed) and the pace every few seconds.
    """
    if dtype not in FEATURE_DTYPES:
        raise ExtractionError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionError(f"batch_size must be a positive integer, got {batch_size!r}")
    workers = default_workers() if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ExtractionError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if not 0.0 <= max_failure_ratio <= 1.0:
        raise ExtractionError(f"max_failure_ratio must be in [0, 1], got {max_failure_ratio}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ExtractionError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    dev, autocast = _resolve_device(device, amp)
    cfg = DetectorConfig.load(config)
    rule = box_rule(selection, boxes, min_boxes, max_boxes)
    output = Path(output)
    if output.exists():
        remove_stale_parts(output)
        if not overwrite:
            raise FileExistsError(f"output {output} already exists (use overwrite=True / --overwrite)")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    paths = list_images(images)
    ids = [image_id(p) for p in paths]

    model = VGDetector(cfg)
    sha = load_detectron2_weights(model, weights)
    model.to(dev).eval()
    attrs = {"detector_config": cfg.to_dict(), "weights_sha256": sha, "box_strategy": rule.strategy,
             "min_boxes": rule.min_boxes, "max_boxes": rule.max_boxes, "amp": amp or "none"}
    key = extraction_key(attrs, dtype, dev.type)

    start = time.perf_counter()
    failures: list[tuple[str, str, str]] = []
    extracted = kept_boxes = 0
    allowed_failures = math.floor(max_failure_ratio * len(paths))
    content = dict(zip(ids, content_hashes(paths)))  # before decoding: what the index vouches for
    output.parent.mkdir(parents=True, exist_ok=True)
    with FeatureWriter(output, max_boxes=rule.max_boxes, feature_dim=cfg.feature_dim, dtype=dtype,
                       attrs=attrs) as writer:
        done = writer.done_ids()
        todo = [(p, i) for p, i in zip(paths, ids) if i not in done]
        reused = _reuse_earlier(writer, todo, content, reuse, key)
        todo = [p for p, i in todo if i not in reused]
        dataset = _ImageDataset(todo, cfg.min_size_test, cfg.max_size_test, max_pixels)
        loader = DataLoader(dataset, batch_size=batch_size,
                            num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        reporter = ProgressReporter(on_progress, "extract", len(paths), "img", start=len(paths) - len(todo))
        thread = _WriterThread(writer)
        thread.start()
        try:
            with tqdm(total=len(todo), disable=not progress, unit="img", desc="extract") as bar:
                for batch in loader:
                    thread.check()
                    good = [it for it in batch if it.error is None]
                    failures += [(it.path, it.img_id, it.error) for it in batch if it.error is not None]
                    if len(failures) > allowed_failures:
                        raise ExtractionError(
                            f"{len(failures)} of {len(paths)} images could not be read, more than "
                            f"max_failure_ratio={max_failure_ratio} allows; first: {failures[0][0]}: "
                            f"{failures[0][2]}. Finished images are kept; fix or remove the bad ones "
                            "(or raise max_failure_ratio) and rerun to resume.")
                    if good:
                        with torch.inference_mode():
                            with autocast():
                                dets = model([it.image.to(dev, non_blocking=True) for it in good])
                            for it, det in zip(good, dets):  # selection in float32, outside autocast
                                rec = to_record(it.img_id, it.original_size, det, rule, dtype)
                                kept_boxes += rec.num_boxes
                                thread.put(rec)
                    for it in good:  # a file rewritten while it was read is stored but not indexed
                        if it.sha256 != content[it.img_id]:
                            content[it.img_id] = None
                    extracted += len(good)
                    bar.update(len(batch))
                    reporter.update(len(paths) - len(todo) + extracted + len(failures))
        finally:
            thread.stop()
        thread.check()
        compute_s = time.perf_counter() - start
        for path, img_id, reason in failures:
            writer.add_failure(path, img_id, reason)
            content[img_id] = None
        write_sidecar(output, key, {i: h for i, h in content.items() if h})
        try:
            result = writer.finalize(order=ids, overwrite=overwrite)
        except FeatureStoreError as e:
            raise ExtractionError(f"could not finalize {output}: {e}") from e
    return {
        "output": str(output), "images": len(paths), "extracted": extracted, "reused": len(reused),
        "resumed": len(done & set(ids)), "failed": result["failures"], "stored": result["images"],
        "boxes_per_image": kept_boxes / extracted if extracted else 0.0,
        "seconds": round(compute_s, 3), "images_per_second": extracted / compute_s if compute_s > 0 else 0.0,
        "weights_sha256": sha, "config": cfg.name, "box_strategy": rule.strategy, "boxes": rule.span(),
        "device": str(dev), "batch_size": batch_size, "dtype": dtype, "amp": amp,
    }
