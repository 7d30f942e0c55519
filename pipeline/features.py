"""Luigi tasks that make, import and check region-feature files (the HDF5 feature store)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import luigi

from extractor.detector.model import DEFAULT_REGION_CHUNK
from extractor.extract import extract_features
from extractor.images import DEFAULT_MAX_PIXELS, list_images
from extractor.jsonstream import write_text_atomic
from extractor.reuse import merge_sidecars, sidecar_path
from extractor.store import failures_path, merge, validate
from extractor.store.tsv import import_tsv
from pipeline.base import InputPathParameter, PipelineTask, param_problems, paths_of, workdir
from pipeline.detector import TrainDetector, detector_config_problems
from pipeline.progress import TaskProgress
from pipeline.sources import SourcedTask, sources_in_use

FEATURES = "features.h5"


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class ExtractionParams:
    """The parameters ExtractFeatures and its shards share (their names are part of the interface)."""

    name_or_path = ("config",)

    images = InputPathParameter(default="", optional=True, members=list_images,
                                description="a folder of images or a list file; empty: the sources file's images")
    weights = InputPathParameter(default="", kind="file", optional=True,
                                 description="Detectron2-format detector weights; empty: the sources file's "
                                             "detector.weights, or TrainDetector's when it has none")
    config = luigi.Parameter(default="", description="detector config name or YAML; empty: the sources file's "
                                                     "detector.config, TrainDetector's, else VG-R101-C4")
    boxes = luigi.IntParameter(default=36, description="boxes per image; 0: adaptive min_boxes..max_boxes")
    min_boxes = luigi.IntParameter(default=10)
    max_boxes = luigi.IntParameter(default=100)
    selection = luigi.ChoiceParameter(choices=["caffe", "maxnms"], default="caffe")
    dtype = luigi.ChoiceParameter(choices=["float16", "float32"], default="float16")
    max_failure_ratio = luigi.FloatParameter(default=0.05)
    max_pixels = luigi.IntParameter(default=DEFAULT_MAX_PIXELS,
                                    description="larger images are listed as failures ('too large')")
    resize = luigi.ChoiceParameter(choices=["", "caffe", "detectron2"], default="",
                                   description="input rule; empty: the detector config's (caffe for the released "
                                               "VG configs, detectron2 for detectors trained here)")
    amp = luigi.ChoiceParameter(choices=["none", "auto", "bf16", "fp16"], default="none",
                                description="autocast: bf16 / fp16 on CUDA, bf16 on CPUs with bf16 instructions, "
                                            "auto: bf16 where the device has it, else float32 (it changes the "
                                            "features, so it names the output; the file records what ran)")
    tf32 = luigi.BoolParameter(default=False, description="TF32 float32 convolutions and matmuls on CUDA")
    device = luigi.Parameter(default="cpu", significant=False)
    batch_size = luigi.IntParameter(default=1, significant=False)
    region_chunk = luigi.IntParameter(default=DEFAULT_REGION_CHUNK, significant=False,
                                      description="regions res5 runs on at once (memory only)")
    decode_workers = luigi.IntParameter(default=-1, significant=False,
                                        description="image-decoding DataLoader workers; -1: automatic")

    sourced = {"images": "images", "weights": "detector.weights", "config": "detector.config"}

    def extraction_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "images", "weights", "config", "boxes", "min_boxes", "max_boxes", "selection", "dtype",
            "max_failure_ratio", "max_pixels", "resize", "amp", "tf32", "device", "batch_size", "region_chunk",
            "decode_workers")}

    def trains_detector(self) -> bool:
        """No weights given and the sources file has none but says what to train: TrainDetector makes them."""
        if not self.from_sources():
            return False
        src = sources_in_use()
        return not src.has("detector.weights") and src.has_under("detector.train")

    def needs(self) -> tuple[str, ...]:
        return ("images",) if self.trains_detector() else ("images", "weights")

    def input_problems(self) -> list[str]:
        """Every image of the folder / list file exists (naming the list line that does not), and the
        detector config loads."""
        return (super().input_problems() + param_problems(self, "images", _image_list_problem)
                + detector_config_problems(self))

    def upstream(self) -> dict[str, Any]:
        """The writer of the sources file and the detector training, when this extraction reads them."""
        deps = self.source_dependencies()
        if self.trains_detector():
            deps["detector"] = TrainDetector()
        return deps

    def resolved(self) -> dict[str, Any]:
        """Image source, weights file and detector config, as the extraction reads them; `detector`: the
        TrainDetector folder that made the weights (None for given ones)."""
        detector = paths_of(TrainDetector()) if self.trains_detector() else None
        if detector is not None:
            weights, config = str(detector / TrainDetector.WEIGHTS), str(detector / TrainDetector.CONFIG)
        else:
            weights, config = self.input_value("weights"), self.input_value("config") or "VG-R101-C4"
        return {"images": self.input_value("images"), "weights": weights, "config": self.config or config,
                "detector": str(detector) if detector else None}


def _image_list_problem(images: Path) -> str | None:
    if not list_images(images):
        return f"{images}: no images in it"
    return None


class ExtractFeaturesShard(ExtractionParams, SourcedTask):
    """Features of one contiguous block of the image list; resumes from its partial folder after a kill."""

    shard = luigi.IntParameter(default=0)
    shards = luigi.IntParameter(default=1)

    def dependencies(self) -> Any:
        return self.upstream()

    def build(self, out: Path) -> None:
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"ExtractFeaturesShard: shard {self.shard} is outside 0..{self.shards - 1}")
        src = self.resolved()
        paths = list_images(src["images"])
        lo, hi = len(paths) * self.shard // self.shards, len(paths) * (self.shard + 1) // self.shards
        boxes = {"boxes": self.boxes} if self.boxes > 0 else {"min_boxes": self.min_boxes,
                                                              "max_boxes": self.max_boxes}
        if (out / FEATURES).exists() and (out / "summary.json").exists():
            return  # finished before a later write (task.json, the rename) failed
        # a feature file already in the partial folder was finished by a run killed before it published the
        # folder: it is rebuilt from itself through its index (same task, so same inputs and settings)
        with TaskProgress(self) as report:
            summary = extract_features(
                paths[lo:hi], src["weights"], out / FEATURES, config=src["config"], selection=self.selection,
                device=self.device, batch_size=self.batch_size, dtype=self.dtype, resize=self.resize or None,
                amp=None if self.amp == "none" else self.amp, tf32=self.tf32, region_chunk=self.region_chunk,
                num_workers=None if self.decode_workers < 0 else self.decode_workers,
                max_failure_ratio=self.max_failure_ratio, max_pixels=self.max_pixels, overwrite=True,
                reuse=[out / FEATURES, *earlier_features()], progress=False, on_progress=report,
                **boxes)
        print(f"[lxmert] {self.get_task_family()} {self.output_dir().name}: {summary['extracted']} extracted, "
              f"{summary['reused']} reused from earlier outputs, {summary['resumed']} resumed, "
              f"{summary['failed']} failed", flush=True)
        _write_json(out / "summary.json", {**summary, "shard": self.shard, "shards": self.shards,
                                           "first": lo, "stop": hi, "inputs": src})


def earlier_features() -> list[Path]:
    """The feature files of every finished extraction in the work directory: what a shard may reuse (only
    those made with its weights and settings are used, see extractor.reuse)."""
    return [p for family in ("ExtractFeaturesShard", "ExtractFeatures")
            for p in sorted((workdir() / family).glob(f"*/{FEATURES}")) if not p.parent.name.endswith(".partial")]


class ExtractFeatures(ExtractionParams, SourcedTask):
    """Region features of every image in one HDF5 file, made by `shards` shard tasks run in parallel."""

    shards = luigi.IntParameter(default=1)
    merge_mode = luigi.ChoiceParameter(choices=["copy", "virtual"], default="copy",
                                       description="virtual: an HDF5 virtual dataset over the shard files")

    def dependencies(self) -> Any:
        if self.shards < 1:
            raise ValueError(f"ExtractFeatures: shards must be >= 1, got {self.shards}")
        return [ExtractFeaturesShard(shard=i, shards=self.shards, **self.extraction_params())
                for i in range(self.shards)]

    def build(self, out: Path) -> None:
        shard_files = [d / FEATURES for d in self.input_dirs()]
        target = out / FEATURES
        for stale in (target, failures_path(target), sidecar_path(target)):
            stale.unlink(missing_ok=True)
        if not (len(shard_files) == 1 and self.merge_mode == "copy" and _link(shard_files[0], target)):
            merge(shard_files, target, virtual=self.merge_mode == "virtual")
        if self.merge_mode == "copy":  # a virtual file reads its shards, which keep their own index
            merge_sidecars(shard_files, target)
        shards = [json.loads((d / "summary.json").read_text()) for d in self.input_dirs()]
        _write_json(out / "summary.json", {"images": sum(s["stored"] for s in shards),
                                           "failed": sum(s["failed"] for s in shards),
                                           "extracted": sum(s["extracted"] for s in shards),
                                           "reused": sum(s.get("reused", 0) for s in shards),
                                           "inputs": shards[0]["inputs"], "shards": shards})

    @staticmethod
    def inputs(output_dir: Path) -> dict[str, Any]:
        """What the extraction read: {"images", "weights", "config", "detector": TrainDetector folder or None}."""
        summary = json.loads((output_dir / "summary.json").read_text())
        if "inputs" in summary:
            return summary["inputs"]
        # a folder finished before extractions recorded it: its signature still matches only when it was
        # given its images and weights, which its task.json holds
        params = json.loads((output_dir / "task.json").read_text())["params"]
        return {"images": params["images"], "weights": params["weights"],
                "config": params["config"] or "VG-R101-C4", "detector": None}

    @staticmethod
    def path(output_dir: Path) -> Path:
        """The feature file inside an ExtractFeatures / ImportTSVFeatures output folder."""
        return output_dir / FEATURES


def _link(src: Path, dst: Path) -> bool:
    """Hard-link a finished single shard (and its failures) instead of copying it; False across devices."""
    try:
        os.link(src, dst)
        if failures_path(src).exists():
            os.link(failures_path(src), failures_path(dst))
    except OSError:
        dst.unlink(missing_ok=True)
        failures_path(dst).unlink(missing_ok=True)
        return False
    return True


class ImportTSVFeatures(PipelineTask):
    """An existing LXMERT (10-field) or Caffe (6-field) TSV converted into the feature store."""

    tsv = InputPathParameter(kind="file")
    dtype = luigi.ChoiceParameter(choices=["float16", "float32"], default="float32")

    def build(self, out: Path) -> None:
        summary = import_tsv(self.tsv, out / FEATURES, dtype=self.dtype, overwrite=True)  # ours: .partial
        _write_json(out / "summary.json", summary)


class ValidateFeatures(PipelineTask):
    """Checks a feature file (schema, NaN/Inf, box bounds, padding, duplicate ids); fails on any problem."""

    features = InputPathParameter(default="", kind="file", optional=True,
                                  description="an .h5 feature file; empty: ExtractFeatures' output")
    boxes = luigi.IntParameter(default=0, description="expected K; 0: any")
    dim = luigi.IntParameter(default=0, description="expected feature size D; 0: any")

    def dependencies(self) -> Any:
        return {} if self.features else {"features": ExtractFeatures()}

    def build(self, out: Path) -> None:
        path = Path(self.features) if self.features else self.input_dirs()["features"] / FEATURES
        problems = validate(path, boxes=self.boxes or None, dim=self.dim or None)
        _write_json(out / "report.json", {"file": str(path), "problems": problems})
        if problems:
            raise ValueError(f"ValidateFeatures: {path} has {len(problems)} problem(s):\n  "
                             + "\n  ".join(problems[:20]))
