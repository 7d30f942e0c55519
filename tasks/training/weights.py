"""Starting points for training: network configs (presets or files) and every checkpoint kind.

Accepted: our training checkpoints (`checkpoints/step-*.pt`, which carry the network's config),
our or transformers' model directories (`config.json` + weights), and the original code's
`*_LXRT.pth` / fine-tuned `*.pth` files (sizes read from the weights).
"""
from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def read_checkpoint(path: str | Path, param: str = "init_from",
                    head_renames: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], Any]:
    """(tensors in transformers' key layout, the network's LxmertConfig or None if the file has none).

    `head_renames` maps the original code's fine-tuned head prefixes onto ours. A config.json is
    checked before the weights are read; a file without LXMERT backbone tensors is refused before
    any network is built. Errors name `param` and the file.
    """
    from model import LxmertConfig
    from model.checkpoint import BACKBONE_KEYS, CheckpointError, canonical_keys, locate, read_weights
    from model.config import ConfigError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{param}: no checkpoint at {path}")
    renames = dict(head_renames or {})
    try:
        if path.is_file() and path.suffix == ".pt" and path.with_suffix(".json").is_file():
            weights, state = path, _training_checkpoint(path)
            extra = state.get("extra")
            config = extra.get("model_config") if isinstance(extra, dict) else None
            config = LxmertConfig.from_dict(config, source=path) if config else None
            state = state["model"]
        else:
            weights, config_file = locate(path)
            config = LxmertConfig.from_json_file(config_file) if config_file else None
            state = read_weights(weights)
    except ConfigError as exc:
        raise ConfigError(f"{param}: {exc}") from None
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{param}: cannot read weights from {path} ({exc})") from exc
    state = canonical_keys(state, renames)
    if not any(k.startswith(BACKBONE_KEYS) for k in state):
        raise CheckpointError(f"{param}: {weights} holds no LXMERT weights: none of its {len(state):,} tensors "
                              f"is in a backbone (lxmert.*, bert.*, encoder.*){_examples(state)}")
    return state, config


def read_init(init_from: str | None, model: str,
              head_renames: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], Any]:
    """(tensors, network config) of `init_from`, or ({}, None) without it. An original file has no
    config: its sizes are read from the weights and its head count, which weights cannot tell, is
    the `model` preset's."""
    if not init_from:
        return {}, None
    state, config = read_checkpoint(init_from, "init_from", head_renames)
    if config is None:
        from model.checkpoint import infer_config
        config = infer_config(state, source=f"init_from: {init_from}",
                              num_attention_heads=model_config_from(model).num_attention_heads)
    return state, config


def network_config(base: Any, model: str, feature_dim: int, dropout: float | None) -> Any:
    """The config of the network to build: `base` (init_from's) or the `model` preset / file, sized for
    the feature files, with both dropout rates set to `dropout` when it is given."""
    config = dataclasses.replace(base) if base is not None else model_config_from(model)
    config.visual_feat_dim = feature_dim
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return config


def _examples(state: Mapping[str, Tensor]) -> str:
    keys = list(state)[:3]
    return f"; it holds {', '.join(keys)}{' ...' if len(state) > 3 else ''}" if keys else ""


def _training_checkpoint(path: Path) -> dict[str, Any]:
    """The dict of one of our `checkpoints/step-*.pt` files; ValueError when it is not one."""
    from model.checkpoint import load_torch

    try:
        state = load_torch(path)
    except pickle.UnpicklingError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    if not all(isinstance(v, Tensor) for v in state["model"].values()):
        raise ValueError(f"{path}: its 'model' entry is not a state dict of tensors")
    return state


def weights_file(path: str | Path) -> Path:
    """The file a checkpoint path stands for (a model folder's weights file), to name in messages."""
    from model.checkpoint import locate

    path = Path(path)
    return locate(path)[0] if path.is_dir() else path


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str,
                 allow_fresh: Sequence[str] = (), param: str = "init_from") -> list[str]:
    """Copy `state` into `model` strictly (model.checkpoint.load_into): only keys under the
    `allow_fresh` prefixes may stay as initialised (a new task head); returns those keys, which
    are also logged. Errors start with `param` and name the file."""
    from model.checkpoint import load_into

    info = load_into(model, state, f"{param}: {weights_file(source)}", against="the network built for this run",
                     allow_fresh=tuple(allow_fresh))
    return info.fresh_keys


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
    from tasks.data.tokenization import save_vocabulary
    from tasks.training.checkpoints import export_model

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
