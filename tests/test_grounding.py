"""Pointing accuracy on a constructed case, GQA pointing items, matching accuracy in the pretraining evaluation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from extractor.jsonstream import DataFormatError
from extractor.store import FeatureReader, FeatureWriter, ImageFeatures
from model import LxmertConfig
from tasks.data.answers import default_pretrain_table
from tasks.data.tokenization import load_tokenizer
from tasks.demo.feature_world import write_world
from tasks.grounding import PointingItem, gqa_pointing_items, object_boxes, pointing_accuracy
from tasks.pretrain import PretrainConfig, PretrainCorpus, PretrainDataset, evaluate
from tasks.report import grounding_section, grounding_summary
from tasks.training.distributed import DistEnv

hf_logging.set_verbosity_error()
CFG = LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=37, l_layers=1,
                   x_layers=3, r_layers=1, visual_feat_dim=12, max_position_embeddings=16)


# ---------------------------------------------------------------- pointing accuracy on a constructed case

@dataclass
class _Out:
    cross_encoder_attentions: tuple[torch.Tensor, ...]


class _Pointer(nn.Module):
    """A stand-in encoder whose attention is known: in layer 0 every word spreads it evenly over the
    real boxes (so its peak is box 0); in layer 1 a word attends to the box whose first feature
    equals its token id (box 0 if none)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, feats, pos, text_mask, box_mask, return_vision=True, output_attentions=False):
        b, n_words = input_ids.shape
        n_boxes = feats.shape[1]
        first = (box_mask / box_mask.sum(-1, keepdim=True))[:, None, None, :].expand(b, 2, n_words, n_boxes)
        match = (feats[:, None, :, 0] == input_ids[:, :, None].float()).float()  # (b, words, boxes)
        match[..., 0] += (match.sum(-1) == 0).float()
        second = (match / match.sum(-1, keepdim=True))[:, None].expand(b, 2, n_words, n_boxes)
        return _Out((first, second))


def _store(path: Path, images: dict[str, list[tuple[float, float, float, float, float]]]) -> FeatureReader:
    """Images of 100 x 100 pixels with boxes (x1, y1, x2, y2, first feature)."""
    with FeatureWriter(path, max_boxes=4, feature_dim=3, dtype="float32") as w:  # token ids stay exact
        for img_id, boxes in images.items():
            n = len(boxes)
            feats = np.zeros((n, 3), np.float32)
            feats[:, 0] = [b[4] for b in boxes]
            w.add(ImageFeatures(img_id=img_id, img_h=100, img_w=100,
                                boxes=np.array([b[:4] for b in boxes], np.float32), features=feats,
                                objects_id=np.zeros(n, np.int64), objects_conf=np.ones(n, np.float32),
                                attrs_id=np.zeros(n, np.int64), attrs_conf=np.ones(n, np.float32)))
        w.finalize()
    return FeatureReader(path)


def test_pointing_accuracy_counts_hits_per_layer_and_chance(tmp_path: Path) -> None:
    tok = load_tokenizer()
    star, circle = tok.convert_tokens_to_ids(["star", "circle"])
    store = _store(tmp_path / "f.h5", {
        "a": [(0, 0, 10, 10, 0), (50, 50, 70, 70, star), (20, 0, 40, 20, circle), (0, 0, 9, 10, 5)],
        "b": [(0, 0, 30, 30, circle), (60, 60, 90, 90, 0)],
    })
    items = [
        # "star?" (word 3) names the object at (50, 50, 20, 20), box 1: layer 1 points there ("?" does
        # not count), layer 0 at box 0
        PointingItem("q1", "a", "Where is the star?", ((3, 4, (50.0, 50.0, 20.0, 20.0)),)),
        # "circle" (word 3) names the object of box 2: layer 1 hits, layer 0 does not
        PointingItem("q2", "a", "What is the circle?", ((3, 4, (20.0, 0.0, 20.0, 20.0)),)),
        # two words: "circle" points at box 0 (a hit in both layers); "square" has no box with its id,
        # so layer 1 falls back to box 0, which is not the square's
        PointingItem("q3", "b", "Is the circle left of the square?",
                     ((2, 3, (0.0, 0.0, 30.0, 30.0)), (6, 7, (60.0, 60.0, 30.0, 30.0)))),
        PointingItem("q4", "missing", "What is the star?", ((3, 4, (0.0, 0.0, 1.0, 1.0)),)),
    ]
    model = nn.Module()
    model.lxmert = _Pointer()
    result = pointing_accuracy(model, tok, [store], items, batch_size=2)
    assert result["objects"] == 4 and result["questions"] == 3 and result["skipped"] == 1
    assert result["per_layer"] == [25.0, 75.0]  # layer 0: the q3 circle; layer 1: q1, q2, the q3 circle
    assert result["accuracy"] == 75.0  # the mean over layers peaks where layer 1 does
    # boxes overlapping the named object: q1 1 of 4, q2 1 of 4 (box 3 is the object of box 0), q3 1 of 2 each
    assert result["chance"] == pytest.approx(100 * (1 / 4 + 1 / 4 + 1 / 2 + 1 / 2) / 4, abs=0.01)
    assert result["reachable"] == 100.0


