"""Checkpoint I/O: our directories, transformers' directories and the original LXMERT `*_LXRT.pth` files.

All three are read into one key layout, transformers' (`lxmert.` backbone, `cls.`, `obj_predict_head.`,
`answer_head.` heads), which is also what we write, so every format loads into every model class.

Loading is strict: a model tensor the file does not provide or provides in another shape, a backbone
tensor the model has no place for, and a non-float or non-finite value are errors naming the file.
Starting part of a model fresh (a new task head) is asked for by name: `allow_fresh` prefixes, or
`strict=False` for anything; what was left fresh is logged, tensor by tensor.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .config import CONFIG_NAME, LxmertConfig

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
BACKBONE = "lxmert."
_BACKBONE_CHILDREN = ("embeddings.", "encoder.", "pooler.")
BACKBONE_KEYS = (BACKBONE, *_BACKBONE_CHILDREN)  # a backbone tensor's key starts with one of these
# Prefixes of the original code: the pretraining model keeps its backbone under `bert.`, the
# fine-tuning models under `lxrt_encoder.model.bert.`; nn.DataParallel adds `module.` anywhere.
_ORIGINAL_BACKBONE = ("lxrt_encoder.model.bert.", "bert.")
SHOWN = 3  # mismatches named in an error message; the rest are counted


class CheckpointError(ValueError):
    """Weights that cannot be loaded as asked: they do not fit the model, or hold non-float / non-finite
    values; the message names the file."""


@dataclass
class LoadingInfo:
    """What a load left out: model keys not in the file, file keys not in the model, shape clashes."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def fresh_keys(self) -> list[str]:
        """Model keys that kept their fresh initialisation: missing from the file or of another shape."""
        return self.missing_keys + [k for k, *_ in self.mismatched_keys]


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
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = load_torch(path)
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None
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


def infer_config(state: Mapping[str, Tensor], *, source: str | Path | None = None,
                 **overrides: object) -> LxmertConfig:
    """Read the sizes a checkpoint carries (original files have no config.json); `overrides` win.

    The head count is not recoverable from weights: it is 12 (base) unless overridden. Sizes are
    checked like a config.json's (a key `encoder.layer.100000.` is refused, not built); errors name `source`.
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
    return LxmertConfig.from_dict(values, source=source, **overrides)


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


def check_values(state: Mapping[str, Tensor], source: str | Path) -> None:
    """Refuse a tensor that is not floating point (int64 weights are a wrong file, not weights) or holds
    NaN / Inf (a diverged run): either would train or predict garbage without an error."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')}, "
                                  "not floating point; refusing to load it as weights")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad:,} non-finite value(s) (NaN or Inf) "
                                  f"of {value.numel():,}; refusing to load it")


def _listed(what: str, items: Sequence[str], total: int) -> str:
    """'n of total tensors <what>: the first SHOWN, and how many more'."""
    more = f" and {len(items) - SHOWN:,} more" if len(items) > SHOWN else ""
    return f"{len(items):,} of {total:,} tensors {what}: {', '.join(items[:SHOWN])}{more}"


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str | Path = "checkpoint", *,
              against: str = "the model's config", strict: bool = True,
              allow_fresh: Sequence[str] = ()) -> LoadingInfo:
    """Copy `state` into `model`, strictly: every model tensor must come from the file with its shape.

    `allow_fresh` names key prefixes (e.g. `answer_head.`) that may keep their fresh initialisation,
    missing from the file or shaped otherwise; `strict=False` allows that anywhere. File tensors the
    model has no place for are dropped when they are heads (a pretraining model's MLM head when
    building a QA model) and an error in the backbone (`lxmert.`: layers the config lacks). Values
    must be floating point and finite. Errors are one line naming `source` and the first mismatches;
    what was left fresh is logged as a warning, every key of it.
    """
    own = model.state_dict()
    wants_prefix = any(k.startswith(BACKBONE) for k in own)
    backbone = BACKBONE if wants_prefix else _BACKBONE_CHILDREN
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
    order = {k: i for i, k in enumerate(own)}
    info.mismatched_keys.sort(key=lambda m: order[m[0]])  # in the model's order, embeddings first
    tied = tied_duplicates(own)
    clashed = {k for k, *_ in info.mismatched_keys}
    info.missing_keys = [k for k in own if k not in usable and k not in tied and k not in clashed]
    _refuse_misfits(info, source, against, len(own) - len(tied), len(adapted), strict, tuple(allow_fresh),
                    [k for k in info.unexpected_keys if k.startswith(backbone)], bool(usable))
    check_values({**usable, **{k: adapted[k] for k in clashed}}, source)
    model.load_state_dict(usable, strict=False)
    if info.fresh_keys:
        why = "strict=False" if not strict else f"allow_fresh {list(allow_fresh)}"
        log.warning("%s: left freshly initialised (%s): %s", source, why, ", ".join(info.fresh_keys))
    if info.unexpected_keys:
        log.info("%s: not used by %s: %s", source, type(model).__name__, ", ".join(info.unexpected_keys))
    return info


def _refuse_misfits(info: LoadingInfo, source: str | Path, against: str, total: int, in_file: int,
                    strict: bool, allow_fresh: tuple[str, ...], stray_backbone: list[str], loaded_any: bool) -> None:
    """The one-line CheckpointError of `load_into` when the file does not fit as asked."""
    def refused(key: str) -> bool:
        return strict and not key.startswith(allow_fresh)

    shapes = [f"{k} (file {list(a)}, model {list(b)})" for k, a, b in info.mismatched_keys if refused(k)]
    missing = [k for k in info.missing_keys if refused(k)]
    stray = stray_backbone if strict else []
    if loaded_any and not (shapes or missing or stray):
        return
    parts = [] if loaded_any else [f"none of its {in_file:,} tensors fits the model's {total:,}"]
    parts += [_listed("differ in shape", shapes, total)] if shapes else []
    parts += [_listed("are missing from the file", missing, total)] if missing else []
    parts += [_listed("of the file's backbone have no place in the model", stray, in_file)] if stray else []
    hint = "; a partial load is asked for with allow_fresh=[key prefixes] or strict=False" if strict else ""
    raise CheckpointError(f"{source}: weights do not fit {against}: {'; '.join(parts)}{hint}")


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
