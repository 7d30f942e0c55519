"""Demo captions say something an image can confirm or refute: true of their own scene, mostly false of others."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tasks.data.tokenization import load_tokenizer
from tasks.demo.language import (
    COLOR_NAMES,
    NUMBER_WORDS,
    Balancer,
    caption_claims,
    captions,
    relation,
    where,
)
from tasks.demo.questions import vqa_questions
from tasks.demo.scene import PLURALS, SHAPES, Scene, sample_scene

SINGULAR = {p: s for s, p in PLURALS.items()}
PLACES = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom"}
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
OBJECT = r"an? (?:(small|large) )?(\w+) (\w+)"


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(7)
    return [sample_scene(rng, 128, 2, 6) for _ in range(300)]


def _has(scene: Scene, size: str | None, color: str, shape: str) -> bool:
    return scene.count(shape=shape, color=color, size=size) > 0


def reading(text: str, scene: Scene) -> bool:
    """What the caption says, read from its words alone (independently of the generator's predicate)."""
    body = text.rstrip(".")
    if m := re.fullmatch(r"(?:There are|The picture shows) (\w+) (\w+)(?: shapes)?(?: in the picture)?", body):
        n, word = NUMBER_WORDS.index(m.group(1)), m.group(2)
        return scene.count(**({"color": word} if word in COLOR_NAMES else {"shape": SINGULAR[word]})) == n
    if m := re.fullmatch(rf"{OBJECT} (on the left|on the right|at the top|at the bottom) of the picture",
                         body, re.IGNORECASE):
        return any(o.size == m.group(1) and o.color == m.group(2) and o.shape == m.group(3)
                   and where(scene, i) == PLACES[m.group(4)] for i, o in enumerate(scene.objects))
    if m := re.fullmatch(rf"{OBJECT} (to the left of|to the right of|above|below) {OBJECT}", body, re.IGNORECASE):
        return any(a.color == m.group(2) and a.shape == m.group(3) and b.color == m.group(6)
                   and b.shape == m.group(7) and relation(scene, i, j, RELATION_WORDS[m.group(4)])
                   for i, a in enumerate(scene.objects) for j, b in enumerate(scene.objects) if i != j)
    body = re.sub(r"^(The picture shows |There is |A picture of )", "", body)
    parts = re.split(r", | and ", body)
    objects = [re.fullmatch(OBJECT, p, re.IGNORECASE) for p in parts]
    assert all(objects), text
    return all(_has(scene, m.group(1), m.group(2), m.group(3)) for m in objects)


def test_captions_are_true_of_their_scene_and_say_what_they_check(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for k, scene in enumerate(scenes):
        claims = caption_claims(scene, rng, 5)
        assert len(claims) == 5 and len({c.text for c in claims}) == 5
        for claim in claims:
            assert claim.holds(scene) and reading(claim.text, scene), claim.text
            other = scenes[(k + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)]
            assert claim.holds(other) == reading(claim.text, other), claim.text
            checked += 1
    assert checked == 5 * len(scenes)


def test_a_caption_of_another_image_is_almost_always_false(scenes: list[Scene]) -> None:
    """Measured 98% with the demo's sizes: the matching objective's negatives are refutable."""
    rng = np.random.default_rng(1)
    claims = [caption_claims(s, rng, 5) for s in scenes]
    false = [not c.holds(other) for i, cs in enumerate(claims) for c in cs
             for j, other in enumerate(scenes[:60]) if j != i]
    assert np.mean(false) >= 0.95


def test_captions_fit_lxmert_20_tokens() -> None:
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(2)
    longest = 0
    for _ in range(400):
        scene = sample_scene(rng, 128, 6, 6)
        for text in captions(scene, rng, 5):
            longest = max(longest, len(tokenizer.tokenize(text)) + 2)
    assert longest <= 20


def test_vqa_counts_ask_about_drawn_objects() -> None:
    """A counting question presupposes its object, so asked of another image it is often refuted."""
    rng = np.random.default_rng(3)
    balancer = Balancer()
    counts = 0
    for _ in range(200):
        scene = sample_scene(rng, 128, 2, 6)
        for q in vqa_questions(scene, rng, balancer, 8):
            if q.template.startswith("count_") and q.template != "count_all":
                assert q.answer != "0", q.text
                words = q.text.rstrip("?").split()[2:-2]  # "How many [colour] [shapes] are there"
                kwargs = {}
                for w in words:
                    if w in COLOR_NAMES:
                        kwargs["color"] = w
                    elif w in SINGULAR:
                        kwargs["shape"] = SINGULAR[w]
                assert scene.count(**kwargs) == int(q.answer), q.text
                counts += 1
    assert counts > 50
    assert set(SHAPES) == set(SINGULAR.values())
