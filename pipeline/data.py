"""Luigi tasks that turn raw dataset files (named by their parameters or the sources file) into LXMERT's files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import luigi

from extractor.jsonstream import write_json_atomic, write_text_atomic
from pipeline.base import (
    InputPathListParameter,
    InputPathParameter,
    json_check,
    param_problems,
    reads,
)
from pipeline.sources import SourcedTask
from tasks.data.answers import (
    AnswerTable,
    build_gqa_table,
    build_pretrain_table,
    build_vqa_table,
    default_gqa_table,
    default_pretrain_table,
    default_vqa_table,
)
from tasks.data.preprocess import (
    build_gqa_task,
    build_nlvr2_task,
    build_pretrain_corpus,
    build_vqa_task,
    write_corpus,
    write_vqa_subset,
)
from tasks.data.readers import read_gqa_questions, read_img_id_list, read_vg_qas, read_vqa_annotations

ANSWER_SOURCES = ("released", "build")
VOCAB = "vocab.txt"


def vocab_of(output_dir: Path) -> str | None:
    """The WordPiece vocabulary a corpus or task-data folder keeps for its texts; None: BERT's."""
    path = output_dir / VOCAB
    return str(path) if path.is_file() else None


def texts_sourced(section: str, *names: str) -> dict[str, str]:
    """A data task's sources keys: `section.<name>` for each parameter, and `vocab` for its texts' vocabulary."""
    return {**{name: f"{section}.{name}" for name in names}, "vocab": "vocab"}


def vocab_parameter() -> InputPathParameter:
    """The `vocab` of a data task: kept in its folder, so training on its texts tokenizes with it."""
    return InputPathParameter(default="", kind="file", optional=True,
                              description="WordPiece vocab.txt of these texts, kept with the output for "
                                          "training; empty: BERT uncased")


class RawDataTask(SourcedTask):
    """A task over raw dataset files (its parameters or the sources file's): they parse before any work."""

    json_inputs: dict[str, str] = {}  # parameter -> its JSON form: "[" list, "{" object, "jsonl" lines
    id_lists: tuple[str, ...] = ()  # parameters naming image id lists (text or JSON)

    def dependencies(self) -> Any:
        return self.source_dependencies()

    def input_problems(self) -> list[str]:
        """The raw JSON files parse (see pipeline.base.json_check) and the image id lists read."""
        problems = super().input_problems()
        problems += [line for name, top in self.json_inputs.items()
                     for line in param_problems(self, name, json_check(top))]
        for name in self.id_lists:
            problems += param_problems(self, name, reads(lambda p: read_img_id_list(p, numbers_as=None)))
        return problems

    def paired(self, first: str, second: str) -> list[str]:
        """`first` and `second` list matching files (questions and their annotations)."""
        a, b = self.input_entry(first), self.input_entry(second)
        if a is None or b is None or len(a[0]) == len(b[0]):
            return []
        names = f"parameters '{first}' and '{second}'"
        if a[1].startswith("sources"):  # all of a task's inputs come from one place
            names = f"sources keys '{self.sourced[first]}' and '{self.sourced[second]}' ({names})"
        return [f"{self.get_task_family()}: {names} must pair up ({len(a[0])} vs {len(b[0])} files)"]

    def keep_vocab(self, out: Path) -> None:
        """Copy the texts' vocabulary (the `vocab` parameter or sources key) into the output folder."""
        vocab = self.input_value("vocab")
        if vocab:
            shutil.copyfile(vocab, out / VOCAB)

    def pairs(self, first: str, second: str) -> list[tuple[str, str]]:
        """The files of `first` and `second` side by side (checked before work by `paired`)."""
        return list(zip(self.input_value(first), self.input_value(second), strict=True))


