"""Text about demo scenes: how objects are named, captions and region phrases (questions: `questions.py`,
NLVR2 statements: `statements.py`).

Every answer is computed from the exact scene graph. Question templates answer only from what is
drawn, and a `Balancer` picks, for each question, the least-used answer of its template among those
the scene allows, so no template's answers can be guessed from the words alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import permutations
from typing import TypeVar

import numpy as np

from tasks.demo.scene import COLORS, PLURALS, SHAPES, Scene, SceneObject, margin

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine", "ten")
RELATIONS: dict[str, tuple[str, str]] = {  # name -> (phrase, opposite name)
    "left": ("to the left of", "right"),
    "right": ("to the right of", "left"),
    "above": ("above", "below"),
    "below": ("below", "above"),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
T = TypeVar("T")


@dataclass
class Question:
    """One generated question with its canonical answer and what the writers of each format need."""

    template: str
    text: str
    answer: str
    info: dict = field(default_factory=dict)
    topic: tuple | None = None  # GQA: questions on one topic entail each other
    claim: tuple | None = None  # GQA: equal claims are equivalent questions
    determines: bool = True     # GQA: whether the answer settles the topic


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One element of a sequence, drawn with the generator (keeps every choice on one seeded stream)."""
    return options[int(rng.integers(len(options)))]


def relation(scene: Scene, a: int, b: int, rel: str) -> bool | None:
    """Whether object a is `rel` of object b; None when the centres are too close to say."""
    (ax, ay), (bx, by) = scene.objects[a].center, scene.objects[b].center
    delta = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[rel]
    m = margin(scene.width)
    return True if delta >= m else False if delta <= -m else None


def side_of(scene: Scene, i: int) -> str | None:
    """'left' / 'right' half of the image, None near the middle."""
    cx = scene.objects[i].center[0]
    m = 2 * margin(scene.width)
    return "left" if cx <= scene.width / 2 - m else "right" if cx >= scene.width / 2 + m else None


def where(scene: Scene, i: int) -> str | None:
    """The dominant direction of an object from the image centre, None near the centre."""
    cx, cy = scene.objects[i].center
    dx, dy = cx - scene.width / 2, cy - scene.height / 2
    if max(abs(dx), abs(dy)) < 2 * margin(scene.width):
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


_REF_ORDERS = {  # which attribute sets may name an object, shortest first
    "any": (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")),
    "no_color": (("shape",), ("size", "shape")),
    "no_shape": (("color",), ("size",), ("size", "color")),
    "no_size": (("shape",), ("color", "shape")),
}


@dataclass(frozen=True)
class Ref:
    """A referring expression naming exactly one object ('large red circle', 'blue object')."""

    index: int
    attrs: tuple[str, ...]
    phrase: str

    @property
    def noun(self) -> str:
        return self.phrase.split()[-1]


def refer(scene: Scene, i: int, kind: str = "any") -> Ref | None:
    """The shortest unique description of object i using the allowed attributes, or None."""
    o = scene.objects[i]
    for attrs in _REF_ORDERS[kind]:
        matches = [j for j, p in enumerate(scene.objects)
                   if all(getattr(p, a) == getattr(o, a) for a in attrs)]
        if matches == [i]:
            words = [getattr(o, a) for a in ("size", "color") if a in attrs]
            return Ref(i, attrs, " ".join(words + [o.shape if "shape" in attrs else "object"]))
    return None


@lru_cache(maxsize=256)
def refs(scene: Scene, kind: str = "any") -> tuple[Ref, ...]:
    """Every object of the scene that has a unique description of this kind (cached: templates ask often)."""
    return tuple(r for r in (refer(scene, i, kind) for i in range(len(scene.objects))) if r is not None)


def short_refs(scene: Scene, kind: str = "any") -> tuple[Ref, ...]:
    """Descriptions of at most two words, for questions naming two objects (they fit in 20 tokens)."""
    return tuple(r for r in refs(scene, kind) if len(r.attrs) <= 2)


def a_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _describe(o: SceneObject, with_size: bool = False) -> str:
    return f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}"


class Balancer:
    """Keeps each template's answers balanced, so the question's words never predict its answer.

    A new question takes the least-used answer of its template among those the scene allows; when
    even that one is ahead of the template's least-used answer by more than `slack`, the scene
    gets no question of this template (the slot goes to another template).
    """

    def __init__(self, slack: int = 2) -> None:
        self.slack = slack
        self.counts: dict[str, dict[str, int]] = {}

    def pick(self, rng: np.random.Generator, template: str, candidates: list[Question]) -> Question | None:
        by_answer: dict[str, list[Question]] = {}
        for q in candidates:
            by_answer.setdefault(q.answer, []).append(q)
        if not by_answer:
            return None
        used = self.counts.setdefault(template, {})
        answers = sorted(by_answer)
        for a in answers:
            used.setdefault(a, 0)
        least = min(used[a] for a in answers)
        if least > min(used.values()) + self.slack:
            return None
        answer = pick(rng, [a for a in answers if used[a] == least])
        used[answer] += 1
        return pick(rng, by_answer[answer])


# ---------------------------------------------------------------- captions and region phrases

@dataclass(frozen=True)
class Claim:
    """A caption with its meaning: `holds(scene)` says whether it is true of a scene (any scene, not
    only the one it was written for), so a caption's content can be checked against other images."""

    text: str
    holds: Callable[[Scene], bool]


def _present(scene: Scene, o: SceneObject, with_size: bool) -> bool:
    return scene.count(shape=o.shape, color=o.color, size=o.size if with_size else None) > 0


