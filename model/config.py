"""LXMERT hyper-parameters, with transformers' field names and defaults so config.json files interchange.

Every config is checked when it is made, before any layer is allocated: a config.json is input from
a user or a download, so a size given as a string, a zero head count or a hidden size of 10^9 is a
one-line error naming the file and the field, not a traceback or an attempt to allocate terabytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"

# Upper bounds on sizes read from files. Each is far above any LXMERT (base: 768 hidden, 9 / 5 / 5
# layers, 30,522 words, 9,500 answers, 512 positions, 2048-d features) or any published transformer
# (the widest, 16,384 hidden), and low enough that one field alone cannot ask for an absurd model.
MAX_HIDDEN_SIZE = 16384        # the widest published transformers
MAX_INTERMEDIATE_SIZE = 65536  # 4x the widest hidden size, the usual feed-forward ratio
MAX_LAYERS = 128               # per encoder (language, cross, object-relationship); base has 9 / 5 / 5
MAX_VOCAB_SIZE = 10**6         # the largest tokenizers hold about 256k pieces
MAX_LABELS = 10**6             # answers, object classes, attributes: VQA 3,129, Visual Genome 1,600 / 400
MAX_POSITIONS = 65536          # LXMERT reads 20-token sentences; BERT allows 512
MAX_FEATURE_DIM = 65536        # region features (2048-d from ResNet) and box encodings (4-d)
MAX_PARAMETERS = 10**10        # 40 GB in fp32 before gradients and optimizer state; base is 228M
MAX_CONFIG_BYTES = 2**20       # a config.json is about 1 KB; a larger file is not one

_SIZES = {  # field -> (smallest, largest)
    "vocab_size": (1, MAX_VOCAB_SIZE),
    "hidden_size": (1, MAX_HIDDEN_SIZE),
    "num_attention_heads": (1, MAX_HIDDEN_SIZE),
    "num_qa_labels": (1, MAX_LABELS),
    "num_object_labels": (1, MAX_LABELS),
    "num_attr_labels": (1, MAX_LABELS),
    "intermediate_size": (1, MAX_INTERMEDIATE_SIZE),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "type_vocab_size": (1, MAX_VOCAB_SIZE),
    "l_layers": (0, MAX_LAYERS),
    "x_layers": (0, MAX_LAYERS),
    "r_layers": (0, MAX_LAYERS),
    "visual_feat_dim": (1, MAX_FEATURE_DIM),
    "visual_pos_dim": (1, MAX_FEATURE_DIM),
}
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")  # in [0, 1)
_NON_NEGATIVE = ("initializer_range", "visual_loss_normalizer")           # finite, >= 0
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")              # None or ids (eos: or a list)


class ConfigError(ValueError):
    """A config value or file that cannot describe a network; the message names the file and field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or float (not a bool) that converts to a finite float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (a {type(value).__name__})" if isinstance(value, str | bool | float | list | dict) else text


def _field_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be the field `name`, or None."""
    if name in _SIZES:
        low, high = _SIZES[name]
        kind = "a positive integer" if low == 1 else "a non-negative integer"
        if not _is_int(value) or value < low:
            return f"field {name!r} must be {kind}, got {_shown(value)}"
        if value > high:
            return f"field {name!r} must be at most {high:,}, got {_shown(value)}"
    elif name in _PROBABILITIES:
        if not _is_number(value) or not 0 <= value < 1:
            return f"field {name!r} must be a probability in [0, 1), got {_shown(value)}"
    elif name in _NON_NEGATIVE:
        if not _is_number(value) or value < 0:
            return f"field {name!r} must be a finite number >= 0, got {_shown(value)}"
    elif name in _TOKEN_IDS:
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            return f"field {name!r} must be a token id (an integer >= 0) or null, got {_shown(value)}"
    elif name == "hidden_act":
        from .layers import ACTIVATIONS  # layers imports this module: read at call time

        if not isinstance(value, str) or value not in ACTIVATIONS:
            return f"field 'hidden_act' must be one of {sorted(ACTIVATIONS)}, got {_shown(value)}"
    elif not isinstance(value, bool):  # the task_* / visual_*_loss / tie_word_embeddings switches
        return f"field {name!r} must be true or false, got {_shown(value)}"
    return None


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
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on the first field that cannot describe a network: wrong type, out of
        range, heads not dividing the hidden size, or a model over MAX_PARAMETERS; nothing is allocated."""
        for f in dataclasses.fields(self):
            problem = _field_problem(f.name, getattr(self, f.name))
            if problem:
                raise ConfigError(problem)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"field 'hidden_size' ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.parameter_estimate() > MAX_PARAMETERS:
            raise ConfigError(f"these sizes make a network of about {self.parameter_estimate():,} parameters, "
                              f"over the limit of {MAX_PARAMETERS:,} (hidden_size {self.hidden_size}, "
                              f"intermediate_size {self.intermediate_size}, layers {self.l_layers} / "
                              f"{self.x_layers} / {self.r_layers}, vocab_size {self.vocab_size})")

    def parameter_estimate(self) -> int:
        """Parameters of the pretraining model with every head (weight matrices and embeddings; biases
        and LayerNorms, under 1% of base, left out): what the sizes would ask to allocate."""
        h, i = self.hidden_size, self.intermediate_size
        layer = 4 * h * h + 2 * h * i                 # self-attention (q, k, v, out) + feed-forward
        cross = 12 * h * h + 4 * h * i                # shared cross-attention + two self-attentions + two FFNs
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h
        visual = (self.visual_feat_dim + self.visual_pos_dim) * h
        heads = (4 * h * h + self.vocab_size + 2 * h * self.num_qa_labels   # pooler, transforms, QA head
                 + h * (self.num_object_labels + self.num_attr_labels + self.visual_feat_dim))
        return (embeddings + visual + (self.l_layers + self.r_layers) * layer + self.x_layers * cross
                + heads)

    @property
    def num_hidden_layers(self) -> dict[str, int]:
        """The per-encoder layer counts, as transformers reports them."""
        return {"vision": self.r_layers, "cross_encoder": self.x_layers, "language": self.l_layers}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | Path | None = None,
                  **overrides: Any) -> LxmertConfig:
        """Build from a config.json mapping, dropping keys transformers adds (architectures, dtype...);
        a value that cannot describe a network is a ConfigError starting with `source` when given."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown LxmertConfig fields: {sorted(unknown)}")
        prefix = f"{source}: " if source else ""
        if not isinstance(values, dict):
            raise ConfigError(f"{prefix}expected a JSON object of config fields, found a JSON "
                              f"{type(values).__name__}")
        if values.get("model_type", "lxmert") != "lxmert":
            raise ConfigError(f"{prefix}field 'model_type' must be 'lxmert', got {_shown(values['model_type'])}")
        try:
            return cls(**{k: v for k, v in {**values, **overrides}.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> LxmertConfig:
        """Read a config.json written by us, by transformers, or by hand; errors name the file."""
        path = Path(path)
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a config.json may hold")
        try:
            values = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
        return cls.from_dict(values, source=path, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus `model_type`, which transformers' AutoConfig needs."""
        return {"model_type": "lxmert", **dataclasses.asdict(self)}

    def to_json_file(self, path: str | Path, architectures: list[str] | None = None) -> None:
        """Write config.json; `architectures` names the class, as transformers does."""
        values = self.to_dict()
        if architectures:
            values["architectures"] = architectures
        Path(path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
