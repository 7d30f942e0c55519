"""Luigi tasks that turn raw datasets (or the built-in demo world) into LXMERT's preprocessed files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import luigi

from pipeline.base import InputPathListParameter, InputPathParameter, PipelineTask
from tasks.answers import AnswerTable, build_pretrain_table, default_pretrain_table
from tasks.demo import PRESETS, generate_world, world_path
from tasks.preprocess import build_pretrain_corpus, write_corpus
from tasks.readers import read_gqa_questions, read_img_id_list, read_vg_qas, read_vqa_annotations

ANSWER_SOURCES = ("released", "build")


class GenerateDemoWorld(PipelineTask):
    """The built-in synthetic world, written in the real datasets' formats (docs/demo.md)."""

    seed = luigi.IntParameter(default=0)
    preset = luigi.ChoiceParameter(choices=sorted(PRESETS), default="demo")

    def build(self, out: Path) -> None:
        generate_world(out / "world", seed=self.seed, config=PRESETS[self.preset], overwrite=True)


class RawDataTask(PipelineTask):
    """A task over raw dataset files; when none of `raw_params` is given it reads the demo world."""

    raw_params: tuple[str, ...] = ()

    def uses_demo(self) -> bool:
        return not any(getattr(self, name) for name in self.raw_params)

    def dependencies(self) -> Any:
        return {"world": GenerateDemoWorld()} if self.uses_demo() else {}

    def world(self, *keys: str) -> Path:
        """A file of the demo world's manifest (only when uses_demo())."""
        return world_path(self.input_dirs()["world"] / "world", *keys)


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
                                    description="released: LXMERT's 9500-answer table; build: from these data")
    answer_min_count = luigi.IntParameter(default=9)

    raw_params = ("coco_captions", "vqa_questions", "vg_regions", "vg_qas", "gqa_questions")

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
                "vqa": [(self.world("vqa", "questions", s), self.world("vqa", "annotations", s)) for s in splits],
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
        (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")

    def answer_table(self, src: dict[str, Any]) -> AnswerTable:
        if self.answers == "released":
            return default_pretrain_table()
        vqa = [a for _, ann in src["vqa"] for a in read_vqa_annotations(ann)]
        gqa = [q for path in src["gqa_questions"] for q in read_gqa_questions(path)]
        vg = list(read_vg_qas(src["vg_qas"])) if src["vg_qas"] else []
        return build_pretrain_table(vqa=vqa, gqa=gqa, visual7w=vg, min_count=self.answer_min_count)
