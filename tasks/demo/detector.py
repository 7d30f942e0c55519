"""The detector the demo trains: its architecture for the world's images and its label files, written into the
world as a Detectron2-style YAML whose label paths are relative to it, so the world can be moved."""
from __future__ import annotations

from pathlib import Path

from extractor.detector.train import demo_detector_config, save_config_yaml

DETECTOR_CONFIG = "demo-detector.yaml"


def write_detector_config(root: Path, labels: dict[str, str], image_size: int) -> Path:
    """Write root/demo-detector.yaml for the label files `labels` ({"objects", "attributes"}: paths relative
    to root); DetectorConfig.load of it gives the demo detector's config with absolute label paths."""
    cfg = demo_detector_config(root / labels["objects"], root / labels["attributes"], image_size)
    portable = cfg.replace(object_labels=labels["objects"], attribute_labels=labels["attributes"])
    return save_config_yaml(portable, root / DETECTOR_CONFIG)
