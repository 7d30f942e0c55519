"""Where each file of a demo world lives, relative to its root (the manifest's `files`; docs/demo.md)."""
from __future__ import annotations

from typing import Any

LAYOUT: dict[str, Any] = {  # every path is relative to the world's root
    "coco": {
        "images": {"train2014": "coco/train2014", "val2014": "coco/val2014"},
        "captions": {"train2014": "coco/annotations/captions_train2014.json",
                     "val2014": "coco/annotations/captions_val2014.json"},
    },
    "vqa": {
        "questions": {"train2014": "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                      "val2014": "vqa/v2_OpenEnded_mscoco_val2014_questions.json"},
        "annotations": {"train2014": "vqa/v2_mscoco_train2014_annotations.json",
                        "val2014": "vqa/v2_mscoco_val2014_annotations.json"},
    },
    "vg": {
        "images": "vg/images",
        "image_data": "vg/image_data.json",
        "objects": "vg/objects.json",
        "attributes": "vg/attributes.json",
        "region_descriptions": "vg/region_descriptions.json",
        "question_answers": "vg/question_answers.json",
    },
    "gqa": {
        "questions": {"train": "gqa/train_balanced_questions.json", "val": "gqa/val_balanced_questions.json"},
        "choices": {"train": "gqa/train_choices.json", "val": "gqa/val_choices.json"},
    },
    "nlvr2": {
        "data": {"train": "nlvr2/train.json", "dev": "nlvr2/dev.json"},
        "images": {"train": "nlvr2/images/train", "dev": "nlvr2/images/dev"},
    },
    "labels": {"objects": "labels/objects_vocab.txt", "attributes": "labels/attributes_vocab.txt"},
    "vocab": "vocab.txt",
    "splits": {"coco_minival": "splits/coco_minival.txt", "vg_val": "splits/vg_val.txt",
               "heldout": "splits/heldout_images.txt"},
    "scene_graphs": "scene_graphs.json",
}
