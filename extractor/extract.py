"""Feature extraction driver: images -> detector -> box selection -> HDF5 feature store.

The command line and the Luigi tasks both call ``extract_features``. Decoding and resizing run in
DataLoader workers, the detector on the main thread, and box selection and HDF5 writes on a writer
thread, so the device waits for neither: each batch's detections reach the host in one copy (one
synchronisation), and selection runs there on the CPU while the device computes the next batch.
A rerun resumes: images the feature store already holds are skipped.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from extractor.detector.config import RESIZE_MODES, DetectorConfig
from extractor.detector.model import (
    DEFAULT_REGION_CHUNK,
    MIN_RESIZED_SIDE,
    Detections,
    VGDetector,
    boxes_to_original,
    preprocess,
)
from extractor.detector.selection import STRATEGIES, best_labels, select_caffe, select_maxnms
from extractor.detector.weights import load_detectron2_weights
from extractor.images import DEFAULT_MAX_PIXELS, ImageReadError, image_id, list_images, load_image
from extractor.precision import AUTO, cpu_has_bf16, resolve_amp
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
              dtype: str, scale: float | None = None) -> ImageFeatures:
    """Select one image's boxes and turn them into a feature-store record in original-image pixels
    (scale: the caffe resize's factor, None for detectron2's, see model.boxes_to_original)."""
    if rule.strategy == "caffe":
        keep, boxes = select_caffe(det.proposals, det.scores, min_boxes=rule.min_boxes,
                                   max_boxes=rule.max_boxes)
    else:
        keep, boxes = select_maxnms(det.boxes, det.scores, min_boxes=rule.min_boxes, max_boxes=rule.max_boxes)
    h, w = original_size
    boxes = boxes_to_original(boxes, original_size, det.image_size, scale)
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
    scale: float | None = None  # the caffe resize's factor (boxes are divided by it); None for detectron2's

    def pin_memory(self) -> _Item:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can overlap compute."""
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self


