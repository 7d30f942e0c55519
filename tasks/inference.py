"""Using a fine-tuned model: load it with what its run recorded (`inference.json`), read a question as
fine-tuning did, and answer with the model's cross-attention over the boxes. `python -m tasks.ask` and the
report's examples both go through here.

The attention shown is the language -> vision attention of the last cross layer, averaged over its heads
and over the question's word pieces ([CLS] and [SEP] left out): one share per box, summing to 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extractor.jsonstream import load_json
from extractor.store import ImageFeatures
from tasks.benchmarks import BENCHMARKS, Benchmark
from tasks.data.answers import AnswerTable
from tasks.data.features import open_stores
from tasks.data.tokenization import load_tokenizer, vocab_beside
from tasks.finetune import INFERENCE_RECORD, FinetuneConfig, inference_record
from tasks.training.runconfig import load_json as load_config

DEFAULT_MAX_SEQ_LENGTH = 20  # the original fine-tuning's, for a released model without a record


class InferenceError(ValueError):
    """Input a model cannot take (a question too long, a folder without a model, images of the wrong count),
    said in one line naming the option."""


@dataclass
class FineTuned:
    """A fine-tuned model with what reading its input needs."""

    model: nn.Module
    benchmark: Benchmark
    tokenizer: Any
    table: AnswerTable | None       # the answer head's rows (VQA / GQA)
    max_seq_length: int
    max_boxes: int                  # 0: every box of an image
    loss: str                       # bce: each answer's sigmoid is its probability; ce: a softmax over answers
    features: list[dict] | None     # the attributes of the feature files it was trained on (None: unknown)
    weights: Path                   # what was loaded
    device: torch.device


@dataclass
class Answer:
    """The model's answers, best first, with probabilities, and each image's attention share per box."""

    top: list[tuple[Any, float]]
    attention: list[np.ndarray]


def locate_model(path: str | Path, task: str | None = None) -> tuple[Path, dict | None]:
    """(the weights to load, the fine-tuning run's record or None) of a fine-tuning run folder (its chosen
    model), an evaluation folder (the weights it evaluated), a model folder inside a run, or any other model.
    `task` given, an earlier run whose record cannot be rebuilt is taken as a model without one."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"--model: no model at {path}")
    if (path / INFERENCE_RECORD).is_file() or _earlier_run(path):
        metrics = load_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
        if "weights" in metrics:  # an evaluation folder: the fine-tuned weights it scored
            weights = Path(metrics["weights"])
        elif "model" in metrics:  # a fine-tuning run: the weights it kept (its folders moved with it)
            weights = path / Path(metrics["model"]).name
        else:
            weights = path / ("best" if (path / "best").is_dir() else "final")
        if not weights.exists():
            raise InferenceError(f"--model: {path} is a fine-tuning run, but its weights {weights} are gone")
        record_dir = weights.parent if _run_folder(weights.parent) else path
        return weights, _record(record_dir, task)
    if _run_folder(path.parent):
        return path, _record(path.parent, task)
    return path, None


def _run_folder(folder: Path) -> bool:
    return (folder / INFERENCE_RECORD).is_file() or _earlier_run(folder)


def _earlier_run(folder: Path) -> bool:
    """A fine-tuning run from before runs kept inference.json: its config.json is a FinetuneConfig."""
    config = folder / "config.json"
    if (folder / INFERENCE_RECORD).is_file() or not config.is_file():
        return False
    data = load_json(config)
    return isinstance(data, dict) and data.get("task") in BENCHMARKS and "train_files" in data


def _record(folder: Path, task: str | None) -> dict | None:
    """The run's inference.json; for an earlier run, the same record made from the files its config.json
    names, when they are still there (else None when `task` is given, an error when not)."""
    if (folder / INFERENCE_RECORD).is_file():
        return load_json(folder / INFERENCE_RECORD)
    cfg = load_config(FinetuneConfig, folder / "config.json")
    missing = [p for p in [*cfg.features, cfg.answers or ""] if p and not Path(p).is_file()]
    if missing and task is not None:
        return None
    if missing:
        raise InferenceError(f"--model: {folder} was fine-tuned before runs kept {INFERENCE_RECORD}, and the files "
                             f"its config.json names are gone ({missing[0]}); give --task and --answers")
    with ExitStack() as stack:
        stores = [stack.enter_context(store) for store in open_stores(cfg.features)]
        return inference_record(cfg, stores, cfg.benchmark.answer_table(cfg.answers))


