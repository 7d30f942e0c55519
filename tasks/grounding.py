"""Pointing accuracy: does the cross-attention from a word that names an object peak on that object's box?

LXMERT's claim is that cross-modality pretraining ties words to regions. GQA annotates which words of
a question name which scene-graph objects (`annotations.question`: whitespace-token index or span ->
object id), and the scene graph gives each object's box, so the claim can be measured directly: run
the network on the question and the image's stored boxes, average the language -> vision attention
of the word's WordPieces over heads (and over cross layers for the headline), and count a hit when
the box it attends to most overlaps the named object (IoU >= 0.5). Chance is the share of the boxes
that overlap it; `reachable` is how often any stored box does (the detector's share of the ceiling).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.jsonstream import DataFormatError, iter_array, iter_object
from extractor.store import FeatureReader
from tasks.data.features import locate_images, read_image

IOU = 0.5


@dataclass(frozen=True)
class PointingItem:
    """One question and the objects its words name: (first word, end word, box x, y, w, h in pixels)."""

    key: str
    img_id: str
    text: str
    refs: tuple[tuple[int, int, tuple[float, float, float, float]], ...]


def object_boxes(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """object id -> (x, y, w, h) from Visual Genome's objects.json (a list of images) or GQA's scene
    graphs (an object of images whose `objects` map ids to objects)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    boxes: dict[str, tuple[float, float, float, float]] = {}

    def add(oid: Any, obj: Any, where: str) -> None:
        try:
            boxes[str(oid)] = tuple(float(obj[k]) for k in ("x", "y", "w", "h"))  # type: ignore[assignment]
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(f"{path}: {where}: object {oid!r} needs numeric x, y, w, h") from None

    if head.startswith(b"["):
        for i, image in enumerate(iter_array(path)):
            for obj in image.get("objects", []) if isinstance(image, dict) else []:
                add(obj.get("object_id") if isinstance(obj, dict) else None, obj, f"image {i}")
    elif head.startswith(b"{"):
        for img, graph in iter_object(path):
            objects = graph.get("objects", {}) if isinstance(graph, dict) else {}
            for oid, obj in objects.items() if isinstance(objects, dict) else ():
                add(oid, obj, f"image {img!r}")
    else:
        raise DataFormatError(f"{path}: expected Visual Genome objects.json or GQA scene graphs (JSON)")
    return boxes


def _span(key: str, where: str) -> tuple[int, int]:
    """GQA's annotation key: one whitespace-token index ("3") or a span ("3:5", end excluded)."""
    try:
        a, _, b = key.partition(":")
        start = int(a)
        end = int(b) if b else start + 1
    except ValueError:
        raise DataFormatError(f"{where}: annotation key {key!r} is not a token index or span") from None
    if not 0 <= start < end:
        raise DataFormatError(f"{where}: annotation key {key!r} is an empty span")
    return start, end


def gqa_pointing_items(questions: str | Path, boxes: dict[str, tuple[float, float, float, float]]
                       ) -> list[PointingItem]:
    """The questions of a GQA questions file whose annotations name objects with a known box."""
    items = []
    for qid, q in iter_object(Path(questions)):
        where = f"{questions}: question {qid!r}"
        notes = (q.get("annotations") or {}).get("question") or {} if isinstance(q, dict) else {}
        refs = []
        for key, oid in sorted(notes.items()):
            if str(oid) in boxes:
                refs.append((*_span(key, where), boxes[str(oid)]))
        if refs:
            items.append(PointingItem(str(qid), str(q["imageId"]), str(q["question"]), tuple(refs)))
    return items


