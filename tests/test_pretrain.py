"""Pretraining targets built from known examples, the corpus, collation, switches, and learning."""
import csv
import json

import numpy as np
import pytest
import torch

from extractor.jsonstream import DataFormatError
from extractor.store import FeatureReader
from tasks.data.answers import AnswerTable, default_pretrain_table
from tasks.data.tokenization import load_tokenizer
from tasks.demo.feature_world import write_world
from tasks.pretrain import (
    IGNORE,
    PretrainConfig,
    PretrainCorpus,
    PretrainDataset,
    collate_pretrain,
    mask_features,
    mask_tokens,
    run,
    sample_answer,
    targets,
)
from tasks.training.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeRng:
    """Hands out preset draws, so each masking branch is hit on purpose."""

    def __init__(self, draws, ints=()):
        self.draws, self.ints = list(draws), list(ints)

    def random(self, n):
        out, self.draws = self.draws[:n], self.draws[n:]
        return np.array(out)

    def integers(self, low, high, n):
        out, self.ints = self.ints[:n], self.ints[n:]
        return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=16, max_boxes=8, feature_dim=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_word_masking_80_10_10():
    ids = np.array([10, 11, 12, 13, 14])
    # draws / 0.15: 0.07 -> [MASK]; 0.87 -> random; 0.93 -> kept; 0.5 not chosen; 0.993 -> kept
    out, labels = mask_tokens(ids, FakeRng([0.01, 0.13, 0.14, 0.5, 0.149], ints=[77]), 0.15, 100, 3)
    assert out.tolist() == [3, 77, 12, 13, 14]
    assert labels.tolist() == [10, 11, 12, IGNORE, 14]


def test_word_masking_rates_over_many_tokens():
    ids = np.arange(1000, 21000)
    out, labels = mask_tokens(ids, np.random.default_rng(0), 0.15, 30522, 103)
    chosen = labels != IGNORE
    assert abs(chosen.mean() - 0.15) < 0.01 and np.array_equal(labels[chosen], ids[chosen])
    assert abs((out[chosen] == 103).mean() - 0.8) < 0.02
    assert abs((out[chosen] == ids[chosen]).mean() - 0.1) < 0.02
    assert np.array_equal(out[~chosen], ids[~chosen])


def test_object_masking_80_10_10():
    feats = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    other = np.full((1, 3), -7.0, np.float32)
    out, mask = mask_features(feats, FakeRng([0.01, 0.13, 0.14, 0.9]), 0.15, lambda n: np.repeat(other, n, 0))
    assert out.tolist() == [[0, 0, 0], [-7, -7, -7], feats[2].tolist(), feats[3].tolist()]
    assert mask.tolist() == [1, 1, 1, 0]


def test_answer_sampled_in_proportion_to_soft_score():
    rng = np.random.default_rng(0)
    draws = [sample_answer(np.array([4, 9]), np.array([0.9, 0.3], np.float32), rng) for _ in range(4000)]
    assert abs(np.mean(np.array(draws) == 4) - 0.75) < 0.03
    assert sample_answer(np.array([7]), np.array([0.3], np.float32), rng) == 7
    assert sample_answer(np.array([], np.int64), np.array([], np.float32), rng) == IGNORE


def test_corpus_flattens_converts_answers_and_skips_unknown_images(world, tmp_path):
    records = json.loads(world.corpus.read_text())
    records[0]["labelf"]["vqa"][0] = {"Red.": 1.0, "not-an-answer-xyz": 0.6}
    records.append({"img_id": "nowhere", "sentf": {"mscoco": ["x"]}, "labelf": {}})
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records))
    table = default_pretrain_table()
    corpus = PretrainCorpus([path], [FeatureReader(world.features)], table)
    assert corpus.stats.images == 16 and corpus.stats.examples == 64
    assert corpus.stats.skipped_images == ["nowhere"] and corpus.stats.labelled == 32
    assert corpus.sentence(2) == f"what color is the {world.objects[0]}?"
    assert corpus.uid(2) == "img0000_vqa_000" and corpus.uid(1) == "img0000_mscoco_001"
    answers, scores = corpus.label(2)
    assert [table.answer(a) for a in answers] == ["red"] and scores.tolist() == [1.0]
    assert len(corpus.label(0)[0]) == 0  # captions carry no answer
    records[1]["labelf"]["vqa"] = [{"red": 1.0}]
    path.write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"record 1 \(img0001\): labelf\['vqa'\] has 1 entries for 2"):
        PretrainCorpus([path], [FeatureReader(world.features)], table)


