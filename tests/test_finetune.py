"""Fine-tuning: the QA losses, answer-head initialisation, and VQA / GQA / NLVR2 runs with their files."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractor.store import FeatureReader
from model.checkpoint import canonical_keys, tied_duplicates
from tasks.benchmarks import read_nlvr2_predictions, read_vqa_predictions
from tasks.benchmarks.datasets import collate_task
from tasks.benchmarks.nlvr2 import NLVR2Dataset
from tasks.benchmarks.qa import qa_loss
from tasks.data.answers import AnswerTable, default_pretrain_table, default_vqa_table
from tasks.data.readers import load_nlvr2_task
from tasks.data.tokenization import load_tokenizer
from tasks.demo.feature_world import write_world
from tasks.finetune import FinetuneConfig, build_model, run
from tasks.pretrain import PretrainConfig, model_config
from tasks.training.checkpoints import save_checkpoint
from tasks.training.loop import TrainConfig
from tasks.training.weights import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=8, max_boxes=6, feature_dim=16)


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    """A tiny pretraining network (random weights) saved as a model directory."""
    from model import LxmertForPreTraining

    torch.manual_seed(0)
    cfg = PretrainConfig(model="tiny")
    model = LxmertForPreTraining(model_config(cfg, feature_dim=16, num_answers=len(default_pretrain_table())))
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    return path, model


def train_config(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.1, num_workers=0,
                log_every=1, ckpt_every=0, progress=False, tensorboard=False, plots=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_qa_losses_scale_by_the_number_of_answers():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    target = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.0]])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 6 * 3
    assert float(qa_loss(logits, target, "bce")) == pytest.approx(float(bce))
    # cross-entropy on the best answer; the unlabelled second question is skipped
    ce = F.cross_entropy(logits[:1], torch.tensor([0])) * 3
    assert float(qa_loss(logits, target, "ce")) == pytest.approx(float(ce))
    assert float(qa_loss(logits, torch.zeros(2, 3), "ce")) == 0.0


def test_answer_head_starts_from_the_pretraining_head(world, pretrained, tmp_path):
    path, source = pretrained
    cfg = FinetuneConfig(task="vqa", train_files=[str(world.vqa)], features=[str(world.features)],
                         init_from=str(path), train=train_config(tmp_path))
    table, pretrain = default_vqa_table(), default_pretrain_table()
    model = build_model(cfg, 16, table)
    head, src = model.answer_head.logit_fc, source.answer_head.logit_fc
    red, missing = table.label("red"), table.label("visilab")  # "visilab" is not among the 9500
    assert torch.equal(head[3].weight[red], src[3].weight[pretrain.label("red")])
    assert torch.equal(head[3].bias[red], src[3].bias[pretrain.label("red")])
    assert not head[3].weight[missing].any() and not head[3].bias[missing].any()
    assert torch.equal(head[0].weight, src[0].weight) and torch.equal(head[2].bias, src[2].bias)
    backbone = "encoder.x_layers.0.visual_attention.att.query.weight"
    assert torch.equal(model.lxmert.state_dict()[backbone], source.lxmert.state_dict()[backbone])
    with pytest.raises(ValueError, match="init_from: .* expects 16-d features, the feature files hold 32-d"):
        build_model(cfg, 32, table)


def test_vqa_run_writes_submissions_and_official_metrics(world, pretrained, tmp_path):
    out = tmp_path / "vqa"
    cfg = FinetuneConfig(task="vqa", train_files=[str(world.vqa)], valid_files=[str(world.vqa)],
                         test_files=[str(world.vqa)], annotations=str(world.vqa_annotations),
                         features=[str(world.features)], init_from=str(pretrained[0]),
                         train=train_config(out, epochs=3))
    metrics = run(cfg)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["steps"] == 6 and len(metrics["evals"]) == 3 and metrics["model"].endswith("best")
    best = max(e["accuracy"] for e in metrics["evals"])
    assert metrics["best"]["accuracy"] == best == metrics["valid"]["accuracy"]
    # the official accuracy of the written submission, recomputed by hand (10 identical answers)
    preds = read_vqa_predictions(out / "valid_predict.json")
    truth = {e["question_id"]: next(iter(e["label"])) for e in json.loads(world.vqa.read_text())}
    assert preds.keys() == truth.keys()
    expected = round(100 * np.mean([preds[q] == a for q, a in truth.items()]), 2)
    assert metrics["valid"]["accuracy"] == expected
    assert metrics["valid"]["soft_score"] == pytest.approx(expected)
    assert read_vqa_predictions(out / "vqa_predict.json") == preds
    assert metrics["submissions"] == [str(out / "valid_predict.json"), str(out / "vqa_predict.json")]


def test_gqa_from_scratch_with_cross_entropy(world, tmp_path):
    out = tmp_path / "gqa"
    cfg = FinetuneConfig(task="gqa", train_files=[str(world.gqa)], valid_files=[str(world.gqa)],
                         features=[str(world.features)], model="tiny", loss="ce", dropout=0.0,
                         train=train_config(out, epochs=4, lr=2e-3))
    metrics = run(cfg)
    with (out / "logs" / "train.csv").open() as f:
        losses = [float(line.split(",")[3]) for line in f.readlines()[1:]]
    assert len(losses) == 8 and np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    written = json.loads((out / "valid_predict.json").read_text())
    submitted = {p["questionId"]: p["prediction"] for p in written}
    truth = {e["question_id"]: next(iter(e["label"])) for e in json.loads(world.gqa.read_text())}
    assert submitted.keys() == truth.keys()
    # without the official questions file, LXMERT's own accuracy (exact match here) is reported
    expected = 100 * np.mean([submitted[q] == a for q, a in truth.items()])
    assert metrics["valid"]["soft_score"] == pytest.approx(expected) and "accuracy" not in metrics["valid"]


def test_nlvr2_pairs_and_evaluation_only(world, pretrained, tmp_path):
    entries = load_nlvr2_task(world.nlvr2)
    data = NLVR2Dataset(entries, [FeatureReader(world.features)], load_tokenizer())
    batch = collate_task([data[0], data[1]])
    assert batch["visual_feats"].shape == (2, 2, 6, 16) and batch["visual_attention_mask"].shape == (2, 2, 6)
    assert batch["label"].tolist() == [entries[0]["label"], entries[1]["label"]]
    out = tmp_path / "nlvr2"
    # a pretraining checkpoint has no pair head: evaluating it needs the fresh head asked for
    cfg = FinetuneConfig(task="nlvr2", eval_only=True, valid_files=[str(world.nlvr2)],
                         features=[str(world.features)], init_from=str(pretrained[0]),
                         allow_fresh=["logit_fc."], train=train_config(out))
    metrics = run(cfg)
    preds = read_nlvr2_predictions(out / "valid_predict.csv")
    accuracy = np.mean([preds[e["identifier"]] == bool(e["label"]) for e in entries])
    assert metrics["valid"]["accuracy"] == pytest.approx(accuracy) and "consistency" in metrics["valid"]
    assert not (out / "checkpoints").exists()


def test_config_errors_name_the_parameter(world, tmp_path):
    with pytest.raises(ValueError, match="task: unknown 'vqa2'"):
        FinetuneConfig(task="vqa2", train_files=[str(world.vqa)]).validate()
    with pytest.raises(FileNotFoundError, match="annotations: no file at /nowhere.json"):
        FinetuneConfig(train_files=[str(world.vqa)], annotations="/nowhere.json").validate()
    with pytest.raises(ValueError, match="init_from: eval_only needs weights"):
        FinetuneConfig(eval_only=True).validate()


def test_every_checkpoint_kind_reads_to_the_same_weights(pretrained, tmp_path):
    path, source = pretrained
    want = canonical_keys(source.state_dict())
    tied = tied_duplicates(source.state_dict())
    # the original code's pretraining file: backbone under bert., saved from nn.DataParallel
    original = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in source.state_dict().items()}
    torch.save(original, tmp_path / "Epoch20_LXRT.pth")
    ours = save_checkpoint({"model": source.state_dict(), "extra": {"model_config": source.config.to_dict()}},
                           tmp_path / "checkpoints", step=7, keep_last=1)
    for kind in (path, tmp_path / "Epoch20_LXRT.pth", ours):
        state, config = read_checkpoint(kind)
        assert set(want) - set(state) <= tied  # a model directory stores tied weights once
        assert all(torch.equal(state[k], want[k]) for k in state)
        assert config is None if kind.name.endswith(".pth") else config.hidden_size == 32
    cfg = FinetuneConfig(task="vqa", init_from=str(tmp_path / "Epoch20_LXRT.pth"), model="tiny")
    model = build_model(cfg, 16, default_vqa_table())
    assert model.config.hidden_size == 32 and model.config.num_attention_heads == 2
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint at /nowhere"):
        read_checkpoint("/nowhere")


def test_head_starts_from_a_pretraining_table_of_our_own(tmp_path):
    from model import LxmertForPreTraining

    own = AnswerTable(["blue", "red", "car"], [["vqa"], ["vqa", "gqa"], ["gqa"]])
    own.save_pretrain(tmp_path / "answers.json")
    torch.manual_seed(1)
    source = LxmertForPreTraining(model_config(PretrainConfig(model="tiny"), feature_dim=16, num_answers=3))
    source.save_pretrained(tmp_path / "pretrained")
    cfg = FinetuneConfig(task="vqa", init_from=str(tmp_path / "pretrained"),
                         pretrain_answers=str(tmp_path / "answers.json"))
    table = default_vqa_table()
    head = build_model(cfg, 16, table).answer_head.logit_fc[3]
    assert torch.equal(head.weight[table.label("car")], source.answer_head.logit_fc[3].weight[2])
    assert not head.weight[table.label("yes")].any()
    with pytest.raises(ValueError, match="neither this task's 3129 nor the pretraining table's 9500"):
        build_model(FinetuneConfig(task="vqa", init_from=str(tmp_path / "pretrained")), 16, table)


def test_a_sub_vocabulary_travels_with_the_weights(world, tmp_path):
    """Pretraining with a small vocabulary sizes the embedding for it and saves vocab.txt beside the
    weights; fine-tuning from them picks it up unasked, and a larger tokenizer is refused."""
    from tasks import pretrain
    from tasks.data.tokenization import save_vocabulary, sub_vocabulary

    entries = json.loads(world.corpus.read_text())
    texts = [s for e in entries for sents in e["sentf"].values() for s in sents]
    texts += [e["sent"] for e in json.loads(world.vqa.read_text())]
    vocab = save_vocabulary(sub_vocabulary(texts), tmp_path / "vocab")
    size = len(vocab.read_text().splitlines())
    pre = pretrain.PretrainConfig(corpus=[str(world.corpus)], features=[str(world.features)], model="tiny",
                                  vocab=str(vocab), train=train_config(tmp_path / "pre", epochs=1))
    pretrain.run(pre)
    final = tmp_path / "pre" / "final"
    assert (final / "vocab.txt").read_text() == vocab.read_text()
    assert json.loads((final / "config.json").read_text())["vocab_size"] == size < 200
    cfg = FinetuneConfig(task="vqa", train_files=[str(world.vqa)], features=[str(world.features)],
                         init_from=str(final), train=train_config(tmp_path / "ft", epochs=1))
    run(cfg)
    assert (tmp_path / "ft" / "final" / "vocab.txt").read_text() == vocab.read_text()
    with pytest.raises(ValueError, match=f"tokenizer has 30522 tokens but .*final embeds only {size}"):
        build_model(dataclasses.replace(cfg, vocab=None), 16, default_vqa_table(), 30522)


def test_fresh_pretraining_model_fits_tokenizer_and_detector():
    from types import SimpleNamespace

    from tasks.pretrain import build_model as build_pretrain
    from tasks.pretrain import detector_label_counts

    model = build_pretrain(PretrainConfig(model="tiny"), 16, 3, vocab_size=120, labels=(7, 9))
    assert model.lxmert.embeddings.word_embeddings.num_embeddings == 120
    assert (model.config.num_object_labels, model.config.num_attr_labels) == (7, 9)
    store = SimpleNamespace(attrs={"detector_config": {"num_classes": 1600, "num_attributes": 400}})
    assert detector_label_counts([store, store]) == (1600, 400)
    other = SimpleNamespace(attrs={"detector_config": {"num_classes": 7, "num_attributes": 9}})
    assert detector_label_counts([store, other]) is None  # disagreeing files: keep the config's sizes
    assert detector_label_counts([SimpleNamespace(attrs={})]) is None
