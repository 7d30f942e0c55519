"""Luigi tasks that pretrain, fine-tune and evaluate LXMERT through the shared training loop."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import luigi

from extractor.store import FeatureReader, FeatureStoreError
from model.checkpoint import locate
from model.config import ConfigError, LxmertConfig
from pipeline.base import InputPathListParameter, InputPathParameter, PipelineTask, json_check, param_problems
from pipeline.data import BuildGQAData, BuildNLVR2Data, BuildPretrainCorpus, BuildVQAData, TaskData, vocab_of
from pipeline.features import ExtractFeatures
from tasks import finetune, pretrain
from tasks.baselines import majority_predictions
from tasks.data.jsonstream import load_json, write_json_atomic, write_text_atomic
from tasks.evaluate import evaluate_gqa, evaluate_nlvr2, evaluate_vqa
from tasks.finetune import FinetuneConfig, write_submission
from tasks.pretrain import PretrainConfig
from tasks.training.loop import TrainConfig
from tasks.training.runconfig import save_json
from tasks.training.weights import model_config_from

INIT_CHOICES = ("pretrained", "scratch")


class TrainingParams:
    """Loop settings shared by the training tasks; how many processes run them does not change the result."""

    name_or_path = ("model",)

    model = luigi.Parameter(default="base", description="preset (base, small, tiny) or a config.json")
    epochs = luigi.IntParameter(default=1)
    max_steps = luigi.IntParameter(default=0, description="> 0: stop after this many optimiser steps")
    batch_size = luigi.IntParameter(default=32, description="examples per optimiser step, all processes")
    grad_accum = luigi.IntParameter(default=1)
    lr = luigi.FloatParameter(default=5e-5)
    warmup_ratio = luigi.FloatParameter(default=0.1)
    optimizer = luigi.ChoiceParameter(choices=["bertadam", "adamw"], default="bertadam")
    weight_decay = luigi.FloatParameter(default=0.01)
    clip_grad_norm = luigi.FloatParameter(default=5.0)
    amp = luigi.ChoiceParameter(choices=["none", "bf16", "fp16"], default="none")
    seed = luigi.IntParameter(default=9595)
    dropout = luigi.FloatParameter(default=-1.0, description="< 0: the model's own")
    device = luigi.Parameter(default="auto", significant=False)
    num_workers = luigi.IntParameter(default=2, significant=False)
    ckpt_every = luigi.IntParameter(default=1000, significant=False)
    log_every = luigi.IntParameter(default=10, significant=False, description="steps per train.csv row")
    nproc_per_node = luigi.IntParameter(default=1, significant=False, description="> 1: launch torchrun")
    nnodes = luigi.IntParameter(default=1, significant=False)
    rdzv_endpoint = luigi.Parameter(default="", significant=False, description="HOST:PORT when nnodes > 1")

    def train_config(self, out: Path) -> TrainConfig:
        return TrainConfig(output_dir=str(out), epochs=self.epochs, max_steps=self.max_steps,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup_ratio=self.warmup_ratio, optimizer=self.optimizer,
                           weight_decay=self.weight_decay, clip_grad_norm=self.clip_grad_norm, amp=self.amp,
                           device=self.device, seed=self.seed, num_workers=self.num_workers,
                           ckpt_every=self.ckpt_every, log_every=self.log_every, resume=True,
                           progress=False)

    def launch(self, module: Any, args: list[str], cfg: Any, out: Path) -> dict[str, Any]:
        """Run in this process, or under torchrun when several processes are asked for; returns metrics."""
        if self.nproc_per_node * self.nnodes == 1:
            return module.run(cfg)
        config = out / "launch_config.json"
        save_json(cfg, config)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ValueError(f"{self.get_task_family()}: nnodes > 1 needs rdzv_endpoint HOST:PORT")
            cmd += [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                    f"--rdzv-id={self.get_task_family()}-{out.name}"]
        else:
            cmd += ["--standalone"]
        cmd += ["-m", module.__name__, *args, "--config", str(config)]
        write_text_atomic(out / "launch.sh", "# run the same on every other node\n" + shlex.join(cmd) + "\n")
        print(f"{self.get_task_family()}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return json.loads((out / "metrics.json").read_text())


def _features(task: Any) -> list[str]:
    return list(task.features) or [str(ExtractFeatures.path(task.input_dirs()["features"]))]


def _feature_file_problem(path: Path) -> str | None:
    """A feature file that is not HDF5, is truncated or does not follow the schema (no data is read)."""
    try:
        with FeatureReader(path) as reader:
            len(reader)
    except FeatureStoreError as e:
        return str(e)
    return None


def _model_problems(task: luigi.Task) -> list[str]:
    """The `model` preset is unknown, or its config.json is missing, does not parse or holds a field
    that cannot describe a network (the error names the file and the field)."""
    if not task.model:
        return []
    label = f"{task.get_task_family()}: parameter 'model'"
    try:
        model_config_from(task.model, label)
    except FileNotFoundError as e:
        return [str(e)]
    except ConfigError as e:
        return [f"{label}: {e}"]
    except (OSError, ValueError, TypeError) as e:
        return [f"{label}: {task.model}: {e}"]
    return []


def _weights_problem(path: Path) -> str | None:
    """A folder that holds no weights file, or whose config.json cannot describe a network (the
    weights file itself is only opened when training starts)."""
    config = locate(path)[1]
    if config is not None:
        LxmertConfig.from_json_file(config)
    return None


class PretrainLXMERT(TrainingParams, PipelineTask):
    """Cross-modality pretraining with the five objectives (MLM, matching, object labels, features, QA)."""

    features = InputPathListParameter(default=[], kind="file", optional=True,
                                      description="HDF5 feature files; empty: ExtractFeatures' output")
    corpus = InputPathListParameter(default=[], kind="file", optional=True,
                                    description="LXMERT corpus json files; empty: BuildPretrainCorpus")
    valid_corpus = InputPathListParameter(default=[], kind="file", optional=True)
    answers = InputPathParameter(default="", kind="file", optional=True,
                                 description="[{ans, dsets}] table of the QA head; empty: the corpus task's")
    init = InputPathParameter(default="", optional=True, description="weights to start from; empty: random")
    allow_fresh = luigi.ListParameter(default=[], significant=False,
                                      description="key prefixes init may leave freshly initialised (a head it "
                                                  "lacks); loading is strict otherwise")
    objectives = luigi.ListParameter(default=["mlm", "matched", "obj", "attr", "feat", "qa"])
    qa_from_epoch = luigi.IntParameter(default=0)
    word_mask_rate = luigi.FloatParameter(default=0.15)
    obj_mask_rate = luigi.FloatParameter(default=0.15)
    max_seq_length = luigi.IntParameter(default=20)
    valid_examples = luigi.IntParameter(default=0)
    vocab = InputPathParameter(default="", kind="file", optional=True,
                               description="WordPiece vocab.txt; empty: the one BuildPretrainCorpus keeps with "
                                           "its corpus (the sources file's vocab), else BERT uncased (30,522)")

    def dependencies(self) -> Any:
        deps: dict[str, Any] = {}
        if not self.features:
            deps["features"] = ExtractFeatures()
        if not self.corpus:
            deps["corpus"] = BuildPretrainCorpus()
        return deps

    def input_problems(self) -> list[str]:
        """Objectives known; feature files readable; corpus and answer files parse; model and init usable."""
        problems = []
        unknown = sorted(set(self.objectives) - set(pretrain.OBJECTIVES))
        if unknown:
            problems.append(f"PretrainLXMERT: parameter 'objectives' has unknown {unknown}; "
                            f"known: {list(pretrain.OBJECTIVES)}")
        problems += param_problems(self, "features", _feature_file_problem)
        for name in ("corpus", "valid_corpus", "answers"):
            problems += param_problems(self, name, json_check("["))
        return problems + param_problems(self, "init", _weights_problem) + _model_problems(self)

    def build(self, out: Path) -> None:
        if self.corpus:
            corpus, valid, answers = list(self.corpus), list(self.valid_corpus), self.answers or None
            vocab = self.vocab or None
        else:
            d = self.input_dirs()["corpus"]
            corpus = [str(d / f"{s}.json") for s in ("mscoco_train", "mscoco_nominival", "vgnococo")]
            valid, answers = [str(d / "mscoco_minival.json")], self.answers or str(d / "answers.json")
            vocab = self.vocab or vocab_of(d)
        train = self.train_config(out)
        cfg = PretrainConfig(corpus=corpus, features=_features(self), valid_corpus=valid,
                             valid_examples=self.valid_examples, model=self.model, init_from=self.init or None,
                             allow_fresh=list(self.allow_fresh),
                             dropout=self.dropout if self.dropout >= 0 else None, answers=answers,
                             qa_from_epoch=self.qa_from_epoch, word_mask_rate=self.word_mask_rate,
                             obj_mask_rate=self.obj_mask_rate, max_seq_length=self.max_seq_length,
                             vocab=vocab, train=train,
                             **{o: o in self.objectives for o in pretrain.OBJECTIVES})
        self.launch(pretrain, [], cfg, out)


class FinetuneTask(TrainingParams, PipelineTask):
    """Fine-tuning on one benchmark from pretrained weights ("pretrained"), none ("scratch") or a path."""

    task_name = ""
    data_task: type[TaskData] = TaskData
    name_or_path = ("init", "model")

    init = luigi.Parameter(default="pretrained",
                           description="pretrained: PretrainLXMERT's weights; scratch: random; or a path "
                                       "to weights (our run folder, a transformers folder, *_LXRT.pth)")
    features = InputPathListParameter(default=[], kind="file", optional=True)
    allow_fresh = luigi.OptionalListParameter(
        default=None, significant=False,
        description="key prefixes init may leave freshly initialised; loading is strict otherwise. Default: "
                    "the task head (a pretrained model has none) when training, nothing when evaluating")
    model = luigi.Parameter(default="", description="network size from scratch: preset or config.json; "
                                                    "empty: PretrainLXMERT's, so the two compare")
    loss = luigi.ChoiceParameter(choices=["bce", "ce"], default="bce")
    max_seq_length = luigi.IntParameter(default=20)
    vocab = InputPathParameter(default="", kind="file", optional=True,
                               description="WordPiece vocab.txt; empty: the one saved with the initial weights, "
                                           "from scratch the one the data task keeps (the sources file's vocab, "
                                           "as PretrainLXMERT's), so the two compare")

    def dependencies(self) -> Any:
        deps: dict[str, Any] = {"data": self.data_task()}
        if not self.features:
            deps["features"] = ExtractFeatures()
        if self.init == "pretrained":
            deps["pretrain"] = PretrainLXMERT()
        return deps

    def input_problems(self) -> list[str]:
        """init is a choice or usable weights; feature files readable; model usable."""
        problems = param_problems(self, "features", _feature_file_problem) + _model_problems(self)
        if self.init in INIT_CHOICES:
            return problems
        if not Path(self.init).exists():
            return problems + [f"{self.get_task_family()}: parameter 'init' is neither "
                               f"{' / '.join(INIT_CHOICES)} nor an existing path: '{self.init}'"]
        return problems + param_problems(self, "init", _weights_problem)

    def config(self, out: Path, eval_only: bool = False, init_from: str | None = None) -> FinetuneConfig:
        """The run's FinetuneConfig; eval_only with `init_from` evaluates given fine-tuned weights."""
        inputs = self.input_dirs()
        data, official = inputs["data"], TaskData.official(inputs["data"])
        pretrain_dir = None if eval_only else inputs.get("pretrain")
        if not eval_only:
            init_from = str(pretrain_dir / "final") if pretrain_dir else (
                None if self.init == "scratch" else self.init)
        annotations = {"vqa": official.get("annotations"), "gqa": official.get("questions")}.get(self.task_name)
        return FinetuneConfig(
            task=self.task_name, train_files=[str(data / "train.json")], valid_files=[str(data / "valid.json")],
            features=_features(self), annotations=str(annotations) if annotations else None,
            gqa_choices=str(official["choices"]) if "choices" in official else None,
            answers=str(data / "ans2label.json") if self.task_name != "nlvr2" else None,
            model=self.model or PretrainLXMERT().model, init_from=init_from,
            # evaluating never leaves part of the weights fresh (None is strict with eval_only)
            allow_fresh=None if eval_only or self.allow_fresh is None else list(self.allow_fresh),
            pretrain_answers=str(pretrain_dir / "answers.json") if pretrain_dir else None,
            loss=self.loss, dropout=self.dropout if self.dropout >= 0 else None,
            max_seq_length=self.max_seq_length, eval_only=eval_only, train=self.train_config(out),
            # otherwise the vocab.txt saved beside init_from's weights, or BERT's
            vocab=self.vocab or (vocab_of(data) if init_from is None else None))

    def build(self, out: Path) -> None:
        self.launch(finetune, [self.task_name], self.config(out), out)

    @staticmethod
    def chosen_model(output_dir: Path) -> Path:
        """The weights the run kept (best on valid, else final), as a path in its final folder."""
        return output_dir / Path(json.loads((output_dir / "metrics.json").read_text())["model"]).name