def load_finetuned(path: str | Path, task: str | None = None, answers: str | Path | None = None,
                   vocab: str | Path | None = None, device: str = "cpu") -> FineTuned:
    """The model at `path` (see `locate_model`) in eval mode. A run of this project says its benchmark, answer
    table and feature settings; any other model (a transformers folder, an original *.pth) needs `task`, and
    takes the released answer table unless `answers` (an ans2label json) names another."""
    weights, record = locate_model(path, task)
    if record is not None and task is not None and task != record["task"]:
        raise InferenceError(f"--task: {task} given, but {path} was fine-tuned on {record['task']}")
    name = record["task"] if record is not None else task
    if name is None:
        raise InferenceError(f"--model: {path} is not a fine-tuning run of this project (no {INFERENCE_RECORD}): "
                             f"give --task ({' / '.join(BENCHMARKS)})")
    benchmark = BENCHMARKS[name]
    if answers is not None:
        table = AnswerTable.load(answers)
    elif record is not None and record.get("answers") is not None:
        table = AnswerTable(record["answers"])
    else:
        table = benchmark.answer_table(None)
    model = benchmark.model_class.from_pretrained(weights).to(device)
    if table is not None and len(table) != model.config.num_qa_labels:
        raise InferenceError(f"--answers: the table has {len(table)} answers but the answer head of {weights} has "
                             f"{model.config.num_qa_labels}; give the table it was fine-tuned with")
    tokenizer = load_tokenizer(vocab or vocab_beside(weights))
    if len(tokenizer.vocab) > model.config.vocab_size:
        raise InferenceError(f"--vocab: {len(tokenizer.vocab)} word pieces, but {weights} embeds only "
                             f"{model.config.vocab_size}: give the vocabulary it was trained with")
    record = record or {}
    return FineTuned(model, benchmark, tokenizer, table, record.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH),
                     record.get("max_boxes", 0), record.get("loss", "bce"), record.get("features"), Path(weights),
                     torch.device(device))


def encode_text(ft: FineTuned, text: str, option: str = "--question") -> list[int]:
    """[CLS] word pieces [SEP] as fine-tuning read them; a text the model would have to cut is refused."""
    pieces = ft.tokenizer.tokenize(text.strip())
    if not pieces:
        raise InferenceError(f"{option}: empty")
    limit = ft.max_seq_length - 2
    if len(pieces) > limit:
        raise InferenceError(f"{option}: {len(pieces)} word pieces, longer than the {limit} the model reads "
                             f"(max_seq_length {ft.max_seq_length}); shorten it")
    return ft.tokenizer.convert_tokens_to_ids(["[CLS]", *pieces, "[SEP]"])


def _visual(ft: FineTuned, images: Sequence[ImageFeatures]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, boxes normalised by the image size, and the box mask, padded to the most boxes."""
    n = [min(r.num_boxes, ft.max_boxes) if ft.max_boxes else r.num_boxes for r in images]
    k, dim = max(n), images[0].features.shape[1]
    feats, pos, mask = np.zeros((len(images), k, dim), np.float32), np.zeros((len(images), k, 4), np.float32), \
        np.zeros((len(images), k), np.float32)
    for i, (r, m) in enumerate(zip(images, n)):
        feats[i, :m] = r.features[:m]
        pos[i, :m] = r.boxes[:m] / np.array([r.img_w, r.img_h, r.img_w, r.img_h], np.float32)
        mask[i, :m] = 1.0
    return tuple(torch.from_numpy(a).to(ft.device) for a in (feats, pos, mask))


@torch.no_grad()
def answer(ft: FineTuned, text: str, images: Sequence[ImageFeatures], top: int = 5,
           option: str = "--question") -> Answer:
    """The model's `top` answers to `text` about `images` (one, or the benchmark's pair), with probabilities,
    and the attention of the question over each image's boxes. Boxes are the feature store's, in pixels."""
    wanted = len(ft.benchmark.image_keys)
    if len(images) != wanted:
        raise InferenceError(f"--image: {ft.benchmark.name} takes {wanted} image(s), {len(images)} given")
    ids = encode_text(ft, text, option)
    feats, pos, mask = _visual(ft, images)
    words = torch.tensor([ids] * len(images), device=ft.device)
    out = ft.model.lxmert(words, feats, pos, torch.ones_like(words), mask, torch.zeros_like(words),
                          return_vision=False, output_attentions=True)
    if wanted == 2:  # the pair head reads both pooled outputs side by side (LxmertForNLVR2)
        probs = ft.model.logit_fc(out.pooled_output.view(1, -1)).float().softmax(-1)[0]
        ranked = sorted([(True, float(probs[1])), (False, float(probs[0]))], key=lambda a: -a[1])
    else:
        logits = ft.model.answer_head(out.pooled_output).float()[0]
        probs = logits.softmax(-1) if ft.loss == "ce" else logits.sigmoid()
        best = probs.topk(min(top, len(probs)))
        ranked = [(ft.table.answer(i) if ft.table is not None else i, float(p))
                  for p, i in zip(best.values.tolist(), best.indices.tolist())]
    shares = out.cross_encoder_attentions[-1].float().mean(1)[:, 1:len(ids) - 1].mean(1)  # (images, boxes)
    attention = [shares[i, : int(mask[i].sum())].cpu().numpy() for i in range(len(images))]
    return Answer(ranked[:top], attention)
