"""Detector configuration: one dataclass, named presets, and Detectron2-style YAML.

Users of py-bottom-up-attention bring YAML files written for Detectron2; we read the keys that
describe the test-time model, accept training-only keys without effect, refuse values of keys
we do not implement, and reject unknown keys by name, so a typo never passes silently. Label
files a YAML names by relative path are found beside it, so a folder holding weights, their
config and its label files (what ``save_config_yaml`` writes) can be moved as one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extractor.fileio import atomic_write, writing

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
POOLER_TYPES = ("ROIPool", "ROIAlign", "ROIAlignV2")
# How an image becomes the network's input (extractor.detector.model.preprocess): "caffe" is the original
# bottom-up-attention's (generate_tsv.py), which made the released features; "detectron2" is
# ResizeShortestEdge's, as py-bottom-up-attention and the detectors trained here see images.
RESIZE_MODES = ("caffe", "detectron2")
# Largest log-scale change a box delta may ask for (Detectron2's clamp: a 16 px box to 1000 px).
SCALE_CLAMP = math.log(1000.0 / 16)


class ConfigError(ValueError):
    """A detector configuration that names an unknown key or an unsupported value."""


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that shapes the detector at test time; the defaults are the released VG-R101-C4 model."""

    name: str = "VG-R101-C4"
    # ResNet C4 backbone (stem, res2..res4) and the res5 RoI head; num_blocks is (res2, res3, res4, res5).
    num_blocks: tuple[int, int, int, int] = RESNET_BLOCKS[101]
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    num_groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = True
    caffe_maxpool: bool = True
    pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Test-time resize: shortest side to min_size_test, longest side at most max_size_test, by the rule
    # `resize` names (RESIZE_MODES).
    min_size_test: int = 600
    max_size_test: int = 1000
    resize: str = "caffe"
    # Region proposal network on C4 (stride 16).
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    rpn_hidden_channels: int = 512  # -1: as many as C4 has
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 0.0
    rpn_bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # RoI head: pooling on C4, res5, class / box / attribute predictors.
    num_classes: int = 1600
    pooler_type: str = "ROIPool"
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    res5_halve: bool = False
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    attribute_on: bool = True
    num_attributes: int = 400
    # Label files (one class a line); None means the shipped Visual Genome vocabularies.
    object_labels: str | None = None
    attribute_labels: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if len(self.num_blocks) != 4 or min(self.num_blocks) < 1:
            problems.append(f"num_blocks must be 4 positive counts (res2..res5), got {self.num_blocks}")
        if self.pooler_type not in POOLER_TYPES:
            problems.append(f"pooler_type must be one of {POOLER_TYPES}, got {self.pooler_type!r}")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.min_size_test <= 0 or self.max_size_test < self.min_size_test:
            problems.append(f"need 0 < min_size_test <= max_size_test, got {self.min_size_test}, "
                            f"{self.max_size_test}")
        if self.num_classes < 1 or (self.attribute_on and self.num_attributes < 1):
            problems.append("num_classes and num_attributes must be positive")
        if self.feature_dim % 8:
            problems.append(f"res2_out_channels * 8 = {self.feature_dim} must be divisible by 8 "
                            "(attribute embedding is feature_dim / 8)")
        if not 0.0 <= self.anchor_offset < 1.0:
            problems.append(f"anchor_offset must be in [0, 1), got {self.anchor_offset}")
        if problems:
            raise ConfigError(f"config {self.name!r}: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        """Width of the pooled res5 region feature (2048 for the released model)."""
        return self.res2_out_channels * 8

    @property
    def depth(self) -> int | None:
        """ResNet depth when the block counts are a standard one (50/101/152), else None."""
        return next((d for d, b in RESNET_BLOCKS.items() if b == self.num_blocks), None)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able field dict (stored in the feature file's attributes)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorConfig:
        """Inverse of to_dict; unknown fields are an error naming them."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown detector config field(s): {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, name_or_yaml: str | Path | DetectorConfig = "VG-R101-C4") -> DetectorConfig:
        """A named config (see NAMED_CONFIGS) or a Detectron2-style YAML file."""
        if isinstance(name_or_yaml, DetectorConfig):
            return name_or_yaml
        key = str(name_or_yaml)
        if key in NAMED_CONFIGS:
            return NAMED_CONFIGS[key]
        path = Path(key)
        if path.suffix.lower() in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = _load_yaml(path, seen=())
            _check_label_files(cfg)
            return cfg
        raise ConfigError(f"unknown config {key!r}: use one of {sorted(NAMED_CONFIGS)} or a YAML file")


def _check_label_files(cfg: DetectorConfig) -> None:
    from extractor.detector.labels import attribute_names, object_names

    n = len(object_names(cfg.object_labels))
    if n != cfg.num_classes:
        raise ConfigError(f"config {cfg.name!r}: object label file has {n} names but num_classes is "
                          f"{cfg.num_classes} (LABELS.OBJECTS / MODEL.ROI_HEADS.NUM_CLASSES)")
    if cfg.attribute_on:
        n = len(attribute_names(cfg.attribute_labels))
        if n != cfg.num_attributes:
            raise ConfigError(f"config {cfg.name!r}: attribute label file has {n} names but num_attributes "
                              f"is {cfg.num_attributes} (LABELS.ATTRIBUTES / NUM_ATTRIBUTES)")


_VG_R101 = DetectorConfig()
_VG_R50 = _VG_R101.replace(name="VG-R50-C4", num_blocks=RESNET_BLOCKS[50])
# Same structure, a fraction of the width and depth: for tests and the CPU demo. Detectors trained here
# see images by one rule at training and test time, Detectron2's (the Caffe rule matters for the released
# weights, which were trained and run with it).
_TINY = _VG_R101.replace(
    name="tiny", num_blocks=(1, 1, 2, 1), stem_out_channels=16, res2_out_channels=32, width_per_group=8,
    rpn_hidden_channels=64, min_size_test=224, max_size_test=384, rpn_pre_nms_topk=1000,
    rpn_post_nms_topk=100, resize="detectron2")
# Detectron2's own C4 defaults, for YAML files whose _BASE_ is Detectron2's Base-RCNN-C4.yaml.
_D2_C4 = _VG_R101.replace(
    name="detectron2-C4", num_blocks=RESNET_BLOCKS[50], caffe_maxpool=False,
    pixel_mean=(103.530, 116.280, 123.675), min_size_test=800, max_size_test=1333, resize="detectron2",
    anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0), rpn_hidden_channels=-1, rpn_post_nms_topk=1000,
    num_classes=80, pooler_type="ROIAlignV2", res5_halve=True, attribute_on=False)

