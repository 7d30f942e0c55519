"""Builders of LXMERT's preprocessed files (docs/architecture.md) from the datasets' raw files.

Each builder returns the entries; write them with write_json_atomic. Users who already have
LXMERT's released json skip this step and load those with tasks.data.readers.load_*.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from extractor.jsonstream import DataFormatError, load_json, write_json_atomic
from tasks.data.answers import AnswerTable, vqa_label
from tasks.data.readers import (
    nlvr2_img_ids,
    read_coco_captions,
    read_gqa_questions,
    read_nlvr2,
    read_vg_image_data,
    read_vg_qas,
    read_vg_regions,
    read_vqa_annotations,
    read_vqa_questions,
)

PathLike = str | os.PathLike[str]


def build_vqa_task(
    questions: PathLike, annotations: PathLike | None = None, table: AnswerTable | None = None
) -> list[dict]:
    """VQA entries {question_id, img_id, sent, label, answer_type, question_type}.

    label is {answer: soft score} over the ten answers after normalize_answer; with `table`
    (LXMERT used its 3129 answers: default_vqa_table()) answers outside it are dropped. Without
    annotations (test splits) entries carry no label and no types.
    """
    anns = {}
    if annotations is not None:
        anns = {a.question_id: a for a in read_vqa_annotations(annotations)}
    out = []
    for q in read_vqa_questions(questions):
        entry: dict = {"question_id": q.question_id, "img_id": q.img_id, "sent": q.question}
        if annotations is not None:
            a = anns.pop(q.question_id, None)
            if a is None:
                raise DataFormatError(
                    f"{annotations}: no annotation for question {q.question_id} of {questions}")
            entry.update(label=vqa_label(a.answers, table), answer_type=a.answer_type,
                         question_type=a.question_type)
        out.append(entry)
    if anns:
        raise DataFormatError(
            f"{annotations}: {len(anns)} annotations have no question in {questions} "
            f"(first: {sorted(anns)[:5]})")
    return out


def build_gqa_task(questions: PathLike) -> list[dict]:
    """GQA entries {question_id: str, img_id, sent, label: {answer: 1.0}} (no label on test splits)."""
    out = []
    for q in read_gqa_questions(questions):
        entry: dict = {"question_id": q.question_id, "img_id": q.img_id, "sent": q.question}
        if q.answer is not None:
            entry["label"] = {q.answer: 1.0}
        out.append(entry)
    return out


def build_nlvr2_task(data: PathLike) -> list[dict]:
    """NLVR2 entries {identifier, img0, img1, sent, label: 1 for True, 0 for False}."""
    out = []
    for ex in read_nlvr2(data):
        img0, img1 = nlvr2_img_ids(ex.identifier)
        entry: dict = {"identifier": ex.identifier, "img0": img0, "img1": img1, "sent": ex.sentence}
        if ex.label is not None:
            entry["label"] = int(ex.label)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# The pretraining corpus

# LXMERT's corpus files: COCO train2014 images, COCO val2014 images outside / inside minival,
# and Visual Genome images that are not COCO images.
CORPUS_SPLITS = ("mscoco_train", "mscoco_nominival", "mscoco_minival", "vgnococo")


def corpus_split(img_id: str, minival: set[str] | frozenset[str]) -> str:
    """Which corpus file an image's entry belongs to."""
    if img_id.startswith("COCO_train2014_"):
        return "mscoco_train"
    if img_id.startswith("COCO_val2014_"):
        return "mscoco_minival" if img_id in minival else "mscoco_nominival"
    return "vgnococo"


class _Corpus:
    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def add(self, img_id: str, source: str, sentence: str, label: dict[str, float] | None = None) -> None:
        e = self.entries.setdefault(img_id, {"img_id": img_id, "sentf": {}, "labelf": {}})
        e["sentf"].setdefault(source, []).append(sentence)
        if label is not None:
            e["labelf"].setdefault(source, []).append(label)