class FinetuneVQA(FinetuneTask):
    """VQA v2: soft-score BCE over the answer table, answer head initialised from the pretraining QA head."""

    task_name, data_task = "vqa", BuildVQAData


class FinetuneGQA(FinetuneTask):
    """GQA: as the original (BCE over the 1842 answers; `loss=ce` for its cross-entropy option)."""

    task_name, data_task = "gqa", BuildGQAData


class FinetuneNLVR2(FinetuneTask):
    """NLVR2: one sentence and two images, the pair head, 2-way cross-entropy."""

    task_name, data_task = "nlvr2", BuildNLVR2Data


class EvaluateTask(PipelineTask):
    """Predictions on the valid split in the benchmark's official format, scored by the official metric."""

    finetune_task: type[FinetuneTask] = FinetuneTask

    init = luigi.Parameter(default="pretrained", description="the fine-tuning run's init (see Finetune*)")
    weights = InputPathParameter(default="", optional=True,
                                 description="fine-tuned weights to evaluate instead of the Finetune task's")
    device = luigi.Parameter(default="auto", significant=False)

    def input_problems(self) -> list[str]:
        return param_problems(self, "weights", _weights_problem)

    def dependencies(self) -> Any:
        ft = self.finetune_task(init=self.init)
        deps: dict[str, Any] = {"data": ft.data_task()}
        if not self.weights:
            deps["finetune"] = ft
        if not ft.features:
            deps["features"] = ExtractFeatures()
        return deps

    def build(self, out: Path) -> None:
        ft = self.finetune_task(init=self.init)
        weights = self.weights or str(FinetuneTask.chosen_model(self.input_dirs()["finetune"]))
        cfg = ft.config(out, eval_only=True, init_from=weights)
        cfg = replace(cfg, train=replace(cfg.train, device=self.device))
        finetune.run(cfg)
        task, ext = ft.task_name, "csv" if ft.task_name == "nlvr2" else "json"
        predictions = out / f"valid_predict.{ext}"
        data = self.input_dirs()["data"]
        official = TaskData.official(data)
        majority = majority_predictions(task, load_json(data / "train.json"), load_json(data / "valid.json"))
        baseline_file = write_submission(task, out / f"majority_predict.{ext}", majority)
        scores = {"model": self.score(official, predictions), "majority": self.score(official, baseline_file)}
        write_json_atomic(out / "metrics.json", {
            "task": task, "init": self.init, "weights": weights, "predictions": predictions.name,
            "accuracy": self.headline(scores["model"]), "majority_accuracy": self.headline(scores["majority"]),
            "official": scores}, indent=1)

    def score(self, official: dict[str, Path], predictions: Path) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def headline(metrics: dict[str, Any]) -> float:
        """The number papers report, in percent."""
        raise NotImplementedError