def test_gqa_items_from_annotations_and_boxes(tmp_path: Path) -> None:
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"image_id": 7, "objects": [{"object_id": 11, "x": 1, "y": 2, "w": 3, "h": 4},
                                                               {"object_id": 12, "x": 5, "y": 6, "w": 7, "h": 8}]}]))
    graphs = tmp_path / "val_sceneGraphs.json"
    graphs.write_text(json.dumps({"7": {"width": 50, "height": 50,
                                        "objects": {"11": {"x": 1, "y": 2, "w": 3, "h": 4, "name": "star"}}}}))
    assert object_boxes(objects) == {"11": (1.0, 2.0, 3.0, 4.0), "12": (5.0, 6.0, 7.0, 8.0)}
    assert object_boxes(graphs) == {"11": (1.0, 2.0, 3.0, 4.0)}
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({
        "001": {"imageId": "7", "question": "Is the star left of the big cross?",
                "annotations": {"question": {"2": "11", "5:7": "12"}, "answer": {}, "fullAnswer": {}}},
        "002": {"imageId": "7", "question": "Is there a star?", "annotations": {"question": {}}},
        "003": {"imageId": "7", "question": "Is the moon up?", "annotations": {"question": {"2": "99"}}},
    }))
    items = gqa_pointing_items(questions, object_boxes(objects))
    assert items == [PointingItem("001", "7", "Is the star left of the big cross?",
                                  ((2, 3, (1.0, 2.0, 3.0, 4.0)), (5, 7, (5.0, 6.0, 7.0, 8.0))))]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"imageId": "7", "question": "x", "annotations": {"question": {"a": "11"}}}}))
    with pytest.raises(DataFormatError, match="bad.json: question '1': annotation key 'a'"):
        gqa_pointing_items(bad, object_boxes(objects))


# ---------------------------------------------------------------- matching accuracy in the pretraining evaluation

