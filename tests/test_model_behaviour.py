"""Behaviour of our LXMERT beyond transformers parity: gradients, masks, NLVR2 pairs, autocast, compile."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel

CFG = LxmertConfig(
    vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=40, l_layers=2, x_layers=2,
    r_layers=1, visual_feat_dim=20, num_object_labels=9, num_attr_labels=5, num_qa_labels=7,
    max_position_embeddings=16,
)
B, L, O = 4, 8, 5


def make_inputs(images: int | None = None) -> dict:
    """Padded sentences and boxes; `images=2` gives NLVR2's (B, 2, O, .) visual inputs."""
    g = torch.Generator().manual_seed(2)
    lead = (B,) if images is None else (B, images)
    text = torch.ones(B, L, dtype=torch.long)
    text[1, 5:] = 0
    boxes = torch.ones(*lead, O)
    boxes[(0,) * len(lead)][3:] = 0
    return {
        "input_ids": torch.randint(1, CFG.vocab_size, (B, L), generator=g),
        "visual_feats": torch.randn(*lead, O, CFG.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(*lead, O, 4, generator=g),
        "attention_mask": text,
        "visual_attention_mask": boxes,
        "token_type_ids": torch.randint(0, 2, (B, L), generator=g),
    }


def make_targets() -> dict:
    g = torch.Generator().manual_seed(3)
    labels = torch.full((B, L), -1)
    labels[:, 2] = 7
    conf = torch.rand(B, O, generator=g)
    return {
        "labels": labels,
        "obj_labels": {
            "obj": (torch.randint(0, CFG.num_object_labels, (B, O), generator=g), conf),
            "attr": (torch.randint(0, CFG.num_attr_labels, (B, O), generator=g), conf.flip(1)),
            "feat": (torch.randn(B, O, CFG.visual_feat_dim, generator=g),
                     torch.tensor([[1.0, 0, 0, 1, 0]] * B)),
        },
        "matched_label": torch.tensor([1, 0, 1, 0]),
        "ans": torch.tensor([3, -1, 6, -1]),
    }


@pytest.mark.parametrize("cls", [LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2])
def test_every_parameter_gets_a_gradient(cls):
    model = cls(CFG).train()
    if cls is LxmertForPreTraining:
        loss = model(**make_inputs(), **make_targets()).loss
    elif cls is LxmertForQuestionAnswering:
        loss = model(**make_inputs(), labels=torch.tensor([0, 1, 2, 3])).loss
    else:
        loss = model(**make_inputs(images=2), labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    # Models that read only the pooled [CLS] skip the last cross layer's vision branch.
    last = f"lxmert.encoder.x_layers.{CFG.x_layers - 1}."
    skipped = (last + "visn_self_att.", last + "visn_inter.", last + "visn_output.")
    for name, p in model.named_parameters():
        if cls is not LxmertForPreTraining and name.startswith(skipped):
            assert p.grad is None, name
        else:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_skipping_the_vision_branch_keeps_the_pooled_output():
    model = LxmertModel(CFG).eval()
    with torch.no_grad():
        full, lean = model(**make_inputs()), model(**make_inputs(), return_vision=False)
    assert lean.vision_output is None
    assert torch.equal(full.pooled_output, lean.pooled_output)
    assert torch.equal(full.language_output, lean.language_output)


def test_losses_are_named_per_objective_and_sum_to_the_loss():
    out = LxmertForPreTraining(CFG).eval()(**make_inputs(), **make_targets())
    assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert abs(float(sum(out.losses.values()).detach()) - float(out.loss.detach())) < 1e-5
    assert out.masked_lm_logits.shape == (B, CFG.vocab_size)  # one labelled position per sentence
    assert out.prediction_logits is None  # full-shaped or nothing: with labels only the masked positions run
    assert out.question_answering_score.shape == (2, CFG.num_qa_labels)  # two valid answers


def test_no_labelled_word_gives_zero_not_nan():
    targets = {"labels": torch.full((B, L), -100), "ans": torch.full((B,), -1)}
    out = LxmertForPreTraining(CFG).eval()(**make_inputs(), **targets)
    assert float(out.losses["mlm"].detach()) == 0.0 and float(out.losses["qa"].detach()) == 0.0
    assert out.masked_lm_logits.shape == (0, CFG.vocab_size)


def test_padded_boxes_and_tokens_do_not_leak():
    model = LxmertModel(CFG).eval()
    inputs = make_inputs()
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["visual_feats"][0, 3:] += 5.0  # padded boxes of image 0
    changed["input_ids"][1, 5:] = 1  # padded tokens of sentence 1
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert torch.allclose(a.pooled_output, b.pooled_output, atol=1e-6)
    assert torch.allclose(a.language_output[1, :5], b.language_output[1, :5], atol=1e-6)
    assert torch.allclose(a.vision_output[0, :3], b.vision_output[0, :3], atol=1e-6)
    assert not torch.allclose(a.vision_output[0, 3:], b.vision_output[0, 3:], atol=1e-3)


def test_nlvr2_encodes_both_images_with_the_shared_encoder():
    model = LxmertForNLVR2(CFG).eval()
    inputs = make_inputs(images=2)
    labels = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        pooled = [
            model.lxmert(inputs["input_ids"], inputs["visual_feats"][:, i], inputs["visual_pos"][:, i],
                         inputs["attention_mask"], inputs["visual_attention_mask"][:, i],
                         inputs["token_type_ids"]).pooled_output
            for i in (0, 1)
        ]
        expected = model.logit_fc(torch.cat(pooled, dim=1))
    assert out.logits.shape == (B, 2)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.loss, F.cross_entropy(expected, labels), atol=1e-5)
    visual = ("visual_feats", "visual_pos", "visual_attention_mask")
    swapped = {**inputs, **{k: inputs[k].flip(1) for k in visual}}
    with torch.no_grad():
        assert not torch.allclose(model(**swapped).logits, out.logits, atol=1e-4)  # the order matters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_is_close_to_fp32(dtype):
    model = LxmertForPreTraining(CFG).eval()
    inputs, targets = make_inputs(), make_targets()
    with torch.no_grad():
        full = model(**inputs, **targets)
    with torch.autocast("cpu", dtype=dtype):
        half = model(**inputs, **targets)
    assert half.cross_relationship_score.dtype == dtype
    assert torch.isfinite(half.loss)
    assert abs(float(half.loss.detach()) - float(full.loss)) < 0.02 * float(full.loss)
    assert (half.cross_relationship_score.float() - full.cross_relationship_score).abs().max() < 0.05
    half.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_float16_store_features_are_accepted():
    model = LxmertModel(CFG).eval()
    inputs = make_inputs()
    inputs["visual_feats"] = inputs["visual_feats"].half()
    with torch.no_grad():
        a = model(**inputs).pooled_output
        b = model(**{**inputs, "visual_feats": inputs["visual_feats"].float()}).pooled_output
    assert torch.equal(a, b)


def test_backbone_traces_as_one_graph():
    torch._dynamo.reset()
    model = LxmertModel(dataclasses.replace(CFG, l_layers=1, x_layers=1, r_layers=1)).train()
    explained = torch._dynamo.explain(model)(**make_inputs())
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_device_follows_inputs():
    model = LxmertForPreTraining(CFG).to("meta")
    inputs = {k: v.to("meta") for k, v in make_inputs().items()}
    out = model(**inputs)
    assert out.prediction_logits.device.type == "meta"
    assert out.prediction_logits.shape == (B, L, CFG.vocab_size)
    assert out.masked_lm_logits is None
    assert out.question_answering_score.shape == (B, CFG.num_qa_labels)


@pytest.mark.parametrize("cls", [LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2])
def test_save_and_reload_every_class(cls, tmp_path):
    model = cls(CFG).eval()
    model.save_pretrained(tmp_path)
    again, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys and again.config == CFG
    assert not again.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    if cls is LxmertForPreTraining:
        assert again.cls.predictions.decoder.weight is again.lxmert.embeddings.word_embeddings.weight


# ---------------------------------------------------------------- dropout drawn 16 bits at a time on CPU

def test_cpu_dropout_rate_scale_and_seed():
    from model.layers import dropout

    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002
    assert torch.allclose(y[kept], torch.full_like(y[kept], 65536 / (65536 - 6554)))
    assert abs(y.mean().item() - 1) < 0.005  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.1, True), y)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    odd = dropout(torch.ones(3, 7, 5), 0.5, True)  # sizes not a multiple of four
    assert odd.shape == (3, 7, 5) and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_cpu_attention_with_dropout_is_sdpa_math(monkeypatch):
    """The explicit CPU attention used under dropout equals SDPA when the mask keeps everything."""
    import model.layers as layers

    attention = layers.Attention(dataclasses.replace(CFG, attention_probs_dropout_prob=0.1)).train()
    x, context = torch.randn(B, L, 32), torch.randn(B, O, 32)
    mask = layers.additive_mask(make_inputs()["visual_attention_mask"], torch.float32)
    monkeypatch.setattr(layers, "_cpu_keep_mask", lambda t, p: (torch.ones_like(t, dtype=torch.bool), 1.0))
    ours = attention(x, context, mask)
    attention.dropout_p = 0.0
    torch.testing.assert_close(ours, attention(x, context, mask), atol=1e-6, rtol=1e-5)


