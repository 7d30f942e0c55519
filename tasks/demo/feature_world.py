"""A small learnable world in the real file formats, for the training tests and the benchmark.

Each image has a colour and a main object; its box features are class and attribute codes plus
noise, and the sentences and answers talk about the same colour and object. Every pretraining
objective can therefore lower its loss on it, and fine-tuning can reach high accuracy, in seconds
on a CPU. (The full demo world, with rendered images for the detector, lives in tasks.demo.)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractor.store import FeatureWriter, ImageFeatures, parts_dir

COLORS = ("red", "blue", "green", "yellow", "white", "black")
OBJECTS = ("car", "dog", "cat", "tree", "boat", "chair")
N_CLASSES, N_ATTRS = 12, 8  # detector label ids used (within the 1600 / 400 of Visual Genome)


@dataclass
class World:
    """Where the files of a generated world are, and what each image shows."""

    features: Path
    corpus: Path
    vqa: Path
    vqa_annotations: Path
    gqa: Path
    nlvr2: Path
    img_ids: list[str]
    colors: list[str]
    objects: list[str]


def _codes(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.normal(0.0, 1.0, (n, dim)).astype(np.float32)


def write_world(root: str | Path, n_images: int = 16, max_boxes: int = 8, feature_dim: int = 32,
                vary_boxes: bool = True, seed: int = 0) -> World:
    """Write features.h5, a pretraining corpus and VQA / GQA / NLVR2 task files under `root`.

    With `vary_boxes` odd images have fewer boxes than `max_boxes` (exercising padding).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_code, attr_code = _codes(rng, N_CLASSES, feature_dim), _codes(rng, N_ATTRS, feature_dim)
    color_code = _codes(rng, len(COLORS), feature_dim)
    img_ids = [f"img{i:04d}" for i in range(n_images)]
    colors = [COLORS[i % len(COLORS)] for i in range(n_images)]
    objects = [OBJECTS[(i // len(COLORS) + i) % len(OBJECTS)] for i in range(n_images)]
    features = root / "features.h5"
    shutil.rmtree(parts_dir(features), ignore_errors=True)  # a fresh world, not a resumed one
    with FeatureWriter(features, max_boxes=max_boxes, feature_dim=feature_dim, dtype="float16") as writer:
        for i, img_id in enumerate(img_ids):
            n = max_boxes - (i % 2) * (max_boxes // 4) if vary_boxes else max_boxes
            obj = rng.integers(0, N_CLASSES, n)
            obj[0] = OBJECTS.index(objects[i])
            attr = rng.integers(0, N_ATTRS, n)
            attr[0] = COLORS.index(colors[i])
            feats = class_code[obj] + 0.5 * attr_code[attr] + color_code[COLORS.index(colors[i])]
            feats += rng.normal(0.0, 0.1, feats.shape).astype(np.float32)
            xy = rng.uniform(0, 300, (n, 2)).astype(np.float32)
            wh = rng.uniform(20, 100, (n, 2)).astype(np.float32)
            writer.add(ImageFeatures(
                img_id=img_id, img_h=400, img_w=400, boxes=np.concatenate([xy, xy + wh], axis=1),
                features=feats, objects_id=obj.astype(np.int64),
                objects_conf=rng.uniform(0.3, 1.0, n).astype(np.float32),
                attrs_id=attr.astype(np.int64), attrs_conf=rng.uniform(0.3, 1.0, n).astype(np.float32)))
        writer.finalize(order=img_ids, overwrite=True)
    corpus, vqa, annotations, gqa, nlvr2 = [], [], [], [], []
    for i, (img_id, color, obj) in enumerate(zip(img_ids, colors, objects)):
        corpus.append({
            "img_id": img_id,
            "sentf": {"mscoco": [f"a {color} {obj} in the picture", f"the {obj} is {color}"],
                      "vqa": [f"what color is the {obj}?", f"what is the {color} thing?"]},
            "labelf": {"vqa": [{color: 1.0}, {obj: 1.0, "animal": 0.3}]},
        })
        for j, (question, answer) in enumerate(((f"what color is the {obj}?", color),
                                                 (f"what is the {color} thing?", obj))):
            qid = i * 10 + j
            vqa.append({"question_id": qid, "img_id": img_id, "sent": question, "label": {answer: 1.0},
                        "answer_type": "other", "question_type": "what"})
            annotations.append({"question_id": qid, "image_id": i, "question_type": "what",
                                "answer_type": "other", "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k in range(10)]})
            gqa.append({"question_id": str(qid), "img_id": img_id, "sent": question, "label": {answer: 1.0}})
        other = (i + 1) % n_images
        same = colors[other] == color
        nlvr2.append({"identifier": f"dev-{i}-0-0", "img0": img_id, "img1": img_ids[other],
                      "sent": f"both pictures show something {color}", "label": int(same)})
        nlvr2.append({"identifier": f"dev-{i}-1-0", "img0": img_id, "img1": img_id,
                      "sent": f"both pictures show something {color}", "label": 1})
    files = {"corpus": corpus, "vqa": vqa, "gqa": gqa, "nlvr2": nlvr2,
             "vqa_annotations": {"annotations": annotations}}
    for name, data in files.items():
        (root / f"{name}.json").write_text(json.dumps(data))
    return World(features=features, corpus=root / "corpus.json", vqa=root / "vqa.json",
                 vqa_annotations=root / "vqa_annotations.json", gqa=root / "gqa.json",
                 nlvr2=root / "nlvr2.json", img_ids=img_ids, colors=colors, objects=objects)