def test_example_targets_match_the_store_and_the_sentence(world, tokenizer):
    store = FeatureReader(world.features)
    table = default_pretrain_table()
    corpus = PretrainCorpus([world.corpus], [store], table)
    data = PretrainDataset(corpus, [store], tokenizer, PretrainConfig(), seed=3)
    seen_mismatch = seen_match = 0
    for i in range(len(data)):
        ex = data[i]
        image = store.get(int(corpus.ex_img[i]), normalize_boxes=True)
        # visual targets: detector labels and confidences of every box, raw features for regression
        for key, want in (("obj_ids", image.objects_id), ("obj_conf", image.objects_conf),
                          ("attr_ids", image.attrs_id), ("attr_conf", image.attrs_conf)):
            assert np.array_equal(ex[key], want)
        assert np.array_equal(ex["feat_target"], image.features)
        assert np.allclose(ex["visual_pos"], image.boxes) and ex["visual_pos"].max() <= 1.0
        masked = ex["feat_mask"] == 1
        unmasked_same = np.array_equal(ex["visual_feats"][~masked], image.features[~masked])
        assert unmasked_same
        # words: [CLS] ... [SEP]; labels only where chosen, holding the original word
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        sentence_ids = np.where(labels != IGNORE, labels, ids)[1:-1]
        text = tokenizer.decode(sentence_ids.tolist())
        if ex["matched"]:
            seen_match += 1
            assert text == corpus.sentence(i)
            answers, _ = corpus.label(i)
            assert (ex["ans"] == IGNORE) == (len(answers) == 0)
            assert ex["ans"] == IGNORE or ex["ans"] in answers
        else:  # a sentence of another image, never with an answer
            seen_mismatch += 1
            others = {corpus.sentence(j) for j in range(len(corpus)) if corpus.ex_img[j] != corpus.ex_img[i]}
            assert text in others and ex["ans"] == IGNORE
    assert seen_match > 20 and seen_mismatch > 20


def test_examples_are_a_function_of_seed_epoch_and_index(world, tokenizer):
    store = FeatureReader(world.features)
    corpus = PretrainCorpus([world.corpus], [store], default_pretrain_table())
    a = PretrainDataset(corpus, [store], tokenizer, PretrainConfig(), seed=1)
    b = PretrainDataset(corpus, [store], tokenizer, PretrainConfig(), seed=1)
    for i in (5, 0, 5):
        assert all(np.array_equal(a[i][k], b[i][k]) for k in ("input_ids", "labels", "visual_feats"))
    a.set_epoch(1)
    assert not all(np.array_equal(a[i]["labels"], b[i]["labels"]) for i in range(8))


def test_collate_pads_words_and_boxes_with_zero_weight(world, tokenizer):
    store = FeatureReader(world.features)
    corpus = PretrainCorpus([world.corpus], [store], default_pretrain_table())
    data = PretrainDataset(corpus, [store], tokenizer, PretrainConfig(word_mask_rate=0.0), seed=1)
    batch = collate_pretrain([data[0], data[4]])  # image 0 has 8 boxes, image 1 has 6
    assert batch["visual_feats"].shape == (2, 8, 16) and batch["visual_feats"].dtype == torch.float16
    assert batch["visual_attention_mask"][1].tolist() == [1] * 6 + [0] * 2
    obj_ids, obj_conf = batch["obj_labels"]["obj"]
    assert obj_conf[1, 6:].tolist() == [0, 0] and batch["obj_labels"]["feat"][1][1, 6:].tolist() == [0, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(data[0]["input_ids"]), len(data[4]["input_ids"])]
    assert batch["labels"] is None  # no word was masked: the MLM loss is skipped, not NaN
    assert batch["ids"] == [corpus.uid(0), corpus.uid(4)]


def test_switched_off_objectives_and_late_qa_give_no_targets(world, tokenizer):
    store = FeatureReader(world.features)
    corpus = PretrainCorpus([world.corpus], [store], default_pretrain_table())
    data = PretrainDataset(corpus, [store], tokenizer, PretrainConfig(), seed=0)
    batch = collate_pretrain([data[i] for i in range(16)])
    cfg = PretrainConfig(mlm=False, obj=False, attr=False, feat=False, qa_from_epoch=2)
    t = targets(batch, cfg, epoch=1)
    assert t["labels"] is None and t["obj_labels"] is None and t["ans"] is None
    assert t["matched_label"] is batch["matched_label"]
    assert targets(batch, cfg, epoch=2)["ans"] is batch["ans"]
    only_feat = targets(batch, PretrainConfig(obj=False, attr=False), epoch=0)["obj_labels"]
    assert only_feat["feat"][0].dtype == torch.float32


def test_each_loss_goes_down_on_the_synthetic_world(tmp_path):
    """Two images, eight sentences, masks drawn once: every objective must fit its fixed targets."""
    world = write_world(tmp_path / "world", n_images=2, max_boxes=8, feature_dim=16)
    cfg = PretrainConfig(
        corpus=[str(world.corpus)], features=[str(world.features)], model="tiny", dropout=0.0,
        static_masks=True,
        train=TrainConfig(output_dir=str(tmp_path / "run"), epochs=24, batch_size=8, lr=5e-3,
                          warmup_ratio=0.05, num_workers=0, log_every=1, ckpt_every=0, progress=False,
                          tensorboard=False, plots=False, device="cpu"))
    metrics = run(cfg)
    with open(tmp_path / "run" / "logs" / "train.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == 24 and metrics["corpus"]["examples"] == 8
    assert AnswerTable.load_pretrain(tmp_path / "run" / "answers.json") == default_pretrain_table()
    for name in ("loss", "mlm", "matched", "obj", "attr", "feat", "qa"):
        values = [float(r[name]) for r in logged]
        first, last = np.mean(values[:3]), np.mean(values[-3:])
        assert last < 0.7 * first, (name, values)
