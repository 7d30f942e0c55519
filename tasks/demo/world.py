"""The demo world: a small synthetic COCO / VQA v2 / Visual Genome / GQA / NLVR2 in the real files' formats.

A fresh CPU machine has none of the real datasets, so the pipeline's demo runs on this world with
the same readers, detector training, extraction and training code the real data goes through.
Everything is drawn from one seed (the same seed gives byte-identical files) and written into a
temporary folder that is renamed into place only when complete.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from extractor.fileio import atomic_directory, write_file, writing
from tasks.data.tokenization import sub_vocabulary
from tasks.demo.detector import write_detector_config
from tasks.demo.language import COLOR_NAMES, NUMBER_WORDS, Balancer, Question, captions, pick, region_phrases
from tasks.demo.layout import LAYOUT
from tasks.demo.questions import gqa_links, gqa_questions, gqa_valid_answers, vg_answer, vg_questions, vqa_questions
from tasks.demo.scene import SHAPES, SIZES, Scene, Theme, render, sample_scene, sample_theme
from tasks.demo.sources import DETECTOR_CONFIG, SOURCES_FILE, sources_text
from tasks.demo.statements import nlvr2_statements

FORMAT = "lxmert-demo-world"
VERSION = 1
MANIFEST = "world.json"
_MAX_COCO_ID, _MAX_VG_ID, _MAX_NLVR2_SET = 581929, 2417997, 10000
_STREAMS = {"coco_ids": 1, "vg_ids": 2, "nlvr2_train_ids": 3, "nlvr2_dev_ids": 4, "coco_minival": 5,
            "vg_val": 6, "train2014": 10, "val2014": 11, "vg": 12, "nlvr2_train": 13, "nlvr2_dev": 14}
_SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("grey",), "diamond": ("rhombus",), "cross": ("plus",),
                                         "0": ("zero", "none"),
                                         **{str(i): (NUMBER_WORDS[i],) for i in range(1, 11)}}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world; the defaults fit the demo's 10-minute budget on 2 CPU cores."""

    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 6
    coco_train_images: int = 300
    coco_val_images: int = 100
    minival_images: int | None = None  # COCO val images held out from pretraining; None = all of val
    captions_per_image: int = 5
    vqa_questions_per_image: int = 8
    synonym_rate: float = 0.08  # chance that one of the ten VQA answers is a synonym ("grey", "two")
    wrong_answer_rate: float = 0.03  # chance that one of the ten VQA answers is wrong
    vg_train_images: int = 300
    vg_val_images: int = 100  # GQA val images, also the detector's val images; held out from pretraining
    vg_questions_per_image: int = 4
    gqa_questions_per_image: int = 10
    nlvr2_train_sets: int = 100
    nlvr2_dev_sets: int = 30
    nlvr2_pairs_per_set: int = 4
    nlvr2_sentences_per_set: int = 3

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 64:
            problems.append("image_size must be >= 64 (objects would not fit)")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            problems.append("need 1 <= min_objects <= max_objects <= 8")
        for name in ("coco_train_images", "coco_val_images", "vg_train_images", "vg_val_images",
                     "nlvr2_train_sets", "nlvr2_dev_sets", "nlvr2_sentences_per_set", "captions_per_image",
                     "vqa_questions_per_image", "vg_questions_per_image", "gqa_questions_per_image"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.nlvr2_pairs_per_set < 2:
            problems.append("nlvr2_pairs_per_set must be >= 2 (labels are balanced within a set)")
        if self.minival_images is not None and not 1 <= self.minival_images <= self.coco_val_images:
            problems.append("minival_images must be between 1 and coco_val_images (or None for all)")
        if not (0 <= self.synonym_rate and 0 <= self.wrong_answer_rate and
                self.synonym_rate + self.wrong_answer_rate <= 0.5):
            problems.append("synonym_rate and wrong_answer_rate must be >= 0 and sum to <= 0.5")
        if problems:
            raise ValueError("WorldConfig: " + "; ".join(problems))


PRESETS: dict[str, WorldConfig] = {
    "demo": WorldConfig(),
    # for the longer run (README): twice the pretraining images (fewer memorised) and four times the NLVR2
    # training sets; validation sets of the demo's sizes (the COCO val and NLVR2 dev scenes are the demo's,
    # the Visual Genome / GQA val scenes are drawn anew, as they come from the same pool as the train ones)
    "large": WorldConfig(coco_train_images=600, vg_train_images=600, nlvr2_train_sets=400),
    "tiny": WorldConfig(coco_train_images=24, coco_val_images=12, vg_train_images=24, vg_val_images=12,
                        nlvr2_train_sets=6, nlvr2_dev_sets=4),
}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _unique_ids(seed: int, stream: str, n: int, high: int) -> list[int]:
    """n distinct ids in 1..high, scattered (not 1..n) so that an id is never mistaken for an index."""
    return [int(i) + 1 for i in _rng(seed, _STREAMS[stream]).choice(high, n, replace=False)]


def _subset(seed: int, stream: str, ids: list[int], n: int) -> list[int]:
    chosen = _rng(seed, _STREAMS[stream]).choice(len(ids), n, replace=False)
    return sorted(ids[int(i)] for i in chosen)


TEXT_KEYS = frozenset({"caption", "question", "answer", "fullAnswer", "phrase", "sentence"})


def _collect_texts(data: Any, out: set[str]) -> None:
    """Add the natural-language strings of a dataset file (values of TEXT_KEYS) to `out`."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in TEXT_KEYS and isinstance(value, str):
                out.add(value)
            else:
                _collect_texts(value, out)
    elif isinstance(data, list):
        for value in data:
            _collect_texts(value, out)


class _Writer:
    """Writes the files of one world under a root, keeping the scene graph of every image."""

    def __init__(self, root: Path, seed: int, config: WorldConfig) -> None:
        self.root, self.seed, self.cfg = root, seed, config
        self.scenes: dict[str, Scene] = {}
        self.texts: set[str] = set()  # every sentence, question and answer written, for the vocabulary
        self._pending: list[tuple[str, str, Scene, tuple[int, ...]]] = []

    def write(self, rel: str, data: bytes | str) -> None:
        """One file of the world (the folder is renamed into place whole, so no file needs its own rename)."""
        write_file(self.root / rel, data)

    def json(self, rel: str, data: Any) -> None:
        self.write(rel, json.dumps(data))
        _collect_texts(data, self.texts)

    def lines(self, rel: str, rows: list[str]) -> None:
        self.write(rel, "".join(r + "\n" for r in rows))

    def image(self, folder: str, stem: str, rng: np.random.Generator, render_key: tuple[int, ...],
              theme: Theme | None = None) -> Scene:
        """Sample one image's scene (its img_id is the file stem); drawing waits for `draw_all`.

        The pixels come from their own generator (seed + render_key), so images can be drawn in any
        order, on any number of threads, and still be byte-identical.
        """
        cfg = self.cfg
        scene = sample_scene(rng, cfg.image_size, cfg.min_objects, cfg.max_objects, theme)
        self.scenes[stem] = scene
        self._pending.append((folder, stem, scene, render_key))
        return scene

    def _draw(self, job: tuple[str, str, Scene, tuple[int, ...]]) -> None:
        folder, stem, scene, key = job
        ok, png = cv2.imencode(".png", render(scene, _rng(self.seed, *key))[..., ::-1])
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {stem}")
        self.write(f"{folder}/{stem}.png", png.tobytes())

    def draw_all(self, workers: int) -> None:
        """Draw and save every sampled image (OpenCV and numpy release the GIL, so threads help)."""
        for folder in sorted({job[0] for job in self._pending}):
            with writing(self.root / folder):
                (self.root / folder).mkdir(parents=True, exist_ok=True)
        if workers <= 1:
            for job in self._pending:
                self._draw(job)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(self._draw, self._pending))
        self._pending.clear()


def _wrong_answer(q: Question, rng: np.random.Generator) -> str:
    """A plausible human mistake: the other yes/no, a count off by one, another colour or shape."""
    a = q.answer
    if a in ("yes", "no"):
        return "no" if a == "yes" else "yes"
    if a.isdigit():
        return str(int(a) + 1) if a == "0" or rng.random() < 0.5 else str(int(a) - 1)
    pool = COLOR_NAMES if a in COLOR_NAMES else SHAPES
    return pick(rng, [x for x in pool if x != a])


def _vqa_annotation(q: Question, question_id: int, image_id: int, rng: np.random.Generator,
                    cfg: WorldConfig) -> dict:
    """Ten human answers with a little noise; multiple_choice_answer is the most frequent one."""
    answers = []
    for k in range(10):
        u = rng.random()
        if u < cfg.wrong_answer_rate:
            text, confidence = _wrong_answer(q, rng), pick(rng, ("maybe", "no"))
        elif u < cfg.wrong_answer_rate + cfg.synonym_rate and q.answer in _SYNONYMS:
            text, confidence = pick(rng, _SYNONYMS[q.answer]), "yes"
        else:
            text, confidence = q.answer, "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": k + 1})
    counts = Counter(a["answer"] for a in answers)
    best = max(counts.values())
    mc = q.answer if counts[q.answer] == best else sorted(a for a, c in counts.items() if c == best)[0]
    return {"question_id": question_id, "image_id": image_id, "question_type": q.info["question_type"],
            "answer_type": q.info["answer_type"], "multiple_choice_answer": mc, "answers": answers}


def _majority(train: list[str], val: list[str]) -> dict:
    """The most frequent train answer and its share of train and val (the majority-answer baseline)."""
    answer, n = Counter(train).most_common(1)[0]
    return {"answer": answer, "train_share": round(n / len(train), 4),
            "val_share": round(sum(a == answer for a in val) / max(1, len(val)), 4)}


def _coco_vqa(w: _Writer) -> dict:
    cfg, seed = w.cfg, w.seed
    ids = _unique_ids(seed, "coco_ids", cfg.coco_train_images + cfg.coco_val_images, _MAX_COCO_ID)
    n_train = cfg.coco_train_images
    splits = {"train2014": sorted(ids[:n_train]), "val2014": sorted(ids[n_train:])}
    caption_ids = itertools.count(1)
    answers: dict[str, list[str]] = {}
    answer_types: dict[str, Counter] = {}
    for split, image_ids in splits.items():
        text_rng = _rng(seed, 100 + _STREAMS[split])
        balancer = Balancer()
        images, caps, questions, annotations = [], [], [], []
        for k, image_id in enumerate(image_ids):
            stem = f"COCO_{split}_{image_id:012d}"
            scene = w.image(LAYOUT["coco"]["images"][split], stem, _rng(seed, _STREAMS[split], k),
                            (_STREAMS[split], k, 1))
            images.append({"id": image_id, "file_name": f"{stem}.png", "height": scene.height,
                           "width": scene.width})
            caps += [{"id": next(caption_ids), "image_id": image_id, "caption": c}
                     for c in captions(scene, text_rng, cfg.captions_per_image)]
            for j, q in enumerate(vqa_questions(scene, text_rng, balancer, cfg.vqa_questions_per_image)):
                qid = image_id * 1000 + j  # VQA v2's own numbering
                questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
                annotations.append(_vqa_annotation(q, qid, image_id, text_rng, cfg))
        info = {"description": "LXMERT demo world (synthetic)", "version": "1.0", "year": 2014}
        w.json(LAYOUT["coco"]["captions"][split], {"info": info, "licenses": [], "images": images,
                                                    "annotations": caps})
        w.json(LAYOUT["vqa"]["questions"][split], {"info": info, "task_type": "Open-Ended",
                                                   "data_type": "mscoco", "license": {},
                                                   "data_subtype": split, "questions": questions})
        w.json(LAYOUT["vqa"]["annotations"][split], {"info": info, "license": {}, "data_subtype": split,
                                                     "data_type": "mscoco", "annotations": annotations})
        answers[split] = [a["multiple_choice_answer"] for a in annotations]
        answer_types[split] = Counter(a["answer_type"] for a in annotations)
    n_minival = cfg.minival_images or cfg.coco_val_images
    minival = _subset(seed, "coco_minival", splits["val2014"], n_minival)
    w.lines(LAYOUT["splits"]["coco_minival"], [f"COCO_val2014_{i:012d}" for i in minival])
    return {"images": {s: len(v) for s, v in splits.items()}, "minival_images": len(minival),
            "captions": next(caption_ids) - 1,
            "questions": {s: len(v) for s, v in answers.items()},
            "answer_types": {s: dict(sorted(c.items())) for s, c in answer_types.items()},
            "answers": len(set(answers["train2014"]) | set(answers["val2014"])),
            "majority": _majority(answers["train2014"], answers["val2014"])}


def _token_map(text: str, refs: list, object_ids: list[int]) -> dict[str, str]:
    """GQA annotations: whitespace-token index of each referred object's noun -> its object id."""
    words = [t.strip("?.,") for t in text.split()]
    out = {}
    for r in refs:
        phrase = r.phrase.split()
        for start in range(len(words) - len(phrase) + 1):
            if words[start:start + len(phrase)] == phrase:
                out[str(start + len(phrase) - 1)] = str(object_ids[r.index])
                break
    return out


def _gqa_entries(questions: list[Question], qids: list[str], image_id: int, object_ids: list[int]) -> dict:
    entailed, equivalent = gqa_links(questions)
    out = {}
    for i, q in enumerate(questions):
        semantic = [{"operation": op, "dependencies": deps,
                     "argument": arg if idx is None else f"{arg} ({object_ids[idx]})"}
                    for op, deps, arg, idx in q.info["program"]]
        semantic_str = "->".join(f"{s['operation']}: {s['argument']}" +
                                 (f" [{', '.join(map(str, s['dependencies']))}]" if s["dependencies"] else "")
                                 for s in semantic)
        out[qids[i]] = {
            "semantic": semantic, "entailed": [qids[j] for j in entailed[i]],
            "equivalent": [qids[j] for j in equivalent[i]], "question": q.text, "imageId": str(image_id),
            "isBalanced": True, "groups": q.info["groups"], "answer": q.answer, "semanticStr": semantic_str,
            "annotations": {"answer": {}, "question": _token_map(q.text, q.info["refs"], object_ids),
                            "fullAnswer": _token_map(q.info["fullAnswer"], q.info["refs"], object_ids)},
            "types": q.info["types"], "fullAnswer": q.info["fullAnswer"],
        }
    return out


def _vg_gqa(w: _Writer) -> dict:
    cfg, seed = w.cfg, w.seed
    ids = sorted(_unique_ids(seed, "vg_ids", cfg.vg_train_images + cfg.vg_val_images, _MAX_VG_ID))
    val_ids = set(_subset(seed, "vg_val", ids, cfg.vg_val_images))
    text_rng = _rng(seed, 100 + _STREAMS["vg"])
    gqa_rng = {s: _rng(seed, 200 + _STREAMS["vg"], i) for i, s in enumerate(("train", "val"))}
    vg_balancer = Balancer()
    gqa_balancer = {"train": Balancer(), "val": Balancer()}
    gqa_qid = {"train": itertools.count(10_000_000), "val": itertools.count(20_000_000)}
    object_ids, region_ids = itertools.count(1_000_000), itertools.count(4_000_000)
    qa_ids = itertools.count(7_000_000)
    image_data, objects, attributes, regions, qas = [], [], [], [], []
    gqa: dict[str, dict] = {"train": {}, "val": {}}
    choices: dict[str, dict] = {"train": {}, "val": {}}
    for k, image_id in enumerate(ids):
        scene = w.image(LAYOUT["vg"]["images"], str(image_id), _rng(seed, _STREAMS["vg"], k),
                        (_STREAMS["vg"], k, 1))
        image_data.append({"image_id": image_id, "width": scene.width, "height": scene.height,
                           "url": f"{LAYOUT['vg']['images']}/{image_id}.png", "coco_id": None,
                           "flickr_id": None})
        oids = [next(object_ids) for _ in scene.objects]
        objs = [{"object_id": oid, "x": o.x, "y": o.y, "w": o.w, "h": o.h, "names": [o.shape],
                 "synsets": [f"{o.shape}.n.01"], "attributes": [o.color, o.size]}
                for oid, o in zip(oids, scene.objects)]
        objects.append({"image_id": image_id, "objects": objs})
        attributes.append({"image_id": image_id, "attributes": objs})
        regions.append({"id": image_id, "regions": [
            {"region_id": next(region_ids), "image_id": image_id, "phrase": phrase, "x": x, "y": y,
             "width": bw, "height": bh} for phrase, (x, y, bw, bh) in region_phrases(scene, text_rng)]})
        qas.append({"id": image_id, "qas": [
            {"qa_id": next(qa_ids), "image_id": image_id, "question": q.text,
             "answer": vg_answer(q, text_rng)}
            for q in vg_questions(scene, text_rng, vg_balancer, cfg.vg_questions_per_image)]})
        split = "val" if image_id in val_ids else "train"
        questions = gqa_questions(scene, gqa_rng[split], gqa_balancer[split], cfg.gqa_questions_per_image)
        qids = [f"{next(gqa_qid[split]):08d}" for _ in questions]
        gqa[split].update(_gqa_entries(questions, qids, image_id, oids))
        for qid, q in zip(qids, questions):
            valid = gqa_valid_answers(q.template)
            choices[split][qid] = {"valid": valid, "plausible": valid}
    vg = LAYOUT["vg"]
    w.json(vg["image_data"], image_data)
    w.json(vg["objects"], objects)
    w.json(vg["attributes"], attributes)
    w.json(vg["region_descriptions"], regions)
    w.json(vg["question_answers"], qas)
    for split in ("train", "val"):
        w.json(LAYOUT["gqa"]["questions"][split], gqa[split])
        w.json(LAYOUT["gqa"]["choices"][split], choices[split])
    w.lines(LAYOUT["splits"]["vg_val"], [str(i) for i in sorted(val_ids)])
    answers = {s: [q["answer"] for q in gqa[s].values()] for s in gqa}
    structural = {s: dict(sorted(Counter(q["types"]["structural"] for q in gqa[s].values()).items()))
                  for s in gqa}
    return {"vg_images": {"train": len(ids) - len(val_ids), "val": len(val_ids)},
            "vg_objects": sum(len(o["objects"]) for o in objects),
            "vg_regions": sum(len(r["regions"]) for r in regions), "vg_qas": sum(len(q["qas"]) for q in qas),
            "gqa": {"questions": {s: len(v) for s, v in gqa.items()}, "structural": structural,
                    "entailed_links": sum(len(q["entailed"]) for s in gqa for q in gqa[s].values()),
                    "answers": len(set(answers["train"]) | set(answers["val"])),
                    "majority": _majority(answers["train"], answers["val"])}}


def _nlvr2(w: _Writer) -> dict:
    cfg, seed = w.cfg, w.seed
    labels: dict[str, list[str]] = {}
    stats: dict[str, Any] = {"sets": {}, "examples": {}, "images": {}}
    for split, n_sets in (("train", cfg.nlvr2_train_sets), ("dev", cfg.nlvr2_dev_sets)):
        folder = LAYOUT["nlvr2"]["images"][split]
        rows = []
        set_ids = sorted(i - 1 for i in _unique_ids(seed, f"nlvr2_{split}_ids", n_sets, _MAX_NLVR2_SET))
        for k, set_id in enumerate(set_ids):
            stream = _STREAMS[f"nlvr2_{split}"]
            rng = _rng(seed, stream, k)
            theme = sample_theme(rng)
            pairs = [tuple(w.image(folder, f"{split}-{set_id}-{p}-img{side}", rng,
                                   (stream, k, p + 1, side + 1), theme) for side in (0, 1))
                     for p in range(cfg.nlvr2_pairs_per_set)]
            statements = nlvr2_statements(pairs, theme, rng, cfg.nlvr2_sentences_per_set)
            for s, (_, sentence, truths) in enumerate(statements):
                for p, truth in enumerate(truths):
                    rows.append({"identifier": f"{split}-{set_id}-{p}-{s}", "sentence": sentence,
                                 "left_url": f"{folder}/{split}-{set_id}-{p}-img0.png",
                                 "right_url": f"{folder}/{split}-{set_id}-{p}-img1.png",
                                 "label": "True" if truth else "False", "synset": theme.shapes[0],
                                 "query": " ".join(theme.colors + theme.shapes)})
        w.lines(LAYOUT["nlvr2"]["data"][split], [json.dumps(r) for r in rows])
        w.texts.update(r["sentence"] for r in rows)
        labels[split] = [r["label"] for r in rows]
        stats["sets"][split] = n_sets
        stats["examples"][split] = len(rows)
        stats["images"][split] = 2 * n_sets * cfg.nlvr2_pairs_per_set
    stats["majority"] = _majority(labels["train"], labels["dev"])
    return stats


def _write_world(root: Path, seed: int, config: WorldConfig, workers: int) -> dict:
    w = _Writer(root, seed, config)
    stats = {"coco_vqa": _coco_vqa(w), "vg_gqa": _vg_gqa(w), "nlvr2": _nlvr2(w)}
    w.draw_all(workers)
    # the world's language is closed: its WordPieces (a few hundred of BERT's 30,522) are all the
    # demo model needs; they tokenize every text exactly as the full vocabulary does
    w.lines(LAYOUT["vocab"], sub_vocabulary(sorted(w.texts)))
    w.lines(LAYOUT["labels"]["objects"], list(SHAPES))
    w.lines(LAYOUT["labels"]["attributes"], [",".join((c, "grey")) if c == "gray" else c for c in COLOR_NAMES]
            + list(SIZES))
    minival = (root / LAYOUT["splits"]["coco_minival"]).read_text().split()
    vg_val = (root / LAYOUT["splits"]["vg_val"]).read_text().split()
    w.lines(LAYOUT["splits"]["heldout"], minival + vg_val)
    w.json(LAYOUT["scene_graphs"], {stem: {"width": s.width, "height": s.height,
                                           "objects": [dataclasses.asdict(o) for o in s.objects]}
                                    for stem, s in w.scenes.items()})
    manifest = {"format": FORMAT, "version": VERSION, "seed": seed, "config": dataclasses.asdict(config),
                "image_size": [config.image_size, config.image_size],
                "classes": {"objects": list(SHAPES), "attributes": list(COLOR_NAMES) + list(SIZES)},
                "files": LAYOUT, "stats": stats}
    w.write(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    # what the pipeline reads, named as a user's sources file names real data (docs/cluster.md)
    write_detector_config(root / DETECTOR_CONFIG, root / LAYOUT["labels"]["objects"],
                          root / LAYOUT["labels"]["attributes"], config.image_size)
    w.write(SOURCES_FILE, sources_text())
    return manifest


def generate_world(out: str | Path, seed: int = 0, config: WorldConfig | None = None,
                   overwrite: bool = False, workers: int | None = None) -> dict:
    """Write a complete world to `out` and return its manifest.

    The world is built in a hidden sibling folder and renamed onto `out` only when finished, so a
    crash or kill never leaves a half-written world where the pipeline would take it for done.
    `workers` threads draw the images (default: the CPU count, at most 4); the files do not depend on it.
    """
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    out = Path(out).absolute()
    config = config or WorldConfig()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_directory(out, sync=False) as tmp:  # made again from the seed if a crash loses it
        manifest = _write_world(tmp, seed, config, workers)
    return manifest


def read_manifest(root: str | Path) -> dict:
    """The manifest of a generated world; a clear error when `root` holds none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no demo world at {root}: {MANIFEST} is missing (generate one with "
                                f"`python -m tasks.demo --out {root}`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} manifest")
    return manifest


def world_path(root: str | Path, *keys: str) -> Path:
    """Absolute path of one `files` entry of the manifest: world_path(root, "vqa", "questions", "val2014")."""
    entry: Any = read_manifest(root)["files"]
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            raise KeyError(f"demo world manifest has no files entry {'/'.join(keys)}")
        entry = entry[key]
    if not isinstance(entry, str):
        raise KeyError(f"demo world manifest entry {'/'.join(keys)} is a group, not a path")
    return Path(root).absolute() / entry