class BuildPretrainCorpus(RawDataTask):
    """LXMERT's pretraining corpus (mscoco_train / nominival / minival / vgnococo) and its answer table."""

    coco_captions = InputPathListParameter(default=[], kind="file", optional=True)
    vqa_questions = InputPathListParameter(default=[], kind="file", optional=True)
    vqa_annotations = InputPathListParameter(default=[], kind="file", optional=True)
    vg_regions = InputPathParameter(default="", kind="file", optional=True)
    vg_qas = InputPathParameter(default="", kind="file", optional=True)
    vg_image_data = InputPathParameter(default="", kind="file", optional=True)
    gqa_questions = InputPathListParameter(default=[], kind="any", optional=True)
    minival = InputPathParameter(default="", kind="file", optional=True,
                                 description="COCO val2014 images held out of pretraining (LXMERT's minival)")
    exclude = InputPathParameter(default="", kind="file", optional=True,
                                 description="further image ids (e.g. GQA's evaluation images) left out")
    answers = luigi.ChoiceParameter(choices=ANSWER_SOURCES, default="released",
                                    description="released: LXMERT's 9500 answers; build: from these data")
    answer_min_count = luigi.IntParameter(default=9)
    vocab = vocab_parameter()

    sourced = texts_sourced("pretrain", "coco_captions", "vqa_questions", "vqa_annotations", "vg_regions", "vg_qas",
                            "vg_image_data", "gqa_questions", "minival", "exclude")
    needs_any = ("coco_captions", "vqa_questions", "vg_regions", "vg_qas", "gqa_questions")
    json_inputs = {"coco_captions": "{", "vqa_questions": "{", "vqa_annotations": "{", "vg_regions": "[",
                   "vg_qas": "[", "vg_image_data": "[", "gqa_questions": "{"}
    id_lists = ("minival", "exclude")

    def input_problems(self) -> list[str]:
        return super().input_problems() + self.paired("vqa_questions", "vqa_annotations")

    def sources(self) -> dict[str, Any]:
        """The raw files to read."""
        v = self.input_value
        return {"coco_captions": list(v("coco_captions")), "vqa": self.pairs("vqa_questions", "vqa_annotations"),
                "vg_regions": v("vg_regions") or None, "vg_qas": v("vg_qas") or None,
                "vg_image_data": v("vg_image_data") or None, "gqa_questions": list(v("gqa_questions")),
                "minival": v("minival") or None, "exclude": v("exclude") or None}

    def build(self, out: Path) -> None:
        src = self.sources()
        minival = read_img_id_list(src["minival"]) if src["minival"] else []
        exclude = read_img_id_list(src["exclude"], numbers_as=None) if src["exclude"] else []
        splits = build_pretrain_corpus(
            coco_captions=src["coco_captions"], vqa=src["vqa"], vg_regions=src["vg_regions"],
            vg_qas=src["vg_qas"], gqa_questions=src["gqa_questions"], vg_image_data=src["vg_image_data"],
            minival=minival, exclude=exclude)
        write_corpus(splits, out)
        self.keep_vocab(out)
        self.answer_table(src).save_pretrain(out / "answers.json")
        stats = {name: {"images": len(entries),
                        "sentences": sum(len(s) for e in entries for s in e["sentf"].values())}
                 for name, entries in splits.items()}
        write_text_atomic(out / "stats.json", json.dumps(stats, indent=1) + "\n")

    def answer_table(self, src: dict[str, Any]) -> AnswerTable:
        if self.answers == "released":
            return default_pretrain_table()
        vqa = [a for _, ann in src["vqa"] for a in read_vqa_annotations(ann)]
        gqa = [q for path in src["gqa_questions"] for q in read_gqa_questions(path)]
        vg = list(read_vg_qas(src["vg_qas"])) if src["vg_qas"] else []
        return build_pretrain_table(vqa=vqa, gqa=gqa, visual7w=vg, min_count=self.answer_min_count)


class TaskData(RawDataTask):
    """One benchmark's LXMERT task files (train.json, valid.json), answer table and official eval files.

    `official.json` names the files the official scorer reads for the valid split, relative to the
    output folder: they are copies made by the task, so the folder holds all it needs.
    """

    answers = luigi.ChoiceParameter(choices=ANSWER_SOURCES, default="released",
                                    description="released: the table of the released checkpoints; "
                                                "build: from the training data")
    answer_min_count = luigi.IntParameter(default=9)
    vocab = vocab_parameter()

    @staticmethod
    def official(output_dir: Path) -> dict[str, Path]:
        """The official files of the valid split, as absolute paths."""
        names = json.loads((output_dir / "official.json").read_text())
        return {k: output_dir / v for k, v in names.items()}

    def _finish(self, out: Path, train: list[dict], valid: list[dict], table: AnswerTable | None,
                official: dict[str, str]) -> None:
        write_json_atomic(out / "train.json", train)
        write_json_atomic(out / "valid.json", valid)
        self.keep_vocab(out)
        if table is not None:
            table.save(out / "ans2label.json", out / "label2ans.json")
        write_json_atomic(out / "official.json", official, indent=1)
        write_json_atomic(out / "stats.json", {"train": len(train), "valid": len(valid),
                                               "answers": len(table) if table is not None else 2}, indent=1)


