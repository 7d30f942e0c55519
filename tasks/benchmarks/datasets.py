"""The task files as datasets: entries whose images are in the feature files, each example's words and
boxes, and the collate function shared by every benchmark (QA batches carry `target`, pairs `label`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from extractor.store import FeatureReader
from tasks.data.batches import pad
from tasks.data.features import locate_images, read_image


def encode(tokenizer: Any, sentence: str, max_len: int) -> np.ndarray:
    """[CLS] words [SEP], truncated as the original (words cut to max_len - 2)."""
    tokens = tokenizer.tokenize(sentence.strip())[: max_len - 2]
    return np.asarray(tokenizer.convert_tokens_to_ids(["[CLS]", *tokens, "[SEP]"]), dtype=np.int64)


class TaskDataset(Dataset):
    """Task entries whose images are in the feature files (others are counted in `skipped`)."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 image_keys: Sequence[str], max_seq_length: int, max_boxes: int) -> None:
        where = locate_images(stores, (e[k] for e in entries for k in image_keys))
        self.entries = [e for e in entries if all(e[k] in where for k in image_keys)]
        self.skipped = len(entries) - len(self.entries)
        self.where, self.stores, self.tokenizer = where, list(stores), tokenizer
        self.max_seq_length, self.max_boxes = max_seq_length, max_boxes

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, img_id: str) -> tuple[np.ndarray, np.ndarray]:
        rec = read_image(self.stores, *self.where[img_id], self.max_boxes)
        return rec.features, rec.boxes.astype(np.float32)


def collate_task(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad words and boxes to the batch's longest; QA batches carry `target`, NLVR2 `label`."""
    n_words = max(len(e["input_ids"]) for e in examples)
    pair = "box_mask" in examples[0]
    box_axis = 1 if pair else 0
    n_boxes = max(e["visual_feats"].shape[box_axis] for e in examples)
    feat_dtype = torch.from_numpy(examples[0]["visual_feats"][:0]).dtype
    ids = pad([e["input_ids"] for e in examples], n_words, torch.long)
    batch: dict[str, Any] = {
        "ids": [str(e["key"]) for e in examples],
        "keys": [e["key"] for e in examples],
        "input_ids": ids,
        "attention_mask": pad([np.ones(len(e["input_ids"]), np.int64) for e in examples], n_words, torch.long),
        "token_type_ids": torch.zeros_like(ids),
        "visual_feats": pad([e["visual_feats"] for e in examples], n_boxes, feat_dtype, box_axis),
        "visual_pos": pad([e["visual_pos"] for e in examples], n_boxes, torch.float32, box_axis),
    }
    if pair:
        batch["visual_attention_mask"] = pad([e["box_mask"] for e in examples], n_boxes, torch.float32, 1)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        masks = [np.ones(len(e["visual_feats"]), np.float32) for e in examples]
        batch["visual_attention_mask"] = pad(masks, n_boxes, torch.float32)
        batch["target"] = torch.from_numpy(np.stack([e["target"] for e in examples]))
    return batch
