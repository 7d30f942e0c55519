"""Fine-tuning and evaluation on VQA v2, GQA and NLVR2 with the shared training loop.

    torchrun --nproc_per_node 4 -m tasks.finetune vqa --config vqa.json

VQA and GQA train the answer head with soft-score BCE-with-logits times the number of answers
(GQA optionally with cross-entropy, as the original `--mceLoss`); the head starts from the
pretraining QA head where answers match. NLVR2 encodes each image with the sentence and
classifies the pair. After training, the best epoch's model predicts the valid and test files:
the official submission files are written and the official metrics computed into metrics.json.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from extractor.jsonstream import write_json_atomic
from extractor.progress import ProgressFn, launched_progress
from model.checkpoint import load_into, state_dict_of
from tasks.benchmarks import BENCHMARKS, VQA, Benchmark
from tasks.benchmarks.datasets import TaskDataset, collate_task
from tasks.benchmarks.qa import LOSSES
from tasks.data.answers import AnswerTable, head_init_mapping
from tasks.data.batches import model_inputs
from tasks.data.features import open_stores
from tasks.data.tokenization import load_tokenizer, tokenizer_tokens, vocab_beside
from tasks.pretrain import pretrain_table
from tasks.training.distributed import DistEnv, gather_objects, run_command, start_run
from tasks.training.loop import (
    StepContext,
    StepFn,
    StepOutput,
    TrainConfig,
    autocast,
    epoch_generator,
    to_device,
    train,
)
from tasks.training.runconfig import parse_config
from tasks.training.weights import export_with_vocab, fit_vocab, load_weights, network_config, read_init, weights_file

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Everything `python -m tasks.finetune <task>` needs; `train` holds the loop's settings."""

    task: str = VQA.name                                  # a benchmark: vqa | gqa | nlvr2
    train_files: list[str] = field(default_factory=list)  # task files to train on (LXMERT's json)
    valid_files: list[str] = field(default_factory=list)  # evaluated after every epoch and at the end
    test_files: list[str] = field(default_factory=list)   # predicted at the end (submission files)
    features: list[str] = field(default_factory=list)     # HDF5 feature files covering the images
    annotations: str | None = None     # official file of the valid split: VQA annotations / GQA questions
    gqa_choices: str | None = None     # GQA *_choices.json of the valid split (validity, plausibility)
    answers: str | None = None         # ans2label json (default: the released table of the task)
    vocab: str | None = None
    model: str = "base"                # sizes when training from scratch (preset or config.json)
    init_from: str | None = None       # pretrained or fine-tuned weights (any format we read)
    # key prefixes init_from may leave freshly initialised (loading is strict otherwise); None: the
    # task head (answer_head. / logit_fc.) when training, as a pretrained backbone has none; nothing
    # with eval_only, where a fresh head would predict at random
    allow_fresh: list[str] | None = None
    init_qa_head: bool = True          # VQA / GQA: start the answer head from the pretraining QA head
    pretrain_answers: str | None = None  # answer table of the pretraining QA head (its answers.json)
    pretrain_qa_sets: list[str] = field(default_factory=list)  # QA sources that head was restricted to
    loss: str = "bce"                  # vqa / gqa: bce (soft scores) | ce (argmax answer, GQA's option)
    dropout: float | None = None
    max_seq_length: int = 20
    max_boxes: int = 0
    eval_batch_size: int = 256
    eval_only: bool = False            # skip training: evaluate / predict with init_from
    train: TrainConfig = field(default_factory=VQA.recipe)  # the task's recipe (python -m tasks.finetune <task>)

    def validate(self) -> None:
        """Errors name the parameter; checked before any data is read."""
        if self.task not in BENCHMARKS:
            raise ValueError(f"task: unknown {self.task!r}, expected one of {tuple(BENCHMARKS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected bce or ce, got {self.loss!r}")
        if not self.eval_only and not self.train_files:
            raise ValueError("train_files: at least one task file is required (or set eval_only)")
        if self.eval_only and not self.init_from:
            raise ValueError("init_from: eval_only needs weights to evaluate")
        for name in ("train_files", "valid_files", "test_files", "features"):
            for p in getattr(self, name):
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{name}: no file at {p}")
        for name in ("annotations", "gqa_choices", "answers", "pretrain_answers"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"{name}: no file at {getattr(self, name)}")
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length: must be >= 3, got {self.max_seq_length}")
        self.train.validate()

    @property
    def benchmark(self) -> Benchmark:
        """The record of the benchmark `task` names."""
        return BENCHMARKS[self.task]


# ----------------------------------------------------------------------------- model

def make_step(cfg: FinetuneConfig) -> StepFn:
    """The loop's step function for the task."""
    def step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
        return StepOutput(cfg.benchmark.loss(model, batch, cfg.loss))
    return step


