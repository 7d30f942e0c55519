"""Our LXMERT against transformers' (the oracle): outputs, losses, gradients and every checkpoint format."""
import dataclasses
import json

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from model.checkpoint import canonical_keys, infer_config

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
TOL = 1e-4

CONFIGS = {
    "base-like": LxmertConfig(
        vocab_size=60, hidden_size=32, num_attention_heads=4, intermediate_size=37, l_layers=2, x_layers=2,
        r_layers=1, visual_feat_dim=24, num_object_labels=11, num_attr_labels=7, num_qa_labels=9,
        max_position_embeddings=16,
    ),
    "tanh-gelu, more vision": LxmertConfig(
        vocab_size=45, hidden_size=24, num_attention_heads=3, intermediate_size=20, l_layers=1, x_layers=1,
        r_layers=2, visual_feat_dim=10, num_object_labels=5, num_attr_labels=4, num_qa_labels=6,
        hidden_act="gelu_new", max_position_embeddings=16, visual_loss_normalizer=3.0,
    ),
    "no attr, no qa": LxmertConfig(
        vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=24, l_layers=1, x_layers=2,
        r_layers=1, visual_feat_dim=8, num_object_labels=6, num_attr_labels=3, num_qa_labels=4,
        visual_attr_loss=False, task_qa=False, max_position_embeddings=16,
    ),
}
MASKS = ["none", "text", "text+boxes"]


def make_inputs(cfg: LxmertConfig, masks: str, batch: int = 3, seq: int = 9, boxes: int = 6) -> dict:
    """Random inputs and all pretraining targets (ignored entries as -100 so transformers accepts them)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g)
    inputs = {
        "input_ids": ids,
        "visual_feats": torch.randn(batch, boxes, cfg.visual_feat_dim, generator=g),
        "visual_pos": torch.rand(batch, boxes, 4, generator=g),
        "token_type_ids": torch.randint(0, 2, (batch, seq), generator=g),
    }
    if masks != "none":
        text = torch.ones(batch, seq, dtype=torch.long)
        text[0, 5:] = 0
        text[2, 7:] = 0
        inputs["attention_mask"] = text
    if masks == "text+boxes":
        visn = torch.ones(batch, boxes)
        visn[1, 3:] = 0
        inputs["visual_attention_mask"] = visn
    labels = torch.full((batch, seq), -100)
    picked = torch.rand(batch, seq, generator=g) < 0.3
    picked[:, 1] = True
    labels[picked] = ids[picked]
    targets = {
        "labels": labels,
        "obj_labels": {
            "obj": (torch.randint(0, cfg.num_object_labels, (batch, boxes), generator=g),
                    torch.rand(batch, boxes, generator=g)),
            "attr": (torch.randint(0, cfg.num_attr_labels, (batch, boxes), generator=g),
                     torch.rand(batch, boxes, generator=g)),
            "feat": (torch.randn(batch, boxes, cfg.visual_feat_dim, generator=g),
                     (torch.rand(batch, boxes, generator=g) < 0.4).float()),
        },
        "matched_label": torch.tensor([1, 0, 1]),
        "ans": torch.tensor([2, -100, 1]),
    }
    return inputs, targets


def hf_pair(cfg: LxmertConfig, tmp_path, ours_cls=LxmertForPreTraining, hf_cls=None):
    """Our model with random weights and transformers' model loaded from our save_pretrained."""
    ours = ours_cls(cfg).eval()
    ours.save_pretrained(tmp_path)
    hf_cls = hf_cls or getattr(transformers, ours_cls.__name__)
    theirs, info = hf_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return ours, theirs.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def pretraining_pair(tmp_path_factory):
    """One (ours, transformers') pair per config, shared by the mask variants."""
    pairs = {}

    def get(name: str):
        if name not in pairs:
            pairs[name] = hf_pair(CONFIGS[name], tmp_path_factory.mktemp("pair"))
        return pairs[name]

    return get


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pretraining_outputs_and_losses_equal_transformers(name, masks, pretraining_pair):
    cfg = CONFIGS[name]
    ours, theirs = pretraining_pair(name)
    inputs, targets = make_inputs(cfg, masks)
    with torch.no_grad():
        full_ours, full_theirs = ours(**inputs), theirs(**inputs)
        assert max_diff(full_ours.prediction_logits, full_theirs.prediction_logits) <= TOL
        assert max_diff(full_ours.cross_relationship_score, full_theirs.cross_relationship_score) <= TOL
        if cfg.task_qa:
            assert max_diff(full_ours.question_answering_score, full_theirs.question_answering_score) <= TOL
        assert full_ours.loss is None

        a, b = ours(**inputs, **targets), theirs(**inputs, **targets)
        assert abs(float(a.loss) - float(b.loss)) <= TOL
        picked = targets["labels"] >= 0
        assert max_diff(a.masked_lm_logits, full_theirs.prediction_logits[picked]) <= TOL
        assert a.prediction_logits is None
        if cfg.task_qa:
            valid = targets["ans"] >= 0
            assert max_diff(a.question_answering_score, full_theirs.question_answering_score[valid]) <= TOL
        # Each objective alone, against transformers given only that target.
        names = {"labels": "mlm", "matched_label": "matched", "ans": "qa"}
        for key, value in targets.items():
            if key == "ans" and not cfg.task_qa:
                continue
            one = ours(**inputs, **{key: value})
            expected = float(theirs(**inputs, **{key: value}).loss)
            assert abs(float(one.loss) - expected) <= TOL
            if key == "obj_labels":
                visual = {"obj", "feat"} | ({"attr"} if cfg.visual_attr_loss else set())
                assert set(one.losses) == visual
            else:
                assert abs(float(one.losses[names[key]]) - expected) <= TOL
    assert set(a.losses) == {"mlm", "matched", "obj", "feat"} | (
        {"attr"} if cfg.visual_attr_loss else set()) | ({"qa"} if cfg.task_qa else set())