class EvaluateVQA(EvaluateTask):
    """VQA accuracy (official rules): overall, per answer type, per question type."""

    finetune_task = FinetuneVQA

    def score(self, official: dict[str, Path], predictions: Path) -> dict[str, Any]:
        return evaluate_vqa(official["annotations"], predictions, official["questions"])

    @staticmethod
    def headline(metrics: dict[str, Any]) -> float:
        return float(metrics["overall"])


class EvaluateGQA(EvaluateTask):
    """GQA accuracy, binary / open, validity, plausibility, consistency, distribution."""

    finetune_task = FinetuneGQA

    def score(self, official: dict[str, Path], predictions: Path) -> dict[str, Any]:
        return evaluate_gqa(official["questions"], predictions, official.get("choices"))

    @staticmethod
    def headline(metrics: dict[str, Any]) -> float:
        return round(float(metrics["accuracy"]), 2)


class EvaluateNLVR2(EvaluateTask):
    """NLVR2 accuracy and consistency."""

    finetune_task = FinetuneNLVR2

    def score(self, official: dict[str, Path], predictions: Path) -> dict[str, Any]:
        return evaluate_nlvr2(official["data"], predictions)

    @staticmethod
    def headline(metrics: dict[str, Any]) -> float:
        return round(100 * float(metrics["accuracy"]), 2)
