"""Luigi tasks that turn raw datasets (or the built-in demo world) into LXMERT's preprocessed files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from extractor.jsonstream import write_json_atomic, write_text_atomic
from pipeline.base import (
    InputPathListParameter,
    InputPathParameter,
    PipelineTask,
    json_check,
    param_problems,
    reads,
)
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
from tasks.demo import PRESETS, generate_world, world_path

ANSWER_SOURCES = ("released", "build")


class GenerateDemoWorld(PipelineTask):
    """The built-in synthetic world, written in the real datasets' formats (docs/demo.md)."""

    seed = luigi.IntParameter(default=0)
    preset = luigi.ChoiceParameter(choices=sorted(PRESETS), default="demo")

    def build(self, out: Path) -> None:
        generate_world(out / "world", seed=self.seed, config=PRESETS[self.preset], overwrite=True)


def world_vocab(world_task_dir: Path | None) -> str | None:
    """The demo world's own WordPiece vocabulary (docs/demo.md), given GenerateDemoWorld's output
    folder; None without one (raw data, or a world written before worlds had it)."""
    if world_task_dir is None:
        return None
    try:
        path = world_path(world_task_dir / "world", "vocab")
    except KeyError:
        return None
    return str(path) if path.is_file() else None


class RawDataTask(PipelineTask):
    """A task over raw dataset files; when none of `raw_params` is given it reads the demo world."""

    raw_params: tuple[str, ...] = ()
    json_inputs: dict[str, str] = {}  # parameter -> its JSON form: "[" list, "{" object, "jsonl" lines
    id_lists: tuple[str, ...] = ()  # parameters naming image id lists (text or JSON)

    def uses_demo(self) -> bool:
        return not any(getattr(self, name) for name in self.raw_params)

    def dependencies(self) -> Any:
        return {"world": GenerateDemoWorld()} if self.uses_demo() else {}

    def input_problems(self) -> list[str]:
        """The raw JSON files parse (see pipeline.base.json_check) and the image id lists read."""
        problems = [line for name, top in self.json_inputs.items()
                    for line in param_problems(self, name, json_check(top))]
        for name in self.id_lists:
            problems += param_problems(self, name, reads(lambda p: read_img_id_list(p, numbers_as=None)))
        return problems

    def paired(self, first: str, second: str) -> list[str]:
        """`first` and `second` list matching files (questions and their annotations)."""
        a, b = getattr(self, first), getattr(self, second)
        if len(a) != len(b):
            return [f"{self.get_task_family()}: parameters '{first}' and '{second}' must pair up "
                    f"({len(a)} vs {len(b)} files)"]
        return []

    def required(self, *names: str) -> list[str]:
        """With raw data (not the demo world) each of `names` must be given."""
        if self.uses_demo():
            return []
        return [f"{self.get_task_family()}: parameter '{n}' is required when raw data are given "
                f"({', '.join(self.raw_params)})" for n in names if not getattr(self, n)]

    def world(self, *keys: str) -> Path:
        """A file of the demo world's manifest (only when uses_demo())."""
        return world_path(self.input_dirs()["world"] / "world", *keys)

    def vqa_files(self, split: str) -> tuple[Path, Path]:
        """The demo world's VQA questions and annotations of one split."""
        return self.world("vqa", "questions", split), self.world("vqa", "annotations", split)


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

    raw_params = ("coco_captions", "vqa_questions", "vg_regions", "vg_qas", "gqa_questions")
    json_inputs = {"coco_captions": "{", "vqa_questions": "{", "vqa_annotations": "{", "vg_regions": "[",
                   "vg_qas": "[", "vg_image_data": "[", "gqa_questions": "{"}
    id_lists = ("minival", "exclude")

    def input_problems(self) -> list[str]:
        return super().input_problems() + self.paired("vqa_questions", "vqa_annotations")

    def sources(self) -> dict[str, Any]:
        """The raw files to read, from the parameters or from the demo world."""
        if not self.uses_demo():
            if len(self.vqa_questions) != len(self.vqa_annotations):
                raise ValueError("BuildPretrainCorpus: vqa_questions and vqa_annotations must pair up "
                                 f"({len(self.vqa_questions)} vs {len(self.vqa_annotations)} files)")
            return {"coco_captions": list(self.coco_captions),
                    "vqa": list(zip(self.vqa_questions, self.vqa_annotations)),
                    "vg_regions": self.vg_regions or None, "vg_qas": self.vg_qas or None,
                    "vg_image_data": self.vg_image_data or None,
                    "gqa_questions": list(self.gqa_questions),
                    "minival": self.minival or None, "exclude": self.exclude or None}
        splits = ("train2014", "val2014")
        return {"coco_captions": [self.world("coco", "captions", s) for s in splits],
                "vqa": [self.vqa_files(s) for s in splits],
                "vg_regions": self.world("vg", "region_descriptions"),
                "vg_qas": self.world("vg", "question_answers"),
                "vg_image_data": self.world("vg", "image_data"),
                "gqa_questions": [self.world("gqa", "questions", "train")],
                "minival": self.world("splits", "coco_minival"),
                "exclude": self.world("splits", "vg_val")}

    def build(self, out: Path) -> None:
        src = self.sources()
        minival = read_img_id_list(src["minival"]) if src["minival"] else []
        exclude = read_img_id_list(src["exclude"], numbers_as=None) if src["exclude"] else []
        splits = build_pretrain_corpus(
            coco_captions=src["coco_captions"], vqa=src["vqa"], vg_regions=src["vg_regions"],
            vg_qas=src["vg_qas"], gqa_questions=src["gqa_questions"], vg_image_data=src["vg_image_data"],
            minival=minival, exclude=exclude)
        write_corpus(splits, out)
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
    output folder when they live in it.
    """

    answers = luigi.ChoiceParameter(choices=ANSWER_SOURCES, default="released",
                                    description="released: the table of the released checkpoints; "
                                                "build: from the training data")
    answer_min_count = luigi.IntParameter(default=9)

    @staticmethod
    def official(output_dir: Path) -> dict[str, Path]:
        """The official files of the valid split, as absolute paths."""
        names = json.loads((output_dir / "official.json").read_text())
        return {k: output_dir / v for k, v in names.items()}

    def _finish(self, out: Path, train: list[dict], valid: list[dict], table: AnswerTable | None,
                official: dict[str, str]) -> None:
        write_json_atomic(out / "train.json", train)
        write_json_atomic(out / "valid.json", valid)
        if table is not None:
            table.save(out / "ans2label.json", out / "label2ans.json")
        write_json_atomic(out / "official.json", official, indent=1)
        write_json_atomic(out / "stats.json", {"train": len(train), "valid": len(valid),
                                               "answers": len(table) if table is not None else 2}, indent=1)


class BuildVQAData(TaskData):
    """VQA v2: train (+ nominival) and minival, LXMERT's split; soft-score labels over the answer table."""

    train_questions = InputPathListParameter(default=[], kind="file", optional=True)
    train_annotations = InputPathListParameter(default=[], kind="file", optional=True)
    val_questions = InputPathParameter(default="", kind="file", optional=True)
    val_annotations = InputPathParameter(default="", kind="file", optional=True)
    minival = InputPathParameter(default="", kind="file", optional=True,
                                 description="val images evaluated on (the rest of val joins train); "
                                             "empty: all of val is evaluated")

    raw_params = ("train_questions", "val_questions")
    json_inputs = {"train_questions": "{", "train_annotations": "{", "val_questions": "{", "val_annotations": "{"}
    id_lists = ("minival",)

    def input_problems(self) -> list[str]:
        return (super().input_problems() + self.paired("train_questions", "train_annotations")
                + self.required("train_questions", "train_annotations", "val_questions", "val_annotations"))

    def build(self, out: Path) -> None:
        if self.uses_demo():
            train, val = [self.vqa_files("train2014")], self.vqa_files("val2014")
            minival = self.world("splits", "coco_minival")
        else:
            if len(self.train_questions) != len(self.train_annotations):
                raise ValueError("BuildVQAData: train_questions and train_annotations must pair up")
            train = list(zip(self.train_questions, self.train_annotations))
            val = (self.val_questions, self.val_annotations)
            minival = self.minival or None
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

    raw_params = ("train_questions", "valid_questions")
    json_inputs = {"train_questions": "{", "valid_questions": "{", "valid_choices": "{"}

    def input_problems(self) -> list[str]:
        return super().input_problems() + self.required("train_questions", "valid_questions")

    def build(self, out: Path) -> None:
        if self.uses_demo():
            train, valid_q = [self.world("gqa", "questions", "train")], self.world("gqa", "questions", "val")
            choices: Path | str = self.world("gqa", "choices", "val")
        else:
            train, valid_q, choices = list(self.train_questions), self.valid_questions, self.valid_choices
        if self.answers == "released":
            table = default_gqa_table()
        else:
            table = build_gqa_table([q for p in train for q in read_gqa_questions(p)],
                                    min_count=self.answer_min_count)
        train_entries = [e for p in train for e in build_gqa_task(p)]
        official = {"questions": str(Path(valid_q).absolute())}
        if choices:
            official["choices"] = str(Path(choices).absolute())
        self._finish(out, train_entries, build_gqa_task(valid_q), table, official)


class BuildNLVR2Data(TaskData):
    """NLVR2: train and dev (or test) statements over image pairs."""

    train = InputPathParameter(default="", kind="file", optional=True, description="train.json (JSON lines)")
    valid = InputPathParameter(default="", kind="file", optional=True, description="dev.json or test1.json")

    raw_params = ("train", "valid")
    json_inputs = {"train": "jsonl", "valid": "jsonl"}

    def input_problems(self) -> list[str]:
        return super().input_problems() + self.required("train", "valid")

    def build(self, out: Path) -> None:
        if self.uses_demo():
            train, valid = self.world("nlvr2", "data", "train"), self.world("nlvr2", "data", "dev")
        else:
            train, valid = self.train, self.valid
        self._finish(out, build_nlvr2_task(train), build_nlvr2_task(valid), None,
                     {"data": str(Path(valid).absolute())})


class BuildTaskData(luigi.WrapperTask):
    """The task files of all three benchmarks (each also runs alone: BuildVQAData, BuildGQAData, ...)."""

    def requires(self) -> Any:
        return [BuildVQAData(), BuildGQAData(), BuildNLVR2Data()]
