"""The detector the demo trains (its architecture for the world's images and labels), written into the world as
a Detectron2-style YAML that names its label files by relative path, so the world can be moved."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from extractor.detector.train import demo_detector_config, save_config_yaml

__all__ = ["demo_detector_config", "write_detector_config"]


def write_detector_config(path: str | os.PathLike, objects_vocab: str | os.PathLike,
                          attributes_vocab: str | os.PathLike, image_size: int | Sequence[int]) -> Path:
    """Write the demo preset as a detector YAML at `path`, its label files named relative to it."""
    cfg = demo_detector_config(objects_vocab, attributes_vocab, image_size)
    folder = Path(path).parent.resolve()
    return save_config_yaml(cfg.replace(object_labels=os.path.relpath(cfg.object_labels, folder),
                                        attribute_labels=os.path.relpath(cfg.attribute_labels, folder)), path)