def _word_positions(tokenizer: Any, text: str, max_words: int) -> list[list[int]]:
    """For each whitespace word, the positions of its WordPieces after [CLS] that are not punctuation
    ("star?" gives the position of "star"), within the first max_words."""
    positions, at = [], 1
    for word in text.split():
        pieces = tokenizer.tokenize(word)
        positions.append([at + k for k, piece in enumerate(pieces)
                          if at + k <= max_words and any(ch.isalnum() for ch in piece)])
        at += len(pieces)
    return positions


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes `a` (n, 4) with one box `b` (4,), all (x1, y1, x2, y2)."""
    w = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    inter = w * h
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / np.maximum(area, 1e-12)


def backbone(model: nn.Module) -> nn.Module:
    """The LXMERT encoder of any of the model classes (they hold it as `lxmert`)."""
    return getattr(model, "lxmert", model)


@torch.no_grad()
def pointing_accuracy(model: nn.Module, tokenizer: Any, stores: Sequence[FeatureReader],
                      items: Iterable[PointingItem], batch_size: int = 64, max_seq_length: int = 20,
                      max_boxes: int = 0) -> dict[str, Any]:
    """Pointing accuracy (%) over every named object of `items` whose image is in `stores`.

    Returns `accuracy` (attention averaged over heads and cross layers), `per_layer`, `chance`,
    `reachable` (all in %), and the counts `objects`, `questions` and `skipped` (questions whose image
    has no features).
    """
    encoder = backbone(model).eval()
    device = next(encoder.parameters()).device
    items = list(items)
    where = locate_images(stores, (it.img_id for it in items))
    kept = [it for it in items if it.img_id in where]
    hits: list[np.ndarray] = []  # per named object: hit per layer, then the mean over layers
    chance, reachable = [], []
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        images = [read_image(stores, *where[it.img_id], max_boxes) for it in batch]
        ids = [tokenizer.convert_tokens_to_ids(
            ["[CLS]", *tokenizer.tokenize(it.text)[: max_seq_length - 2], "[SEP]"]) for it in batch]
        n_words, n_boxes = max(map(len, ids)), max(im.num_boxes for im in images)
        input_ids = torch.zeros(len(batch), n_words, dtype=torch.long)
        text_mask = torch.zeros(len(batch), n_words, dtype=torch.long)
        feats = torch.zeros(len(batch), n_boxes, images[0].features.shape[1])
        pos = torch.zeros(len(batch), n_boxes, 4)
        box_mask = torch.zeros(len(batch), n_boxes)
        for row, (seq, im) in enumerate(zip(ids, images)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            text_mask[row, : len(seq)] = 1
            feats[row, : im.num_boxes] = torch.from_numpy(im.features.astype(np.float32))
            pos[row, : im.num_boxes] = torch.from_numpy(im.boxes.astype(np.float32))
            box_mask[row, : im.num_boxes] = 1
        out = encoder(input_ids.to(device), feats.to(device), pos.to(device), text_mask.to(device),
                      box_mask.to(device), return_vision=False, output_attentions=True)
        # (layers, batch, words, boxes): mean over heads
        att = torch.stack([a.float().mean(1) for a in out.cross_encoder_attentions]).cpu().numpy()
        for row, (it, seq, im) in enumerate(zip(batch, ids, images)):
            words = _word_positions(tokenizer, it.text, len(seq) - 2)
            for first, end, (x, y, w, h) in it.refs:
                spots = [p for word in words[first:end] for p in word]
                if not spots:
                    continue  # the words were cut by max_seq_length
                target = np.array([x / im.img_w, y / im.img_h, (x + w) / im.img_w, (y + h) / im.img_h])
                good = _iou(im.boxes[: im.num_boxes].astype(np.float64), target) >= IOU
                per_layer = att[:, row, spots, : im.num_boxes].mean(1)  # (layers, boxes)
                picks = [*per_layer.argmax(-1), per_layer.mean(0).argmax()]
                hits.append(good[picks])
                chance.append(good.mean())
                reachable.append(good.any())
    table = np.array(hits, dtype=np.float64).reshape(len(hits), -1)
    return {"accuracy": round(100 * float(table[:, -1].mean()), 2) if len(table) else None,
            "per_layer": [round(100 * float(v), 2) for v in table[:, :-1].mean(0)] if len(table) else [],
            "chance": round(100 * float(np.mean(chance)), 2) if chance else None,
            "reachable": round(100 * float(np.mean(reachable)), 2) if reachable else None,
            "objects": len(table), "questions": len(kept), "skipped": len(items) - len(kept)}
