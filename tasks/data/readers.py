"""Readers of the datasets' own files (COCO, Visual Genome, VQA v2, GQA, NLVR2) and of LXMERT's json.

Large files are streamed record by record (extractor.jsonstream). Every reader yields small frozen
records with the img_id the feature extractor writes for the same image (its file stem):
COCO `COCO_train2014_000000132417`, Visual Genome and GQA the image number as a string, NLVR2
`dev-850-0-img0`. Malformed input raises DataFormatError naming the file and the record.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The Visual Genome objects reader and the image-id conventions live with the extractor, whose detector
# trains on them (extractor never imports tasks); they are re-exported here with the other readers.
from extractor.detector.annotations import VGImageObjects as VGImageObjects
from extractor.detector.annotations import VGObject as VGObject
from extractor.detector.annotations import read_vg_objects as read_vg_objects
from extractor.detector.annotations import vg_image_id as _vg_image
from extractor.detector.annotations import vg_records as _vg_images
from extractor.images import coco_img_id as coco_img_id
from extractor.images import read_img_id_list as read_img_id_list
from extractor.jsonstream import At as _At
from extractor.jsonstream import DataFormatError, iter_array, iter_jsonl, iter_members, iter_object
from extractor.jsonstream import field as _get
from extractor.jsonstream import first_field as _first_key
from extractor.jsonstream import is_kind as _check
from extractor.jsonstream import str_list as _str_list

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------------------------
# img_id conventions

_COCO_SPLIT = re.compile(r"(train|val|test)20\d\d")


def _split_from_name(path: Path) -> str | None:
    m = _COCO_SPLIT.search(path.name)
    return m.group(0) if m else None


def nlvr2_img_ids(identifier: str) -> tuple[str, str]:
    """The two image ids of an NLVR2 example: `<split>-<set>-<pair>-img0` and `-img1`."""
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0", f"{stem}-img1"


def nlvr2_group(identifier: str) -> str:
    """The consistency group of an NLVR2 example: its identifier with the pair field blanked."""
    parts = identifier.split("-")
    parts[2] = ""
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# COCO captions


@dataclass(frozen=True, slots=True)
class Caption:
    img_id: str
    image_id: int
    caption: str


def read_coco_captions(path: PathLike, split: str | None = None) -> Iterator[Caption]:
    """Captions of a COCO captions file, with img_id from the image's file_name stem.

    Without file_name, img_id is COCO_<split>_%012d; split defaults to the one in the file name
    (captions_train2014.json -> train2014).
    """
    path = Path(path)
    split = split or _split_from_name(path)
    names: dict[int, str] = {}
    images_read = False
    pending: list[tuple[int, int, str]] = []
    seen_annotations = False

    def img_id(image_id: int, at: _At) -> str:
        if image_id in names:
            return names[image_id]
        if split is None:
            raise at.error(f"image {image_id} has no file_name and the split is unknown (pass split=)")
        return coco_img_id(image_id, split)

    for key, value in iter_members(path, stream={"images", "annotations"}):
        if key == "images":
            for i, img in enumerate(value):
                at = _At(path, "images[{}]", i)
                image_id = _get(img, "id", "int", at)
                file_name = _get(img, "file_name", "str", at, optional=True)
                if file_name:
                    names[image_id] = Path(file_name).stem
            images_read = True
        elif key == "annotations":
            seen_annotations = True
            for i, ann in enumerate(value):
                at = _At(path, "annotations[{}]", i)
                image_id = _get(ann, "image_id", "int", at)
                caption = _get(ann, "caption", "str", at).strip()
                if images_read:
                    yield Caption(img_id(image_id, at), image_id, caption)
                else:
                    pending.append((i, image_id, caption))
    if not seen_annotations:
        raise DataFormatError(f"{path}: no 'annotations' array (not a COCO captions file)")
    for i, image_id, caption in pending:
        yield Caption(img_id(image_id, _At(path, "annotations[{}]", i)), image_id, caption)


# ---------------------------------------------------------------------------------------------
# Visual Genome


@dataclass(frozen=True, slots=True)
class VGRegion:
    img_id: str
    region_id: int
    phrase: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class VGQA:
    img_id: str
    qa_id: int
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class VGImage:
    img_id: str
    coco_id: int | None
    width: int | None
    height: int | None


def read_vg_regions(path: PathLike) -> Iterator[VGRegion]:
    """Region descriptions of region_descriptions.json ([{id|image_id, regions: [...]}])."""
    path = Path(path)
    for i, _, img, regions in _vg_images(path, "regions"):
        for j, r in enumerate(regions):
            at = _At(path, "record {} (image {}) regions[{}]", i, img, j)
            yield VGRegion(
                img_id=img or str(_get(r, "image_id", "int", at)),
                region_id=_first_key(r, ("region_id", "id"), "int", at),
                phrase=_get(r, "phrase", "str", at).strip(),
                x=_get(r, "x", "number", at), y=_get(r, "y", "number", at),
                width=_get(r, "width", "number", at), height=_get(r, "height", "number", at),
            )


def read_vg_qas(path: PathLike) -> Iterator[VGQA]:
    """Question-answer pairs of question_answers.json ([{id|image_id, qas: [...]}])."""
    path = Path(path)
    for i, _, img, qas in _vg_images(path, "qas"):
        for j, qa in enumerate(qas):
            at = _At(path, "record {} (image {}) qas[{}]", i, img, j)
            yield VGQA(
                img_id=img or str(_get(qa, "image_id", "int", at)),
                qa_id=_first_key(qa, ("qa_id", "id"), "int", at),
                question=_get(qa, "question", "str", at).strip(),
                answer=_get(qa, "answer", "str", at).strip(),
            )


def read_vg_image_data(path: PathLike) -> Iterator[VGImage]:
    """Images of image_data.json, with their COCO id where the image is also in COCO."""
    path = Path(path)
    for i, rec in enumerate(iter_array(path)):
        at = _At(path, "record {}", i)
        yield VGImage(
            img_id=_vg_image(rec, at),  # type: ignore[arg-type]
            coco_id=_get(rec, "coco_id", "int", at, optional=True),
            width=_get(rec, "width", "int", at, optional=True),
            height=_get(rec, "height", "int", at, optional=True),
        )


# ---------------------------------------------------------------------------------------------
# VQA v2


@dataclass(frozen=True, slots=True)
class VQAQuestion:
    question_id: int
    image_id: int
    img_id: str
    question: str


@dataclass(frozen=True, slots=True)
class VQAAnnotation:
    question_id: int
    image_id: int
    question_type: str
    answer_type: str
    multiple_choice_answer: str
    answers: tuple[str, ...]


def read_vqa_questions(path: PathLike, subtype: str | None = None) -> Iterator[VQAQuestion]:
    """Questions of a VQA questions file; img_id from the COCO subtype (train2014, val2014, ...).

    The subtype comes from the argument, else the file name, else the file's data_subtype.
    """
    path = Path(path)
    subtype = subtype or _split_from_name(path)
    buffered: list[tuple[int, int, int, str]] = []
    seen = False
    for key, value in iter_members(path, stream={"questions"}):
        if key == "data_subtype" and subtype is None and isinstance(value, str):
            subtype = value
        elif key == "questions":
            seen = True
            for i, q in enumerate(value):
                at = _At(path, "questions[{}]", i)
                row = (i, _get(q, "question_id", "int", at), _get(q, "image_id", "int", at),
                       _get(q, "question", "str", at))
                if subtype is None:
                    buffered.append(row)
                else:
                    yield VQAQuestion(row[1], row[2], coco_img_id(row[2], subtype), row[3])
    if not seen:
        raise DataFormatError(f"{path}: no 'questions' array (not a VQA questions file)")
    if buffered and subtype is None:
        raise DataFormatError(f"{path}: the COCO subtype is unknown (no data_subtype): pass subtype=")
    for _, qid, image_id, question in buffered:
        yield VQAQuestion(qid, image_id, coco_img_id(image_id, subtype), question)  # type: ignore[arg-type]


def read_vqa_annotations(path: PathLike) -> Iterator[VQAAnnotation]:
    """Annotations (ten human answers per question) of a VQA annotations file."""
    path = Path(path)
    seen = False
    for key, value in iter_members(path, stream={"annotations"}):
        if key != "annotations":
            continue
        seen = True
        for i, a in enumerate(value):
            at = _At(path, "annotations[{}]", i)
            answers = _get(a, "answers", "list", at)
            if not answers:
                raise at.error("no human answers")
            texts = tuple(_get(x, "answer", "str", _At(path, "annotations[{}].answers[{}]", i, j))
                          for j, x in enumerate(answers))
            yield VQAAnnotation(
                question_id=_get(a, "question_id", "int", at),
                image_id=_get(a, "image_id", "int", at),
                question_type=_get(a, "question_type", "str", at),
                answer_type=_get(a, "answer_type", "str", at),
                multiple_choice_answer=_get(a, "multiple_choice_answer", "str", at),
                answers=texts,
            )
    if not seen:
        raise DataFormatError(f"{path}: no 'annotations' array (not a VQA annotations file)")


# ---------------------------------------------------------------------------------------------
# GQA


@dataclass(frozen=True, slots=True)
class GQAQuestion:
    question_id: str
    img_id: str
    question: str
    answer: str | None
    is_balanced: bool
    structural: str | None
    semantic_type: str | None
    detailed: str | None
    global_group: str | None
    entailed: tuple[str, ...]
    steps: int


@dataclass(frozen=True, slots=True)
class GQAChoices:
    valid: frozenset[str]
    plausible: frozenset[str]


def _gqa_files(path: Path) -> list[Path]:
    """A GQA json file, or the chunk files of a folder (train_all_questions/*.json) in number order."""
    if path.is_dir():
        files = sorted(path.glob("*.json"),
                       key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
        if not files:
            raise FileNotFoundError(f"no .json chunk files in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return [path]


_NOT_A_STEP = ("exist", "query: name", "choose name")


def _gqa_steps(semantic: list, at: _At) -> int:
    # Reasoning steps as the official evaluation counts them: operations other than the final
    # "querying" ones (matched as substrings of "<operation>: <argument>").
    steps = 0
    for k, op in enumerate(semantic):
        oat = _At(at.path, at.fmt + " semantic[{}]", *at.args, k)
        text = f"{_get(op, 'operation', 'str', oat)}: {_get(op, 'argument', 'str', oat)}"
        steps += not any(s in text for s in _NOT_A_STEP)
    return steps


def read_gqa_questions(path: PathLike) -> Iterator[GQAQuestion]:
    """Questions of a GQA questions file (balanced or all; a folder of chunks is read in order)."""
    for file in _gqa_files(Path(path)):
        for qid, q in iter_object(file):
            at = _At(file, "question {!r}", qid)
            types = _get(q, "types", "dict", at, optional=True) or {}
            groups = _get(q, "groups", "dict", at, optional=True) or {}
            semantic = _get(q, "semantic", "list", at, optional=True) or []
            yield GQAQuestion(
                question_id=qid,
                img_id=_get(q, "imageId", "str", at),
                question=_get(q, "question", "str", at),
                answer=_get(q, "answer", "str", at, optional=True),
                is_balanced=bool(_get(q, "isBalanced", "bool", at, optional=True)),
                structural=_get(types, "structural", "str", at, optional=True),
                semantic_type=_get(types, "semantic", "str", at, optional=True),
                detailed=_get(types, "detailed", "str", at, optional=True),
                global_group=_get(groups, "global", "str", at, optional=True),
                entailed=_str_list(q, "entailed", at),
                steps=_gqa_steps(semantic, at),
            )


def read_gqa_choices(path: PathLike) -> Iterator[tuple[str, GQAChoices]]:
    """(question id, valid and plausible answers) of a GQA *_choices.json file."""
    for file in _gqa_files(Path(path)):
        for qid, c in iter_object(file):
            at = _At(file, "question {!r}", qid)
            valid, plausible = _str_list(c, "valid", at), _str_list(c, "plausible", at)
            yield qid, GQAChoices(frozenset(valid), frozenset(plausible))


# ---------------------------------------------------------------------------------------------
# NLVR2

_NLVR2_ID = re.compile(r"^[A-Za-z0-9]+-\d+-\d+-\d+$")


@dataclass(frozen=True, slots=True)
class NLVR2Example:
    identifier: str
    sentence: str
    label: bool | None
    left_url: str | None
    right_url: str | None


def check_nlvr2_identifier(identifier: Any, at: str) -> str:
    """An NLVR2 identifier `<split>-<set>-<pair>-<sentence>`, or DataFormatError naming `at`."""
    if not isinstance(identifier, str) or not _NLVR2_ID.match(identifier):
        raise DataFormatError(f"{at}: identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    return identifier


def read_nlvr2(path: PathLike) -> Iterator[NLVR2Example]:
    """Examples of an NLVR2 JSON-lines file (label None where the split hides it)."""
    path = Path(path)
    for lineno, rec in iter_jsonl(path):
        at = _At(path, "line {}", lineno)
        identifier = check_nlvr2_identifier(_get(rec, "identifier", "str", at), f"{path}: line {lineno}")
        label = _get(rec, "label", "str", at, optional=True)
        if label not in (None, "True", "False"):
            raise at.error(f"label should be 'True' or 'False', got {label!r}")
        yield NLVR2Example(
            identifier=identifier,
            sentence=_get(rec, "sentence", "str", at),
            label=None if label is None else label == "True",
            left_url=_get(rec, "left_url", "str", at, optional=True),
            right_url=_get(rec, "right_url", "str", at, optional=True),
        )


# ---------------------------------------------------------------------------------------------
# LXMERT's preprocessed json (docs/architecture.md), validated on load


def _label(rec: dict, at: _At) -> None:
    label = _get(rec, "label", "dict", at, optional=True)
    if label is not None and not all(isinstance(a, str) and _check(s, "number") for a, s in label.items()):
        raise at.error(f"label should be {{answer: score}}, got {label!r:.80}")


def load_vqa_task(path: PathLike) -> list[dict]:
    """LXMERT VQA entries [{question_id: int, img_id, sent, label?, answer_type?, question_type?}]."""
    path = Path(path)
    out = []
    for i, rec in enumerate(iter_array(path)):
        at = _At(path, "record {}", i)
        _get(rec, "question_id", "int", at)
        _get(rec, "img_id", "str", at)
        _get(rec, "sent", "str", at)
        _label(rec, at)
        _get(rec, "answer_type", "str", at, optional=True)
        _get(rec, "question_type", "str", at, optional=True)
        out.append(rec)
    return out


def load_gqa_task(path: PathLike) -> list[dict]:
    """LXMERT GQA entries [{question_id: str, img_id, sent, label?}]."""
    path = Path(path)
    out = []
    for i, rec in enumerate(iter_array(path)):
        at = _At(path, "record {}", i)
        _get(rec, "question_id", "str", at)
        _get(rec, "img_id", "str", at)
        _get(rec, "sent", "str", at)
        _label(rec, at)
        out.append(rec)
    return out


def load_nlvr2_task(path: PathLike) -> list[dict]:
    """LXMERT NLVR2 entries [{identifier, img0, img1, sent, label?: 0 | 1}]."""
    path = Path(path)
    out = []
    for i, rec in enumerate(iter_array(path)):
        at = _At(path, "record {}", i)
        check_nlvr2_identifier(_get(rec, "identifier", "str", at), f"{path}: record {i}")
        for key in ("img0", "img1", "sent"):
            _get(rec, key, "str", at)
        label = _get(rec, "label", "int", at, optional=True)
        if label not in (None, 0, 1):
            raise at.error(f"label should be 0 or 1, got {label!r}")
        out.append(rec)
    return out


def load_pretrain_corpus(path: PathLike) -> list[dict]:
    """LXMERT pretraining entries [{img_id, sentf: {source: [sent]}, labelf: {source: [{ans: score}]}}]."""
    path = Path(path)
    out = []
    for i, rec in enumerate(iter_array(path)):
        at = _At(path, "record {}", i)
        img = _get(rec, "img_id", "str", at)
        at = _At(path, "record {} (image {})", i, img)
        sentf = _get(rec, "sentf", "dict", at)
        labelf = _get(rec, "labelf", "dict", at)
        for src, sents in sentf.items():
            if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                raise at.error(f"sentf[{src!r}] should be a list of sentences")
        for src, labels in labelf.items():
            if src not in sentf:
                raise at.error(f"labelf[{src!r}] has no sentences in sentf")
            if not isinstance(labels, list) or len(labels) != len(sentf[src]):
                raise at.error(
                    f"labelf[{src!r}] should be a list aligned with its {len(sentf[src])} sentences")
            for j, label in enumerate(labels):
                if not isinstance(label, dict) or not all(
                        isinstance(a, str) and _check(s, "number") for a, s in label.items()):
                    raise at.error(f"labelf[{src!r}][{j}] should be {{answer: score}}, got {label!r:.80}")
        out.append(rec)
    return out
