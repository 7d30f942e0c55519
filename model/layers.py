"""Building blocks of LXMERT: embeddings, SDPA attention, the three kinds of layers, and the heads.

Module and parameter names follow transformers' LXMERT (itself the original code's names), so state
dicts load both ways.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LxmertConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
LN_EPS = 1e-12


# ----------------------------------------------------------------------------- building blocks


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, K) 1 = attend / 0 = padding -> (B, 1, 1, K) added to the scores, transformers' values."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def compute_dtype_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An fp32 additive mask in the dtype attention runs in under autocast (bf16, fp16), kept finite.

    fp32's lowest value rounds to -inf in bf16 and fp16, and a row whose keys are all masked (an image
    without boxes) then attends to nothing (zeros, or NaN in some kernels) instead of uniformly, as
    in fp32. Half the dtype's lowest value stays finite, still zeroes every masked key, and leaves room
    to add a score in fp16 without overflowing.
    """
    return mask.clamp(min=torch.finfo(dtype).min / 2).to(dtype)


_FAST_CPU_DROPOUT = True


def set_fast_cpu_dropout(enabled: bool) -> bool:
    """Switch the CPU speed path on or off: 16-bit dropout keep-masks (below) and, in training, attention
    through an explicit softmax instead of SDPA (`Attention`); returns the previous setting. On, the
    default, a small model's CPU training step is 10-20% faster with dropout, and 1.87x without it in
    bf16; off, dropout and attention use torch's native kernels on CPU too, which draw other masks
    from the same seed."""
    global _FAST_CPU_DROPOUT
    previous, _FAST_CPU_DROPOUT = _FAST_CPU_DROPOUT, bool(enabled)
    return previous


def _fast_cpu_path(x: Tensor) -> bool:
    """Whether dropout on `x` takes the 16-bit CPU path: switched on, on CPU, eager (torch.compile
    understands only the native kernel)."""
    return _FAST_CPU_DROPOUT and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _cpu_keep_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A Bernoulli(1 - p) keep-mask for `x` from 16-bit uniform draws, four per 64-bit draw of the
    CPU generator, and the scale that keeps E[output] = x.

    The CPU generator makes one draw per element for `bernoulli_` (about 10 ns each, on the two
    cores 10-20% of a small model's training step); four 16-bit draws per call are 4x faster. The
    drop rate is p rounded to a multiple of 1 / 65536 (0.1 -> 0.100006) and the scale uses that
    rounded rate, so the output stays unbiased. Seeded by torch.manual_seed like any dropout.
    """
    n = x.numel()
    threshold = round(p * 65536)
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform16 = draws.view(torch.int16)[:n].view(x.shape)  # each uniform on [-32768, 32767]
    return uniform16 >= threshold - 32768, 65536 / (65536 - threshold)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: the native fused kernel, or on the CPU speed path (`set_fast_cpu_dropout`)
    the 16-bit keep-mask above."""
    if not training or p == 0:
        return x
    if p >= 1 or not _fast_cpu_path(x):
        return torch.native_dropout(x, p, True)[0]
    keep, scale = _cpu_keep_mask(x, p)
    return x * (keep * scale).to(x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout with the same keep-mask distribution and 1 / (1 - p) scale, drawn faster (see
    `dropout`): the native fused kernel instead of F.dropout's separate passes, and on CPU 16-bit
    draws instead of one generator call per element."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (padding_idx 0 as the original)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(h, eps=LN_EPS)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class VisualEmbeddings(nn.Module):
    """Object embedding: the mean of LayerNorm(W_f feature) and LayerNorm(W_p box), then dropout."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.visn_fc = nn.Linear(config.visual_feat_dim, h)
        self.visn_layer_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.box_fc = nn.Linear(config.visual_pos_dim, h)
        self.box_layer_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        dtype = self.visn_fc.weight.dtype  # features often arrive as float16 from the store
        x = self.visn_layer_norm(self.visn_fc(feats.to(dtype)))
        y = self.box_layer_norm(self.box_fc(boxes.to(dtype)))
        return self.dropout((x + y) / 2)


def explicit_attention(q: Tensor, p: float) -> bool:
    """Whether attention on the CPU speed path takes an explicit softmax instead of SDPA: with dropout
    (SDPA's CPU kernel draws its mask one generator call per element; `dropout`'s 16-bit mask instead),
    and in bf16 where a backward follows (SDPA's CPU backward in bf16 makes a demo training step 1.87x
    slower; in fp32 and without a backward the two are within 5%: bench/attention_path.py)."""
    if not _fast_cpu_path(q):
        return False
    return p > 0 or (q.dtype == torch.bfloat16 and torch.is_grad_enabled() and q.requires_grad)


class Attention(nn.Module):
    """Multi-head attention of `x` over `context`: scaled_dot_product_attention, or on the CPU speed path
    (`set_fast_cpu_dropout`) an explicit softmax where dropout is drawn or a bf16 backward follows."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob

    def split_heads(self, t: Tensor) -> Tensor:
        """(B, N, H) -> (B, heads, N, H / heads)."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None,
                output_attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The attended values (B, N, H); with `output_attentions`, also the attention probabilities
        (B, heads, N, context length) they were computed with (before attention dropout)."""
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(context))
        v = self.split_heads(self.value(context))
        if mask is not None and mask.dtype != q.dtype:
            mask = compute_dtype_mask(mask, q.dtype)
        p = self.dropout_p if self.training else 0.0
        probs = None
        if output_attentions or explicit_attention(q, p):
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(-1)
            y = (dropout(probs, p, True) if p > 0 else probs) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).flatten(2)
        return (y, probs) if output_attentions else y