class _ImageDataset(Dataset):
    """Decode and resize (the config's rule) in the DataLoader workers; a bad image becomes an _Item with an error."""

    def __init__(self, paths: Sequence[Path], cfg: DetectorConfig, max_pixels: int) -> None:
        self.paths, self.cfg, self.max_pixels = list(paths), cfg, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item:
        path = self.paths[i]
        try:
            image = load_image(path, self.max_pixels)
        except ImageReadError as e:
            return _Item(str(path), image_id(path), None, (0, 0), e.reason)
        h, w = image.shape[:2]
        tensor, scale = preprocess(image, self.cfg)
        rh, rw = tensor.shape[-2:]
        if min(rh, rw) < MIN_RESIZED_SIDE:
            reason = f"too thin: {w}x{h} resizes to {rw}x{rh}, under {MIN_RESIZED_SIDE} px"
            return _Item(str(path), image_id(path), None, (h, w), reason)
        return _Item(str(path), image_id(path), tensor, (h, w), None, content_hash(path), scale)


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def to_host(dets: list[Detections], rule: BoxRule) -> list[Detections]:
    """The detections box selection reads, on the CPU, in ONE device-to-host copy (one synchronisation) per
    batch; the class boxes (R, C, 4) only for the maxnms rule (empty (R, 0, 4) under caffe, which keeps
    the proposals). Detections already on the CPU are returned as they are."""
    if not dets or dets[0].scores.device.type == "cpu":
        return dets

    def fields(d: Detections) -> list[torch.Tensor]:
        out = [d.proposals, d.scores, d.features]
        out += [d.attr_scores] if d.attr_scores is not None else []
        return out + ([d.boxes] if rule.strategy == "maxnms" else [])

    tensors = [t for d in dets for t in fields(d)]
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    host = iter([part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
    out = []
    for d in dets:
        proposals, scores, features = next(host), next(host), next(host)
        attr = next(host) if d.attr_scores is not None else None
        boxes = next(host) if rule.strategy == "maxnms" else proposals.new_empty((proposals.shape[0], 0, 4))
        out.append(Detections(d.image_size, proposals, scores, boxes, features, attr))
    return out


class _WriterThread(threading.Thread):
    """Selects each batch's boxes on the CPU and writes the records, so neither stalls the detector."""

    def __init__(self, writer: FeatureWriter, rule: BoxRule, dtype: str, maxsize: int = 8) -> None:
        super().__init__(name="feature-writer", daemon=True)
        self.writer, self.rule, self.dtype = writer, rule, dtype
        self.queue: queue.Queue[list[tuple[_Item, Detections]] | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.kept_boxes = 0

    def run(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is None:  # after an error keep draining so the producer never blocks
                try:
                    with torch.inference_mode():
                        for it, det in batch:
                            rec = to_record(it.img_id, it.original_size, det, self.rule, self.dtype, it.scale)
                            self.writer.add(rec)
                            self.kept_boxes += rec.num_boxes
                except BaseException as e:  # handed to the main thread, which re-raises it
                    self.error = e

    def put(self, batch: list[tuple[_Item, Detections]]) -> None:
        """Queue one batch's host detections (to_host) for selection and writing."""
        self.check()
        self.queue.put(batch)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Write what is queued, then end the thread (errors stay in .error for check())."""
        self.queue.put(None)
        self.join()


def _resolve_device(device: str | torch.device, amp: str | None) -> tuple[torch.device, str | None]:
    """The device (cuda:N made the current CUDA device, so pinned memory and kernels go to it) and the
    autocast mode that runs: bf16 / fp16 on CUDA, bf16 on CPUs with bf16 instructions; "auto" resolved
    (extractor.precision), None for float32."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ExtractionError(f"device={device!r} is not a device (cpu, cuda or cuda:N): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionError(f"device={device!r} but CUDA is not available here")
        if dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise ExtractionError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                                      "are visible (CUDA_VISIBLE_DEVICES renumbers them from 0)")
            torch.cuda.set_device(dev)
    if amp == AUTO:
        amp = None if resolve_amp(amp, dev) == "none" else "bf16"
    if amp is None:
        return dev, None
    if amp not in AMP_DTYPES:
        raise ExtractionError(f"amp must be None, 'auto', 'bf16' or 'fp16', got {amp!r}")
    if dev.type == "cpu" and amp == "fp16":
        raise ExtractionError("amp='fp16' needs device='cuda'; on a CPU with bf16 instructions use amp='bf16'")
    if dev.type == "cpu" and not cpu_has_bf16():
        raise ExtractionError("amp='bf16' on the CPU needs bf16 instructions (AVX-512 BF16 or AMX), which this "
                              "CPU lacks: leave amp unset (float32)")
    if dev.type not in ("cuda", "cpu"):
        raise ExtractionError(f"amp={amp!r} needs device='cuda' or 'cpu' (got {device!r})")
    return dev, amp


@contextlib.contextmanager
def tf32_mode(device: torch.device, enabled: bool) -> Iterator[None]:
    """On CUDA, float32 convolutions and matmuls in TF32 only when asked (cuDNN allows it by default on
    Ampere and later), so float32 features agree with the CPU reference; restored afterwards."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


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
                     progress: bool = True, resize: str | None = None, tf32: bool = False,
                     region_chunk: int = DEFAULT_REGION_CHUNK, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Extract region features of ``images`` into the HDF5 file ``output``; returns a summary dict.

    images: a folder, a list file or a list of paths. boxes=N keeps exactly N per image (36 when
    nothing is given); min_boxes/max_boxes keep between them (adaptive, the caffe rule's threshold).
    reuse: earlier feature files or folders of them; images whose bytes they hold (with the same weights
    and settings) are copied, not extracted. The output gets its own index (``<output>.images.jsonl``).
    Raises ExtractionError when more than max_failure_ratio of the images cannot be read. Images over
    max_pixels are listed as failures ("too large"), see extractor.images.DEFAULT_MAX_PIXELS.
    resize: "caffe" or "detectron2" overrides the config's input rule (None: the config's). amp: "bf16" or
    "fp16" autocast on CUDA, "bf16" on CPUs with bf16 instructions, "auto" bf16 where the device has it
    (the file's `amp` attribute records what ran). tf32: let CUDA run float32 convolutions
    and matmuls in TF32 (off by default). region_chunk: regions res5 runs on at once (memory, not features).
    `on_progress` gets the images done (stored before, reused, extracted or failed) and the pace every few seconds.
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
    if isinstance(region_chunk, bool) or not isinstance(region_chunk, int) or region_chunk < 1:
        raise ExtractionError(f"region_chunk must be a positive integer, got {region_chunk!r}")
    if resize is not None and resize not in RESIZE_MODES:
        raise ExtractionError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    dev, amp = _resolve_device(device, amp)
    autocast = contextlib.nullcontext if amp is None else (lambda: torch.autocast(dev.type, dtype=AMP_DTYPES[amp]))
    cfg = DetectorConfig.load(config)
    if resize is not None:
        cfg = cfg.replace(resize=resize)
    tf32 = bool(tf32) and dev.type == "cuda"
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
    if amp is not None and dev.type == "cpu":  # oneDNN's bf16 convolutions want NHWC (docs/extractor.md)
        model.to(memory_format=torch.channels_last)
    model.roi_heads.region_chunk = region_chunk
    attrs = {"detector_config": cfg.to_dict(), "weights_sha256": sha, "box_strategy": rule.strategy,
             "min_boxes": rule.min_boxes, "max_boxes": rule.max_boxes, "amp": amp or "none",
             "resize": cfg.resize, "tf32": tf32}
    key = extraction_key(attrs, dtype, dev.type)

    start = time.perf_counter()
    failures: list[tuple[str, str, str]] = []
    extracted = 0
    allowed_failures = math.floor(max_failure_ratio * len(paths))
    content = dict(zip(ids, content_hashes(paths)))  # before decoding: what the index vouches for
    output.parent.mkdir(parents=True, exist_ok=True)
    with FeatureWriter(output, max_boxes=rule.max_boxes, feature_dim=cfg.feature_dim, dtype=dtype,
                       attrs=attrs) as writer:
        done = writer.done_ids()
        todo = [(p, i) for p, i in zip(paths, ids) if i not in done]
        reused = _reuse_earlier(writer, todo, content, reuse, key)
        todo = [p for p, i in todo if i not in reused]
        dataset = _ImageDataset(todo, cfg, max_pixels)
        loader = DataLoader(dataset, batch_size=batch_size,
                            num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        reporter = ProgressReporter(on_progress, "extract", len(paths), "img", start=len(paths) - len(todo))
        thread = _WriterThread(writer, rule, dtype, maxsize=max(2, 64 // batch_size))
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
                        with torch.inference_mode(), tf32_mode(dev, tf32):
                            with autocast():
                                dets = model([it.image.to(dev, non_blocking=True) for it in good])
                            thread.put(list(zip(good, to_host(dets, rule))))  # selected there, in float32
                    for it in good:  # a file rewritten while it was read is stored but not indexed
                        if it.sha256 != content[it.img_id]:
                            content[it.img_id] = None
                    extracted += len(good)
                    bar.update(len(batch))
                    reporter.update(len(paths) - len(todo) + extracted + len(failures))
        finally:
            thread.stop()
        thread.check()
        kept_boxes = thread.kept_boxes
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
        "device": str(dev), "batch_size": batch_size, "dtype": dtype, "amp": amp, "resize": cfg.resize,
        "tf32": tf32,
    }
