"""Fine-tuning and evaluation on VQA v2, GQA and NLVR2 with the shared training loop.

    torchrun --nproc_per_node 4 -m tasks.finetune vqa --config vqa.json

VQA and GQA train the answer head with soft-score BCE-with-logits times the number of answers
(GQA optionally with cross-entropy, as the original `--mceLoss`); the head starts from the
pretraining QA head where answers match. NLVR2 encodes each image with the sentence and
classifies the pair. After training, the best epoch's model predicts the valid and test files:
the official submission files are written and the official metrics computed into metrics.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from extractor.store import FeatureReader
from model.checkpoint import CheckpointError
from model.config import ConfigError
from tasks.data.answers import (
    AnswerTable,
    default_gqa_table,
    default_vqa_table,
    head_init_mapping,
)
from tasks.data.features import locate_images, open_stores, read_image
from tasks.data.jsonstream import write_json_atomic
from tasks.data.readers import (
    NLVR2Example,
    load_gqa_task,
    load_nlvr2_task,
    load_vqa_task,
    read_gqa_choices,
    read_gqa_questions,
    read_vqa_annotations,
)
from tasks.data.tokenization import load_tokenizer, tokenizer_tokens, vocab_beside
from tasks.metrics import (
    gqa_metrics,
    nlvr2_metrics,
    soft_score_accuracy,
    vqa_accuracy,
    write_gqa_submission,
    write_nlvr2_submission,
    write_vqa_submission,
)
from tasks.pretrain import pretrain_table
from tasks.training.distributed import DistEnv, cleanup_distributed, gather_objects, init_distributed
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
from tasks.training.runconfig import parse_config, save_json
from tasks.training.weights import (
    export_with_vocab,
    fit_vocab,
    load_weights,
    model_config_from,
    read_checkpoint,
    weights_file,
)

log = logging.getLogger(__name__)

TASKS = ("vqa", "gqa", "nlvr2")
TASK_HEADS = {"vqa": "answer_head.", "gqa": "answer_head.", "nlvr2": "logit_fc."}  # what a pretrained model lacks
IGNORE = -100

# The original recipe: batch 32, 4 epochs, warm-up 10%, gradient clipping 5; lr per task.
TASK_LR = {"vqa": 5e-5, "gqa": 1e-5, "nlvr2": 5e-5}


def default_train_config(task: str) -> TrainConfig:
    """The loop settings of the original fine-tuning recipe for `task`."""
    return TrainConfig(output_dir=f"runs/finetune/{task}", epochs=4, batch_size=32, lr=TASK_LR[task],
                       warmup_ratio=0.1, clip_grad_norm=5.0)


@dataclass
class FinetuneConfig:
    """Everything `python -m tasks.finetune <task>` needs; `train` holds the loop's settings."""

    task: str = "vqa"                                     # vqa | gqa | nlvr2
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
    train: TrainConfig = field(default_factory=lambda: default_train_config("vqa"))

    def validate(self) -> None:
        """Errors name the parameter; checked before any data is read."""
        if self.task not in TASKS:
            raise ValueError(f"task: unknown {self.task!r}, expected one of {TASKS}")
        if self.loss not in ("bce", "ce"):
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


# ----------------------------------------------------------------------------- datasets

def _encode(tokenizer: Any, sentence: str, max_len: int) -> np.ndarray:
    """[CLS] words [SEP], truncated as the original (words cut to max_len - 2)."""
    tokens = tokenizer.tokenize(sentence.strip())[: max_len - 2]
    return np.asarray(tokenizer.convert_tokens_to_ids(["[CLS]", *tokens, "[SEP]"]), dtype=np.int64)


class _TaskDataset(Dataset):
    """Task entries whose images are in the feature files (others are counted in `skipped`)."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 image_keys: Sequence[str], max_seq_length: int, max_boxes: int) -> None:
        where = locate_images(stores, (e[k] for e in entries for k in image_keys))
        self.entries = [e for e in entries if all(e[k] in where for k in image_keys)]
        self.skipped = len(entries) - len(self.entries)
        self.where, self.stores, self.tokenizer = where, list(stores), tokenizer
        self.max_seq_length, self.max_boxes = max_seq_length, max_boxes

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, img_id: str) -> tuple[np.ndarray, np.ndarray]:
        rec = read_image(self.stores, *self.where[img_id], self.max_boxes)
        return rec.features, rec.boxes.astype(np.float32)


class QADataset(_TaskDataset):
    """VQA / GQA questions with soft-score targets over the answer table."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 table: AnswerTable, max_seq_length: int = 20, max_boxes: int = 0) -> None:
        super().__init__(entries, stores, tokenizer, ("img_id",), max_seq_length, max_boxes)
        self.table = table

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        feats, boxes = self._image(e["img_id"])
        target = np.zeros(len(self.table), dtype=np.float32)
        for ans, score in (e.get("label") or {}).items():
            if ans in self.table:
                target[self.table.label(ans)] = score
        return {"key": e["question_id"], "input_ids": _encode(self.tokenizer, e["sent"], self.max_seq_length),
                "visual_feats": feats, "visual_pos": boxes, "target": target}