NAMED_CONFIGS: dict[str, DetectorConfig] = {c.name: c for c in (_VG_R101, _VG_R50, _TINY, _D2_C4)}


# ---------------------------------------------------------------- YAML keys

def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _floats(n: int | None) -> Callable[[Any], tuple[float, ...]]:
    def conv(v: Any) -> tuple[float, ...]:
        if not isinstance(v, list | tuple) or (n is not None and len(v) != n):
            raise TypeError(f"a list of {n or 'some'} numbers")
        return tuple(_float(x) for x in v)
    return conv


def _one_level(v: Any) -> tuple[float, ...]:
    """Detectron2 writes per-level lists ([[64, 128]]); C4 has one level."""
    if isinstance(v, list | tuple) and len(v) == 1 and isinstance(v[0], list | tuple):
        v = v[0]
    return _floats(None)(v)


def _blocks(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or len(v) != 4:
        raise TypeError("a list of 4 block counts (res2, res3, res4, res5)")
    return tuple(_int(x) for x in v)


def _depth(v: Any) -> tuple[int, ...]:
    if _int(v) not in RESNET_BLOCKS:
        raise TypeError(f"one of {sorted(RESNET_BLOCKS)}")
    return RESNET_BLOCKS[v]


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


# YAML key -> (field, converter)
_MAPPED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "NAME": ("name", _str),
    "MODEL.RESNETS.DEPTH": ("num_blocks", _depth),
    "MODEL.RESNETS.NUM_BLOCKS": ("num_blocks", _blocks),
    "MODEL.RESNETS.STEM_OUT_CHANNELS": ("stem_out_channels", _int),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": ("res2_out_channels", _int),
    "MODEL.RESNETS.NUM_GROUPS": ("num_groups", _int),
    "MODEL.RESNETS.WIDTH_PER_GROUP": ("width_per_group", _int),
    "MODEL.RESNETS.STRIDE_IN_1X1": ("stride_in_1x1", _bool),
    "MODEL.CAFFE_MAXPOOL": ("caffe_maxpool", _bool),
    "MODEL.PIXEL_MEAN": ("pixel_mean", _floats(3)),
    "MODEL.PIXEL_STD": ("pixel_std", _floats(3)),
    "INPUT.MIN_SIZE_TEST": ("min_size_test", _int),
    "INPUT.MAX_SIZE_TEST": ("max_size_test", _int),
    "INPUT.RESIZE": ("resize", _str),
    "MODEL.ANCHOR_GENERATOR.SIZES": ("anchor_sizes", _one_level),
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": ("anchor_ratios", _one_level),
    "MODEL.ANCHOR_GENERATOR.OFFSET": ("anchor_offset", _float),
    "MODEL.PROPOSAL_GENERATOR.HID_CHANNELS": ("rpn_hidden_channels", _int),
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": ("rpn_min_size", _float),
    "MODEL.RPN.PRE_NMS_TOPK_TEST": ("rpn_pre_nms_topk", _int),
    "MODEL.RPN.POST_NMS_TOPK_TEST": ("rpn_post_nms_topk", _int),
    "MODEL.RPN.NMS_THRESH": ("rpn_nms_thresh", _float),
    "MODEL.RPN.BBOX_REG_WEIGHTS": ("rpn_bbox_reg_weights", _floats(4)),
    "MODEL.ROI_HEADS.NUM_CLASSES": ("num_classes", _int),
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": ("pooler_type", _str),
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": ("pooler_resolution", _int),
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": ("pooler_sampling_ratio", _int),
    "MODEL.ROI_BOX_HEAD.RES5HALVE": ("res5_halve", _bool),
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": ("bbox_reg_weights", _floats(4)),
    "MODEL.ROI_BOX_HEAD.ATTR": ("attribute_on", _bool),
    "MODEL.ROI_BOX_HEAD.NUM_ATTRS": ("num_attributes", _int),
    "MODEL.ATTRIBUTE_ON": ("attribute_on", _bool),
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES": ("num_attributes", _int),
    "LABELS.OBJECTS": ("object_labels", _str),
    "LABELS.ATTRIBUTES": ("attribute_labels", _str),
}

