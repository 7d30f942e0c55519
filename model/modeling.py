"""The LXMERT models: the backbone, pretraining with its five objectives, QA and NLVR2, and checkpoint I/O.

Outputs and losses are transformers' (the oracle in our tests); the differences are in speed only:
attention goes through `scaled_dot_product_attention` (layers.py), and with targets given the heads run
only where a loss needs them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .config import LxmertConfig
from .layers import (
    AnswerHead,
    Embeddings,
    Encoder,
    LMPredictionHead,
    Pooler,
    PreTrainingHeads,
    VisualObjHead,
    additive_mask,
    classifier,
)

# ----------------------------------------------------------------------------- outputs


@dataclass
class LxmertModelOutput:
    """Sequence outputs of both modalities after the last cross layer, and the pooled [CLS]."""

    language_output: Tensor
    vision_output: Tensor | None  # None when asked not to compute it (return_vision=False)
    pooled_output: Tensor
    # with output_attentions: per cross layer, the language -> vision attention probabilities
    # (B, heads, words, boxes), transformers' name and layout; rows sum to 1 over the unmasked boxes
    cross_encoder_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LxmertForPreTrainingOutput:
    """Pretraining scores and losses.

    Without `labels`, `prediction_logits` holds every position (B, L, vocab), as transformers; with
    `labels` it is None and `masked_lm_logits` holds only the labelled positions (n, vocab), in the
    row-major order of `labels >= 0`. With `ans`, `question_answering_score` holds only the rows where
    `ans >= 0`. `losses` has one entry per objective computed: mlm, matched, obj, attr, feat, qa.
    """

    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    masked_lm_logits: Tensor | None = None
    cross_relationship_score: Tensor | None = None
    question_answering_score: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LxmertForQuestionAnsweringOutput:
    """Answer logits (all rows) and, with class-index labels, their cross-entropy."""

    loss: Tensor | None = None
    question_answering_score: Tensor | None = None


@dataclass
class LxmertForNLVR2Output:
    """2-way logits per (sentence, image pair) and, with labels, their cross-entropy."""

    loss: Tensor | None = None
    logits: Tensor | None = None


# ----------------------------------------------------------------------------- losses


def mean_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy averaged over targets >= 0 (-100, and the original data's -1, are ignored); 0 if none."""
    target = target.reshape(-1)
    valid = target >= 0
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.masked_fill(~valid, -100), reduction="sum"
    )
    return total / valid.sum().clamp(min=1)


def target_rows(labels: Tensor | None = None, obj_labels: Mapping[str, tuple[Tensor, Tensor]] | None = None,
                ans: Tensor | None = None) -> dict[str, Tensor]:
    """Flat indices of the rows each pretraining loss reads: "mlm" the positions of `labels >= 0` in
    (B * L) row-major order, "qa" the rows of `ans >= 0`, and per visual key the boxes of non-zero
    weight in (B * O).

    Where the targets are built (the collate functions, on the host) this costs nothing; the network
    then gathers rows of a known count. Computed on a GPU, each boolean selection must wait for the
    device to learn its size, which stalls the host once per loss and micro-batch.
    """
    rows = {}
    if labels is not None:
        rows["mlm"] = (labels.reshape(-1) >= 0).nonzero().flatten()
    if ans is not None:
        rows["qa"] = (ans.reshape(-1) >= 0).nonzero().flatten()
    for key, (_, weight) in (obj_labels or {}).items():
        rows[key] = (weight.reshape(-1) != 0).nonzero().flatten()
    return rows


# ----------------------------------------------------------------------------- models


class LxmertPreTrainedModel(nn.Module):
    """Weight initialisation and checkpoint I/O shared by the model classes."""

    # Key prefixes of the original code's fine-tuned heads, renamed to ours on load.
    head_renames: Mapping[str, str] = {}

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def init_weights(self, *modules: nn.Module) -> None:
        """BERT initialisation: N(0, initializer_range) weights, zero biases and padding rows, unit LN."""
        std = self.config.initializer_range
        for module in (m for root in modules for m in root.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LMPredictionHead):
                nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: LxmertConfig | None = None,
        *,
        output_loading_info: bool = False,
        strict: bool = True,
        allow_fresh: Sequence[str] = (),
        **overrides: object,
    ):
        """Load a directory (ours or transformers': config.json + model.safetensors / pytorch_model.bin)
        or a weights file (an original `*_LXRT.pth`, whose sizes are read from the weights).

        `overrides` replace config fields, e.g. `num_qa_labels=3129`. The load is strict
        (`checkpoint.load_into`): a head whose shape then differs must be named in `allow_fresh`
        (e.g. `("answer_head.logit_fc.3.",)`) to keep its fresh initialisation. The config is checked
        before the weights are read. Returns the model in eval mode, and the `LoadingInfo` if asked.
        """
        weights, config_file = checkpoint.locate(path)
        if config is not None:
            config, against = dataclasses.replace(config, **overrides), "the given config"
        elif config_file is not None:
            config, against = LxmertConfig.from_json_file(config_file, **overrides), str(config_file)
        if overrides and config is not None:
            against += f" with {', '.join(sorted(overrides))} overridden"
        state = checkpoint.canonical_keys(checkpoint.read_weights(weights), cls.head_renames)
        if config is None:
            config = checkpoint.infer_config(state, source=weights, **overrides)
            against = "the sizes read from its weights"
        model = cls(config)
        info = checkpoint.load_into(model, state, weights, against=against, strict=strict, allow_fresh=allow_fresh)
        model.eval()
        return (model, info) if output_loading_info else model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors, loadable by transformers' classes of the same name."""
        checkpoint.save_directory(self, self.config, directory)


