"""Answers: LXMERT's convert_ans, the official VQA normalisation, soft scores and answer tables.

An answer table is the label order of a QA head: row i of the head scores answer i, so the tables
the released checkpoints were trained with (shipped in tasks/data/) are the defaults.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from extractor.jsonstream import DataFormatError, load_json, write_json_atomic

if TYPE_CHECKING:
    from tasks.data.readers import VGQA, GQAQuestion, VQAAnnotation

# ---------------------------------------------------------------------------------------------
# LXMERT's answer conversion (pretraining labels and fine-tuning head initialisation)

_NUMBER_WORDS_1_10 = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}


def convert_ans(ans: str) -> str:
    """Map an answer onto the 9500-answer pretraining vocabulary's spelling, as LXMERT does.

    Lowercase; drop one trailing '.'; drop a leading "a ", then "an ", then "the " (checked in
    that order, each once); number words one..ten become digits; "grey" becomes "gray".
    """
    if not ans:
        return ""
    ans = ans.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):
        if ans.startswith(article):
            ans = ans[len(article):].strip()
    if ans == "grey":
        return "gray"
    return _NUMBER_WORDS_1_10.get(ans, ans)


# ---------------------------------------------------------------------------------------------
# The official VQA answer normalisation (vqaEval.py: processPunctuation + processDigitArticle)

# Contracted spellings without apostrophes -> with. The official table's four capitalised keys
# ("Im", "Ive", "Id've", "I'dve") can never match the lower-cased words and are left out; the
# odd entry "somebody'd" -> "somebodyd" is the official one.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {"none": "0", "zero": "0", **_NUMBER_WORDS_1_10}
ARTICLES = frozenset({"a", "an", "the"})
# Characters handled one by one; "'", ":" and "." are not among them ("." has its own rule).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-AHEAD for the text "<="
# plus a digit, which never matches in front of a '.', so only "not followed by a digit" acts.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) where re.sub takes `count`: at most 32 are removed.
_PERIOD_LIMIT = 32


def process_punctuation(text: str) -> str:
    """The official punctuation rule, quirks included.

    Each character of PUNCTUATION is deleted when it is followed or preceded by a space in the
    ORIGINAL text, or when the text anywhere holds a comma between two digits (then every one is
    deleted); otherwise it becomes a space. Then a '.' not followed by a digit is deleted, at most
    32 times.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lowercase, split on whitespace, number words -> digits, drop articles, expand contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official normalisation of one answer: punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(text))


def vqa_soft_score(count: int) -> float:
    """Score of an answer given by `count` of the 10 annotators: 0, 0.3, 0.6, 0.9, then 1."""
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def vqa_label(answers: Iterable[str], table: AnswerTable | None = None) -> dict[str, float]:
    """{answer: soft score} from the annotators' answers after normalize_answer.

    With a table, answers outside it are dropped, as the released VQA data did for its 3129.
    """
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: vqa_soft_score(c) for a, c in counts.items() if table is None or a in table}


# ---------------------------------------------------------------------------------------------
# Answer tables

