"""A tiny LXMERT and pretraining examples built in memory (no feature files), for tests of the training
paths that need a real network and every target but not the data pipeline."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from model import LxmertConfig

TINY = LxmertConfig(
    vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=24, l_layers=1, x_layers=2,
    r_layers=1, visual_feat_dim=12, num_object_labels=7, num_attr_labels=5, num_qa_labels=9,
    max_position_embeddings=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)


def pretrain_example(i: int, seed: int = 0, boxes: int | None = None, answer: bool = True) -> dict[str, Any]:
    """Example `i` as PretrainDataset returns it: one masked word, half the boxes masked, an answer
    unless `answer` is off; `boxes` boxes (default 3 to 5)."""
    rng = np.random.default_rng([seed, i])
    words = int(rng.integers(4, 9))
    n = int(rng.integers(3, 6)) if boxes is None else boxes
    labels = np.full(words, -100, dtype=np.int64)
    labels[1 + int(rng.integers(0, words - 2))] = int(rng.integers(1, TINY.vocab_size))
    feats = rng.standard_normal((n, TINY.visual_feat_dim)).astype(np.float32)
    return {"id": f"ex{i}", "input_ids": rng.integers(1, TINY.vocab_size, words), "labels": labels,
            "visual_feats": feats, "visual_pos": rng.random((n, 4)).astype(np.float32),
            "obj_ids": rng.integers(0, TINY.num_object_labels, n),
            "obj_conf": rng.random(n).astype(np.float32),
            "attr_ids": rng.integers(0, TINY.num_attr_labels, n),
            "attr_conf": rng.random(n).astype(np.float32), "feat_target": feats.copy(),
            "feat_mask": (np.arange(n) % 2).astype(np.float32), "matched": int(rng.integers(0, 2)),
            "ans": int(rng.integers(0, TINY.num_qa_labels)) if answer else -100, "index": i, "shown": i}


class PretrainExamples(Dataset):
    """`n` in-memory pretraining examples (see `pretrain_example`)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.items = [pretrain_example(i, seed) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]
