"""Luigi tasks that pretrain, fine-tune and evaluate LXMERT through the shared training loop."""
from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import luigi

from extractor.jsonstream import load_json, write_json_atomic, write_text_atomic
from extractor.store import FeatureReader, FeatureStoreError
from model.checkpoint import locate
from model.config import ConfigError, LxmertConfig
from pipeline.base import InputPathListParameter, InputPathParameter, PipelineTask, json_check, param_problems
from pipeline.data import BuildGQAData, BuildNLVR2Data, BuildPretrainCorpus, BuildVQAData, TaskData, vocab_of
from pipeline.features import ExtractFeatures
from pipeline.params import config_values, derived
from pipeline.progress import TaskProgress, stream_child
from tasks import finetune, pretrain
from tasks.benchmarks import GQA, NLVR2, VQA, Benchmark
from tasks.benchmarks.qa import LOSSES
from tasks.finetune import FinetuneConfig
from tasks.pretrain import PretrainConfig
from tasks.training.loop import AMP_MODES, TrainConfig
from tasks.training.optim import OPTIMIZERS
from tasks.training.runconfig import save_json
from tasks.training.weights import model_config_from

INIT_CHOICES = ("pretrained", "scratch")

# TrainConfig fields the training tasks take; their defaults are the stage's recipe (PretrainConfig().train,
# the benchmark's fine-tuning recipe), and luigi.cfg sets the demo's
LOOP_SETTINGS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio", "optimizer", "weight_decay",
                 "clip_grad_norm", "amp", "seed", "device", "num_workers", "ckpt_every", "log_every")
# settings that change how, not what, a task computes: not part of its identity
RUN_SETTINGS = ("device", "num_workers", "ckpt_every", "log_every")
PRETRAIN_SETTINGS = ("model", "dropout", "qa_from_epoch", "word_mask_rate", "obj_mask_rate", "max_seq_length",
                     "valid_examples")
FINETUNE_SETTINGS = ("dropout", "loss", "max_seq_length")
HELP = {"model": "preset (base, small, tiny) or a config.json", "dropout": "< 0: the model's own",
        "max_steps": "> 0: stop after this many optimiser steps",
        "batch_size": "examples per optimiser step, all processes", "log_every": "steps per train.csv row"}


TrainingTaskT = TypeVar("TrainingTaskT", bound="TrainingTask")


def loop_settings(recipe: TrainConfig) -> Callable[[type[TrainingTaskT]], type[TrainingTaskT]]:
    """Class decorator: the training task follows `recipe` (its stage's); its loop settings are parameters
    defaulting to the recipe's values."""
    add = derived(recipe, LOOP_SETTINGS, insignificant=RUN_SETTINGS,
                  choices={"optimizer": OPTIMIZERS, "amp": AMP_MODES}, descriptions=HELP)

    def follow(cls: type[TrainingTaskT]) -> type[TrainingTaskT]:
        cls.recipe = recipe
        return add(cls)

    return follow


class TrainingTask(PipelineTask):
    """What the training tasks share: the loop settings (each task's from its recipe, see `loop_settings`)
    and the launch; how many processes run them does not change the result."""

    name_or_path = ("model",)

    nproc_per_node = luigi.IntParameter(default=1, significant=False, description="> 1: launch torchrun")
    nnodes = luigi.IntParameter(default=1, significant=False)
    rdzv_endpoint = luigi.Parameter(default="", significant=False, description="HOST:PORT when nnodes > 1")

    recipe: TrainConfig  # the stage's recipe (set by `loop_settings`), whose loop settings the parameters override

    def train_config(self, out: Path) -> TrainConfig:
        return replace(self.recipe, **config_values(self, TrainConfig, LOOP_SETTINGS), output_dir=str(out),
                       resume=True, progress=False)

    def launch(self, module: Any, args: list[str], cfg: Any, out: Path) -> dict[str, Any]:
        """Run in this process, or under torchrun when several processes are asked for; returns metrics."""
        if self.nproc_per_node * self.nnodes == 1:
            with TaskProgress(self) as report:
                return module.run(cfg, on_progress=report)
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
        with TaskProgress(self) as report:
            stream_child(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, report)
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


@loop_settings(PretrainConfig().train)
@derived(PretrainConfig(), PRETRAIN_SETTINGS, descriptions=HELP)
class PretrainLXMERT(TrainingTask):
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
    objectives = luigi.ListParameter(default=[o for o in pretrain.OBJECTIVES if getattr(PretrainConfig(), o)])
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
        cfg = PretrainConfig(corpus=corpus, features=_features(self), valid_corpus=valid, init_from=self.init or None,
                             allow_fresh=list(self.allow_fresh), answers=answers, vocab=vocab,
                             train=self.train_config(out), **config_values(self, PretrainConfig, PRETRAIN_SETTINGS),
                             **{o: o in self.objectives for o in pretrain.OBJECTIVES})
        self.launch(pretrain, [], cfg, out)


