"""Demo NLVR2 statements about pairs of scenes, true or false by the exact scene graphs."""
from __future__ import annotations

from collections.abc import Callable
from itertools import permutations

import numpy as np

from tasks.demo.language import COLOR_NAMES, NUMBER_WORDS, RELATIONS, a_an, pick, relation
from tasks.demo.scene import PLURALS, SHAPES, Scene, Theme

# ---------------------------------------------------------------- NLVR2 statements

Truth = Callable[[Scene, Scene], bool]
_SIDES = ("left", "right")


def _choose_args(rng: np.random.Generator, theme: Theme) -> tuple[str, str]:
    shape = pick(rng, theme.shapes) if rng.random() < 0.85 else pick(rng, SHAPES)
    color = pick(rng, theme.colors) if rng.random() < 0.85 else pick(rng, COLOR_NAMES)
    return color, shape


def _numbered(n: int, s: str) -> str:
    return f"{NUMBER_WORDS[n]} {s if n == 1 else PLURALS[s]}"


def _side(pair: tuple[Scene, Scene], side: str) -> Scene:
    return pair[0] if side == "left" else pair[1]


def _st_side_exist(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    side = pick(rng, _SIDES)
    text = pick(rng, (f"The {side} image contains {a_an(c)} {s}.",
                      f"There is {a_an(c)} {s} in the {side} image."))
    return "side_exist", text, lambda a, b: _side((a, b), side).count(shape=s, color=c) > 0


def _st_side_none(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    side = pick(rng, _SIDES)
    if rng.random() < 0.5:
        return "side_none", f"The {side} image contains no {PLURALS[s]}.", \
            lambda a, b: _side((a, b), side).count(shape=s) == 0
    return "side_none", f"There are no {c} objects in the {side} image.", \
        lambda a, b: _side((a, b), side).count(color=c) == 0


def _st_both(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    if rng.random() < 0.5:
        return "both_exist", f"Each image contains at least one {c} {s}.", \
            lambda a, b: a.count(shape=s, color=c) > 0 and b.count(shape=s, color=c) > 0
    return "both_exist", f"Both images contain {a_an(s)}.", \
        lambda a, b: a.count(shape=s) > 0 and b.count(shape=s) > 0


def _st_either(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    return "either_exist", f"At least one image contains {a_an(c)} {s}.", \
        lambda a, b: a.count(shape=s, color=c) > 0 or b.count(shape=s, color=c) > 0


def _st_side_count(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    side = pick(rng, _SIDES)
    n = int(rng.integers(1, 4))
    kind = int(rng.integers(3))
    if kind == 0:
        return "side_count", f"The {side} image contains exactly {_numbered(n, s)}.", \
            lambda a, b: _side((a, b), side).count(shape=s) == n
    if kind == 1:
        verb, noun = ("is", "object") if n == 1 else ("are", "objects")
        return "side_count", f"There {verb} exactly {NUMBER_WORDS[n]} {c} {noun} in the {side} image.", \
            lambda a, b: _side((a, b), side).count(color=c) == n
    n += 1
    return "side_count", f"The {side} image shows exactly {NUMBER_WORDS[n]} shapes.", \
        lambda a, b: len(_side((a, b), side).objects) == n


def _st_more(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    _, s = _choose_args(rng, theme)
    side = pick(rng, _SIDES)
    other = "right" if side == "left" else "left"
    word = pick(rng, ("more", "fewer"))

    def sign(a: Scene, b: Scene, key: Callable[[Scene], int]) -> bool:
        mine, theirs = key(_side((a, b), side)), key(_side((a, b), other))
        return mine > theirs if word == "more" else mine < theirs

    if rng.random() < 0.5:
        return "compare_count", f"The {side} image contains {word} {PLURALS[s]} than the {other} image.", \
            lambda a, b: sign(a, b, lambda x: x.count(shape=s))
    return "compare_count", f"The {side} image has {word} objects than the {other} image.", \
        lambda a, b: sign(a, b, lambda x: len(x.objects))


def _st_same(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    if rng.random() < 0.5:
        return "same_count", f"Both images contain the same number of {PLURALS[s]}.", \
            lambda a, b: a.count(shape=s) == b.count(shape=s)
    return "same_count", f"There are as many {c} objects in the left image as in the right image.", \
        lambda a, b: a.count(color=c) == b.count(color=c)


def _st_total(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    _, s = _choose_args(rng, theme)
    n = int(rng.integers(1, 5))
    verb = "is" if n == 1 else "are"
    return "total_count", f"There {verb} exactly {_numbered(n, s)} in total in the two images.", \
        lambda a, b: a.count(shape=s) + b.count(shape=s) == n


def _st_relation(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c1, s1 = _choose_args(rng, theme)
    c2, s2 = _choose_args(rng, theme)
    side = pick(rng, _SIDES)
    rel = pick(rng, tuple(RELATIONS))

    def holds(a: Scene, b: Scene) -> bool:
        sc = _side((a, b), side)
        return any(sc.objects[i].shape == s1 and sc.objects[i].color == c1 and sc.objects[j].shape == s2
                   and sc.objects[j].color == c2 and relation(sc, i, j, rel)
                   for i, j in permutations(range(len(sc.objects)), 2))

    text = f"The {side} image has {a_an(c1)} {s1} {RELATIONS[rel][0]} {a_an(c2)} {s2}."
    return "relation", text, holds


# weights: mostly statements about which coloured shapes each image holds (what captions and questions
# teach in pretraining), fewer that count, compare counts or relate two objects
NLVR2_TEMPLATES: dict[str, tuple[float, Callable[[np.random.Generator, Theme], tuple[str, str, Truth]]]] = {
    "side_exist": (3.0, _st_side_exist),
    "side_none": (1.0, _st_side_none),
    "both_exist": (2.0, _st_both),
    "either_exist": (1.5, _st_either),
    "side_count": (0.75, _st_side_count),
    "compare_count": (0.5, _st_more),
    "same_count": (0.5, _st_same),
    "total_count": (0.5, _st_total),
    "relation": (1.0, _st_relation),
}


def nlvr2_statements(pairs: list[tuple[Scene, Scene]], theme: Theme, rng: np.random.Generator, k: int,
                     tries: int = 300) -> list[tuple[str, str, list[bool]]]:
    """k different statements for a set of image pairs, each true for half the pairs where possible.

    Returns (template, sentence, truth per pair). Because one sentence is true for some pairs and
    false for others, the sentence alone never tells the label.
    """
    target = len(pairs) / 2
    makers = [fn for _, fn in NLVR2_TEMPLATES.values()]
    weights = np.array([w for w, _ in NLVR2_TEMPLATES.values()])
    out: list[tuple[str, str, list[bool]]] = []
    texts: set[str] = set()
    for _ in range(k):
        best: tuple[str, str, list[bool]] | None = None
        for _ in range(tries):
            template, text, truth = makers[int(rng.choice(len(makers), p=weights / weights.sum()))](rng, theme)
            if text in texts:
                continue
            labels = [bool(truth(a, b)) for a, b in pairs]
            if best is None or abs(sum(labels) - target) < abs(sum(best[2]) - target):
                best = (template, text, labels)
            if abs(sum(labels) - target) < 1:
                break
        if best is not None:
            out.append(best)
            texts.add(best[1])
    return out