class _Matcher(nn.Module):
    """Answers the matching question right except for the examples listed in `wrong` (by dataset index)."""

    def __init__(self, wrong: set[int], index: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.wrong, self.index = wrong, index

    def forward(self, input_ids, matched_label=None, **_):
        rows = self.index[: len(input_ids)]
        del self.index[: len(input_ids)]
        if matched_label is None:
            return type("Out", (), {"loss": self.weight.sum(), "losses": {},
                                    "cross_relationship_score": torch.zeros(len(rows), 2),
                                    "question_answering_score": None})()
        said = matched_label.clone()
        for row, i in enumerate(rows):
            if i in self.wrong:
                said[row] = 1 - said[row]
        score = torch.nn.functional.one_hot(said, 2).float()
        return type("Out", (), {"loss": self.weight.sum(), "losses": {}, "cross_relationship_score": score,
                                "question_answering_score": None})()


def test_matching_accuracy_is_the_share_of_pairs_the_head_gets_right(tmp_path: Path) -> None:
    world = write_world(tmp_path / "world", n_images=6, max_boxes=4, feature_dim=8)
    stores = [FeatureReader(world.features)]
    corpus = PretrainCorpus([world.corpus], stores, default_pretrain_table())
    cfg = PretrainConfig(corpus=[str(world.corpus)], features=[str(world.features)], qa=False)
    dataset = PretrainDataset(corpus, stores, load_tokenizer(), cfg, seed=1)
    cfg.train.num_workers = 0
    indices = list(range(len(dataset)))
    labels = [dataset[i]["matched"] for i in indices]  # the examples evaluate sees (epoch 0's draws)
    assert 0 < sum(labels) < len(labels)
    wrong = {0, 3, 4}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = evaluate(_Matcher(wrong, list(indices)), dataset, indices, cfg, env, batch_size=4, epoch=0)
    assert result["valid_matched_accuracy"] == pytest.approx(1 - len(wrong) / len(indices))
    # per kind of the sentence shown: for a mismatched pair that is the other image's sentence
    shown = {i: corpus.sources[corpus.ex_src[dataset[i]["shown"]]] for i in indices}
    assert any(shown[i] != corpus.sources[corpus.ex_src[i]] for i in indices)  # some pair shows the other kind
    for kind, sources in (("captions", {"mscoco"}), ("questions", {"vqa"})):
        rows = [i for i in indices if shown[i] in sources]
        assert 0 < len(rows) < len(indices)
        expected = 1 - len(wrong & set(rows)) / len(rows)
        assert result[f"valid_matched_accuracy_{kind}"] == pytest.approx(expected)
    cfg.matched = False  # the objective off: no matching targets, no accuracy
    assert "valid_matched_accuracy" not in evaluate(_Matcher(wrong, list(indices)), dataset, indices, cfg, env,
                                                     batch_size=4, epoch=0)


# ---------------------------------------------------------------- the report's grounding figures

POINTING = {"pretrained": {"accuracy": 61.5, "per_layer": [40.0, 55.0], "chance": 18.25, "reachable": 93.0,
                           "objects": 40, "questions": 30, "skipped": 0},
            "scratch": {"accuracy": 22.5, "per_layer": [20.0, 25.0], "chance": 18.25, "reachable": 93.0,
                        "objects": 40, "questions": 30, "skipped": 0}}


def test_grounding_summary_keeps_every_epoch_and_both_inits() -> None:
    evals = [{"epoch": 0, "valid_loss": 3.0, "valid_matched_accuracy": 0.5125},
             {"epoch": 1, "valid_loss": 2.0, "valid_matched_accuracy": 0.83456}]
    summary = grounding_summary(evals, POINTING)
    assert summary["matching"] == {"per_epoch": [51.25, 83.46], "last_epoch": 83.46, "chance": 50.0}
    for e, (c, q) in zip(evals, ((0.52, 0.5), (0.9123, 0.7))):
        e.update(valid_matched_accuracy_captions=c, valid_matched_accuracy_questions=q)
    summary = grounding_summary(evals, POINTING)
    assert summary["matching"]["captions"] == {"per_epoch": [52.0, 91.23], "last_epoch": 91.23}
    assert summary["matching"]["questions"] == {"per_epoch": [50.0, 70.0], "last_epoch": 70.0}
    assert summary["pointing"] == {"pretrained": 61.5, "scratch": 22.5, "chance": 18.25}
    assert grounding_summary([{"epoch": 0, "valid_loss": 1.0}], {}) == {}  # matching off, no pointing: nothing


def test_grounding_section_draws_the_matching_curve_and_the_pointing_table(tmp_path: Path) -> None:
    grounding = grounding_summary([{"valid_matched_accuracy": a} for a in (0.5, 0.7, 0.85)], POINTING)
    section = grounding_section(grounding, POINTING, tmp_path)
    assert section.title == "Grounding"
    assert (tmp_path / "figures" / "matching.png").stat().st_size > 1000
    assert "85.00% after the last, chance" in section.markdown
    split = grounding_summary([{"valid_matched_accuracy": a, "valid_matched_accuracy_captions": a + 0.1,
                                "valid_matched_accuracy_questions": a - 0.1} for a in (0.5, 0.85)], {})
    assert "85.00% after the last (95.00% on pairs showing captions, 75.00% on pairs showing questions;" \
        in grounding_section(split, {}, tmp_path).markdown
    assert "| pretrained + fine-tuned | 61.50 | 40.00 | 55.00 |" in section.markdown
    assert "| from scratch | 22.50 | 20.00 | 25.00 |" in section.markdown
    assert "| chance | 18.25 | - | - |" in section.markdown
    assert "figures/matching.png" in section.html
    assert grounding_section({}, {}, tmp_path) is None