class NLVR2Dataset(_TaskDataset):
    """NLVR2 sentences with their two images; label 1 = True."""

    def __init__(self, entries: list[dict], stores: Sequence[FeatureReader], tokenizer: Any,
                 max_seq_length: int = 20, max_boxes: int = 0) -> None:
        super().__init__(entries, stores, tokenizer, ("img0", "img1"), max_seq_length, max_boxes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        (f0, b0), (f1, b1) = self._image(e["img0"]), self._image(e["img1"])
        k = max(len(f0), len(f1))
        feats = np.zeros((2, k, f0.shape[1]), dtype=f0.dtype)
        boxes = np.zeros((2, k, 4), dtype=np.float32)
        mask = np.zeros((2, k), dtype=np.float32)
        for j, (f, b) in enumerate(((f0, b0), (f1, b1))):
            feats[j, : len(f)], boxes[j, : len(b)], mask[j, : len(f)] = f, b, 1.0
        return {"key": e["identifier"], "input_ids": _encode(self.tokenizer, e["sent"], self.max_seq_length),
                "visual_feats": feats, "visual_pos": boxes, "box_mask": mask,
                "label": int(e.get("label", IGNORE))}


def _pad_to(arrays: Sequence[np.ndarray], axis_len: int, axis: int, dtype: torch.dtype) -> torch.Tensor:
    shape = list(arrays[0].shape)
    shape[axis] = axis_len
    out = torch.zeros((len(arrays), *shape), dtype=dtype)
    for row, a in enumerate(arrays):
        index = [row] + [slice(None)] * a.ndim
        index[axis + 1] = slice(0, a.shape[axis])
        out[tuple(index)] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def collate_task(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad words and boxes to the batch's longest; QA batches carry `target`, NLVR2 `label`."""
    n_words = max(len(e["input_ids"]) for e in examples)
    pair = "box_mask" in examples[0]
    box_axis = 1 if pair else 0
    n_boxes = max(e["visual_feats"].shape[box_axis] for e in examples)
    feat_dtype = torch.from_numpy(examples[0]["visual_feats"][:0]).dtype
    ids = _pad_to([e["input_ids"] for e in examples], n_words, 0, torch.long)
    batch: dict[str, Any] = {
        "ids": [str(e["key"]) for e in examples],
        "keys": [e["key"] for e in examples],
        "input_ids": ids,
        "attention_mask": _pad_to([np.ones(len(e["input_ids"]), np.int64) for e in examples], n_words, 0,
                                  torch.long),
        "token_type_ids": torch.zeros_like(ids),
        "visual_feats": _pad_to([e["visual_feats"] for e in examples], n_boxes, box_axis, feat_dtype),
        "visual_pos": _pad_to([e["visual_pos"] for e in examples], n_boxes, box_axis, torch.float32),
    }
    if pair:
        batch["visual_attention_mask"] = _pad_to([e["box_mask"] for e in examples], n_boxes, 1, torch.float32)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        masks = [np.ones(len(e["visual_feats"]), np.float32) for e in examples]
        batch["visual_attention_mask"] = _pad_to(masks, n_boxes, 0, torch.float32)
        batch["target"] = torch.from_numpy(np.stack([e["target"] for e in examples]))
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The network's arguments from a collated batch (features cast to float32 on device)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"], "visual_feats": batch["visual_feats"].float(),
            "visual_pos": batch["visual_pos"], "visual_attention_mask": batch["visual_attention_mask"]}


# ----------------------------------------------------------------------------- losses and model

def qa_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """The original VQA / GQA loss: mean BCE-with-logits over (batch x answers) times the number of
    answers; with `ce`, cross-entropy on each question's best answer (unlabelled ones skipped),
    also times the number of answers as the original does."""
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]
    best, index = target.max(dim=1)
    index = index.masked_fill(best <= 0, IGNORE)
    if not bool((index != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, index, ignore_index=IGNORE) * logits.shape[1]


def make_step(cfg: FinetuneConfig) -> StepFn:
    """The loop's step function for the task."""
    def step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
        if cfg.task == "nlvr2":
            out = model(**model_inputs(batch), labels=batch["label"])
            return StepOutput(out.loss)
        logits = model(**model_inputs(batch)).question_answering_score
        return StepOutput(qa_loss(logits, batch["target"], cfg.loss))
    return step


def answer_table(cfg: FinetuneConfig) -> AnswerTable | None:
    """The answer table of the QA head (None for NLVR2)."""
    if cfg.task == "nlvr2":
        return None
    if cfg.answers:
        return AnswerTable.load(cfg.answers)
    return default_vqa_table() if cfg.task == "vqa" else default_gqa_table()


def build_model(cfg: FinetuneConfig, feature_dim: int, table: AnswerTable | None,
                vocab_size: int | None = None) -> nn.Module:
    """The task network, from scratch (`model` sizes) or from `init_from`; `vocab_size` is the
    tokenizer's (a fresh network's word embedding gets exactly that size).

    With a pretraining checkpoint and `init_qa_head`, the QA head's hidden layers are copied and
    each answer row taken from the pretraining row of the same answer (zero when absent), as the
    original fine-tuning did. A checkpoint whose head already has this table's size (a fine-tuned
    model of the task) is loaded as it is.
    """
    from model import LxmertForNLVR2, LxmertForQuestionAnswering

    cls = LxmertForNLVR2 if cfg.task == "nlvr2" else LxmertForQuestionAnswering
    state, base = ({}, None)
    if cfg.init_from:
        state, base = read_checkpoint(cfg.init_from, "init_from", cls.head_renames)
        if base is None:  # an original *.pth: sizes from the weights, head count from `model`
            from model.checkpoint import infer_config
            base = infer_config(state, source=f"init_from: {cfg.init_from}",
                                num_attention_heads=model_config_from(cfg.model).num_attention_heads)
    config = dataclasses.replace(base) if base is not None else model_config_from(cfg.model)
    config.visual_feat_dim = feature_dim
    if table is not None:
        config.num_qa_labels = len(table)
    if cfg.dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.dropout
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
    return () if cfg.eval_only else (TASK_HEADS[cfg.task],)


# ----------------------------------------------------------------------------- prediction and metrics

@torch.no_grad()
def predict(model: nn.Module, dataset: _TaskDataset, task: str, env: DistEnv, batch_size: int,
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
        if task == "nlvr2":
            labels = out.logits.argmax(-1).tolist()
            preds.update({k: bool(v) for k, v in zip(batch["keys"], labels)})
        else:
            labels = out.question_answering_score.argmax(-1).tolist()
            preds.update({k: dataset.table.answer(v) for k, v in zip(batch["keys"], labels)})
    merged: dict[Any, Any] = {}
    for part in gather_objects(env, preds):
        merged.update(part)
    return merged


def score(cfg: FinetuneConfig, entries: list[dict], preds: dict[Any, Any]) -> dict[str, Any]:
    """The official metrics of the task over the valid entries (unpredicted ones count as wrong),
    plus LXMERT's own soft-score accuracy for VQA / GQA (in %)."""
    result: dict[str, Any] = {"examples": len(entries), "predicted": len(preds)}
    if cfg.task == "nlvr2":
        examples = [NLVR2Example(e["identifier"], e["sent"], bool(e["label"]), None, None)
                    for e in entries if "label" in e]
        result.update(nlvr2_metrics(examples, preds, allow_missing=True))
        return result
    labels = {e["question_id"]: e.get("label") or {} for e in entries}
    result["soft_score"] = 100 * soft_score_accuracy({k: preds.get(k, "") for k in labels}, labels)
    if cfg.annotations and cfg.task == "vqa":
        anns = [a for a in read_vqa_annotations(cfg.annotations) if a.question_id in labels]
        result.update(vqa_accuracy(anns, preds, allow_missing=True))
        result["accuracy"] = result.pop("overall")
    elif cfg.annotations:
        questions = [q for q in read_gqa_questions(cfg.annotations) if q.question_id in labels]
        choices = dict(read_gqa_choices(cfg.gqa_choices)) if cfg.gqa_choices else None
        result.update(gqa_metrics(questions, preds, choices, allow_missing=True))
    return result


def write_submission(task: str, path: Path, preds: dict[Any, Any]) -> Path:
    """The benchmark's submission file: VQA / GQA json, NLVR2 csv."""
    if task == "vqa":
        write_vqa_submission(path, preds)
    elif task == "gqa":
        write_gqa_submission(path, preds)
    else:
        write_nlvr2_submission(path, preds)
    return path


def _loader_for(task: str) -> Callable[[str], list[dict]]:
    return {"vqa": load_vqa_task, "gqa": load_gqa_task, "nlvr2": load_nlvr2_task}[task]


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------- entry point

def run(cfg: FinetuneConfig, env: DistEnv | None = None) -> dict[str, Any]:
    """Fine-tune (unless eval_only), then predict valid and test files with the best model; writes
    submissions and metrics.json under cfg.train.output_dir and returns the metrics (every rank)."""
    from model.checkpoint import load_into, state_dict_of

    cfg.validate()
    env = env or init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
    torch.manual_seed(cfg.train.seed)
    stores = open_stores(cfg.features)
    tokenizer = load_tokenizer(cfg.vocab or vocab_beside(cfg.init_from))
    table = answer_table(cfg)
    load = _loader_for(cfg.task)

    def dataset(files: Sequence[str]) -> tuple[list[dict], _TaskDataset]:
        entries = [e for f in files for e in load(f)]
        if cfg.task == "nlvr2":
            return entries, NLVR2Dataset(entries, stores, tokenizer, cfg.max_seq_length, cfg.max_boxes)
        return entries, QADataset(entries, stores, tokenizer, table, cfg.max_seq_length, cfg.max_boxes)

    model = build_model(cfg, stores[0].feature_dim, table, len(tokenizer.vocab))
    valid_entries, valid_set = dataset(cfg.valid_files) if cfg.valid_files else ([], None)
    metrics: dict[str, Any] = {"task": cfg.task}

    def predictions(m: nn.Module, data: _TaskDataset) -> dict[Any, Any]:
        return predict(m, data, cfg.task, env, cfg.eval_batch_size, cfg.train.num_workers, cfg.train.amp)

    def evaluate(m: nn.Module) -> tuple[dict[str, Any], dict[Any, Any]]:
        preds = predictions(m, valid_set)
        return score(cfg, valid_entries, preds), preds

    if not cfg.eval_only:
        _, train_set = dataset(cfg.train_files)
        metrics["train_examples"], metrics["train_skipped"] = len(train_set), train_set.skipped
        # the official accuracy picks the best epoch when it can be computed, else LXMERT's soft score
        key = "accuracy" if cfg.task == "nlvr2" or cfg.annotations else "soft_score"

        def eval_fn(m: nn.Module, epoch: int) -> dict[str, float]:
            return _flat(evaluate(m)[0])

        result = train(model, train_set, cfg.train, collate_fn=collate_task, step_fn=make_step(cfg),
                       export_fn=export_with_vocab(tokenizer_tokens(tokenizer)),
                       eval_fn=eval_fn if valid_set is not None else None,
                       best_metric=(key, "max") if valid_set is not None else None,
                       extra={"model_config": model.config.to_dict()}, env=env)
        metrics.update(train_loss=result.last_losses.get("loss"), steps=result.step, evals=result.evals,
                       best=result.best)
        chosen = out / ("best" if result.best is not None else "final")
        load_into(model, state_dict_of(chosen), chosen)
        metrics["model"] = str(chosen)
    model.to(env.device)
    submissions = []
    ext = "csv" if cfg.task == "nlvr2" else "json"
    if valid_set is not None:
        valid, preds = evaluate(model)
        metrics["valid"] = valid
        metrics["valid_skipped"] = valid_set.skipped
        if env.is_main:
            submissions.append(str(write_submission(cfg.task, out / f"valid_predict.{ext}", preds)))
    for path in cfg.test_files:
        _, test_set = dataset([path])
        preds = predictions(model, test_set)
        stem = Path(path).stem
        if env.is_main:
            submissions.append(str(write_submission(cfg.task, out / f"{stem}_predict.{ext}", preds)))
        metrics.setdefault("test_skipped", {})[stem] = test_set.skipped
    metrics["submissions"] = submissions
    if env.is_main:
        write_json_atomic(out / "metrics.json", metrics, indent=2)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.finetune {vqa,gqa,nlvr2} [--config cfg.json] [--flag value ...]` (torchrun too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TASKS:
        print(f"usage: python -m tasks.finetune {{{','.join(TASKS)}}} [--config cfg.json] [flags]",
              file=sys.stderr)
        return 2
    task = argv.pop(0)
    base = {"task": task, "train": dataclasses.asdict(default_train_config(task))}
    cfg = parse_config(FinetuneConfig, argv, prog=f"python -m tasks.finetune {task}",
                       description=f"LXMERT fine-tuning and evaluation on {task}", base=base)
    if cfg.task != task:
        raise ValueError(f"task: the command names {task!r} but the config says {cfg.task!r}")
    try:
        env = init_distributed(cfg.train.device)
        metrics = run(cfg, env)
        if env.is_main:
            print(json.dumps({k: v for k, v in metrics.items() if k in ("task", "valid", "best")}, indent=1,
                             default=str))
    except (CheckpointError, ConfigError) as err:  # weights or sizes that do not fit: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
