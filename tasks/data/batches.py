"""Batches for the network: examples of different sizes padded into one tensor, and the network's
input arguments taken from a collated batch (pretraining and fine-tuning collate alike)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE = -100  # target value every loss skips (transformers' convention; the model also skips -1)


def pad(arrays: Sequence[np.ndarray], length: int, dtype: torch.dtype, axis: int = 0,
        value: float = 0) -> torch.Tensor:
    """Stack arrays that differ in size along `axis` into one (n, ...) tensor of that axis' `length`,
    filled with `value` past each array's end."""
    shape = list(arrays[0].shape)
    shape[axis] = length
    out = torch.full((len(arrays), *shape), value, dtype=dtype)
    for row, a in enumerate(arrays):
        index = [row] + [slice(None)] * a.ndim
        index[axis + 1] = slice(0, a.shape[axis])
        out[tuple(index)] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The network's input arguments from a collated batch (features cast to float32 on device)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"], "visual_feats": batch["visual_feats"].float(),
            "visual_pos": batch["visual_pos"], "visual_attention_mask": batch["visual_attention_mask"]}
