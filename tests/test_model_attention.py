"""The cross-attention the network exposes (`output_attentions`): transformers' values, rows over real boxes."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

from model import LxmertConfig, LxmertModel

hf_logging.set_verbosity_error()
CFG = LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=37, l_layers=1,
                   x_layers=3, r_layers=1, visual_feat_dim=12, max_position_embeddings=16)


def _inputs(batch: int = 3, seq: int = 7, boxes: int = 5) -> dict:
    g = torch.Generator().manual_seed(3)
    text = torch.ones(batch, seq, dtype=torch.long)
    text[0, 4:] = 0
    visn = torch.ones(batch, boxes)
    visn[1, 2:] = 0
    visn[2, 4:] = 0
    return {"input_ids": torch.randint(1, CFG.vocab_size, (batch, seq), generator=g),
            "visual_feats": torch.randn(batch, boxes, CFG.visual_feat_dim, generator=g),
            "visual_pos": torch.rand(batch, boxes, 4, generator=g), "attention_mask": text,
            "visual_attention_mask": visn}


def test_cross_attentions_are_the_ones_the_network_uses(tmp_path: Path) -> None:
    """Equal to transformers' cross_encoder_attentions (the oracle); asking for them changes no output."""
    ours = LxmertModel(CFG).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.LxmertModel.from_pretrained(tmp_path).eval()
    inputs = _inputs()
    with torch.no_grad():
        plain = ours(**inputs)
        out = ours(**inputs, output_attentions=True)
        ref = theirs(**inputs, output_attentions=True)
    assert plain.cross_encoder_attentions is None
    assert len(out.cross_encoder_attentions) == CFG.x_layers
    for a, b in zip(out.cross_encoder_attentions, ref.cross_encoder_attentions):
        assert a.shape == (3, CFG.num_attention_heads, 7, 5)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.language_output, plain.language_output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled_output, plain.pooled_output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.vision_output, plain.vision_output, atol=1e-5, rtol=1e-4)


def test_cross_attention_rows_sum_to_one_over_real_boxes() -> None:
    model = LxmertModel(CFG).eval()
    inputs = _inputs()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, return_vision=False)
    real = inputs["visual_attention_mask"][:, None, None, :]
    for att in out.cross_encoder_attentions:
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))
        assert float((att * (1 - real)).abs().max()) == 0.0  # padded boxes get nothing
        assert float(att.min()) >= 0.0
