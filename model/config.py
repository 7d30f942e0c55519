"""LXMERT hyper-parameters, with transformers' field names and defaults so config.json files interchange."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"


@dataclass
class LxmertConfig:
    """Sizes, dropout and pretraining switches of the network; defaults are LXMERT base."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    visual_loss_normalizer: float = 6.67
    task_matched: bool = True
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def num_hidden_layers(self) -> dict[str, int]:
        """The per-encoder layer counts, as transformers reports them."""
        return {"vision": self.r_layers, "cross_encoder": self.x_layers, "language": self.l_layers}

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> LxmertConfig:
        """Build from a config.json mapping, dropping keys transformers adds (architectures, dtype...)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown LxmertConfig fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> LxmertConfig:
        """Read a config.json written by us, by transformers, or by hand."""
        return cls.from_dict(json.loads(Path(path).read_text()), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus `model_type`, which transformers' AutoConfig needs."""
        return {"model_type": "lxmert", **dataclasses.asdict(self)}

    def to_json_file(self, path: str | Path, architectures: list[str] | None = None) -> None:
        """Write config.json; `architectures` names the class, as transformers does."""
        values = self.to_dict()
        if architectures:
            values["architectures"] = architectures
        Path(path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
