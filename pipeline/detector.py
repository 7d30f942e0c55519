"""The Luigi task that trains a detector of the extractor's architecture (for a world without released weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from extractor.detector.config import DetectorConfig
from extractor.detector.train import train_detector
from pipeline.base import InputPathParameter, PipelineTask
from pipeline.data import RawDataTask
from pipeline.progress import TaskProgress
from tasks.data.readers import read_img_id_list


def detector_config_problems(task: PipelineTask) -> list[str]:
    """The task's `config` (a config name or a YAML file) does not load: unknown name, missing file, bad YAML."""
    entry = task.input_entry("config")
    if entry is None or not entry[0]:
        return []
    value, label = entry
    try:
        DetectorConfig.load(value)
    except (OSError, ValueError) as e:
        return [f"{task.get_task_family()}: {label}: {e}"]
    return []


class TrainDetector(RawDataTask):
    """Trains the bottom-up-attention architecture on Visual Genome-format boxes; reports mAP@0.5 on val."""

    WEIGHTS = "weights.pkl"
    CONFIG = "config.yaml"
    name_or_path = ("config",)

    images = InputPathParameter(default="", kind="dir", optional=True, description="folder of the VG images")
    objects = InputPathParameter(default="", kind="file", optional=True, description="VG objects.json")
    attributes = InputPathParameter(default="", kind="file", optional=True, description="VG attributes.json")
    valid_ids = InputPathParameter(default="", kind="file", optional=True,
                                   description="image ids held out for mAP; empty: a fixed fraction")
    val_ids = luigi.Parameter(default="", significant=False, description="old name of valid_ids")
    config = luigi.Parameter(default="", description="detector config name or YAML; empty: the sources "
                                                     "file's detector.config")
    epochs = luigi.FloatParameter(default=10.0)
    batch_size = luigi.IntParameter(default=4)
    lr = luigi.FloatParameter(default=5e-3)
    seed = luigi.IntParameter(default=0)
    device = luigi.Parameter(default="cpu", significant=False)
    data_workers = luigi.IntParameter(default=0, significant=False, description="DataLoader workers")

    sourced = {"images": "detector.train.images", "objects": "detector.train.objects",
               "attributes": "detector.train.attributes", "valid_ids": "detector.train.valid_ids",
               "config": "detector.config"}
    needed = ("images", "objects", "config")
    aliases = {"val_ids": "valid_ids"}
    json_inputs = {"objects": "[", "attributes": "["}
    id_lists = ("valid_ids",)

    def input_problems(self) -> list[str]:
        return super().input_problems() + detector_config_problems(self)

    def build(self, out: Path) -> None:
        cfg = DetectorConfig.load(self.input_value("config"))
        val_ids = self.input_value("valid_ids")
        ids = read_img_id_list(val_ids, numbers_as=None) if val_ids else None
        with TaskProgress(self) as report:
            result = train_detector(cfg, images=self.input_value("images"), objects=self.input_value("objects"),
                                    attributes=self.input_value("attributes") or None, output=out / self.WEIGHTS,
                                    metrics=out / "metrics.json", config_file=out / self.CONFIG, val_ids=ids,
                                    epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                                    device=self.device, num_workers=self.data_workers, progress=False,
                                    on_progress=report)
        print(f"TrainDetector: mAP@0.5 {result['map50']} on {result['val_images']} val images "
              f"in {result['seconds']} s", flush=True)

    @staticmethod
    def metrics(output_dir: Path) -> dict[str, Any]:
        return json.loads((output_dir / "metrics.json").read_text())
