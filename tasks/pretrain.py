"""LXMERT pretraining: the corpus x feature-store dataset, the five objectives' targets, the CLI.

One example is one (image, sentence) pair of the corpus. Its randomness (masking, mismatching,
answer sampling) comes from a generator seeded by (seed, epoch, example index), so examples are
the same whichever DataLoader worker builds them, and a resumed run sees the batches an
uninterrupted one would. The corpus is held as a few flat numpy arrays and the features are read
lazily from HDF5, so memory does not grow with the number of images; tokenisation and masking
run in the DataLoader workers.

    torchrun --nproc_per_node 4 -m tasks.pretrain --config pretrain.json
"""
from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from extractor.jsonstream import DataFormatError, iter_array, write_json_atomic
from extractor.progress import ProgressFn, launched_progress
from extractor.store import FeatureReader, ImageFeatures
from model.modeling import target_rows
from tasks.data.answers import PRETRAIN_QA_SOURCES, AnswerTable, convert_label, default_pretrain_table
from tasks.data.batches import IGNORE, model_inputs, pad
from tasks.data.features import locate_images, open_stores, read_image
from tasks.data.tokenization import load_tokenizer, tokenizer_tokens, vocab_beside
from tasks.training.distributed import DistEnv, all_reduce_sum, run_command, start_run
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
from tasks.training.weights import export_with_vocab, fit_vocab, load_weights, network_config, read_init

SOURCES = ("mscoco", "vg", "vqa", "gqa", "visual7w")
# Sources whose sentences are captions (every source but the QA ones); the others are questions. The matching
# accuracy is also reported per kind: a question of another image ("Is there a red circle?") can often
# be asked of this image too, while a caption of another image is rarely true of it, so the two kinds
# tell how much of the accuracy is grounding and how much the sentences allow.
CAPTION_SOURCES = tuple(s for s in SOURCES if s not in PRETRAIN_QA_SOURCES)  # mscoco, vg
OBJECTIVES = ("mlm", "matched", "obj", "attr", "feat", "qa")  # their switches, and the loss parts logged
MATCHING_KINDS = ("captions", "questions")
MISMATCH_RATE = 0.5  # share of sentences paired with another image while the matching objective is on


# ----------------------------------------------------------------------------- pure target builders

