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


def box_name(record: ImageFeatures, j: int, object_names: Sequence[str], attribute_names: Sequence[str]) -> str:
    """What the detector calls box j: "attribute object" (attribute left out when unlabeled)."""
    obj = _name(object_names, int(record.objects_id[j]))
    attr_id = int(record.attrs_id[j])
    return obj if attr_id < 0 else f"{_name(attribute_names, attr_id)} {obj}"


def caption(record: ImageFeatures, j: int, object_names: Sequence[str],
            attribute_names: Sequence[str]) -> str:
    """The text shown for box j: "attribute object confidence" (attribute left out when unlabeled)."""
    return f"{box_name(record, j, object_names, attribute_names)} {float(record.objects_conf[j]):.2f}"


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


def readable(image_bgr: np.ndarray, min_side: int = 384, max_side: int = 1024) -> np.ndarray:
    """The image scaled so its shorter side is `min_side` (its longer side at most `max_side`): large enough
    that box captions drawn on it can be read, small enough for a page of them."""
    h, w = image_bgr.shape[:2]
    scale = min(min_side / min(h, w), max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image_bgr, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)


def draw_attention(image_bgr: np.ndarray, boxes: np.ndarray, weights: np.ndarray, captions: Sequence[str],
                   image_size: tuple[int, int], labelled: int = 3) -> np.ndarray:
    """A copy of the image shaded by attention over its boxes: each pixel as bright as the most attended box
    covering it (relative to the top box), every box outlined, the `labelled` most attended ones in colour
    with "rank. caption share%".

    `boxes` (n, 4) are pixel x1 y1 x2 y2 in an image of `image_size` (height, width), rescaled to the image
    given; `weights` (n,) are the attention shares (summing to 1 over the boxes).
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 BGR, got {image_bgr.shape} {image_bgr.dtype}")
    weights = np.asarray(weights, np.float64)
    if len(weights) != len(boxes) or len(captions) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes, {len(weights)} weights and {len(captions)} captions")
    h, w = image_bgr.shape[:2]
    scale = np.array([w / image_size[1], h / image_size[0]] * 2, np.float64)
    pixels = [tuple(int(v) for v in (np.asarray(b, np.float64) * scale).round()) for b in boxes]
    heat = np.zeros((h, w), np.float32)
    top = weights.max() if len(weights) and weights.max() > 0 else 1.0
    for (x1, y1, x2, y2), weight in zip(pixels, weights):
        region = heat[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)]
        np.maximum(region, weight / top, out=region)
    out = (image_bgr.astype(np.float32) * (0.25 + 0.75 * heat[..., None])).round().astype(np.uint8)
    thick = max(2, round(min(h, w) / 200))
    font = max(0.5, min(h, w) / 800)
    for x1, y1, x2, y2 in pixels:
        cv2.rectangle(out, (x1, y1), (x2, y2), (200, 200, 200), 1)
    order = np.argsort(-weights, kind="stable")[:labelled]
    texts = [f"{rank}. {captions[j]} {100 * weights[j]:.0f}%" for rank, j in enumerate(order, start=1)]
    spots = _label_spots([pixels[j] for j in order], texts, font, (h, w))
    for rank in reversed(range(len(order))):  # the most attended drawn last, on top
        x1, y1, x2, y2 = pixels[order[rank]]
        colour = _colour(rank)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        lx1, ly1, lx2, ly2 = spots[rank]
        cv2.rectangle(out, (lx1, ly1), (lx2, ly2), colour, cv2.FILLED)
        cv2.putText(out, texts[rank], (lx1, ly2 - cv2.getTextSize(texts[rank], _FONT, font, 1)[1]), _FONT, font,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _label_spots(boxes: Sequence[tuple[int, int, int, int]], texts: Sequence[str], font: float,
                 size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Where each caption goes (x1, y1, x2, y2), in order: above its box, else inside its top, else below it,
    else the first free line downwards, so that no caption covers an earlier one."""
    h, w = size
    placed: list[tuple[int, int, int, int]] = []
    for (x1, y1, _, y2), text in zip(boxes, texts):
        (tw, th), base = cv2.getTextSize(text, _FONT, font, 1)
        lh, lx = th + base, max(0, min(x1, w - tw))
        tops = [y1 - lh, y1, y2, *range(0, max(h - lh, 0) + 1, lh)]
        spots = [(lx, top, lx + tw, top + lh) for top in tops if 0 <= top <= h - lh]
        free = [s for s in spots if not any(s[0] < p[2] and p[0] < s[2] and s[1] < p[3] and p[1] < s[3]
                                            for p in placed)]
        placed.append((free or spots or [(lx, 0, lx + tw, lh)])[0])
    return placed


def side_by_side(images: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Images in a row on white, scaled to the height of the first (an NLVR2 pair)."""
    height = images[0].shape[0]
    scaled = [im if im.shape[0] == height else
              cv2.resize(im, (max(1, round(im.shape[1] * height / im.shape[0])), height), interpolation=cv2.INTER_AREA)
              for im in images]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    row: list[np.ndarray] = []
    for im in scaled:
        row += [spacer, im] if row else [im]
    return np.concatenate(row, axis=1)


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
