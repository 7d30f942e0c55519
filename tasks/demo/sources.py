"""The demo world's sources file: every input the pipeline reads, named in the form a user's sources file
takes for real data (docs/cluster.md), with paths relative to the world's root."""
from __future__ import annotations

from typing import Any

import yaml

from tasks.demo.layout import LAYOUT

SOURCES_FILE = "sources.yaml"
DETECTOR_CONFIG = "labels/demo-detector.yaml"  # beside the label files it names

_COCO, _VQA, _VG, _GQA, _NLVR2, _SPLITS = (LAYOUT[k] for k in ("coco", "vqa", "vg", "gqa", "nlvr2", "splits"))
_YEARS = ("train2014", "val2014")

SOURCES: dict[str, Any] = {
    "images": ".",  # every image of the world: COCO, Visual Genome and NLVR2
    "detector": {
        "config": DETECTOR_CONFIG,  # no weights: TrainDetector trains this architecture on detector.train
        "train": {"images": _VG["images"], "objects": _VG["objects"], "attributes": _VG["attributes"],
                  "valid_ids": _SPLITS["vg_val"]},
    },
    "pretrain": {
        "coco_captions": [_COCO["captions"][y] for y in _YEARS],
        "vqa_questions": [_VQA["questions"][y] for y in _YEARS],
        "vqa_annotations": [_VQA["annotations"][y] for y in _YEARS],
        "vg_regions": _VG["region_descriptions"],
        "vg_qas": _VG["question_answers"],
        "vg_image_data": _VG["image_data"],
        "gqa_questions": [_GQA["questions"]["train"]],
        "minival": _SPLITS["coco_minival"],
        "exclude": _SPLITS["vg_val"],  # GQA's evaluated images stay out of pretraining
    },
    "vqa": {
        "train_questions": [_VQA["questions"]["train2014"]],
        "train_annotations": [_VQA["annotations"]["train2014"]],
        "valid_questions": _VQA["questions"]["val2014"],
        "valid_annotations": _VQA["annotations"]["val2014"],
        "minival": _SPLITS["coco_minival"],
    },
    "gqa": {
        "train_questions": [_GQA["questions"]["train"]],
        "valid_questions": _GQA["questions"]["val"],
        "valid_choices": _GQA["choices"]["val"],
        "valid_objects": _VG["objects"],  # the boxes GQA's question annotations name (pointing accuracy)
    },
    "nlvr2": {"train_statements": _NLVR2["data"]["train"], "valid_statements": _NLVR2["data"]["dev"]},
    "vocab": LAYOUT["vocab"],
}
"""What the world's sources.yaml holds (the pipeline reads it before the world exists, to plan its graph)."""


def sources_text() -> str:
    """The world's sources.yaml."""
    return ("# The demo world's sources, in the form of a sources file for real data (docs/cluster.md).\n"
            "# Paths are relative to this file's folder.\n" + yaml.safe_dump(SOURCES, sort_keys=False))
