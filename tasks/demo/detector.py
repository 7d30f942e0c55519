"""The demo world's detector preset: the tiny detector sized for its classes, images and shapes.

The world has no released weights, so a detector is trained on it (TrainDetector); this is the config
it trains, as data the world writes (``write_detector_config``), named like any user's YAML.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from extractor.detector.config import ConfigError, DetectorConfig, save_config_yaml
from extractor.detector.labels import read_labels

# Detectron2's MSRA input normalisation: a network trained from scratch without batch statistics
# needs inputs near unit scale (the released Caffe model's std of 1 only suits its own weights).
DEMO_PIXEL_MEAN = (103.530, 116.280, 123.675)
DEMO_PIXEL_STD = (57.375, 57.120, 58.395)


def demo_detector_config(objects_vocab: str | os.PathLike, attributes_vocab: str | os.PathLike,
                         image_size: int | Sequence[int]) -> DetectorConfig:
    """The tiny detector sized for the demo world: its classes, its image size, anchors for its shapes.

    Measured choices (docs/extractor.md, "The demo detector"): images upscaled 2x, because C4's
    stride of 16 leaves a 14 px shape under one cell at 1x and mAP falls by half; anchors of
    16 / 32 / 64 world pixels (the shapes are 14-38 px at 128); stride in the 3x3 conv, which
    learns shapes faster from scratch than the MSRA 1x1; ROIAlignV2 at 7x7 with one sample per bin
    (RoIPool's rounding to cells nearly triples the box loss; more samples make RoIAlign's CPU
    backward dearer); few proposals (at most 6 objects an image).
    """
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or min(sides) < 16:
        raise ConfigError(f"image_size must be a side or (width, height) of at least 16 px, "
                          f"got {image_size!r}")
    scale = 2
    unit = min(sides) * scale / 128  # the anchor sizes below are for a 128 px world
    objects, attributes = Path(objects_vocab).resolve(), Path(attributes_vocab).resolve()
    return DetectorConfig.load("tiny").replace(
        name="demo-detector",
        num_classes=len(read_labels(objects)), object_labels=str(objects),
        num_attributes=len(read_labels(attributes)), attribute_labels=str(attributes),
        stride_in_1x1=False, pixel_mean=DEMO_PIXEL_MEAN, pixel_std=DEMO_PIXEL_STD,
        min_size_test=min(sides) * scale, max_size_test=max(sides) * scale,
        anchor_sizes=tuple(float(round(s * unit)) for s in (16, 32, 64)),
        rpn_pre_nms_topk=600, rpn_post_nms_topk=64, pooler_type="ROIAlignV2", pooler_resolution=7,
        pooler_sampling_ratio=1)


def write_detector_config(path: str | os.PathLike, objects_vocab: str | os.PathLike,
                          attributes_vocab: str | os.PathLike, image_size: int | Sequence[int]) -> Path:
    """Write the demo preset as a detector YAML at `path`, naming its label files by relative path (copied
    beside it unless they are there already), so `--config <path>` works wherever the folder goes."""
    return save_config_yaml(demo_detector_config(objects_vocab, attributes_vocab, image_size), path)