def test_backbone_outputs_equal_transformers(tmp_path):
    cfg = CONFIGS["base-like"]
    ours, theirs = hf_pair(cfg, tmp_path, LxmertModel)
    inputs, _ = make_inputs(cfg, "text+boxes")
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    for field in ("language_output", "vision_output", "pooled_output"):
        assert max_diff(getattr(a, field), getattr(b, field)) <= TOL


def test_gradients_equal_transformers(tmp_path):
    cfg = CONFIGS["base-like"]
    ours, theirs = hf_pair(cfg, tmp_path)
    inputs, targets = make_inputs(cfg, "text+boxes")
    ours(**inputs, **targets).loss.backward()
    theirs(**inputs, **targets).loss.backward()
    their_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert max_diff(p.grad, their_grads[name].grad) <= TOL, name


def test_question_answering_equals_transformers(tmp_path):
    cfg = CONFIGS["base-like"]
    ours, theirs = hf_pair(cfg, tmp_path, LxmertForQuestionAnswering)
    inputs, _ = make_inputs(cfg, "text+boxes")
    answers = torch.tensor([3, 0, 8])
    with torch.no_grad():
        a, b = ours(**inputs, labels=answers), theirs(**inputs, labels=answers)
    assert max_diff(a.question_answering_score, b.question_answering_score) <= TOL
    assert abs(float(a.loss) - float(b.loss)) <= TOL
    with pytest.raises(TypeError):
        ours(**inputs, labels=torch.rand(3, cfg.num_qa_labels))


def test_ignored_minus_one_equals_minus_hundred():
    cfg = CONFIGS["base-like"]
    model = LxmertForPreTraining(cfg).eval()
    inputs, targets = make_inputs(cfg, "text")
    original = {**targets, "labels": targets["labels"].masked_fill(targets["labels"] < 0, -1),
                "ans": torch.tensor([2, -1, 1])}
    with torch.no_grad():
        a, b = model(**inputs, **targets), model(**inputs, **original)
    assert {k: float(v) for k, v in a.losses.items()} == {k: float(v) for k, v in b.losses.items()}


def test_config_defaults_and_json_interchange(tmp_path):
    theirs = transformers.LxmertConfig()
    for f in dataclasses.fields(LxmertConfig):
        assert getattr(LxmertConfig(), f.name) == getattr(theirs, f.name), f.name
    assert LxmertConfig().num_hidden_layers == theirs.num_hidden_layers
    theirs.save_pretrained(tmp_path)
    assert "transformers_version" in json.loads((tmp_path / "config.json").read_text())
    assert LxmertConfig.from_json_file(tmp_path / "config.json") == LxmertConfig()
    cfg = CONFIGS["tanh-gelu, more vision"]
    back = transformers.LxmertConfig.from_dict(cfg.to_dict())
    assert all(getattr(back, f.name) == getattr(cfg, f.name) for f in dataclasses.fields(cfg))
    with pytest.raises(TypeError):
        LxmertConfig.from_dict({}, hiden_size=3)


def test_round_trip_ours_transformers_ours(tmp_path):
    cfg = CONFIGS["base-like"]
    ours, theirs = hf_pair(cfg, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    again, info = LxmertForPreTraining.from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    assert again.config == cfg
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # transformers' older format: pytorch_model.bin next to config.json
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(theirs.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tmp_path / "theirs" / "config.json").read_text())
    from_bin = LxmertForPreTraining.from_pretrained(bin_dir)
    inputs, _ = make_inputs(cfg, "text")
    with torch.no_grad():
        assert max_diff(from_bin(**inputs).prediction_logits, theirs(**inputs).prediction_logits) <= TOL