# Keys whose value is fixed by this implementation: any other value is refused.
_FIXED: dict[str, tuple[Any, ...]] = {
    "MODEL.META_ARCHITECTURE": ("GeneralizedRCNN",),
    "MODEL.BACKBONE.NAME": ("build_resnet_backbone",),
    "MODEL.RESNETS.NORM": ("FrozenBN",),
    "MODEL.RESNETS.OUT_FEATURES": (["res4"],),
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": ([False] * 4,),
    "MODEL.MASK_ON": (False,),
    "MODEL.KEYPOINT_ON": (False,),
    "MODEL.LOAD_PROPOSALS": (False,),
    "MODEL.PROPOSAL_GENERATOR.NAME": ("RPN",),
    "MODEL.ANCHOR_GENERATOR.NAME": ("DefaultAnchorGenerator",),
    "MODEL.RPN.HEAD_NAME": ("StandardRPNHead", "StandardRPNHeadForVGWithHiddenDim"),
    "MODEL.RPN.IN_FEATURES": (["res4"],),
    "MODEL.ROI_HEADS.NAME": ("Res5ROIHeads", "Res5ROIHeadsForVGStride", "AttributeRes5ROIHeads"),
    "MODEL.ROI_HEADS.IN_FEATURES": (["res4"],),
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": (False,),
    "INPUT.FORMAT": ("BGR",),
}

# Keys with no effect on the test-time model (training, data, solver): accepted and ignored.
_IGNORED_SECTIONS = ("SOLVER.", "DATASETS.", "DATALOADER.", "TEST.", "GLOBAL.")
_IGNORED: frozenset[str] = frozenset({
    "OUTPUT_DIR", "SEED", "VERSION", "CUDNN_BENCHMARK", "VIS_PERIOD",
    "MODEL.WEIGHTS", "MODEL.DEVICE", "MODEL.BACKBONE.FREEZE_AT", "MODEL.RESNETS.RES5_DILATION",
    "MODEL.RESNETS.DEFORM_MODULATED", "MODEL.RESNETS.DEFORM_NUM_GROUPS", "MODEL.ANCHOR_GENERATOR.ANGLES",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "MODEL.RPN.POSITIVE_FRACTION", "MODEL.RPN.IOU_THRESHOLDS", "MODEL.RPN.IOU_LABELS",
    "MODEL.RPN.SMOOTH_L1_BETA", "MODEL.RPN.LOSS_WEIGHT", "MODEL.RPN.BOUNDARY_THRESH",
    "MODEL.RPN.BBOX_REG_LOSS_TYPE", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS", "MODEL.ROI_HEADS.IOU_LABELS", "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT",
    # Detectron2's own post-processing; our box selection rules carry their thresholds (selection.py).
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "MODEL.ROI_HEADS.NMS_THRESH_TEST",
    "MODEL.ROI_BOX_HEAD.NAME", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "MODEL.ROI_BOX_HEAD.NUM_FC",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "INPUT.MASK_FORMAT",
    "INPUT.RANDOM_FLIP", "INPUT.CROP.ENABLED", "INPUT.CROP.TYPE", "INPUT.CROP.SIZE",
})

