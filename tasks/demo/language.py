"""Text about demo scenes: captions, region phrases, VQA / GQA / Visual Genome questions, NLVR2 statements.

Every answer is computed from the exact scene graph. Question templates answer only from what is
drawn, and a `Balancer` picks, for each question, the least-used answer of its template among those
the scene allows, so no template's answers can be guessed from the words alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations, permutations
from typing import TypeVar

import numpy as np

from tasks.demo.scene import COLORS, PLURALS, SHAPES, Scene, SceneObject, Theme, margin

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


def _a_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalize(text: str) -> str:
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
    text = _capitalize(opening + _listing([_a_an(_describe(o, with_size)) for o in objs]) + ".")
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
    text = _capitalize(f"{_a_an(_describe(oa))} {RELATIONS[r][0]} {_a_an(_describe(ob))}.")
    return Claim(text, _pair_holds(oa, ob, r))


_PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _caption_where(scene: Scene, rng: np.random.Generator) -> Claim | None:
    options = [(i, w) for i in range(len(scene.objects)) if (w := where(scene, i))]
    if not options:
        return None
    i, w = pick(rng, options)
    o = scene.objects[i]
    text = _capitalize(f"{_a_an(_describe(o, True))} {_PLACES[w]} of the picture.")
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


# ---------------------------------------------------------------- VQA v2 questions

def _yes(truth: bool) -> str:
    return "yes" if truth else "no"


def _vqa(template: str, text: str, answer: str, question_type: str, answer_type: str) -> Question:
    return Question(template, text, answer, {"question_type": question_type, "answer_type": answer_type})


def _vqa_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("color", f"What color is the {r.phrase}?", scene.objects[r.index].color, "what color is the",
                 "other") for r in refs(scene, "no_color")]


def _vqa_shape(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("shape", f"What shape is the {r.phrase}?", scene.objects[r.index].shape, "what", "other")
            for r in refs(scene, "no_shape")]


# Counts are asked of what is drawn (as most of VQA's counting questions are), so a counting question
# presupposes its object: asked of another image, it is often refuted (what the matching objective needs).

def _vqa_count_shape(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("count_shape", f"How many {PLURALS[s]} are there?", str(n), "how many", "number")
            for s in SHAPES if 1 <= (n := scene.count(shape=s)) <= 3]


def _vqa_count_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("count_color", f"How many {c} objects are there?", str(n), "how many", "number")
            for c in COLOR_NAMES if 1 <= (n := scene.count(color=c)) <= 3]


def _vqa_count_color_shape(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("count_color_shape", f"How many {c} {PLURALS[s]} are there?", str(n), "how many", "number")
            for c in COLOR_NAMES for s in SHAPES if 1 <= (n := scene.count(shape=s, color=c)) <= 2]


def _vqa_count_all(scene: Scene, rng: np.random.Generator) -> list[Question]:
    text = pick(rng, ("How many shapes are there?", "How many objects are in the picture?"))
    return [_vqa("count_all", text, str(len(scene.objects)), "how many", "number")]


def _vqa_exist(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("exist", f"Is there {_a_an(c)} {s}?", _yes(scene.count(shape=s, color=c) > 0), "is there a",
                 "yes/no") for c in COLOR_NAMES for s in SHAPES]


def _vqa_exist_any(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [_vqa("exist_any", f"Are there any {PLURALS[s]}?", _yes(scene.count(shape=s) > 0), "are there",
                 "yes/no") for s in SHAPES]


def _vqa_spatial(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for ra, rb in permutations(short_refs(scene), 2):
        for rel, (phrase, _) in RELATIONS.items():
            truth = relation(scene, ra.index, rb.index, rel)
            if truth is not None:
                out.append(_vqa("spatial", f"Is the {ra.phrase} {phrase} the {rb.phrase}?", _yes(truth),
                                "is the", "yes/no"))
    return out


# weights: mostly questions about named objects; questions that fit any image (existence, the total
# count) are kept few, since a sentence that fits any image teaches the matching objective nothing
VQA_TEMPLATES: dict[str, tuple[float, Callable[[Scene, np.random.Generator], list[Question]]]] = {
    "color": (3.0, _vqa_color),
    "shape": (2.0, _vqa_shape),
    "count_shape": (0.75, _vqa_count_shape),
    "count_color": (0.5, _vqa_count_color),
    "count_color_shape": (0.5, _vqa_count_color_shape),
    "count_all": (0.25, _vqa_count_all),
    "exist": (1.0, _vqa_exist),
    "exist_any": (0.25, _vqa_exist_any),
    "spatial": (1.5, _vqa_spatial),
}


class _Candidates(dict):
    """Each template's candidate questions for one scene, enumerated once on first use."""

    def __init__(self, scene: Scene, rng: np.random.Generator,
                 templates: dict[str, tuple[float, Callable[[Scene, np.random.Generator], list[Question]]]]):
        super().__init__()
        self.scene, self.rng, self.templates = scene, rng, templates

    def __missing__(self, name: str) -> list[Question]:
        self[name] = self.templates[name][1](self.scene, self.rng)
        return self[name]