def original_pretrain_state(theirs: torch.nn.Module) -> dict:
    """The original code's `*_LXRT.pth` layout: `module.bert.` backbone, heads as named there."""
    state = {}
    for key, value in theirs.state_dict().items():
        key = "module." + key.replace("lxmert.", "bert.", 1)
        if key.endswith("embeddings.LayerNorm.weight"):  # some BERT-era files say gamma / beta
            key = key.replace(".weight", ".gamma")
        state[key] = value.clone()
    return state


def test_original_pretraining_checkpoint(tmp_path):
    cfg = CONFIGS["base-like"]
    _, theirs = hf_pair(cfg, tmp_path / "dir")
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(original_pretrain_state(theirs), path)
    inferred = infer_config(canonical_keys(torch.load(path, weights_only=True)), num_attention_heads=4)
    assert inferred == cfg
    ours, info = LxmertForPreTraining.from_pretrained(path, num_attention_heads=4, output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    inputs, targets = make_inputs(cfg, "text+boxes")
    with torch.no_grad():
        assert abs(float(ours(**inputs, **targets).loss) - float(theirs(**inputs, **targets).loss)) <= TOL


def test_original_finetuned_checkpoints(tmp_path):
    cfg = CONFIGS["base-like"]
    ours_qa, theirs_qa = hf_pair(cfg, tmp_path / "qa", LxmertForQuestionAnswering)
    vqa = {k.replace("lxmert.", "lxrt_encoder.model.module.bert.").replace("answer_head.", ""): v
           for k, v in theirs_qa.state_dict().items()}
    torch.save(vqa, tmp_path / "BEST.pth")
    loaded, info = LxmertForQuestionAnswering.from_pretrained(
        tmp_path / "BEST.pth", num_attention_heads=4, output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys
    inputs, _ = make_inputs(cfg, "text")
    with torch.no_grad():
        assert max_diff(loaded(**inputs).question_answering_score,
                        theirs_qa(**inputs).question_answering_score) <= TOL

    nlvr2 = LxmertForNLVR2(cfg)
    original = {k.replace("lxmert.", "lxrt_encoder.model.bert."): v for k, v in nlvr2.state_dict().items()}
    torch.save(original, tmp_path / "NLVR2.pth")
    loaded, info = LxmertForNLVR2.from_pretrained(tmp_path / "NLVR2.pth", num_attention_heads=4,
                                                  output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys
    for key, value in nlvr2.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_torch_files_load_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Payload()},
               tmp_path / "evil_LXRT.pth")
    with pytest.raises(Exception, match="(?i)weights.only"):
        LxmertForPreTraining.from_pretrained(tmp_path / "evil_LXRT.pth")


def test_question_answering_from_pretraining_with_new_answer_table(tmp_path):
    cfg = CONFIGS["base-like"]
    pretrain, theirs = hf_pair(cfg, tmp_path)
    head = "answer_head.logit_fc.3."
    qa, info = LxmertForQuestionAnswering.from_pretrained(tmp_path, num_qa_labels=5, output_loading_info=True,
                                                          allow_fresh=(head,))
    assert qa.config.num_qa_labels == 5
    assert {k for k, *_ in info.mismatched_keys} == {head + "weight", head + "bias"}
    assert not info.missing_keys
    assert all(k.startswith(("cls.", "obj_predict_head.")) for k in info.unexpected_keys)
    assert torch.equal(qa.answer_head.logit_fc[0].weight, pretrain.answer_head.logit_fc[0].weight)

    mapping = [4, -1, 0, 8, -1]
    assert qa.init_answer_head_from(tmp_path, mapping) == 3
    inputs, _ = make_inputs(cfg, "text+boxes")
    with torch.no_grad():
        expected = theirs(**inputs).question_answering_score
        got = qa(**inputs).question_answering_score
    for i, row in enumerate(mapping):
        if row >= 0:
            assert max_diff(got[:, i], expected[:, row]) <= TOL
        else:
            assert float(got[:, i].abs().max()) == 0.0

    kept = LxmertForQuestionAnswering.from_pretrained(tmp_path, num_qa_labels=5, allow_fresh=(head,))
    fresh = kept.answer_head.logit_fc[3].weight.clone()
    kept.init_answer_head_from(theirs, mapping, unmapped="keep")
    assert torch.equal(kept.answer_head.logit_fc[3].weight[1], fresh[1])
    assert torch.equal(kept.answer_head.logit_fc[3].weight[0], theirs.answer_head.logit_fc[3].weight[4])
    with pytest.raises(ValueError):
        qa.init_answer_head_from(pretrain, [0, 1])
    with pytest.raises(ValueError):
        qa.init_answer_head_from(pretrain.state_dict(), [0, 1, 2, 3, cfg.num_qa_labels])