_DETECTRON2_BASES = ("Base-RCNN-C4.yaml",)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _base_config(base: str, yaml_path: Path, seen: tuple[Path, ...]) -> DetectorConfig:
    if base in NAMED_CONFIGS:
        return NAMED_CONFIGS[base]
    candidate = Path(base) if Path(base).is_absolute() else yaml_path.parent / base
    if "://" not in base and candidate.is_file():
        return _load_yaml(candidate, seen)
    if base.rsplit("/", 1)[-1] in _DETECTRON2_BASES:
        return NAMED_CONFIGS["detectron2-C4"]
    raise ConfigError(f"{yaml_path}: _BASE_ {base!r} is neither a named config ({sorted(NAMED_CONFIGS)}) "
                      "nor a readable file (nothing is downloaded)")


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> DetectorConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _BASE_ chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    flat = _flatten(raw)
    base_name = flat.pop("_BASE_", None)
    cfg = _base_config(str(base_name), path, seen + (path,)) if base_name is not None else _VG_R101
    changes: dict[str, Any] = {"name": path.stem}
    for key, value in flat.items():
        if key in _MAPPED:
            fname, conv = _MAPPED[key]
            try:
                changes[fname] = conv(value)
            except TypeError as e:
                raise ConfigError(f"{path}: {key} must be {e}, got {value!r}") from None
            if fname in ("object_labels", "attribute_labels") and not Path(value).is_absolute():
                changes[fname] = str(path.parent / value)
        elif key in _FIXED:
            ok = _FIXED[key]
            if (list(value) if isinstance(value, tuple) else value) not in ok:
                allowed = " or ".join(repr(v) for v in ok)
                raise ConfigError(f"{path}: {key} = {value!r} is not supported (only {allowed})")
        elif key in _IGNORED or key.startswith(_IGNORED_SECTIONS):
            continue
        else:
            raise ConfigError(f"{path}: unknown config key {key}")
    try:
        return cfg.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------- writing YAML

# Keys that also set a field but say less (DEPTH implies standard blocks) or are the older spelling.
_YAML_ALIASES = frozenset({"MODEL.RESNETS.DEPTH", "MODEL.ROI_BOX_HEAD.ATTR", "MODEL.ROI_BOX_HEAD.NUM_ATTRS"})
_LABEL_FIELDS = ("object_labels", "attribute_labels")


def _label_copies(cfg: DetectorConfig, folder: Path) -> dict[str, tuple[Path, Path]]:
    """{label field: (its file, the copy beside the YAML)}; refuses a name another label file already holds."""
    copies: dict[str, tuple[Path, Path]] = {}
    for name in _LABEL_FIELDS:
        if getattr(cfg, name) is None:
            continue
        src = Path(getattr(cfg, name))
        dst = folder / src.name
        held = next((s for s, d in copies.values() if d == dst), dst if dst.exists() else None)
        if held is not None and held.read_bytes() != src.read_bytes():
            raise ConfigError(f"cannot copy the label file {src} to {dst}: that name holds other labels; "
                              "save the config in a folder of its own")
        copies[name] = (src, dst)
    return copies


def save_config_yaml(cfg: DetectorConfig, path: str | os.PathLike) -> Path:
    """Write cfg as a Detectron2-style YAML that ``DetectorConfig.load`` reads back, its label files copied
    beside it and named by relative path, so weights, config and labels travel as one folder."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    copies = _label_copies(cfg, path.parent)
    keys: dict[str, str] = {}
    for key, (field, _) in _MAPPED.items():
        if key not in _YAML_ALIASES:
            keys.setdefault(field, key)
    tree: dict[str, Any] = {}
    for field, value in cfg.to_dict().items():
        if value is None:
            continue
        if field in ("anchor_sizes", "anchor_ratios"):
            value = [value]  # Detectron2 writes one list per feature level
        if field in copies:
            value = copies[field][1].name
        node = tree
        *parents, leaf = keys[field].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for src, dst in copies.values():
        if not dst.exists():
            atomic_write(dst, src.read_bytes())
    atomic_write(path, yaml.safe_dump(tree, sort_keys=True))
    return path
