"""Starting points for training: network configs (presets or files) and every checkpoint kind.

Accepted: our training checkpoints (`checkpoints/step-*.pt`, which carry the network's config),
our or transformers' model directories (`config.json` + weights), and the original code's
`*_LXRT.pth` / fine-tuned `*.pth` files (sizes read from the weights).
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path, param: str = "init_from",
                    head_renames: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], Any]:
    """(tensors in transformers' key layout, the network's LxmertConfig or None if the file has none).

    `head_renames` maps the original code's fine-tuned head prefixes onto ours. Errors name
    `param` and the path.
    """
    from model import LxmertConfig
    from model.checkpoint import canonical_keys, load_torch, locate, read_weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{param}: no checkpoint at {path}")
    renames = dict(head_renames or {})
    if path.is_file() and path.suffix == ".pt" and path.with_suffix(".json").is_file():
        try:
            state = load_torch(path)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{param}: {exc}") from None
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{param}: {path} is not a training checkpoint (no 'model' entry)")
        config = state.get("extra", {}).get("model_config")
        return canonical_keys(state["model"], renames), LxmertConfig.from_dict(config) if config else None
    try:
        weights, config_file = locate(path)
        state = canonical_keys(read_weights(weights), renames)
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{param}: cannot read weights from {path} ({exc})") from exc
    return state, LxmertConfig.from_json_file(config_file) if config_file else None


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str) -> list[str]:
    """Copy every tensor of `state` that fits into `model`; returns (and logs) the model keys the
    checkpoint did not provide, e.g. a new task head."""
    from model.checkpoint import load_into

    info = load_into(model, state)
    if info.missing_keys:
        log.info("%s: kept as initialised: %s", source, info.missing_keys)
    return list(info.missing_keys)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},  # LXMERT base: 768 hidden, 9 / 5 / 5 layers
    "small": {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024,
              "l_layers": 3, "x_layers": 2, "r_layers": 2},
    # the CPU demo; a wider initialisation (0.05, not BERT's 0.02) shortens the plateau before the
    # cross-attention learns which box a word refers to, about 2x on the demo's questions
    "demo": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512,
             "l_layers": 2, "x_layers": 2, "r_layers": 1, "initializer_range": 0.05},
    "tiny": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "l_layers": 1, "x_layers": 1, "r_layers": 1},
}


def fit_vocab(config: Any, vocab_size: int, from_checkpoint: bool, source: str) -> None:
    """Size the word embedding for the tokenizer: a fresh network gets exactly its vocabulary (the
    demo's world vocabulary is 200-odd WordPieces, not BERT's 30,522); a checkpoint's embedding
    is kept, and must cover every id the tokenizer can produce."""
    if not from_checkpoint:
        config.vocab_size = vocab_size
    elif vocab_size > config.vocab_size:
        raise ValueError(f"vocab: the tokenizer has {vocab_size} tokens but {source} embeds only "
                         f"{config.vocab_size}; use the vocabulary it was trained with")


def export_with_vocab(tokens: list[str]) -> Callable[[nn.Module, Path], None]:
    """The training loop's export_fn that also saves the tokenizer's vocab.txt beside the weights,
    so whatever later loads them (fine-tuning, evaluation) tokenizes as training did."""
    from tasks.loop import export_model
    from tasks.tokenization import save_vocabulary

    def export(model: nn.Module, directory: Path) -> None:
        export_model(model, directory)
        save_vocabulary(tokens, directory)

    return export


def model_config_from(name: str, param: str = "model") -> Any:
    """An LxmertConfig from a preset name (base, small, tiny), a config.json or a model directory."""
    from model import LxmertConfig

    if name in MODEL_PRESETS:
        return LxmertConfig(**MODEL_PRESETS[name])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{param}: {name!r} is neither a preset {sorted(MODEL_PRESETS)} "
                                "nor a config.json / model directory")
    return LxmertConfig.from_json_file(path)