def build_pretrain_corpus(
    *,
    coco_captions: Sequence[PathLike] = (),
    vqa: Sequence[tuple[PathLike, PathLike]] = (),
    vg_regions: PathLike | None = None,
    vg_qas: PathLike | None = None,
    gqa_questions: Sequence[PathLike] = (),
    vg_image_data: PathLike | None = None,
    minival: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> dict[str, list[dict]]:
    """LXMERT's pretraining corpus, one entry per image, split into CORPUS_SPLITS.

    Sources: mscoco (COCO captions), vg (VG region descriptions), vqa ((questions, annotations)
    pairs; label = soft scores), gqa (label {answer: 1.0}) and visual7w (VG question_answers, as
    LXMERT names that source; label {answer: 1.0}). Answers are kept as the datasets spell them:
    the pretraining loader maps them with convert_label onto its table, as LXMERT does.
    With vg_image_data, Visual Genome / GQA images that are COCO images are filed under their
    COCO img_id (known from the COCO captions or VQA files given), so one image has one entry.
    Images listed in `minival` (COCO img_ids) go to mscoco_minival whatever the source; images listed
    in `exclude` (e.g. the images of an evaluation split such as GQA's) get no entry at all.
    Entries are ordered by img_id; sentences keep their order in the source files.
    """
    corpus = _Corpus()
    coco_names: dict[int, str] = {}
    for path in coco_captions:
        for c in read_coco_captions(path):
            coco_names[c.image_id] = c.img_id
            corpus.add(c.img_id, "mscoco", c.caption)
    for q_path, a_path in vqa:
        anns = {a.question_id: a for a in read_vqa_annotations(a_path)}
        for q in read_vqa_questions(q_path):
            a = anns.get(q.question_id)
            if a is None:
                raise DataFormatError(f"{a_path}: no annotation for question {q.question_id} of {q_path}")
            coco_names[q.image_id] = q.img_id
            corpus.add(q.img_id, "vqa", q.question, vqa_label(a.answers))

    vg_to_coco: dict[str, str] = {}
    if vg_image_data is not None:
        for img in read_vg_image_data(vg_image_data):
            if img.coco_id is not None and img.coco_id in coco_names:
                vg_to_coco[img.img_id] = coco_names[img.coco_id]

    def image(vg_id: str) -> str:
        return vg_to_coco.get(vg_id, vg_id)

    if vg_regions is not None:
        for r in read_vg_regions(vg_regions):
            corpus.add(image(r.img_id), "vg", r.phrase)
    if vg_qas is not None:
        for qa in read_vg_qas(vg_qas):
            corpus.add(image(qa.img_id), "visual7w", qa.question, {qa.answer: 1.0})
    for path in gqa_questions:
        for q in read_gqa_questions(path):
            if q.answer is None:
                raise DataFormatError(f"{path}: question {q.question_id!r} has no answer (test split?)")
            corpus.add(image(q.img_id), "gqa", q.question, {q.answer: 1.0})

    held_out, excluded = frozenset(minival), frozenset(exclude)
    splits: dict[str, list[dict]] = {name: [] for name in CORPUS_SPLITS}
    for img_id in sorted(corpus.entries):
        if img_id in excluded:
            continue
        splits[corpus_split(img_id, held_out)].append(corpus.entries[img_id])
    return splits


def write_corpus(splits: dict[str, list[dict]], out_dir: PathLike) -> dict[str, Path]:
    """Write each corpus split to <out_dir>/<split>.json (atomically); returns the paths."""
    out = {}
    for name, entries in splits.items():
        out[name] = Path(out_dir) / f"{name}.json"
        write_json_atomic(out[name], entries)
    return out


def write_vqa_subset(questions: PathLike, annotations: PathLike, question_ids: Iterable[int],
                     out_questions: PathLike, out_annotations: PathLike) -> int:
    """Official-format VQA files holding only `question_ids` (e.g. minival), so the official
    scorer sees exactly the evaluated split; other top-level fields are kept. Returns the count."""
    keep = set(question_ids)
    files = ((questions, out_questions, "questions"), (annotations, out_annotations, "annotations"))
    for src, dst, key in files:
        data = load_json(src)
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataFormatError(f"{src}: expected an object with a '{key}' list")
        items = [x for x in data[key] if isinstance(x, dict) and x.get("question_id") in keep]
        found = {x["question_id"] for x in items}
        if found != keep:
            missing = sorted(keep - found)
            raise DataFormatError(f"{src}: {len(missing)} of the wanted questions are absent "
                                  f"(first: {missing[:5]})")
        write_json_atomic(dst, {**data, key: items})
    return len(keep)