def _sample_questions(scene: Scene, rng: np.random.Generator, balancer: Balancer, n: int,
                      templates: dict[str, tuple[float, Callable]]) -> list[Question]:
    names = list(templates)
    weights = np.array([templates[t][0] for t in names])
    out: list[Question] = []
    seen: set[str] = set()
    candidates = _Candidates(scene, rng, templates)
    for _ in range(3 * n):
        if len(out) == n:
            break
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        q = balancer.pick(rng, name, [c for c in candidates[name] if c.text not in seen])
        if q is not None:
            out.append(q)
            seen.add(q.text)
    return out


def vqa_questions(scene: Scene, rng: np.random.Generator, balancer: Balancer, n: int) -> list[Question]:
    """n VQA v2 questions about the scene (question_type / answer_type in `info`)."""
    return _sample_questions(scene, rng, balancer, n, VQA_TEMPLATES)


# ---------------------------------------------------------------- Visual Genome QA (the visual7w source)

def _vg_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [Question("color", f"What color is the {r.phrase}?", scene.objects[r.index].color)
            for r in refs(scene, "no_color")]


def _vg_shape(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [Question("shape", f"What shape is the {r.phrase}?", scene.objects[r.index].shape)
            for r in refs(scene, "no_shape")]


def _vg_count(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [Question("count", f"How many {PLURALS[s]} are there?", str(n)) for s in SHAPES
            if (n := scene.count(shape=s)) <= 3]


def _vg_where(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return [Question("where", f"Where is the {r.phrase}?", w) for r in refs(scene)
            if (w := where(scene, r.index)) is not None]


VG_TEMPLATES: dict[str, tuple[float, Callable[[Scene, np.random.Generator], list[Question]]]] = {
    "color": (1.0, _vg_color), "shape": (1.0, _vg_shape), "count": (1.0, _vg_count),
    "where": (1.0, _vg_where),
}
_VG_WHERE = {"left": "On the left side.", "right": "On the right side.", "top": "At the top.",
             "bottom": "At the bottom."}


def vg_questions(scene: Scene, rng: np.random.Generator, balancer: Balancer, n: int) -> list[Question]:
    """n Visual Genome QA pairs; `vg_answer` gives the answer as VG writes it ('Red.', 'Two.')."""
    return _sample_questions(scene, rng, balancer, n, VG_TEMPLATES)


def vg_answer(q: Question, rng: np.random.Generator) -> str:
    """VG's answer style: capitalised sentence fragments with a full stop, numbers often in words."""
    if q.template == "where":
        return _VG_WHERE[q.answer]
    if q.template == "count":
        return (_capitalize(NUMBER_WORDS[int(q.answer)]) if rng.random() < 0.5 else q.answer) + "."
    if q.template == "shape" and rng.random() < 0.5:
        return _capitalize(_a_an(q.answer)) + "."
    return _capitalize(q.answer) + "."


# ---------------------------------------------------------------- GQA questions

def _ops(scene: Scene, r: Ref, start: int) -> list[tuple[str, list[int], str, int | None]]:
    """GQA program steps selecting a referred object: (operation, dependencies, argument, object index)."""
    o = scene.objects[r.index]
    steps: list[tuple[str, list[int], str, int | None]] = [("select", [], r.noun, r.index)]
    for a in ("size", "color"):
        if a in r.attrs:
            steps.append((f"filter {a}", [start + len(steps) - 1], getattr(o, a), None))
    return steps


def _gqa(template: str, text: str, answer: str, full: str, types: tuple[str, str, str], program: list,
         refs_: list[Ref], topic: tuple | None = None, claim: tuple | None = None, determines: bool = True,
         global_group: str | None = None, local_group: str = "") -> Question:
    structural, semantic, detailed = types
    info = {"fullAnswer": full, "program": program,
            "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
            "refs": refs_, "groups": {"global": global_group, "local": local_group}}
    return Question(template, text, answer, info, topic, claim or ("text", text), determines)


def _single(scene: Scene, r: Ref, op: tuple[str, str]) -> list:
    steps = _ops(scene, r, 0)
    return steps + [(op[0], [len(steps) - 1], op[1], None)]


def _pair(scene: Scene, ra: Ref, rb: Ref, op: tuple[str, str]) -> list:
    a = _ops(scene, ra, 0)
    b = _ops(scene, rb, len(a))
    return a + b + [(op[0], [len(a) - 1, len(a) + len(b) - 1], op[1], None)]


def _gqa_query_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for r in refs(scene, "no_color"):
        c = scene.objects[r.index].color
        text = pick(rng, (f"What color is the {r.phrase}?", f"Which color is the {r.phrase}?"))
        out.append(_gqa("queryColor", text, c, f"The {r.phrase} is {c}.", ("query", "attr", "queryAttr"),
                        _single(scene, r, ("query", "color")), [r], ("color", r.index),
                        ("query color", r.index), global_group="color", local_group=f"10q-{r.noun}_color"))
    return out


def _gqa_query_shape(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for r in refs(scene, "no_shape"):
        s = scene.objects[r.index].shape
        text = pick(rng, (f"What shape is the {r.phrase}?", f"Which kind of shape is the {r.phrase}?"))
        out.append(_gqa("queryShape", text, s, f"The {r.phrase} is {_a_an(s)}.",
                        ("query", "cat", "queryObject"), _single(scene, r, ("query", "name")), [r],
                        ("shape", r.index), ("query shape", r.index), global_group="shape",
                        local_group=f"10q-{r.phrase.replace(' ', '_')}_name"))
    return out


def _gqa_query_side(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for r in refs(scene):
        side = side_of(scene, r.index)
        if side is not None:
            out.append(_gqa("querySide", f"On which side of the image is the {r.phrase}?", side,
                            f"The {r.phrase} is on the {side} of the image.",
                            ("query", "attr", "positionQuery"), _single(scene, r, ("query", "hposition")),
                            [r],
                            ("side", r.index), ("query side", r.index), global_group="hposition",
                            local_group=f"10q-{r.noun}_hposition"))
    return out


def _gqa_verify_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for r in refs(scene, "no_color"):
        true = scene.objects[r.index].color
        for c in COLOR_NAMES:
            yes = c == true
            full = f"Yes, the {r.phrase} is {c}." if yes else f"No, the {r.phrase} is {true}."
            out.append(_gqa("verifyColor", f"Is the {r.phrase} {c}?", _yes(yes), full,
                            ("verify", "attr", "verifyAttr"), _single(scene, r, ("verify color", c)), [r],
                            ("color", r.index), ("verify color", r.index, c), determines=yes,
                            local_group=f"06-{r.noun}_{c}"))
    return out


def _gqa_choose_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for r in refs(scene, "no_color"):
        true = scene.objects[r.index].color
        other = pick(rng, [c for c in COLOR_NAMES if c != true])
        first, second = (true, other) if rng.random() < 0.5 else (other, true)
        out.append(_gqa("chooseColor", f"Is the {r.phrase} {first} or {second}?", true,
                        f"The {r.phrase} is {true}.", ("choose", "attr", "chooseAttr"),
                        _single(scene, r, ("choose color", f"{first}|{second}")), [r], ("color", r.index),
                        ("choose color", r.index, min(first, second), max(first, second)),
                        local_group=f"07-{r.noun}_{first}|{second}"))
    return out


def _gqa_exist(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for c in COLOR_NAMES:
        for s in SHAPES:
            yes = scene.count(shape=s, color=c) > 0
            full = f"Yes, there is {_a_an(c)} {s}." if yes else f"No, there are no {c} {PLURALS[s]}."
            program = [("select", [], s, None), ("filter color", [0], c, None), ("exist", [1], "?", None)]
            out.append(_gqa("exist", f"Is there {_a_an(c)} {s} in the image?", _yes(yes), full,
                            ("verify", "obj", "existAttr"), program, [], ("exist", c, s),
                            local_group=f"09existAttr-{s}_{c}"))
    return out


def _combos(scene: Scene, rng: np.random.Generator, n_absent: int = 4) -> list[tuple[str, str]]:
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    return present + [absent[int(i)] for i in rng.permutation(len(absent))[:n_absent]]


def _gqa_logic(scene: Scene, rng: np.random.Generator, conj: str) -> list[Question]:
    out = []
    for (c1, s1), (c2, s2) in combinations(_combos(scene, rng), 2):
        if s1 == s2:
            continue
        h1, h2 = scene.count(shape=s1, color=c1) > 0, scene.count(shape=s2, color=c2) > 0
        p1, p2 = f"{c1} {s1}", f"{c2} {s2}"
        if conj == "or":
            yes = h1 or h2
            text = f"Is there {_a_an(p1)} or {_a_an(p2)}?"
            full = f"Yes, there is {_a_an(p1 if h1 else p2)}." if yes else f"No, there is no {p1} or {p2}."
        else:
            yes = h1 and h2
            text = f"Are there both {_a_an(p1)} and {_a_an(p2)}?"
            full = f"Yes, there are both {_a_an(p1)} and {_a_an(p2)}." if yes else \
                f"No, there is no {p2 if h1 else p1}."
        program = [("select", [], s1, None), ("filter color", [0], c1, None), ("exist", [1], "?", None),
                   ("select", [], s2, None), ("filter color", [3], c2, None), ("exist", [4], "?", None),
                   (conj, [2, 5], "", None)]
        detailed = "existAttrOr" if conj == "or" else "existAttrAnd"
        out.append(_gqa(f"logic_{conj}", text, _yes(yes), full, ("logical", "obj", detailed),
                        program, [], local_group=f"11{detailed}-{s1}_{c1}_{s2}_{c2}"))
    return out


def _gqa_logic_or(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return _gqa_logic(scene, rng, "or")


def _gqa_logic_and(scene: Scene, rng: np.random.Generator) -> list[Question]:
    return _gqa_logic(scene, rng, "and")


def _axis(rel: str) -> str:
    return "h" if rel in ("left", "right") else "v"


def _gqa_verify_rel(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for ra, rb in permutations(short_refs(scene), 2):
        for rel, (phrase, opposite) in RELATIONS.items():
            truth = relation(scene, ra.index, rb.index, rel)
            if truth is None:
                continue
            full = f"Yes, the {ra.phrase} is {phrase} the {rb.phrase}." if truth else \
                f"No, the {ra.phrase} is {RELATIONS[opposite][0]} the {rb.phrase}."
            canon = (rel, ra.index, rb.index) if rel in ("left", "above") else (opposite, rb.index, ra.index)
            pair = (min(ra.index, rb.index), max(ra.index, rb.index))
            out.append(_gqa("verifyRel", f"Is the {ra.phrase} {phrase} the {rb.phrase}?", _yes(truth), full,
                            ("verify", "rel", "relVerify"), _pair(scene, ra, rb, ("verify rel", rel)),
                            [ra, rb], (_axis(rel), *pair), ("verify rel", *canon), determines=truth,
                            local_group=f"13-{ra.noun}_{rb.noun}"))
    return out


def _gqa_choose_rel(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for ra, rb in permutations(short_refs(scene), 2):
        for first, second in (("left", "right"), ("above", "below")):
            truth = relation(scene, ra.index, rb.index, first)
            if truth is None:
                continue
            answer = first if truth else second
            if first == "left":
                text = f"Is the {ra.phrase} to the left or right of the {rb.phrase}?"
            else:
                text = f"Is the {ra.phrase} above or below the {rb.phrase}?"
            pair = (min(ra.index, rb.index), max(ra.index, rb.index))
            out.append(_gqa("chooseRel", text, answer,
                            f"The {ra.phrase} is {RELATIONS[answer][0]} the {rb.phrase}.",
                            ("choose", "rel", "chooseRel"),
                            _pair(scene, ra, rb, ("choose rel", f"{first}|{second}")),
                            [ra, rb], (_axis(first), *pair), ("choose rel", first, ra.index, rb.index),
                            local_group=f"12-{ra.noun}_{first}|{second}_{rb.noun}"))
    return out


def _gqa_same_color(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for ra, rb in combinations(short_refs(scene, "no_color"), 2):
        ca, cb = scene.objects[ra.index].color, scene.objects[rb.index].color
        full = f"Yes, both the {ra.phrase} and the {rb.phrase} are {ca}." if ca == cb else \
            f"No, the {ra.phrase} is {ca} and the {rb.phrase} is {cb}."
        out.append(_gqa("sameColor", f"Are the {ra.phrase} and the {rb.phrase} the same color?",
                        _yes(ca == cb), full, ("compare", "attr", "sameColor"),
                        _pair(scene, ra, rb, ("same", "color")), [ra, rb],
                        local_group=f"05-{ra.noun}_{rb.noun}_color"))
    return out


def _gqa_compare_size(scene: Scene, rng: np.random.Generator) -> list[Question]:
    out = []
    for ra, rb in permutations(short_refs(scene, "no_size"), 2):
        oa, ob = scene.objects[ra.index], scene.objects[rb.index]
        if oa.shape == ob.shape or oa.size == ob.size:
            continue
        word = pick(rng, ("larger", "smaller"))
        winner = ra if (oa.size == "large") == (word == "larger") else rb
        answer = scene.objects[winner.index].shape
        out.append(_gqa("compareSize", f"Which is {word}, the {ra.phrase} or the {rb.phrase}?", answer,
                        f"The {winner.phrase} is {word} than the {(rb if winner is ra else ra).phrase}.",
                        ("compare", "attr", "compare"), _pair(scene, ra, rb, ("choose", word)), [ra, rb],
                        local_group=f"08-{ra.noun}_{rb.noun}_{word}"))
    return out


GQA_TEMPLATES: dict[str, tuple[float, Callable[[Scene, np.random.Generator], list[Question]]]] = {
    "queryColor": (2.0, _gqa_query_color),
    "queryShape": (1.5, _gqa_query_shape),
    "querySide": (1.0, _gqa_query_side),
    "verifyColor": (1.5, _gqa_verify_color),
    "chooseColor": (1.0, _gqa_choose_color),
    "exist": (1.5, _gqa_exist),
    "logic_or": (0.75, _gqa_logic_or),
    "logic_and": (0.75, _gqa_logic_and),
    "verifyRel": (1.5, _gqa_verify_rel),
    "chooseRel": (1.0, _gqa_choose_rel),
    "sameColor": (1.0, _gqa_same_color),
    "compareSize": (1.0, _gqa_compare_size),
}
GQA_FAMILIES: tuple[tuple[str, ...], ...] = (("queryColor", "verifyColor", "chooseColor"),
                                             ("verifyRel", "chooseRel"))


def gqa_questions(scene: Scene, rng: np.random.Generator, balancer: Balancer, n: int,
                  family_rate: float = 0.5) -> list[Question]:
    """n GQA questions; some come with siblings on the same topic so consistency can be measured."""
    names = list(GQA_TEMPLATES)
    weights = np.array([GQA_TEMPLATES[t][0] for t in names])
    out: list[Question] = []
    seen: set[str] = set()
    candidates = _Candidates(scene, rng, GQA_TEMPLATES)

    def add(q: Question | None) -> None:
        if q is not None:
            out.append(q)
            seen.add(q.text)

    for _ in range(3 * n):
        if len(out) >= n:
            break
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        base = balancer.pick(rng, name, [c for c in candidates[name] if c.text not in seen])
        add(base)
        family = next((f for f in GQA_FAMILIES if name in f), None)
        if base is None or family is None or rng.random() >= family_rate:
            continue
        for sibling in rng.permutation(len(family))[: int(rng.integers(1, 3))]:
            if len(out) >= n:
                break
            sib = family[int(sibling)]
            cands = [c for c in candidates[sib] if c.topic == base.topic and c.text not in seen]
            add(balancer.pick(rng, sib, cands))
    return out


def gqa_links(questions: list[Question]) -> tuple[list[list[int]], list[list[int]]]:
    """For one image's questions: whom each one entails, and whom it is equivalent to (itself included)."""
    entailed, equivalent = [], []
    for i, q in enumerate(questions):
        entailed.append([j for j, p in enumerate(questions)
                         if j != i and q.determines and q.topic is not None and p.topic == q.topic])
        equivalent.append([j for j, p in enumerate(questions) if p.claim == q.claim])
    return entailed, equivalent


def gqa_valid_answers(template: str) -> list[str]:
    """The answers that make sense for a template (GQA's 'valid' and, in this world, 'plausible' choices)."""
    if template in ("queryColor", "chooseColor"):
        return list(COLOR_NAMES)
    if template in ("queryShape", "compareSize"):
        return list(SHAPES)
    if template == "querySide":
        return ["left", "right"]
    if template == "chooseRel":
        return ["left", "right", "above", "below"]
    return ["yes", "no"]


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
    text = pick(rng, (f"The {side} image contains {_a_an(c)} {s}.",
                      f"There is {_a_an(c)} {s} in the {side} image."))
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
    return "both_exist", f"Both images contain {_a_an(s)}.", \
        lambda a, b: a.count(shape=s) > 0 and b.count(shape=s) > 0


def _st_either(rng: np.random.Generator, theme: Theme) -> tuple[str, str, Truth]:
    c, s = _choose_args(rng, theme)
    return "either_exist", f"At least one image contains {_a_an(c)} {s}.", \
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

    text = f"The {side} image has {_a_an(c1)} {s1} {RELATIONS[rel][0]} {_a_an(c2)} {s2}."
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