def _distinct(scene: Scene, rng: np.random.Generator, k: int) -> list[SceneObject]:
    """Up to k objects of the scene with different (colour, shape), in a random order."""
    out: list[SceneObject] = []
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[int(i)]
        if all((o.color, o.shape) != (p.color, p.shape) for p in out):
            out.append(o)
    return out[:k]


_LIST_OPENINGS = ("", "The picture shows ", "There is ", "A picture of ")


def _caption_list(scene: Scene, rng: np.random.Generator) -> Claim:
    """Two or three of the objects by colour and shape (two with their sizes): all must be drawn."""
    with_size = bool(rng.random() < 0.4)  # three objects with sizes would pass LXMERT's 20 tokens
    objs = _distinct(scene, rng, 2 if with_size else 3)
    opening = pick(rng, _LIST_OPENINGS) if len(objs) < 3 else ""  # three and an opening: too long too
    text = capitalize(opening + _listing([a_an(_describe(o, with_size)) for o in objs]) + ".")
    return Claim(text, lambda s: all(_present(s, o, with_size) for o in objs))


def _caption_count(scene: Scene, rng: np.random.Generator) -> Claim | None:
    """An exact count of a shape or a colour that occurs more than once."""
    options = [("shape", s) for s in SHAPES if scene.count(shape=s) > 1]
    options += [("color", c) for c in COLOR_NAMES if scene.count(color=c) > 1]
    if not options:
        return None
    kind, name = pick(rng, options)
    n = scene.count(**{kind: name})
    noun = PLURALS[name] if kind == "shape" else f"{name} shapes"
    text = pick(rng, (f"There are {NUMBER_WORDS[n]} {noun} in the picture.",
                      f"The picture shows {NUMBER_WORDS[n]} {noun}."))
    return Claim(text, lambda s: s.count(**{kind: name}) == n)


def _pair_holds(a: SceneObject, b: SceneObject, rel: str) -> Callable[[Scene], bool]:
    """Some object drawn as `a` (colour, shape) is `rel` of some object drawn as `b`."""
    def holds(s: Scene) -> bool:
        return any(p.color == a.color and p.shape == a.shape and q.color == b.color and q.shape == b.shape
                   and relation(s, i, j, rel) for (i, p), (j, q) in permutations(enumerate(s.objects), 2))
    return holds


def _caption_relation(scene: Scene, rng: np.random.Generator) -> Claim | None:
    options = [(a, b, r) for a, b in permutations(range(len(scene.objects)), 2) for r in RELATIONS
               if relation(scene, a, b, r)]
    if not options:
        return None
    a, b, r = pick(rng, options)
    oa, ob = scene.objects[a], scene.objects[b]
    text = capitalize(f"{a_an(_describe(oa))} {RELATIONS[r][0]} {a_an(_describe(ob))}.")
    return Claim(text, _pair_holds(oa, ob, r))


_PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _caption_where(scene: Scene, rng: np.random.Generator) -> Claim | None:
    options = [(i, w) for i in range(len(scene.objects)) if (w := where(scene, i))]
    if not options:
        return None
    i, w = pick(rng, options)
    o = scene.objects[i]
    text = capitalize(f"{a_an(_describe(o, True))} {_PLACES[w]} of the picture.")
    return Claim(text, lambda s: any(p.shape == o.shape and p.color == o.color and p.size == o.size
                                     and where(s, j) == w for j, p in enumerate(s.objects)))


_CAPTIONS: tuple[Callable[[Scene, np.random.Generator], Claim | None], ...] = (
    _caption_list, _caption_list, _caption_relation, _caption_where, _caption_count)


def caption_claims(scene: Scene, rng: np.random.Generator, k: int) -> list[Claim]:
    """k different true captions of the scene (fewer only if the scene allows fewer), each naming
    objects by colour and shape, so that a caption of another image is rarely true of this one
    (the matching objective needs captions an image can refute)."""
    out: list[Claim] = []
    for _ in range(4 * k):
        for fn in (_CAPTIONS[i] for i in rng.permutation(len(_CAPTIONS))):
            claim = fn(scene, rng)
            if claim and all(claim.text != c.text for c in out):
                out.append(claim)
            if len(out) == k:
                return out
    return out


def captions(scene: Scene, rng: np.random.Generator, k: int) -> list[str]:
    """The texts of `caption_claims`."""
    return [c.text for c in caption_claims(scene, rng, k)]


def region_phrases(scene: Scene, rng: np.random.Generator, n_relations: int = 2) -> list[tuple[str, tuple]]:
    """Visual Genome region descriptions: one per object plus a few relations, with their boxes."""
    out: list[tuple[str, tuple]] = []
    for o in scene.objects:
        phrase = pick(rng, (f"{o.color} {o.shape}", f"{o.size} {o.color} {o.shape}", f"a {o.color} {o.shape}",
                            f"the {o.shape} is {o.color}"))
        out.append((phrase, (o.x, o.y, o.w, o.h)))
    options = [(a, b, r) for a, b in permutations(range(len(scene.objects)), 2) for r in RELATIONS
               if relation(scene, a, b, r)]
    for j in rng.permutation(len(options))[:n_relations]:
        a, b, r = options[int(j)]
        oa, ob = scene.objects[a], scene.objects[b]
        x0, y0 = min(oa.x, ob.x), min(oa.y, ob.y)
        x1, y1 = max(oa.x + oa.w, ob.x + ob.w), max(oa.y + oa.h, ob.y + ob.h)
        text = f"{_describe(oa)} {RELATIONS[r][0].replace('to the ', '')} {_describe(ob)}"
        out.append((text, (x0, y0, x1 - x0, y1 - y0)))
    return out
