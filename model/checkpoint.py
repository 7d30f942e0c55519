"""Checkpoint I/O: our directories, transformers' directories and the original LXMERT `*_LXRT.pth` files.

All three are read into one key layout, transformers' (`lxmert.` backbone, `cls.`, `obj_predict_head.`,
`answer_head.` heads), which is also what we write, so every format loads into every model class.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .config import CONFIG_NAME, LxmertConfig

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
BACKBONE = "lxmert."
_BACKBONE_CHILDREN = ("embeddings.", "encoder.", "pooler.")
# Prefixes of the original code: the pretraining model keeps its backbone under `bert.`, the
# fine-tuning models under `lxrt_encoder.model.bert.`; nn.DataParallel adds `module.` anywhere.
_ORIGINAL_BACKBONE = ("lxrt_encoder.model.bert.", "bert.")


@dataclass
class LoadingInfo:
    """What a load left out: model keys not in the file, file keys not in the model, shape clashes."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def load_torch(path: str | Path) -> Any:
    """torch.load with weights_only=True, so no code in the file runs; a refusal names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: (.*?)\.(\s|$)", str(e))
        what = found.group(1) if found else str(e).splitlines()[0]
        raise pickle.UnpicklingError(
            f"{path}: refused to load ({what}); torch files are read with weights_only=True: tensors and "
            "plain containers only, so no code in a file runs") from None


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors file or a torch pickle of tensors (weights_only: no code runs on load)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = load_torch(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """The weights file and the config.json (if any) that `path` (a directory or a file) stands for."""
    path = Path(path)
    if path.is_dir():
        for name in (SAFETENSORS_NAME, TORCH_NAME):
            if (path / name).is_file():
                config = path / CONFIG_NAME
                return path / name, config if config.is_file() else None
        raise FileNotFoundError(f"{path} holds neither {SAFETENSORS_NAME} nor {TORCH_NAME}")
    if path.is_file():
        config = path.parent / CONFIG_NAME
        return path, config if path.name in (SAFETENSORS_NAME, TORCH_NAME) and config.is_file() else None
    raise FileNotFoundError(f"no checkpoint at {path}")


def canonical_keys(state: Mapping[str, Tensor], head_renames: Mapping[str, str] | None = None
                   ) -> dict[str, Tensor]:
    """Rename original / DataParallel / old-LayerNorm keys to transformers' layout.

    `head_renames` maps a key prefix of an original fine-tuned head to ours (e.g. the VQA model's
    `logit_fc.` to `answer_head.logit_fc.`).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"(^|\.)module\.", r"\1", key)
        for old in _ORIGINAL_BACKBONE:
            if key.startswith(old):
                key = BACKBONE + key[len(old):]
                break
        for old, new in (head_renames or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if "LayerNorm" in key or "layer_norm" in key:
            key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    return out


def _layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_config(state: Mapping[str, Tensor], **overrides: object) -> LxmertConfig:
    """Read the sizes a checkpoint carries (original files have no config.json); `overrides` win.

    The head count is not recoverable from weights: it is 12 (base) unless overridden.
    """
    state = {k.removeprefix(BACKBONE): v for k, v in state.items()}
    values: dict[str, object] = {}
    shapes = {
        "embeddings.word_embeddings.weight": ("vocab_size", "hidden_size"),
        "embeddings.position_embeddings.weight": ("max_position_embeddings", None),
        "embeddings.token_type_embeddings.weight": ("type_vocab_size", None),
        "encoder.visn_fc.visn_fc.weight": (None, "visual_feat_dim"),
        "encoder.visn_fc.box_fc.weight": (None, "visual_pos_dim"),
        "encoder.layer.0.intermediate.dense.weight": ("intermediate_size", None),
        "answer_head.logit_fc.3.weight": ("num_qa_labels", None),
        "obj_predict_head.decoder_dict.obj.weight": ("num_object_labels", None),
        "obj_predict_head.decoder_dict.attr.weight": ("num_attr_labels", None),
    }
    for key, names in shapes.items():
        if key in state:
            for name, size in zip(names, state[key].shape):
                if name:
                    values[name] = int(size)
    if any(k.startswith("encoder.") for k in state):
        for name, prefix in (("l_layers", "encoder.layer."), ("x_layers", "encoder.x_layers."),
                             ("r_layers", "encoder.r_layers.")):
            values[name] = _layer_count(state, prefix)
    if any(k.startswith(("cls.", "obj_predict_head.", "answer_head.")) for k in state):
        values["task_qa"] = any(k.startswith("answer_head.") for k in state)
        values["task_obj_predict"] = any(k.startswith("obj_predict_head.") for k in state)
        for loss in ("obj", "attr", "feat"):
            values[f"visual_{loss}_loss"] = f"obj_predict_head.decoder_dict.{loss}.weight" in state
    return LxmertConfig.from_dict(values, **overrides)


def tied_duplicates(state: Mapping[str, Tensor]) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (the decoder tied to the word embeddings)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    dupes = set()
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), tuple(value.shape))
        if ident in seen:
            dupes.add(key)
        seen.add(ident)
    return dupes


def load_into(model: nn.Module, state: Mapping[str, Tensor]) -> LoadingInfo:
    """Copy matching tensors into `model`; shape clashes keep the model's fresh values and are reported."""
    own = model.state_dict()
    wants_prefix = any(k.startswith(BACKBONE) for k in own)
    adapted = {}
    for key, value in state.items():
        if wants_prefix and key.startswith(_BACKBONE_CHILDREN):
            key = BACKBONE + key
        elif not wants_prefix and key.startswith(BACKBONE):
            key = key[len(BACKBONE):]
        adapted[key] = value
    info = LoadingInfo()
    usable = {}
    for key, value in adapted.items():
        if key not in own:
            info.unexpected_keys.append(key)
        elif own[key].shape != value.shape:
            info.mismatched_keys.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    tied = tied_duplicates(own)
    clashed = {k for k, *_ in info.mismatched_keys}
    info.missing_keys = [k for k in own if k not in usable and k not in tied and k not in clashed]
    model.load_state_dict(usable, strict=False)
    for key, loaded, wanted in info.mismatched_keys:
        log.warning("%s: checkpoint shape %s, model shape %s; kept freshly initialised", key, loaded, wanted)
    if info.missing_keys:
        log.warning("not in the checkpoint, kept freshly initialised: %s", info.missing_keys)
    return info


def save_directory(model: nn.Module, config: LxmertConfig, directory: str | Path) -> None:
    """Write config.json + model.safetensors, each tied tensor once (as transformers does).

    The weights are serialised in memory and written by Python, so a full disk raises an OSError
    with its errno and the file's name (safetensors' own save_file reports neither).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    dupes = tied_duplicates(state)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in dupes}
    path = directory / SAFETENSORS_NAME
    try:
        path.write_bytes(save(tensors, metadata={"format": "pt"}))
    except OSError as e:  # Python's write errors do not name the file
        raise OSError(e.errno, e.strerror, str(path)) from e
    config.to_json_file(directory / CONFIG_NAME, architectures=[type(model).__name__])


def state_dict_of(source: str | Path | nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tensors of a checkpoint path, a model (ours or transformers') or a state dict, in our key layout."""
    if isinstance(source, nn.Module):
        source = source.state_dict()
    elif isinstance(source, str | Path):
        source = read_weights(locate(source)[0])
    return canonical_keys(source)