class AnswerTable:
    """An ordered answer vocabulary: label i is row i of a QA head.

    `dsets` (optional, one list per answer) records which QA sources use each answer, as the
    9500-answer pretraining table does.
    """

    def __init__(self, answers: Iterable[str], dsets: Iterable[Sequence[str]] | None = None) -> None:
        self.label2ans: list[str] = list(answers)
        self.ans2label: dict[str, int] = {}
        for i, ans in enumerate(self.label2ans):
            if not isinstance(ans, str):
                raise ValueError(f"answers: label {i} is {ans!r}, not a string")
            if ans in self.ans2label:
                raise ValueError(f"answers: {ans!r} appears twice (labels {self.ans2label[ans]} and {i})")
            self.ans2label[ans] = i
        self.dsets: list[list[str]] | None = None
        if dsets is not None:
            self.dsets = [list(d) for d in dsets]
            if len(self.dsets) != len(self.label2ans):
                raise ValueError(f"dsets: {len(self.dsets)} entries for {len(self.label2ans)} answers")

    def __len__(self) -> int:
        return len(self.label2ans)

    def __contains__(self, ans: object) -> bool:
        return ans in self.ans2label

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnswerTable):
            return NotImplemented
        return self.label2ans == other.label2ans and self.dsets == other.dsets

    def __repr__(self) -> str:
        return f"AnswerTable({len(self)} answers)"

    def label(self, ans: str) -> int:
        """The label of an answer (KeyError naming it when absent)."""
        try:
            return self.ans2label[ans]
        except KeyError:
            raise KeyError(f"answer {ans!r} is not in the table") from None

    def answer(self, label: int) -> str:
        return self.label2ans[label]

    def subset(self, dsets: Iterable[str]) -> AnswerTable:
        """The answers used by any of `dsets` (LXMERT's pretraining table restricted to QA sets)."""
        if self.dsets is None:
            raise ValueError("subset: this table records no dsets")
        wanted = set(dsets)
        keep = [i for i, d in enumerate(self.dsets) if wanted & set(d)]
        return AnswerTable([self.label2ans[i] for i in keep], [self.dsets[i] for i in keep])

    def save(self, ans2label_path: str | os.PathLike[str], label2ans_path: str | os.PathLike[str]) -> None:
        """Write LXMERT's pair of files: {answer: label} and [answer, ...]."""
        write_json_atomic(ans2label_path, self.ans2label)
        write_json_atomic(label2ans_path, self.label2ans)

    def save_pretrain(self, path: str | os.PathLike[str]) -> None:
        """Write LXMERT's pretraining format [{"ans": ..., "dsets": [...]}, ...]."""
        if self.dsets is None:
            raise ValueError("save_pretrain: this table records no dsets")
        write_json_atomic(path, [{"ans": a, "dsets": d} for a, d in zip(self.label2ans, self.dsets)])

    @classmethod
    def load(
        cls, ans2label_path: str | os.PathLike[str], label2ans_path: str | os.PathLike[str] | None = None
    ) -> AnswerTable:
        """Read an ans2label file (and check it against its label2ans file when given)."""
        label2ans = None if label2ans_path is None else load_json(label2ans_path)
        return cls._from_objects(
            load_json(ans2label_path), label2ans, str(ans2label_path), str(label2ans_path))

    @classmethod
    def load_pretrain(cls, path: str | os.PathLike[str]) -> AnswerTable:
        """Read LXMERT's pretraining table [{"ans", "dsets"}]."""
        return cls._from_pretrain_objects(load_json(path), str(path))

    @classmethod
    def _from_objects(cls, ans2label: Any, label2ans: Any, a_name: str, l_name: str) -> AnswerTable:
        if not isinstance(ans2label, dict):
            raise DataFormatError(f"{a_name}: expected an object {{answer: label}}")
        answers: list[str | None] = [None] * len(ans2label)
        for ans, label in ans2label.items():
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(answers):
                raise DataFormatError(f"{a_name}: answer {ans!r} has label {label!r}, "
                                      f"expected an integer in [0, {len(answers)})")
            if answers[label] is not None:
                raise DataFormatError(f"{a_name}: label {label} is given to {answers[label]!r} and {ans!r}")
            answers[label] = ans
        if label2ans is not None and label2ans != answers:
            if not isinstance(label2ans, list):
                raise DataFormatError(f"{l_name}: expected a list of answers")
            if len(label2ans) != len(answers):
                raise DataFormatError(f"{l_name}: {len(label2ans)} answers but {a_name} has {len(answers)}")
            bad = next(i for i, (x, y) in enumerate(zip(label2ans, answers)) if x != y)
            raise DataFormatError(
                f"{l_name}: label {bad} is {label2ans[bad]!r} but {a_name} gives it to {answers[bad]!r}")
        return cls(answers)  # type: ignore[arg-type]

    @classmethod
    def _from_pretrain_objects(cls, entries: Any, name: str) -> AnswerTable:
        if not isinstance(entries, list):
            raise DataFormatError(f"{name}: expected a list of {{ans, dsets}}")
        answers, dsets = [], []
        for i, e in enumerate(entries):
            if (not isinstance(e, dict) or not isinstance(e.get("ans"), str)
                    or not isinstance(e.get("dsets"), list)
                    or not all(isinstance(d, str) for d in e["dsets"])):
                raise DataFormatError(
                    f"{name}: record {i}: expected {{\"ans\": str, \"dsets\": [str]}}, got {e!r:.80}")
            answers.append(e["ans"])
            dsets.append(e["dsets"])
        try:
            return cls(answers, dsets)
        except ValueError as err:
            raise DataFormatError(f"{name}: {err}") from None