def build_model(cfg: FinetuneConfig, feature_dim: int, table: AnswerTable | None,
                vocab_size: int | None = None) -> nn.Module:
    """The task network, from scratch (`model` sizes) or from `init_from`; `vocab_size` is the
    tokenizer's (a fresh network's word embedding gets exactly that size).

    With a pretraining checkpoint and `init_qa_head`, the QA head's hidden layers are copied and
    each answer row taken from the pretraining row of the same answer (zero when absent), as the
    original fine-tuning did. A checkpoint whose head already has this table's size (a fine-tuned
    model of the task) is loaded as it is.
    """
    cls = cfg.benchmark.model_class
    state, base = read_init(cfg.init_from, cfg.model, cls.head_renames)
    config = network_config(base, cfg.model, feature_dim, cfg.dropout)
    if table is not None:
        config.num_qa_labels = len(table)
    if vocab_size is not None:
        fit_vocab(config, vocab_size, bool(cfg.init_from), cfg.init_from or "model")
    if not cfg.init_from:
        return cls(config)
    visual = state.get("lxmert.encoder.visn_fc.visn_fc.weight")
    if visual is not None and visual.shape[1] != feature_dim:
        raise ValueError(f"init_from: {cfg.init_from} expects {visual.shape[1]}-d features, "
                         f"the feature files hold {feature_dim}-d")
    model = cls(config)
    load_weights(model, state, cfg.init_from, fresh_prefixes(cfg))
    head = state.get("answer_head.logit_fc.3.weight")
    if table is not None and cfg.init_qa_head and head is not None and head.shape[0] != len(table):
        pretrain = pretrain_table(cfg.pretrain_answers, cfg.pretrain_qa_sets)
        if head.shape[0] != len(pretrain):
            raise ValueError(f"init_from: its answer head has {head.shape[0]} answers, neither this task's "
                             f"{len(table)} nor the pretraining table's {len(pretrain)} "
                             "(set pretrain_answers / pretrain_qa_sets)")
        copied = model.init_answer_head_from(state, head_init_mapping(table, pretrain))
        log.warning("init_from: %s: answer_head.logit_fc.3 set from the pretraining QA head: %d of %d answers "
                    "found in its table, the other rows zero", weights_file(cfg.init_from), copied, len(table))
    return model


def fresh_prefixes(cfg: FinetuneConfig) -> tuple[str, ...]:
    """The key prefixes init_from may leave fresh: `allow_fresh`, by default the task head when training."""
    if cfg.allow_fresh is not None:
        return tuple(cfg.allow_fresh)
    return () if cfg.eval_only else (cfg.benchmark.head_prefix,)


# ----------------------------------------------------------------------------- prediction and metrics

@torch.no_grad()
def predict(model: nn.Module, dataset: TaskDataset, benchmark: Benchmark, env: DistEnv, batch_size: int,
            num_workers: int = 0, amp: str = "none") -> dict[Any, Any]:
    """{question id / identifier: answer string / bool} over the dataset; each rank predicts a shard
    and every rank gets the merged result."""
    model.eval()
    shard = list(range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_task, generator=epoch_generator(0, 0, env.rank))
    preds: dict[Any, Any] = {}
    for batch in loader:
        batch = to_device(batch, env.device)
        with autocast(amp, env.device):
            out = model(**model_inputs(batch))
        preds.update(zip(batch["keys"], benchmark.decode(out, dataset)))
    merged: dict[Any, Any] = {}
    for part in gather_objects(env, preds):
        merged.update(part)
    return merged


def score(cfg: FinetuneConfig, entries: list[dict], preds: dict[Any, Any]) -> dict[str, Any]:
    """The official metrics of the task over the valid entries (unpredicted ones count as wrong),
    plus LXMERT's own soft-score accuracy for VQA / GQA (in %)."""
    result: dict[str, Any] = {"examples": len(entries), "predicted": len(preds)}
    result.update(cfg.benchmark.score(entries, preds, cfg.annotations, cfg.gqa_choices))
    return result


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------- entry point

INFERENCE_RECORD = "inference.json"


def inference_record(cfg: FinetuneConfig, stores: Sequence[Any], table: AnswerTable | None) -> dict[str, Any]:
    """What asking the model later needs, kept in its run folder (`python -m tasks.ask`): the benchmark, the
    question length and box cap, the answer table in head order, the loss (how scores become probabilities)
    and each feature file's attributes (detector config, weights sha256, box rule), so an image is extracted
    as the training images were and with the same detector."""
    return {"task": cfg.task, "max_seq_length": cfg.max_seq_length, "max_boxes": cfg.max_boxes, "loss": cfg.loss,
            "answers": table.label2ans if table is not None else None,
            "features": [{"file": Path(s.path).name, **s.attrs} for s in stores]}