def mask_tokens(ids: np.ndarray, rng: np.random.Generator, rate: float, vocab_size: int,
                mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT word masking: each token is chosen with probability `rate`; a chosen token becomes
    [MASK] (80%), a uniformly random vocabulary id (10%) or stays (10%), and is the only kind of
    position with a label (its original id); every other label is IGNORE.
    """
    draw = rng.random(len(ids))
    chosen = draw < rate
    sub = draw / rate if rate > 0 else draw
    out = ids.copy()
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[chosen] = ids[chosen]
    out[chosen & (sub < 0.8)] = mask_id
    replace = chosen & (sub >= 0.8) & (sub < 0.9)
    out[replace] = rng.integers(0, vocab_size, int(replace.sum()))
    return out, labels


def mask_features(feats: np.ndarray, rng: np.random.Generator, rate: float,
                  draw_other: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Object masking: each box is chosen with probability `rate`; a chosen box's feature is
    zeroed (80%), replaced by `draw_other`'s feature from another image (10%) or kept (10%).
    Returns the masked features and the float mask of chosen boxes (the feat-regression weight).
    """
    draw = rng.random(len(feats))
    chosen = draw < rate
    sub = draw / rate if rate > 0 else draw
    out = feats.copy()
    out[chosen & (sub < 0.8)] = 0
    other = chosen & (sub >= 0.8) & (sub < 0.9)
    if other.any():
        out[other] = draw_other(int(other.sum()))
    return out, chosen.astype(np.float32)


def sample_answer(labels: np.ndarray, scores: np.ndarray, rng: np.random.Generator) -> int:
    """One answer label drawn with probability proportional to its soft score (IGNORE if none)."""
    total = float(scores.sum()) if len(scores) else 0.0
    if total <= 0:
        return IGNORE
    if len(labels) == 1:
        return int(labels[0])
    return int(rng.choice(labels, p=scores / total))


# ----------------------------------------------------------------------------- corpus

@dataclass
class CorpusStats:
    """Counts reported after reading a corpus (images without features are skipped, not fatal)."""

    images: int = 0
    examples: int = 0
    labelled: int = 0
    skipped_images: list[str] = field(default_factory=list)


class PretrainCorpus:
    """The pretraining corpus as flat arrays: one row per (image, sentence), answers pre-mapped.

    Built by streaming the corpus JSON files (`[{img_id, sentf, labelf}]`), keeping only images
    present in one of the feature files; no Python object per sentence survives the build.
    """

    def __init__(self, paths: Sequence[str | Path], stores: Sequence[FeatureReader],
                 table: AnswerTable, sources: Sequence[str] | None = None) -> None:
        where = locate_images(stores)
        self.sources = tuple(sources or SOURCES)
        self.stats = CorpusStats()
        img_ids: list[str] = []
        # array.array keeps one machine value per entry while streaming (no Python int objects)
        img_store, img_row = array("h"), array("i")
        ex_img, ex_src, ex_idx = array("i"), array("b"), array("i")
        sent_bytes, sent_off = bytearray(), array("q", [0])
        lab_off, lab_ids, lab_scores = array("q", [0]), array("i"), array("f")
        for path in paths:
            for rec_no, rec in enumerate(iter_array(path)):
                self._check_record(rec, path, rec_no)
                img_id = rec["img_id"]
                if img_id not in where:
                    self.stats.skipped_images.append(img_id)
                    continue
                image = len(img_ids)
                img_ids.append(img_id)
                img_store.append(where[img_id][0])
                img_row.append(where[img_id][1])
                for source, sents in rec["sentf"].items():
                    if source not in self.sources:
                        raise DataFormatError(f"{path}: record {rec_no}: unknown source {source!r}, "
                                              f"expected one of {self.sources}")
                    labels = rec.get("labelf", {}).get(source)
                    if labels is not None and len(labels) != len(sents):
                        raise DataFormatError(f"{path}: record {rec_no} ({img_id}): labelf[{source!r}] has "
                                              f"{len(labels)} entries for {len(sents)} sentences")
                    for i, sent in enumerate(sents):
                        ex_img.append(image)
                        ex_src.append(self.sources.index(source))
                        ex_idx.append(i)
                        sent_bytes += sent.strip().encode("utf-8")
                        sent_off.append(len(sent_bytes))
                        if labels is not None:
                            converted = convert_label(labels[i], table)
                            for ans, score in converted.items():
                                lab_ids.append(table.label(ans))
                                lab_scores.append(score)
                            self.stats.labelled += bool(converted)
                        lab_off.append(len(lab_ids))
        self.img_ids = np.array(img_ids, dtype=np.bytes_) if img_ids else np.zeros(0, dtype="S1")
        self.img_store, self.img_row = np.array(img_store), np.array(img_row)
        self.ex_img, self.ex_src, self.ex_idx = np.array(ex_img), np.array(ex_src), np.array(ex_idx)
        self.sent_bytes = np.frombuffer(bytes(sent_bytes), dtype=np.uint8)
        self.sent_off = np.array(sent_off)
        self.lab_off, self.lab_ids = np.array(lab_off), np.array(lab_ids)
        self.lab_scores = np.array(lab_scores)
        self.stats.images, self.stats.examples = len(img_ids), len(self.ex_img)

    @staticmethod
    def _check_record(rec: Any, path: str | Path, rec_no: int) -> None:
        if not isinstance(rec, dict) or not isinstance(rec.get("img_id"), str) \
                or not isinstance(rec.get("sentf"), dict):
            raise DataFormatError(f"{path}: record {rec_no}: expected {{img_id, sentf, labelf}}")

    def __len__(self) -> int:
        return len(self.ex_img)

    def sentence(self, i: int) -> str:
        return self.sent_bytes[self.sent_off[i]:self.sent_off[i + 1]].tobytes().decode("utf-8")

    def label(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Answer labels (pretraining-table ids) and soft scores of example i (empty if none)."""
        a, b = self.lab_off[i], self.lab_off[i + 1]
        return self.lab_ids[a:b], self.lab_scores[a:b]

    def image_id(self, image: int) -> str:
        return self.img_ids[image].decode("utf-8")

    def uid(self, i: int) -> str:
        """The original code's example id: <img_id>_<source>_<sentence index>."""
        return f"{self.image_id(int(self.ex_img[i]))}_{self.sources[self.ex_src[i]]}_{self.ex_idx[i]:03d}"


# ----------------------------------------------------------------------------- dataset

class PretrainDataset(Dataset):
    """Masked (image, sentence) examples with every pretraining target; see the module docstring."""

    def __init__(self, corpus: PretrainCorpus, stores: Sequence[FeatureReader], tokenizer: Any,
                 cfg: PretrainConfig, seed: int) -> None:
        self.mismatch_rate = MISMATCH_RATE if cfg.matched else 0.0
        if self.mismatch_rate > 0 and corpus.stats.images < 2:
            raise ValueError("corpus: the matching objective needs sentences of at least two images")
        self.corpus, self.stores, self.tokenizer = corpus, list(stores), tokenizer
        self.cfg, self.seed, self.epoch = cfg, seed, 0
        self.vocab_size = len(tokenizer.vocab)
        self.special = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose masks are drawn (the loop calls this before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.corpus)

    def _image(self, image: int) -> ImageFeatures:
        c = self.corpus
        return read_image(self.stores, int(c.img_store[image]), int(c.img_row[image]), self.cfg.max_boxes)

    def _other_example(self, i: int, rng: np.random.Generator) -> int:
        """A uniformly drawn example of another image (the mismatched sentence's source)."""
        own = self.corpus.ex_img[i]
        while True:
            j = int(rng.integers(len(self.corpus)))
            if self.corpus.ex_img[j] != own:
                return j

    def __getitem__(self, i: int) -> dict[str, Any]:
        c, m = self.corpus, self.cfg
        rng = np.random.default_rng([self.seed, 0 if m.static_masks else self.epoch, i])
        matched = 1
        sent_i = i
        if self.mismatch_rate > 0 and rng.random() < self.mismatch_rate:
            matched, sent_i = 0, self._other_example(i, rng)
        cls_id, sep_id, mask_id = self.special
        tokens = self.tokenizer.tokenize(c.sentence(sent_i))[: m.max_seq_length - 2]
        word_ids = np.asarray(self.tokenizer.convert_tokens_to_ids(tokens), dtype=np.int64)
        word_ids, word_labels = mask_tokens(word_ids, rng, m.word_mask_rate, self.vocab_size, mask_id)
        input_ids = np.concatenate([[cls_id], word_ids, [sep_id]]).astype(np.int64)
        labels = np.concatenate([[IGNORE], word_labels, [IGNORE]]).astype(np.int64)

        rec = self._image(int(c.ex_img[i]))
        other_image = int(c.ex_img[self._other_example(i, rng)]) if m.obj_mask_rate > 0 else -1

        def draw_other(n: int) -> np.ndarray:
            other = self._image(other_image).features
            return other[rng.integers(0, len(other), n)]

        feats, feat_mask = mask_features(rec.features, rng, m.obj_mask_rate, draw_other)
        ans = IGNORE
        if matched:
            ans = sample_answer(*c.label(i), rng)
        return {"id": c.uid(i), "input_ids": input_ids, "labels": labels, "visual_feats": feats,
                "visual_pos": rec.boxes.astype(np.float32), "obj_ids": rec.objects_id.astype(np.int64),
                "obj_conf": rec.objects_conf.astype(np.float32), "attr_ids": rec.attrs_id.astype(np.int64),
                "attr_conf": rec.attrs_conf.astype(np.float32), "feat_target": rec.features,
                "feat_mask": feat_mask, "matched": matched, "ans": ans, "index": i, "shown": sent_i}


def collate_pretrain(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad words to the longest sentence and boxes to the most boxes of the batch.

    Padded boxes get zero confidence and zero feature mask, so they weigh nothing in the visual
    losses. A batch with no masked word or no answer label carries None for that target, so the
    loss is skipped instead of averaging over nothing. `target_rows` holds the rows each loss reads,
    found here on the host so that the network never waits for a GPU to find them.
    """
    n_words = max(len(e["input_ids"]) for e in examples)
    n_boxes = max(len(e["visual_feats"]) for e in examples)
    feat_dtype = torch.from_numpy(examples[0]["visual_feats"][:0]).dtype
    ids = pad([e["input_ids"] for e in examples], n_words, torch.long)
    labels = pad([e["labels"] for e in examples], n_words, torch.long, value=IGNORE)
    ans = torch.tensor([e["ans"] for e in examples], dtype=torch.long)
    batch = {
        "ids": [e["id"] for e in examples],
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "shown": torch.tensor([e["shown"] for e in examples], dtype=torch.long),
        "input_ids": ids,
        "attention_mask": pad([np.ones(len(e["input_ids"]), np.int64) for e in examples], n_words, torch.long),
        "token_type_ids": torch.zeros_like(ids),
        "visual_feats": pad([e["visual_feats"] for e in examples], n_boxes, feat_dtype),
        "visual_pos": pad([e["visual_pos"] for e in examples], n_boxes, torch.float32),
        "visual_attention_mask": pad([np.ones(len(e["visual_feats"]), np.float32) for e in examples],
                                     n_boxes, torch.float32),
        "labels": labels if bool((labels != IGNORE).any()) else None,
        "obj_labels": {
            "obj": (pad([e["obj_ids"] for e in examples], n_boxes, torch.long),
                    pad([e["obj_conf"] for e in examples], n_boxes, torch.float32)),
            "attr": (pad([e["attr_ids"] for e in examples], n_boxes, torch.long),
                     pad([e["attr_conf"] for e in examples], n_boxes, torch.float32)),
            "feat": (pad([e["feat_target"] for e in examples], n_boxes, feat_dtype),
                     pad([e["feat_mask"] for e in examples], n_boxes, torch.float32)),
        },
        "matched_label": torch.tensor([e["matched"] for e in examples], dtype=torch.long),
        "ans": ans if bool((ans != IGNORE).any()) else None,
    }
    batch["target_rows"] = target_rows(batch["labels"], batch["obj_labels"], batch["ans"])
    return batch


# ----------------------------------------------------------------------------- config and model

@dataclass
class PretrainConfig:
    """Everything `python -m tasks.pretrain` needs; `train` holds the loop's settings."""

    corpus: list[str] = field(default_factory=list)          # corpus JSON files (LXMERT's format)
    features: list[str] = field(default_factory=list)        # HDF5 feature files covering their images
    valid_corpus: list[str] = field(default_factory=list)    # held-out corpus for per-epoch valid losses
    valid_examples: int = 0                                  # cap on valid examples (0: all)
    vocab: str | None = None                                 # tokenizer directory (default: offline BERT)
    model: str = "base"                                      # preset (base, small, tiny) or config.json path
    init_from: str | None = None                             # weights to start from (any format we read)
    allow_fresh: list[str] = field(default_factory=list)     # key prefixes init_from may leave fresh (e.g. a
                                                             # head it lacks); loading is strict otherwise
    dropout: float | None = None                             # override the model's dropout (None: keep)
    mlm: bool = True
    matched: bool = True
    obj: bool = True
    attr: bool = True
    feat: bool = True
    qa: bool = True
    qa_from_epoch: int = 0                                   # the paper: 10 (of 20); the public code: 0
    answers: str | None = None                               # answer table [{ans, dsets}] (default: the 9500)
    qa_sets: list[str] = field(default_factory=list)         # restrict the answer table to these QA sources
    word_mask_rate: float = 0.15
    obj_mask_rate: float = 0.15
    static_masks: bool = False                               # same masks every epoch (LXMERT: redrawn)
    max_seq_length: int = 20
    max_boxes: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/pretrain", epochs=20,
                                                                   batch_size=256, lr=1e-4,
                                                                   warmup_ratio=0.05, clip_grad_norm=1.0))

    def validate(self) -> None:
        """Errors name the parameter; checked before any data is read."""
        if not self.corpus:
            raise ValueError("corpus: at least one corpus JSON file is required")
        if not self.features:
            raise ValueError("features: at least one HDF5 feature file is required")
        for name in ("corpus", "features", "valid_corpus"):
            for p in getattr(self, name):
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{name}: no file at {p}")
        if self.answers and not Path(self.answers).is_file():
            raise FileNotFoundError(f"answers: no file at {self.answers}")
        if not any(getattr(self, o) for o in OBJECTIVES):
            raise ValueError("objectives: every objective (mlm, matched, obj, attr, feat, qa) is off")
        for name in ("word_mask_rate", "obj_mask_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length: must be >= 3, got {self.max_seq_length}")
        self.train.validate()


def model_config(cfg: PretrainConfig, feature_dim: int, num_answers: int, base: Any = None) -> Any:
    """The network's config: `base` (a checkpoint's) or the `model` preset / file, with the
    objective switches, data sizes and dropout of this run applied."""
    config = network_config(base, cfg.model, feature_dim, cfg.dropout)
    config.num_qa_labels = num_answers
    config.task_mask_lm, config.task_matched, config.task_qa = cfg.mlm, cfg.matched, cfg.qa
    config.task_obj_predict = cfg.obj or cfg.attr or cfg.feat
    config.visual_obj_loss, config.visual_attr_loss, config.visual_feat_loss = cfg.obj, cfg.attr, cfg.feat
    return config


def detector_label_counts(stores: Sequence[FeatureReader]) -> tuple[int, int] | None:
    """(object classes, attributes) of the detector that wrote every feature file, when the files
    record it (our extractor does) and agree; None otherwise."""
    counts = set()
    for store in stores:
        det = store.attrs.get("detector_config")
        if not isinstance(det, dict) or not det.get("num_classes") or not det.get("num_attributes"):
            return None
        counts.add((int(det["num_classes"]), int(det["num_attributes"])))
    return counts.pop() if len(counts) == 1 else None


def build_model(cfg: PretrainConfig, feature_dim: int, num_answers: int, vocab_size: int | None = None,
                labels: tuple[int, int] | None = None) -> nn.Module:
    """A fresh pretraining network (the original trains from scratch), or one continuing init_from.

    A fresh network is sized for its data: the word embedding for the tokenizer (`vocab_size`) and
    the object / attribute heads for the detector's label sets (`labels`; 1600 / 400 with the Visual
    Genome detector, 7 / 9 with the demo's), so no logits are computed for labels that cannot occur.
    """
    from model import LxmertForPreTraining

    state, base = read_init(cfg.init_from, cfg.model)
    config = model_config(cfg, feature_dim, num_answers, base)
    if vocab_size is not None:
        fit_vocab(config, vocab_size, bool(cfg.init_from), cfg.init_from or "model")
    if not cfg.init_from:
        if labels is not None:
            config.num_object_labels, config.num_attr_labels = labels
        return LxmertForPreTraining(config)
    model = LxmertForPreTraining(config)
    load_weights(model, state, cfg.init_from, cfg.allow_fresh)
    return model


# ----------------------------------------------------------------------------- step and evaluation

def targets(batch: dict[str, Any], cfg: PretrainConfig, epoch: int) -> dict[str, Any]:
    """The objective targets to hand the network: switched-off objectives get None."""
    obj = batch["obj_labels"]
    visual = None
    if cfg.obj or cfg.attr or cfg.feat:
        feats, mask = obj["feat"]
        visual = {"obj": obj["obj"], "attr": obj["attr"], "feat": (feats.float(), mask)}
    return {"labels": batch["labels"] if cfg.mlm else None,
            "obj_labels": visual,
            "matched_label": batch["matched_label"] if cfg.matched else None,
            "ans": batch["ans"] if cfg.qa and epoch >= cfg.qa_from_epoch else None}


def make_step(cfg: PretrainConfig) -> StepFn:
    """The loop's step function: forward with targets, the total loss and each objective's part."""
    def step(model: nn.Module, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
        out = model(**model_inputs(batch), **targets(batch, cfg, ctx.epoch), rows=batch["target_rows"])
        return StepOutput(out.loss, dict(getattr(out, "losses", None) or {}))
    return step


@torch.no_grad()
def evaluate(model: nn.Module, dataset: PretrainDataset, indices: Sequence[int], cfg: PretrainConfig,
             env: DistEnv, batch_size: int, epoch: int) -> dict[str, float]:
    """Mean losses of the objectives trained at `epoch`, the matching accuracy (the matching head's
    argmax against matched / mismatched, over every pair, and over the pairs showing a caption or a
    question: CAPTION_SOURCES) and the QA score (soft score of the predicted answer over matched
    labelled pairs) on held-out examples with fixed masks; every rank takes a shard and the sums
    are reduced."""
    model.eval()
    dataset.set_epoch(0)
    shard = [int(i) for i in indices[env.rank::env.world_size]]
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                        num_workers=cfg.train.num_workers, collate_fn=collate_pretrain,
                        generator=epoch_generator(cfg.train.seed, 0, env.rank))
    names = ["loss", *OBJECTIVES, "matched_accuracy", *(f"matched_accuracy_{k}" for k in MATCHING_KINDS),
             "qa_score"]
    captions = [k for k, source in enumerate(dataset.corpus.sources) if source in CAPTION_SOURCES]
    sums = torch.zeros(len(names), dtype=torch.float64, device=env.device)
    counts = torch.zeros(len(names), dtype=torch.float64, device=env.device)
    qa_hits, qa_rows = 0.0, 0  # summed on the host: the rows and example indices come from the host batch
    for host in loader:
        batch = to_device(host, env.device)
        given = targets(batch, cfg, epoch)
        with autocast(cfg.train.amp, env.device):
            out = model(**model_inputs(batch), **given, rows=batch["target_rows"])
        n = len(batch["ids"])
        sums[0] += out.loss.double() * n
        counts[0] += n
        for k, value in (getattr(out, "losses", None) or {}).items():
            if k in OBJECTIVES:
                sums[names.index(k)] += value.double() * n
                counts[names.index(k)] += n
        if given["matched_label"] is not None:
            hits = out.cross_relationship_score.argmax(-1) == given["matched_label"]
            sums[names.index("matched_accuracy")] += hits.sum().double()
            counts[names.index("matched_accuracy")] += n
            # the kind of the sentence shown (for a mismatched pair, the other image's sentence)
            caption = torch.from_numpy(np.isin(dataset.corpus.ex_src[host["shown"].numpy()], captions))
            for kind, rows in zip(MATCHING_KINDS, (caption, ~caption)):
                rows = rows.to(hits.device)
                sums[names.index(f"matched_accuracy_{kind}")] += (hits & rows).sum().double()
                counts[names.index(f"matched_accuracy_{kind}")] += rows.sum().double()
        if given["ans"] is not None:
            # with targets the network scores only rows with an answer (matched, labelled pairs)
            rows = host["target_rows"]["qa"].tolist()
            preds = out.question_answering_score.argmax(-1).tolist()  # one copy to the host per batch
            for row, pred in zip(rows, preds):
                answers, scores = dataset.corpus.label(int(host["index"][row]))
                hit = scores[answers == pred]
                qa_hits += float(hit[0]) if len(hit) else 0.0
                qa_rows += 1
    sums[-1], counts[-1] = qa_hits, qa_rows
    all_reduce_sum(env, sums, counts)
    return {f"valid_{k}": float(sums[i] / counts[i]) for i, k in enumerate(names) if counts[i] > 0}


# ----------------------------------------------------------------------------- entry point

def pretrain_table(path: str | None, qa_sets: Sequence[str] = ()) -> AnswerTable:
    """The QA head's answer table: a [{ans, dsets}] file or the released 9500, maybe restricted."""
    table = AnswerTable.load_pretrain(path) if path else default_pretrain_table()
    return table.subset(qa_sets) if qa_sets else table


def valid_evaluation(cfg: PretrainConfig, stores: Sequence[FeatureReader], tokenizer: Any, table: AnswerTable,
                     env: DistEnv) -> Callable[[nn.Module, int], dict[str, float]]:
    """The loop's eval_fn: `evaluate` on the valid corpus (at most `valid_examples`, a fixed sample)."""
    valid_set = PretrainDataset(PretrainCorpus(cfg.valid_corpus, stores, table), stores, tokenizer, cfg,
                                cfg.train.seed + 1)
    indices = np.arange(len(valid_set))
    if cfg.valid_examples:
        shuffled = np.random.default_rng(cfg.train.seed).permutation(indices)
        indices = np.sort(shuffled[: cfg.valid_examples])
    micro = max(cfg.train.batch_size // (env.world_size * cfg.train.grad_accum), 1)

    def eval_fn(model: nn.Module, epoch: int) -> dict[str, float]:
        return evaluate(model, valid_set, indices, cfg, env, micro, epoch)

    return eval_fn


def run(cfg: PretrainConfig, env: DistEnv | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Pretrain as `cfg` says; writes the run's outputs under cfg.train.output_dir and returns
    the metrics also written to metrics.json (rank 0). `on_progress`: see training.loop.train."""
    env, out = start_run(cfg, env)
    table = pretrain_table(cfg.answers, cfg.qa_sets)
    if env.is_main:
        table.save_pretrain(out / "answers.json")  # the QA head's rows, for fine-tuning
    stores = open_stores(cfg.features)
    tokenizer = load_tokenizer(cfg.vocab or vocab_beside(cfg.init_from))
    corpus = PretrainCorpus(cfg.corpus, stores, table)
    if len(corpus) == 0:
        raise ValueError(f"corpus: no sentence of {cfg.corpus} has an image in {cfg.features}")
    train_set = PretrainDataset(corpus, stores, tokenizer, cfg, cfg.train.seed)
    eval_fn = valid_evaluation(cfg, stores, tokenizer, table, env) if cfg.valid_corpus else None
    model = build_model(cfg, stores[0].feature_dim, len(table), len(tokenizer.vocab),
                        detector_label_counts(stores))
    result = train(model, train_set, cfg.train, collate_fn=collate_pretrain, step_fn=make_step(cfg),
                   export_fn=export_with_vocab(tokenizer_tokens(tokenizer)),
                   loss_names=OBJECTIVES, eval_fn=eval_fn,
                   best_metric=("valid_loss", "min") if eval_fn else None,
                   extra={"model_config": model.config.to_dict()}, env=env, on_progress=on_progress)
    metrics = {"step": result.step, "epoch": result.epoch, "amp": result.amp, "train": result.last_losses,
               "evals": result.evals, "best": result.best,
               "corpus": {"images": corpus.stats.images, "examples": corpus.stats.examples,
                          "labelled": corpus.stats.labelled,
                          "skipped_images": len(corpus.stats.skipped_images)}}
    if env.is_main:
        write_json_atomic(out / "metrics.json", metrics, indent=2)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.pretrain [--config cfg.json] [--flag value ...]`, also under torchrun."""
    cfg = parse_config(PretrainConfig, argv, prog="python -m tasks.pretrain",
                       description="LXMERT pretraining with the five objectives")
    return run_command(cfg, lambda c, e: run(c, e, launched_progress()),
                       lambda m: {"step": m["step"], "train": m["train"]})


if __name__ == "__main__":
    sys.exit(main())