def _packaged(name: str) -> Any:
    res = importlib.resources.files("tasks") / "data" / name
    try:
        return json.loads(res.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(f"tasks/data/{name}: cannot read the shipped table ({err})") from None


def default_vqa_table() -> AnswerTable:
    """The 3129-answer VQA table of the released LXMERT VQA checkpoint."""
    return AnswerTable._from_objects(
        _packaged("vqa_trainval_ans2label.json"), _packaged("vqa_trainval_label2ans.json"),
        "tasks/data/vqa_trainval_ans2label.json", "tasks/data/vqa_trainval_label2ans.json")


def default_gqa_table() -> AnswerTable:
    """The 1842-answer GQA table of the released LXMERT GQA checkpoint."""
    return AnswerTable._from_objects(
        _packaged("gqa_trainval_ans2label.json"), _packaged("gqa_trainval_label2ans.json"),
        "tasks/data/gqa_trainval_ans2label.json", "tasks/data/gqa_trainval_label2ans.json")


def default_pretrain_table(dsets: Iterable[str] | None = None) -> AnswerTable:
    """The 9500-answer pretraining table; with `dsets`, only answers used by those QA sources."""
    name = "lxmert_all_ans.json"
    table = AnswerTable._from_pretrain_objects(_packaged(name), f"tasks/data/{name}")
    return table if dsets is None else table.subset(dsets)


def _ranked(counts: Mapping[str, int], min_count: int) -> list[str]:
    # Most frequent first, ties alphabetical: deterministic (the released tables' order is not
    # reproducible, which is why they stay the defaults).
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


def build_vqa_table(annotations: Iterable[VQAAnnotation], min_count: int = 9) -> AnswerTable:
    """Answers (normalize_answer of multiple_choice_answer) chosen in >= min_count questions.

    (The original table script also deleted commas afterwards; none survive the punctuation rule.)
    """
    per_question: dict[str, set[int]] = {}
    for ann in annotations:
        per_question.setdefault(normalize_answer(ann.multiple_choice_answer), set()).add(ann.question_id)
    return AnswerTable(_ranked({a: len(q) for a, q in per_question.items()}, min_count))


def build_gqa_table(questions: Iterable[GQAQuestion], min_count: int = 1) -> AnswerTable:
    """GQA answers (used verbatim, as GQA's are already clean) seen in >= min_count questions."""
    counts = Counter(q.answer for q in questions if q.answer is not None)
    return AnswerTable(_ranked(counts, min_count))


PRETRAIN_QA_SOURCES = ("vqa", "visual7w", "gqa")  # the order of `dsets` in LXMERT's table


def build_pretrain_table(
    vqa: Iterable[VQAAnnotation] = (),
    gqa: Iterable[GQAQuestion] = (),
    visual7w: Iterable[VGQA] = (),
    min_count: int | Mapping[str, int] = 9,
) -> AnswerTable:
    """A pretraining table from VQA, GQA and Visual Genome QA ("visual7w") answers.

    Each source's answers pass through convert_ans (VQA's after normalize_answer); an answer is
    kept when one source has it in >= min_count questions (per source when a mapping); answers are
    sorted alphabetically and `dsets` lists, in the order vqa, visual7w, gqa, the sources that keep it.
    """
    sources = {
        "vqa": (convert_ans(normalize_answer(a.multiple_choice_answer)) for a in vqa),
        "visual7w": (convert_ans(q.answer) for q in visual7w),
        "gqa": (convert_ans(q.answer) for q in gqa if q.answer is not None),
    }
    kept: dict[str, list[str]] = {}
    for name in PRETRAIN_QA_SOURCES:
        threshold = min_count if isinstance(min_count, int) else min_count.get(name, 9)
        for ans in _ranked(Counter(sources[name]), threshold):
            kept.setdefault(ans, []).append(name)
    answers = sorted(kept)
    return AnswerTable(answers, [kept[a] for a in answers])


def head_init_mapping(target: AnswerTable, pretrain: AnswerTable) -> list[int]:
    """For each target label, the pretraining-head row that initialises it (via convert_ans), or -1.

    Fine-tuning copies row mapping[i] of the pretrained QA head's last layer into row i and zeros
    the rows marked -1, as the original fine-tuning initialisation does.
    """
    return [pretrain.ans2label.get(convert_ans(ans), -1) for ans in target.label2ans]


def convert_label(label: Mapping[str, float], table: AnswerTable) -> dict[str, float]:
    """A pretraining-corpus label mapped onto `table`: convert_ans each answer, drop absent ones.

    This is the conversion LXMERT applies when loading its corpus; where two answers convert to
    the same one, the higher score is kept.
    """
    out: dict[str, float] = {}
    for ans, score in label.items():
        new = convert_ans(ans)
        if new in table and score > out.get(new, float("-inf")):
            out[new] = score
    return out