def run(cfg: FinetuneConfig, env: DistEnv | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Fine-tune (unless eval_only), then predict valid and test files with the best model; writes
    submissions and metrics.json under cfg.train.output_dir and returns the metrics (every rank).
    `inference.json` records what using the model needs (see `inference_record`)."""
    env, out = start_run(cfg, env)
    job = _Job(cfg, env, out)
    if env.is_main:
        write_json_atomic(out / INFERENCE_RECORD, inference_record(cfg, job.stores, job.table), indent=1)
    metrics: dict[str, Any] = {"task": cfg.task}
    if not cfg.eval_only:
        metrics.update(job.fine_tune(on_progress))
    job.model.to(env.device)
    metrics.update(job.predict_files())
    if env.is_main:
        write_json_atomic(out / "metrics.json", metrics, indent=2)
    return metrics


class _Job:
    """One run's data (task files over the feature files), network, training and predictions."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, out: Path) -> None:
        self.cfg, self.env, self.out, self.benchmark = cfg, env, out, cfg.benchmark
        self.stores = open_stores(cfg.features)
        self.tokenizer = load_tokenizer(cfg.vocab or vocab_beside(cfg.init_from))
        self.table = self.benchmark.answer_table(cfg.answers)
        self.model = build_model(cfg, self.stores[0].feature_dim, self.table, len(self.tokenizer.vocab))
        self.valid = self.split(cfg.valid_files) if cfg.valid_files else None

    def split(self, files: Sequence[str]) -> tuple[list[dict], TaskDataset]:
        """The entries of task files and their dataset (entries whose images are in the feature files)."""
        entries = [e for f in files for e in self.benchmark.load_task(f)]
        return entries, self.benchmark.dataset(entries, self.stores, self.tokenizer, self.table,
                                               self.cfg.max_seq_length, self.cfg.max_boxes)

    def predictions(self, model: nn.Module, dataset: TaskDataset) -> dict[Any, Any]:
        cfg = self.cfg
        return predict(model, dataset, self.benchmark, self.env, cfg.eval_batch_size, cfg.train.num_workers,
                       cfg.train.amp)

    def evaluate(self, model: nn.Module) -> tuple[dict[str, Any], dict[Any, Any]]:
        """The valid split's metrics and predictions."""
        entries, dataset = self.valid
        preds = self.predictions(model, dataset)
        return score(self.cfg, entries, preds), preds

    def fine_tune(self, on_progress: ProgressFn | None = None) -> dict[str, Any]:
        """Train; the best epoch's weights (else the final ones) are then loaded into the model."""
        cfg, out = self.cfg, self.out
        _, train_set = self.split(cfg.train_files)
        metrics: dict[str, Any] = {"train_examples": len(train_set), "train_skipped": train_set.skipped}
        eval_fn, best_metric = None, None
        if self.valid is not None:
            # the official accuracy picks the best epoch when it can be computed, else LXMERT's soft score
            best_metric = (self.benchmark.best_metric(cfg.annotations), "max")

            def eval_fn(m: nn.Module, epoch: int) -> dict[str, float]:
                return _flat(self.evaluate(m)[0])

        result = train(self.model, train_set, cfg.train, collate_fn=collate_task, step_fn=make_step(cfg),
                       export_fn=export_with_vocab(tokenizer_tokens(self.tokenizer)), eval_fn=eval_fn,
                       best_metric=best_metric, extra={"model_config": self.model.config.to_dict()}, env=self.env,
                       on_progress=on_progress)
        metrics.update(train_loss=result.last_losses.get("loss"), steps=result.step, evals=result.evals,
                       best=result.best, amp=result.amp)
        chosen = out / ("best" if result.best is not None else "final")
        load_into(self.model, state_dict_of(chosen), chosen)
        metrics["model"] = str(chosen)
        return metrics

    def predict_files(self) -> dict[str, Any]:
        """Predict the valid split (scored) and every test file into submission files (rank 0 writes)."""
        metrics: dict[str, Any] = {}
        submissions = []
        suffix, main = self.benchmark.submission_suffix, self.env.is_main
        if self.valid is not None:
            metrics["valid"], preds = self.evaluate(self.model)
            metrics["valid_skipped"] = self.valid[1].skipped
            if main:
                submissions.append(str(self.benchmark.write_submission(self.out / f"valid_predict{suffix}", preds)))
        for path in self.cfg.test_files:
            _, test_set = self.split([path])
            preds = self.predictions(self.model, test_set)
            stem = Path(path).stem
            if main:
                submissions.append(str(self.benchmark.write_submission(self.out / f"{stem}_predict{suffix}", preds)))
            metrics.setdefault("test_skipped", {})[stem] = test_set.skipped
        metrics["submissions"] = submissions
        return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.finetune {vqa,gqa,nlvr2} [--config cfg.json] [--flag value ...]` (torchrun too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m tasks.finetune {{{','.join(BENCHMARKS)}}} [--config cfg.json] [flags]",
              file=sys.stderr)
        return 2
    task = argv.pop(0)
    base = {"task": task, "train": asdict(BENCHMARKS[task].recipe())}
    cfg = parse_config(FinetuneConfig, argv, prog=f"python -m tasks.finetune {task}",
                       description=f"LXMERT fine-tuning and evaluation on {task}", base=base)
    if cfg.task != task:
        raise ValueError(f"task: the command names {task!r} but the config says {cfg.task!r}")
    return run_command(cfg, lambda c, e: run(c, e, launched_progress()),
                       lambda m: {k: v for k, v in m.items() if k in ("task", "valid", "best")})


if __name__ == "__main__":
    sys.exit(main())
