"""The Luigi task that trains a detector of the extractor's architecture (the demo has no weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from extractor.detector.config import DetectorConfig
from extractor.detector.train import train_detector
from pipeline.base import InputPathParameter
from pipeline.data import RawDataTask
from tasks.data.readers import read_img_id_list
from tasks.demo import read_manifest
from tasks.demo.detector import demo_detector_config


def detector_config_problems(task: luigi.Task) -> list[str]:
    """The task's `config` (a config name or a YAML file) does not load: unknown name, missing file, bad YAML."""
    if not task.config:
        return []
    try:
        DetectorConfig.load(task.config)
    except (OSError, ValueError) as e:
        return [f"{task.get_task_family()}: parameter 'config': {e}"]
    return []


class TrainDetector(RawDataTask):
    """Trains the bottom-up-attention architecture on Visual Genome-format boxes; reports mAP@0.5 on val."""

    WEIGHTS = "weights.pkl"
    CONFIG = "config.yaml"
    name_or_path = ("config",)

    images = InputPathParameter(default="", kind="dir", optional=True, description="folder of the VG images")
    objects = InputPathParameter(default="", kind="file", optional=True, description="VG objects.json")
    attributes = InputPathParameter(default="", kind="file", optional=True, description="VG attributes.json")
    val_ids = InputPathParameter(default="", kind="file", optional=True,
                                 description="image ids held out for mAP; empty: a fixed fraction")
    config = luigi.Parameter(default="", description="detector config name or YAML; empty with the demo "
                                                     "world: the tiny detector sized for it")
    epochs = luigi.FloatParameter(default=10.0)
    batch_size = luigi.IntParameter(default=4)
    lr = luigi.FloatParameter(default=5e-3)
    seed = luigi.IntParameter(default=0)
    device = luigi.Parameter(default="cpu", significant=False)
    data_workers = luigi.IntParameter(default=0, significant=False, description="DataLoader workers")

    raw_params = ("objects",)
    json_inputs = {"objects": "[", "attributes": "["}
    id_lists = ("val_ids",)

    def input_problems(self) -> list[str]:
        problems = super().input_problems()
        if not self.uses_demo() and not self.images:
            problems.append("TrainDetector: parameter 'images' is required when 'objects' is given")
        if not self.uses_demo() and not self.config:
            problems.append("TrainDetector: parameter 'config' is required when 'objects' is given")
        return problems + detector_config_problems(self)

    def build(self, out: Path) -> None:
        if self.uses_demo():
            world = self.input_dirs()["world"] / "world"
            images, objects = self.world("vg", "images"), self.world("vg", "objects")
            attributes, val_ids = self.world("vg", "attributes"), self.world("splits", "vg_val")
            cfg = DetectorConfig.load(self.config) if self.config else demo_detector_config(
                self.world("labels", "objects"), self.world("labels", "attributes"),
                read_manifest(world)["image_size"])
        else:
            images, objects, cfg = self.images, self.objects, DetectorConfig.load(self.config)
            attributes, val_ids = self.attributes or None, self.val_ids or None
        ids = read_img_id_list(val_ids, numbers_as=None) if val_ids else None
        result = train_detector(cfg, images=images, objects=objects, attributes=attributes,
                                output=out / self.WEIGHTS, metrics=out / "metrics.json", config_file=out / self.CONFIG,
                                val_ids=ids, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                seed=self.seed, device=self.device, num_workers=self.data_workers, progress=False)
        print(f"TrainDetector: mAP@0.5 {result['map50']} on {result['val_images']} val images "
              f"in {result['seconds']} s", flush=True)

    @staticmethod
    def metrics(output_dir: Path) -> dict[str, Any]:
        return json.loads((output_dir / "metrics.json").read_text())