@derived(FinetuneConfig(), FINETUNE_SETTINGS, choices={"loss": LOSSES}, descriptions=HELP)
class FinetuneTask(TrainingTask):
    """Fine-tuning on one benchmark from pretrained weights ("pretrained"), none ("scratch") or a path.

    Each benchmark's task takes its loop settings from the benchmark's fine-tuning recipe (`loop_settings`)."""

    benchmark: Benchmark
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
        annotations = official.get(self.benchmark.annotation_file)
        return FinetuneConfig(
            task=self.benchmark.name, train_files=[str(data / "train.json")], valid_files=[str(data / "valid.json")],
            features=_features(self), annotations=str(annotations) if annotations else None,
            gqa_choices=str(official["choices"]) if "choices" in official else None,
            answers=str(data / "ans2label.json") if self.benchmark.answers else None,
            model=self.model or PretrainLXMERT().model, init_from=init_from,
            # evaluating never leaves part of the weights fresh (None is strict with eval_only)
            allow_fresh=None if eval_only or self.allow_fresh is None else list(self.allow_fresh),
            pretrain_answers=str(pretrain_dir / "answers.json") if pretrain_dir else None,
            eval_only=eval_only, train=self.train_config(out), **config_values(self, FinetuneConfig, FINETUNE_SETTINGS),
            # otherwise the vocab.txt saved beside init_from's weights, or BERT's
            vocab=self.vocab or (vocab_of(data) if init_from is None else None))

    def build(self, out: Path) -> None:
        self.launch(finetune, [self.benchmark.name], self.config(out), out)

    @staticmethod
    def chosen_model(output_dir: Path) -> Path:
        """The weights the run kept (best on valid, else final), as a path in its final folder."""
        return output_dir / Path(json.loads((output_dir / "metrics.json").read_text())["model"]).name


@loop_settings(VQA.recipe())
class FinetuneVQA(FinetuneTask):
    """VQA v2: soft-score BCE over the answer table, answer head initialised from the pretraining QA head."""

    benchmark, data_task = VQA, BuildVQAData


@loop_settings(GQA.recipe())
class FinetuneGQA(FinetuneTask):
    """GQA: as the original (BCE over the 1842 answers; `loss=ce` for its cross-entropy option)."""

    benchmark, data_task = GQA, BuildGQAData


@loop_settings(NLVR2.recipe())
class FinetuneNLVR2(FinetuneTask):
    """NLVR2: one sentence and two images, the pair head, 2-way cross-entropy."""

    benchmark, data_task = NLVR2, BuildNLVR2Data


@derived(TrainConfig(), ("device",), insignificant=("device",))
class EvaluateTask(PipelineTask):
    """Predictions on the valid split in the benchmark's official format, scored by the official metric."""

    finetune_task: type[FinetuneTask] = FinetuneTask

    init = luigi.Parameter(default="pretrained", description="the fine-tuning run's init (see Finetune*)")
    weights = InputPathParameter(default="", optional=True,
                                 description="fine-tuned weights to evaluate instead of the Finetune task's")

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
        benchmark = ft.benchmark
        weights = self.weights or str(FinetuneTask.chosen_model(self.input_dirs()["finetune"]))
        cfg = ft.config(out, eval_only=True, init_from=weights)
        cfg = replace(cfg, train=replace(cfg.train, device=self.device))
        finetune.run(cfg)
        predictions = out / f"valid_predict{benchmark.submission_suffix}"
        data = self.input_dirs()["data"]
        official = TaskData.official(data)
        majority = benchmark.majority_predictions(load_json(data / "train.json"), load_json(data / "valid.json"))
        baseline_file = benchmark.write_submission(out / f"majority_predict{benchmark.submission_suffix}", majority)
        scores = {"model": benchmark.evaluate(predictions, **official),
                  "majority": benchmark.evaluate(baseline_file, **official)}
        write_json_atomic(out / "metrics.json", {
            "task": benchmark.name, "init": self.init, "weights": weights, "predictions": predictions.name,
            "accuracy": benchmark.headline(scores["model"]),
            "majority_accuracy": benchmark.headline(scores["majority"]), "official": scores}, indent=1)


class EvaluateVQA(EvaluateTask):
    """VQA accuracy (official rules): overall, per answer type, per question type."""

    finetune_task = FinetuneVQA


class EvaluateGQA(EvaluateTask):
    """GQA accuracy, binary / open, validity, plausibility, consistency, distribution."""

    finetune_task = FinetuneGQA


class EvaluateNLVR2(EvaluateTask):
    """NLVR2 accuracy and consistency."""

    finetune_task = FinetuneNLVR2
