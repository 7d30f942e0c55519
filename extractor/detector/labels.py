"""Object and attribute names of the detector's classes, read from label files (one class a line).

The Visual Genome 1600 object / 400 attribute vocabularies ship in ``extractor/data/``; any other
label file with the same layout works (the demo world has its own classes). A line may hold
synonyms separated by commas; the first one is the name we show.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
OBJECTS_FILE = DATA_DIR / "objects_vocab.txt"
ATTRIBUTES_FILE = DATA_DIR / "attributes_vocab.txt"


def display_name(line: str) -> str:
    """The shown name of one label line: its first comma-separated synonym, stripped."""
    return line.split(",")[0].strip()


def display_names(lines: list[str]) -> list[str]:
    """Shown names of many label lines, in order."""
    return [display_name(s) for s in lines]


@lru_cache(maxsize=16)
def _read(path: str) -> tuple[str, ...]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label file not found: {p}")
    lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    empty = [i + 1 for i, s in enumerate(lines) if not display_name(s)]
    if empty:
        raise ValueError(f"label file {p}: empty name on line(s) {empty[:5]}")
    return tuple(display_names(lines))


def read_labels(path: str | Path) -> list[str]:
    """Names from a label file, index i = class i (background excluded), first synonym shown."""
    return list(_read(str(Path(path).resolve())))


def object_names(path: str | Path | None = None) -> list[str]:
    """Object class names; the shipped Visual Genome 1600 unless a label file is given."""
    return read_labels(OBJECTS_FILE if path is None else path)


def attribute_names(path: str | Path | None = None) -> list[str]:
    """Attribute names; the shipped Visual Genome 400 unless a label file is given."""
    return read_labels(ATTRIBUTES_FILE if path is None else path)
