"""Render an image with its stored boxes and "attribute object confidence" captions, to eyeball features.

``python -m extractor.draw --features F.h5 --img-id ID --image PATH --output OUT.png [--top N]``
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from extractor.detector.labels import attribute_names, object_names
from extractor.images import ImageReadError, load_image
from extractor.store import FeatureReader, FeatureStoreError, ImageFeatures

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _name(names: Sequence[str], i: int) -> str:
    """Label of a class id; ids outside the vocabulary (e.g. -1 for "no label") show as '#id'."""
    return names[i] if 0 <= i < len(names) else f"#{i}"


def _colour(k: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per drawn box (golden-angle hues)."""
    hsv = np.array([[[int(k * 137.508) % 180, 220, 230]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def caption(record: ImageFeatures, j: int, object_names: Sequence[str],
            attribute_names: Sequence[str]) -> str:
    """The text shown for box j: "attribute object confidence" (attribute left out when unlabeled)."""
    obj = _name(object_names, int(record.objects_id[j]))
    attr_id = int(record.attrs_id[j])
    words = [obj] if attr_id < 0 else [_name(attribute_names, attr_id), obj]
    return f"{' '.join(words)} {float(record.objects_conf[j]):.2f}"


def draw_boxes(image_bgr: np.ndarray, record: ImageFeatures, object_names: Sequence[str],
               attribute_names: Sequence[str], max_boxes: int = 36) -> np.ndarray:
    """A copy of the image with the record's most confident ``max_boxes`` boxes and their captions.

    Boxes are in the record's original-image pixels; they are rescaled when the image given has
    another size than ``img_w`` x ``img_h``.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 BGR, got {image_bgr.shape} {image_bgr.dtype}")
    out = np.ascontiguousarray(image_bgr).copy()
    h, w = out.shape[:2]
    scale = np.array([w / record.img_w, h / record.img_h] * 2, np.float64)
    thick = max(1, round(min(h, w) / 300))
    font = max(0.35, min(h, w) / 900)
    order = np.argsort(-np.asarray(record.objects_conf), kind="stable")[:max_boxes]
    for k, j in enumerate(order):
        x1, y1, x2, y2 = (np.asarray(record.boxes[j], np.float64) * scale).round().astype(int)
        colour = _colour(k)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        text = caption(record, int(j), object_names, attribute_names)
        (tw, th), base = cv2.getTextSize(text, _FONT, font, 1)
        tx, ty = max(0, min(x1, w - tw)), max(th + base, y1)  # keep the caption inside the image
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw, ty), colour, cv2.FILLED)
        cv2.putText(out, text, (tx, ty - base), _FONT, font, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: draw one stored image's boxes into a PNG."""
    ap = argparse.ArgumentParser(prog="python -m extractor.draw", description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="feature file (.h5)")
    ap.add_argument("--img-id", required=True, help="image id in the feature file")
    ap.add_argument("--image", required=True, help="the original image file")
    ap.add_argument("--output", required=True, help="PNG to write")
    ap.add_argument("--objects-vocab", help="object label file (default: the shipped Visual Genome 1600)")
    ap.add_argument("--attributes-vocab",
                    help="attribute label file (default: the shipped Visual Genome 400)")
    ap.add_argument("--top", type=int, default=36, help="draw at most this many boxes, most confident first")
    a = ap.parse_args(argv)
    try:
        reader = FeatureReader(a.features)
        if a.img_id not in reader:
            ap.error(f"--img-id {a.img_id} is not in {a.features}")
        record = reader.get(a.img_id)
        image = load_image(a.image)
        objs, attrs = object_names(a.objects_vocab), attribute_names(a.attributes_vocab)
    except (FileNotFoundError, FeatureStoreError, ImageReadError, ValueError) as e:
        ap.error(str(e))
    out = draw_boxes(image, record, objs, attrs, max_boxes=a.top)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(a.output, out):
        ap.error(f"--output {a.output}: could not write the image (use a .png name)")
    print(f"{a.output}: {min(a.top, record.num_boxes)} boxes of {a.img_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
