"""Demo questions: VQA v2, Visual Genome QA and GQA, each answered from the exact scene graph
(a `Balancer` keeps every template's answers unguessable from the words)."""
from __future__ import annotations

from collections.abc import Callable
from itertools import combinations, permutations

import numpy as np

from tasks.demo.language import (
    COLOR_NAMES,
    NUMBER_WORDS,
    RELATIONS,
    Balancer,
    Question,
    Ref,
    a_an,
    capitalize,
    pick,
    refs,
    relation,
    short_refs,
    side_of,
    where,
)
from tasks.demo.scene import PLURALS, SHAPES, Scene

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
    return [_vqa("exist", f"Is there {a_an(c)} {s}?", _yes(scene.count(shape=s, color=c) > 0), "is there a",
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
        return (capitalize(NUMBER_WORDS[int(q.answer)]) if rng.random() < 0.5 else q.answer) + "."
    if q.template == "shape" and rng.random() < 0.5:
        return capitalize(a_an(q.answer)) + "."
    return capitalize(q.answer) + "."


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
        out.append(_gqa("queryShape", text, s, f"The {r.phrase} is {a_an(s)}.",
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
            full = f"Yes, there is {a_an(c)} {s}." if yes else f"No, there are no {c} {PLURALS[s]}."
            program = [("select", [], s, None), ("filter color", [0], c, None), ("exist", [1], "?", None)]
            out.append(_gqa("exist", f"Is there {a_an(c)} {s} in the image?", _yes(yes), full,
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
            text = f"Is there {a_an(p1)} or {a_an(p2)}?"
            full = f"Yes, there is {a_an(p1 if h1 else p2)}." if yes else f"No, there is no {p1} or {p2}."
        else:
            yes = h1 and h2
            text = f"Are there both {a_an(p1)} and {a_an(p2)}?"
            full = f"Yes, there are both {a_an(p1)} and {a_an(p2)}." if yes else \
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