class BuildVQAData(TaskData):
    """VQA v2: train (+ nominival) and minival, LXMERT's split; soft-score labels over the answer table."""

    train_questions = InputPathListParameter(default=[], kind="file", optional=True)
    train_annotations = InputPathListParameter(default=[], kind="file", optional=True)
    valid_questions = InputPathParameter(default="", kind="file", optional=True,
                                         description="val2014 questions (minival is evaluated, the rest trains)")
    valid_annotations = InputPathParameter(default="", kind="file", optional=True)
    val_questions = luigi.Parameter(default="", significant=False, description="old name of valid_questions")
    val_annotations = luigi.Parameter(default="", significant=False, description="old name of valid_annotations")
    minival = InputPathParameter(default="", kind="file", optional=True,
                                 description="val images evaluated on (the rest of val joins train); "
                                             "empty: all of val is evaluated")

    sourced = texts_sourced("vqa", "train_questions", "train_annotations", "valid_questions", "valid_annotations",
                            "minival")
    needed = ("train_questions", "train_annotations", "valid_questions", "valid_annotations")
    aliases = {"val_questions": "valid_questions", "val_annotations": "valid_annotations"}
    json_inputs = {"train_questions": "{", "train_annotations": "{", "valid_questions": "{",
                   "valid_annotations": "{"}
    id_lists = ("minival",)

    def input_problems(self) -> list[str]:
        return super().input_problems() + self.paired("train_questions", "train_annotations")

    def build(self, out: Path) -> None:
        train = self.pairs("train_questions", "train_annotations")
        val = (self.input_value("valid_questions"), self.input_value("valid_annotations"))
        minival = self.input_value("minival") or None
        if self.answers == "released":
            table = default_vqa_table()
        else:
            anns = [a for _, ann in [*train, val] for a in read_vqa_annotations(ann)]
            table = build_vqa_table(anns, min_count=self.answer_min_count)
        train_entries = [e for q, a in train for e in build_vqa_task(q, a, table)]
        val_entries = build_vqa_task(val[0], val[1], table)
        held = set(read_img_id_list(minival)) if minival else {e["img_id"] for e in val_entries}
        valid = [e for e in val_entries if e["img_id"] in held]
        train_entries += [e for e in val_entries if e["img_id"] not in held]
        write_vqa_subset(val[0], val[1], [e["question_id"] for e in valid],
                         out / "valid_questions.json", out / "valid_annotations.json")
        self._finish(out, train_entries, valid, table, {"questions": "valid_questions.json",
                                                        "annotations": "valid_annotations.json"})


class BuildGQAData(TaskData):
    """GQA: balanced train (+ val, as LXMERT) and the evaluated split (testdev for real data)."""

    train_questions = InputPathListParameter(default=[], kind="any", optional=True)
    valid_questions = InputPathParameter(default="", kind="any", optional=True)
    valid_choices = InputPathParameter(default="", kind="file", optional=True)
    answer_min_count = luigi.IntParameter(default=1)

    sourced = texts_sourced("gqa", "train_questions", "valid_questions", "valid_choices")
    needed = ("train_questions", "valid_questions")
    json_inputs = {"train_questions": "{", "valid_questions": "{", "valid_choices": "{"}

    def build(self, out: Path) -> None:
        train, valid_q = list(self.input_value("train_questions")), self.input_value("valid_questions")
        choices = self.input_value("valid_choices")
        if self.answers == "released":
            table = default_gqa_table()
        else:
            table = build_gqa_table([q for p in train for q in read_gqa_questions(p)],
                                    min_count=self.answer_min_count)
        train_entries = [e for p in train for e in build_gqa_task(p)]
        official = {"questions": copy_into(valid_q, out, "valid_questions")}
        if choices:
            official["choices"] = copy_into(choices, out, "valid_choices")
        self._finish(out, train_entries, build_gqa_task(valid_q), table, official)


class BuildNLVR2Data(TaskData):
    """NLVR2: train and dev (or test) statements over image pairs."""

    train_statements = InputPathParameter(default="", kind="file", optional=True,
                                          description="train.json (JSON lines)")
    valid_statements = InputPathParameter(default="", kind="file", optional=True,
                                          description="dev.json or test1.json")
    train = luigi.Parameter(default="", significant=False, description="old name of train_statements")
    valid = luigi.Parameter(default="", significant=False, description="old name of valid_statements")

    sourced = texts_sourced("nlvr2", "train_statements", "valid_statements")
    needed = ("train_statements", "valid_statements")
    aliases = {"train": "train_statements", "valid": "valid_statements"}
    json_inputs = {"train_statements": "jsonl", "valid_statements": "jsonl"}

    def build(self, out: Path) -> None:
        train, valid = self.input_value("train_statements"), self.input_value("valid_statements")
        self._finish(out, build_nlvr2_task(train), build_nlvr2_task(valid), None,
                     {"data": copy_into(valid, out, "valid_statements")})


def copy_into(source: str | Path, out: Path, name: str) -> str:
    """Copy the evaluated split's raw file (or folder of chunks) into the task folder, so the folder holds
    everything its official scorer reads; returns the copy's name relative to `out`."""
    source = Path(source)
    target = name if source.is_dir() else name + source.suffix
    if source.is_dir():
        shutil.copytree(source, out / target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, out / target)
    return target


class BuildTaskData(luigi.WrapperTask):
    """The task files of all three benchmarks (each also runs alone: BuildVQAData, BuildGQAData, ...)."""

    def requires(self) -> Any:
        return [BuildVQAData(), BuildGQAData(), BuildNLVR2Data()]