class LxmertModel(LxmertPreTrainedModel):
    """The encoder stack without heads."""

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.init_weights(self)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        return_vision: bool = True,
        output_attentions: bool = False,
    ) -> LxmertModelOutput:
        """input_ids (B, L); visual_feats (B, O, D); visual_pos (B, O, 4) boxes in [0, 1]; masks 1 = keep.

        `return_vision=False` leaves vision_output None and skips the work only it needs.
        `output_attentions` also returns which boxes each word attends to in every cross layer
        (`cross_encoder_attentions`), computed with an explicit softmax instead of the fused kernel.
        """
        lang = self.embeddings(input_ids, token_type_ids)
        attentions: list[Tensor] | None = [] if output_attentions else None
        lang, visn = self.encoder(
            lang,
            additive_mask(attention_mask, lang.dtype),
            visual_feats,
            visual_pos,
            additive_mask(visual_attention_mask, lang.dtype),
            return_vision,
            attentions,
        )
        return LxmertModelOutput(language_output=lang, vision_output=visn, pooled_output=self.pooler(lang),
                                 cross_encoder_attentions=tuple(attentions) if attentions is not None else None)


class LxmertForPreTraining(LxmertPreTrainedModel):
    """Backbone plus the five pretraining objectives: MLM, matching, object / attribute / feature, QA."""

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.lxmert = LxmertModel(config)
        self.cls = PreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = VisualObjHead(config)
        if config.task_qa:
            self.answer_head = AnswerHead(config, config.num_qa_labels)
        self.init_weights(*(m for name, m in self.named_children() if name != "lxmert"))
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        obj_labels: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        rows: Mapping[str, Tensor] | None = None,
    ) -> LxmertForPreTrainingOutput:
        """Targets: labels (B, L) word ids; obj_labels {"obj": (ids, conf), "attr": (ids, conf),
        "feat": (feats, mask)} per box; matched_label (B,) 1 = matched; ans (B,) answer ids.
        Negative ids (-100, -1) are ignored. `rows`, the `target_rows` of these targets computed where
        they were built, spares the device-to-host waits of finding them here."""
        cfg = self.config
        if rows is None:
            rows = target_rows(labels, obj_labels, ans)
        out = self.lxmert(input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                          token_type_ids)
        pooled = out.pooled_output
        losses: dict[str, Tensor] = {}

        word_logits = masked_logits = None
        if labels is None:
            word_logits = self.cls.predictions(out.language_output)
        else:
            picked = rows["mlm"]
            masked_logits = self.cls.predictions(out.language_output.flatten(0, 1).index_select(0, picked))
            if cfg.task_mask_lm:
                losses["mlm"] = mean_cross_entropy(masked_logits, labels.reshape(-1).index_select(0, picked))

        match_logits = self.cls.seq_relationship(pooled)
        if matched_label is not None and cfg.task_matched:
            losses["matched"] = mean_cross_entropy(match_logits, matched_label)

        if obj_labels is not None and cfg.task_obj_predict:
            losses.update(self.visual_losses(out.vision_output, obj_labels, rows))

        answer_logits = None
        if cfg.task_qa:
            if ans is None:
                answer_logits = self.answer_head(pooled)
            else:
                valid = rows["qa"]
                answer_logits = self.answer_head(pooled.index_select(0, valid))
                losses["qa"] = mean_cross_entropy(answer_logits, ans.reshape(-1).index_select(0, valid))

        given = any(t is not None for t in (labels, obj_labels, matched_label, ans))
        return LxmertForPreTrainingOutput(
            loss=sum(losses.values(), pooled.new_zeros((), dtype=torch.float32)) if given else None,
            prediction_logits=word_logits,
            masked_lm_logits=masked_logits,
            cross_relationship_score=match_logits,
            question_answering_score=answer_logits,
            losses=losses,
        )

    def visual_losses(self, vision_output: Tensor, obj_labels: Mapping[str, tuple[Tensor, Tensor]],
                      rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each enabled visual loss as mean over all boxes of (per-box loss x weight) x normalizer.

        Weights are detector confidences (obj, attr) or the mask of masked boxes (feat); decoders run
        only on the boxes of non-zero weight (`rows`, see `target_rows`), which leaves the mean unchanged.
        """
        head = self.obj_predict_head
        states = head.transform(vision_output).flatten(0, 1)
        losses = {}
        for key, decoder in head.decoder_dict.items():
            target, weight = obj_labels[key]
            weight = weight.reshape(-1)
            picked = rows[key]
            pred = decoder(states.index_select(0, picked)).float()
            if key == "feat":
                target = target.flatten(0, 1).index_select(0, picked).float()
                per_box = F.smooth_l1_loss(pred, target, reduction="none").mean(1)
            else:
                target = target.reshape(-1).index_select(0, picked)
                per_box = F.cross_entropy(pred, target.masked_fill(target < 0, -100), reduction="none")
            weighted = (per_box * weight.index_select(0, picked)).sum() / weight.numel()
            losses[key] = weighted * self.config.visual_loss_normalizer
        return losses


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """Backbone plus the answer head (VQA, GQA); `labels` are class indices as in transformers."""

    head_renames = {"logit_fc.": "answer_head.logit_fc."}

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.lxmert = LxmertModel(config)
        self.answer_head = AnswerHead(config, config.num_qa_labels)
        self.init_weights(self.answer_head)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> LxmertForQuestionAnsweringOutput:
        """Soft-score targets (VQA's BCE) belong to the fine-tuning code; it uses the logits."""
        if labels is not None and labels.is_floating_point():
            raise TypeError("labels are answer indices; train soft scores on question_answering_score")
        pooled = self.lxmert(input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                             token_type_ids, return_vision=False).pooled_output
        logits = self.answer_head(pooled)
        loss = mean_cross_entropy(logits, labels) if labels is not None else None
        return LxmertForQuestionAnsweringOutput(loss=loss, question_answering_score=logits)

    @torch.no_grad()
    def init_answer_head_from(
        self,
        source: str | Path | nn.Module | Mapping[str, Tensor],
        mapping: Sequence[int],
        unmapped: Literal["zero", "keep"] = "zero",
    ) -> int:
        """Start the answer head from a pretraining answer head, as the original VQA / GQA fine-tuning.

        Hidden layers are copied; output row i takes the source's row `mapping[i]`; rows with -1 are
        zeroed (the original) or keep their fresh values (`unmapped="keep"`). Returns how many rows
        were copied. `source` is a checkpoint path, a pretraining model or a state dict.
        """
        prefix = "answer_head.logit_fc."
        state = checkpoint.state_dict_of(source)
        src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not src:
            raise KeyError(f"no {prefix}* weights in the source")
        head = self.answer_head.logit_fc
        index = torch.as_tensor(list(mapping), dtype=torch.long)
        rows = src["3.weight"].shape[0]
        if index.numel() != head[3].out_features:
            raise ValueError(f"mapping has {index.numel()} entries for {head[3].out_features} answers")
        if index.numel() and (index.min() < -1 or index.max() >= rows):
            raise ValueError(f"mapping indices must lie in [-1, {rows})")
        for i in (0, 2):
            head[i].weight.copy_(src[f"{i}.weight"])
            head[i].bias.copy_(src[f"{i}.bias"])
        hit = index >= 0
        if unmapped == "zero":
            head[3].weight.zero_()
            head[3].bias.zero_()
        head[3].weight[hit] = src["3.weight"][index[hit]].to(head[3].weight)
        head[3].bias[hit] = src["3.bias"][index[hit]].to(head[3].bias)
        return int(hit.sum())


class LxmertForNLVR2(LxmertPreTrainedModel):
    """One sentence, two images: each pair goes through the shared encoder; the pooled pair is classified."""

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.lxmert = LxmertModel(config)
        h = config.hidden_size
        self.logit_fc = classifier(2 * h, 2 * h, 2)
        self.init_weights(self.logit_fc)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> LxmertForNLVR2Output:
        """visual_feats (B, 2, O, D), visual_pos (B, 2, O, 4), visual_attention_mask (B, 2, O)."""

        def per_image(t: Tensor | None) -> Tensor | None:  # sentence b is paired with images 2b, 2b+1
            return None if t is None else t.repeat_interleave(2, dim=0)

        pooled = self.lxmert(
            per_image(input_ids),
            visual_feats.flatten(0, 1),
            visual_pos.flatten(0, 1),
            per_image(attention_mask),
            None if visual_attention_mask is None else visual_attention_mask.flatten(0, 1),
            per_image(token_type_ids),
            return_vision=False,
        ).pooled_output
        logits = self.logit_fc(pooled.view(input_ids.shape[0], -1))
        loss = mean_cross_entropy(logits, labels) if labels is not None else None
        return LxmertForNLVR2Output(loss=loss, logits=logits)