def test_fast_cpu_dropout_switched_off_uses_the_native_kernels():
    """One switch turns the CPU speed path off: dropout and attention then draw torch's own masks."""
    import torch.nn.functional as F

    import model.layers as layers

    attention = layers.Attention(dataclasses.replace(CFG, attention_probs_dropout_prob=0.1)).train()
    x, context = torch.randn(B, L, 32), torch.randn(B, O, 32)
    assert layers.set_fast_cpu_dropout(False) is True  # on by default
    try:
        torch.manual_seed(3)
        ours = layers.dropout(x, 0.1, True), attention(x, context)
        torch.manual_seed(3)
        native = torch.native_dropout(x, 0.1, True)[0]
        q, k, v = (attention.split_heads(f(t)) for f, t in
                   ((attention.query, x), (attention.key, context), (attention.value, context)))
        sdpa = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).transpose(1, 2).flatten(2)
    finally:
        assert layers.set_fast_cpu_dropout(True) is False
    assert torch.equal(ours[0], native)
    assert torch.equal(ours[1], sdpa)
    torch.manual_seed(3)
    assert not torch.equal(layers.dropout(x, 0.1, True), native)  # back on: the 16-bit masks


def test_attention_path_on_cpu_follows_dtype_and_backward(monkeypatch):
    """Without dropout, a bf16 pass that will be backpropagated takes the explicit softmax (SDPA's CPU
    backward in bf16 is 1.87x slower: bench/attention_path.py); fp32, no-grad and the speed path
    switched off keep SDPA; both paths give the same values and gradients."""
    import model.layers as layers

    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    attention = layers.Attention(dataclasses.replace(CFG, attention_probs_dropout_prob=0.0)).train()
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(B, L, 32, generator=g), torch.randn(B, O, 32, generator=g)
    mask = torch.zeros(B, 1, 1, O)
    mask[0, ..., 3:] = torch.finfo(torch.float32).min  # the first image has 3 boxes

    def run(dtype: torch.dtype, grad: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sdpa_calls.clear()
        attention.zero_grad()
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = attention(x, context, mask)
        if grad:
            y.float().square().sum().backward()
        return y.float(), [p.grad.clone() for p in attention.parameters() if grad]

    explicit_bf16, explicit_grads = run(torch.bfloat16)
    assert not sdpa_calls
    run(torch.float32)
    assert sdpa_calls  # fp32: even, SDPA kept
    run(torch.bfloat16, grad=False)
    assert sdpa_calls  # nothing flows back: SDPA
    assert layers.set_fast_cpu_dropout(False) is True
    try:
        sdpa_bf16, sdpa_grads = run(torch.bfloat16)
        assert sdpa_calls  # switched off: torch's kernels
    finally:
        layers.set_fast_cpu_dropout(True)
    torch.testing.assert_close(explicit_bf16, sdpa_bf16, atol=3e-2, rtol=3e-2)
    for ours, theirs in zip(explicit_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=5e-2, rtol=5e-2)