class AddNorm(nn.Module):
    """BERT's post-LN sub-layer end: project, dropout, add the residual, LayerNorm."""

    def __init__(self, config: LxmertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class SelfAttentionBlock(nn.Module):
    """Self-attention sub-layer; `self` is the attention's name in the original and transformers."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.self = Attention(config)
        self.output = AddNorm(config, config.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, x, mask), x)


class CrossAttentionBlock(nn.Module):
    """Cross-attention sub-layer: queries from `x`, keys and values from the other modality."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.att = Attention(config)
        self.output = AddNorm(config, config.hidden_size)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None,
                output_attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not output_attentions:
            return self.output(self.att(x, context, context_mask), x)
        y, probs = self.att(x, context, context_mask, output_attentions=True)
        return self.output(y, x), probs


class Intermediate(nn.Module):
    """First half of the feed-forward: expand and activate."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """A BERT layer (self-attention, feed-forward): the language and object-relationship encoders."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.attention = SelfAttentionBlock(config)
        self.intermediate = Intermediate(config)
        self.output = AddNorm(config, config.intermediate_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class CrossLayer(nn.Module):
    """Cross-modality layer: bi-directional cross-attention (one shared module), then per-modality
    self-attention and feed-forward."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visual_attention = CrossAttentionBlock(config)
        self.lang_self_att = SelfAttentionBlock(config)
        self.visn_self_att = SelfAttentionBlock(config)
        self.lang_inter = Intermediate(config)
        self.lang_output = AddNorm(config, config.intermediate_size)
        self.visn_inter = Intermediate(config)
        self.visn_output = AddNorm(config, config.intermediate_size)

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        vision: bool = True,
        attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Both directions read this layer's inputs; `vision=False` skips the vision branch. Given a
        list, `attentions` gets the language -> vision attention probabilities (B, heads, L, O)."""
        if attentions is None:
            new_lang = self.visual_attention(lang, visn, visn_mask)
        else:
            new_lang, probs = self.visual_attention(lang, visn, visn_mask, output_attentions=True)
            attentions.append(probs)
        new_lang = self.lang_self_att(new_lang, lang_mask)
        new_lang = self.lang_output(self.lang_inter(new_lang), new_lang)
        if not vision:
            return new_lang, None
        new_visn = self.visual_attention(visn, lang, lang_mask)
        new_visn = self.visn_self_att(new_visn, visn_mask)
        new_visn = self.visn_output(self.visn_inter(new_visn), new_visn)
        return new_lang, new_visn


class Encoder(nn.Module):
    """Object embedding, then language layers, object-relationship layers, cross-modality layers."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = VisualEmbeddings(config)
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.l_layers))
        self.x_layers = nn.ModuleList(CrossLayer(config) for _ in range(config.x_layers))
        self.r_layers = nn.ModuleList(Layer(config) for _ in range(config.r_layers))

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visual_feats: Tensor,
        visual_pos: Tensor,
        visn_mask: Tensor | None = None,
        return_vision: bool = True,
        attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`return_vision=False` skips the last cross layer's vision branch: nothing but the vision
        output reads it, so models that use only the pooled [CLS] (QA, NLVR2) need not run it.
        Given a list, `attentions` gets each cross layer's language -> vision attention probabilities."""
        visn = self.visn_fc(visual_feats, visual_pos)
        for layer in self.layer:
            lang = layer(lang, lang_mask)
        for layer in self.r_layers:
            visn = layer(visn, visn_mask)
        last = len(self.x_layers) - 1
        for i, layer in enumerate(self.x_layers):
            lang, visn = layer(lang, lang_mask, visn, visn_mask, vision=return_vision or i < last,
                               attentions=attentions)
        return lang, visn


class Pooler(nn.Module):
    """tanh(Linear) of the language [CLS] output."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, lang: Tensor) -> Tensor:
        return torch.tanh(self.dense(lang[:, 0]))


# ----------------------------------------------------------------------------- heads


class HeadTransform(nn.Module):
    """Dense, activation, LayerNorm: shared by the word and object prediction heads."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Masked-word logits; `decoder.weight` is tied to the word embeddings, the bias is its own."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = HeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.transform(x), self.decoder.weight, self.bias)


class PreTrainingHeads(nn.Module):
    """`cls`: masked-word head and the image-sentence matching classifier."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.predictions = LMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class VisualObjHead(nn.Module):
    """Per-box object / attribute logits and feature regression, one decoder per enabled loss."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = HeadTransform(config)
        sizes = {
            "obj": (config.visual_obj_loss, config.num_object_labels),
            "attr": (config.visual_attr_loss, config.num_attr_labels),
            "feat": (config.visual_feat_loss, config.visual_feat_dim),
        }
        self.decoder_dict = nn.ModuleDict(
            {key: nn.Linear(config.hidden_size, n) for key, (on, n) in sizes.items() if on}
        )


def classifier(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Linear, GELU, LayerNorm, Linear: the answer and NLVR2 heads of the original."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.GELU(),
        nn.LayerNorm(hidden, eps=LN_EPS),
        nn.Linear(hidden, out_features),
    )


class AnswerHead(nn.Module):
    """Answer logits from the pooled output."""

    def __init__(self, config: LxmertConfig, num_labels: int):
        super().__init__()
        self.logit_fc = classifier(config.hidden_size, 2 * config.hidden_size, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.logit_fc(pooled)


