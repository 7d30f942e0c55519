"""Detectron2-format weights: load the bottom-up-attention pickles (and torch files), save our own.

A weights file is a dict with a "model" entry {Detectron2 parameter name: array}. Pickles are read
by a restricted unpickler that builds numpy arrays and plain containers only, so a hostile file
cannot run code; torch files go through ``torch.load(weights_only=True)``.

Keys outside the model's own names are an error, except these harmless ones, which are skipped:
``*.num_batches_tracked`` (BatchNorm bookkeeping), ``proposal_generator.anchor_generator.cell_anchors.*``
(anchors, recomputed from the config) and ``pixel_mean`` / ``pixel_std`` (checked against the config:
a different normalisation means the wrong config for these weights). Weights that do not fit the
config say which config to pass when one fits them: the YAML that travels with them, or a named one.
"""
from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.detector.config import NAMED_CONFIGS, ConfigError, DetectorConfig
from extractor.detector.model import VGDetector
from extractor.fileio import atomic_output, file_sha256

__all__ = ["WeightsError", "UnsafePickleError", "safe_load_pickle", "load_detectron2_weights",
           "save_detectron2_weights", "read_weights", "file_sha256"]

_TORCH_LEGACY_PREFIX = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


class WeightsError(ValueError):
    """A weights file that does not fit the model (missing, mis-shaped or unexpected keys)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for something other than numpy arrays and plain containers."""


def _numpy_core(sub: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; accept pickles written under either.
    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{sub}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): __import__("_codecs").encode,  # bytes in protocol-2 pickles
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="latin1")  # pickles written by Python 2 hold latin-1 strings
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load global {module}.{name}: weight pickles may hold only "
                "numpy arrays and plain containers") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r} (not a plain weights pickle)")


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle a file allowing numpy arrays, dtypes, scalars and plain containers only; never runs code."""
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, str(path)).load()


def _is_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:  # the pre-1.6 torch format begins with a pickled magic number
        return f.read(len(_TORCH_LEGACY_PREFIX)) == _TORCH_LEGACY_PREFIX


def read_weights(path: str | Path) -> dict[str, np.ndarray | torch.Tensor]:
    """The {name: array} model dict of a Detectron2-format pickle or torch file (a bare dict also works)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_torch_file(path):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{path}: torch.load(weights_only=True) refused it: {e}") from None
    else:
        data = safe_load_pickle(path)
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise WeightsError(f"{path}: expected {{'model': {{name: array}}}}, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(v, np.ndarray | torch.Tensor):
            raise WeightsError(f"{path}: {k} is a {type(v).__name__}, not an array")
        if isinstance(v, np.ndarray) and v.dtype.kind not in "fiub":
            raise WeightsError(f"{path}: {k} has dtype {v.dtype}, not numeric")
    return data


def _harmless(key: str) -> bool:
    return key.endswith(".num_batches_tracked") or key.startswith("proposal_generator.anchor_generator.")


def _check_normalisation(model: nn.Module, weights: dict[str, Any], path: Path) -> None:
    for key in ("pixel_mean", "pixel_std"):
        if key in weights and hasattr(model, key):
            ours = getattr(model, key).detach().cpu().numpy().ravel()
            theirs = np.asarray(weights[key], dtype=np.float64).ravel()
            if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=1e-3):
                raise WeightsError(f"{path}: {key} {theirs.tolist()} differs from the config's "
                                   f"{ours.tolist()}: wrong config for these weights?")


def _fit_problems(expected: dict[str, tuple[int, ...]], weights: dict[str, Any]) -> list[str]:
    """What keeps `weights` from loading into a model of these parameter shapes: missing, mis-shaped and
    unexpected keys, ten of each named."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and not _harmless(k)
                  and k not in ("pixel_mean", "pixel_std")]
    shaped = [f"{k} {tuple(weights[k].shape)} (model wants {v})"
              for k, v in expected.items() if k in weights and tuple(weights[k].shape) != v]
    problems = []
    for what, names in (("missing key(s)", missing), ("mis-shaped key(s)", shaped),
                        ("unexpected key(s)", unexpected)):
        if names:
            more = f" ... and {len(names) - 10} more" if len(names) > 10 else ""
            problems.append(f"{len(names)} {what}: " + ", ".join(names[:10]) + more)
    return problems


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's parameter and buffer shapes by name."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _heads(shapes: dict[str, tuple[int, ...]]) -> str:
    """"N classes and M attributes" from the predictor's shapes (each has a background / none row)."""
    classes = shapes.get("roi_heads.box_predictor.cls_score.weight", (0,))[0] - 1
    attributes = shapes.get("roi_heads.box_predictor.attr_score.weight", (0,))[0] - 1
    return f"{classes} classes and {attributes if attributes >= 0 else 'no'} attributes"


def _fitting_config(weights: dict[str, Any], path: Path, current: DetectorConfig) -> str | None:
    """The config to pass for these weights: a YAML travelling with them (``<stem>.yaml`` or ``config.yaml``
    beside them, as train_detector and TrainDetector write), else a named config they fit; None if none."""
    candidates: list[str | Path] = [p for p in dict.fromkeys((path.with_suffix(".yaml"), path.parent / "config.yaml"))
                                    if p.is_file()]
    for candidate in [*candidates, *NAMED_CONFIGS]:
        try:
            cfg = DetectorConfig.load(candidate)
        except (ConfigError, OSError):
            continue
        if cfg == current:
            continue
        with torch.device("meta"):  # shapes only: nothing is allocated
            shapes = _shapes(VGDetector(cfg))
        if not _fit_problems(shapes, weights):
            return str(candidate)
    return None


def load_detectron2_weights(model: nn.Module, path: str | Path) -> str:
    """Load Detectron2-named weights into model, strictly; returns the file's SHA-256 (hex).

    Weights that do not fit a VGDetector's config say which config to pass when one fits them: the YAML
    that travels with them, or a named one.
    """
    path = Path(path)
    weights = read_weights(path)
    expected = model.state_dict()
    shapes = _shapes(model)
    problems = _fit_problems(shapes, weights)
    current = getattr(model, "cfg", None)
    hint = _fitting_config(weights, path, current) if problems and isinstance(current, DetectorConfig) else None
    if hint is not None:
        theirs = {k: tuple(v.shape) for k, v in weights.items()}
        differs = (f"{path} has {_heads(theirs)}; the config {current.name} has {_heads(shapes)}"
                   if _heads(theirs) != _heads(shapes) else f"{path} does not fit the config {current.name}")
        raise WeightsError(f"{differs}: pass --config {hint}")
    if problems:
        raise WeightsError(f"{path}: does not fit the model: " + "; ".join(problems))
    _check_normalisation(model, weights, path)
    state = {k: torch.as_tensor(np.array(weights[k]) if isinstance(weights[k], np.ndarray) else weights[k],
                                dtype=v.dtype)
             for k, v in expected.items()}
    model.load_state_dict(state, strict=True)
    return file_sha256(path)


def save_detectron2_weights(model: nn.Module, path: str | Path) -> str:
    """Write the model as a Detectron2-format pickle (what the loader and py-bottom-up-attention read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
              for k, v in model.state_dict().items()}
    payload = {"model": arrays, "__author__": "lxmert-pipeline", "matching_heuristics": False}
    with atomic_output(path) as f:
        pickle.dump(payload, f, protocol=4)
    return file_sha256(path)
