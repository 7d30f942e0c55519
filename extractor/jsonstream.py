"""Incremental JSON reading, checked record fields, and atomic writing.

Visual Genome and GQA ship single JSON documents of several GB; these helpers read one record at
a time through a bounded buffer (json.JSONDecoder.raw_decode on buffered reads), so memory stays
proportional to the largest record, not the file. Every error names the file and the record.
The dataset readers (tasks.data.readers, the detector's annotations) check fields with `field`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from extractor.fileio import atomic_write, writing

CHUNK_CHARS = 1 << 20
_NON_BLANK = re.compile(r"[^ \t\n\r]")
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")


class DataFormatError(ValueError):
    """A data or prediction file that does not hold what its format promises (names file and record)."""


def _unparsable(err: Exception) -> str:
    """Why json gave up on a value it did not call a syntax error: nesting past Python's recursion limit
    (RecursionError), or an integer longer than int() converts (ValueError)."""
    if isinstance(err, RecursionError):
        return "invalid JSON: nested too deeply to parse"
    return f"invalid JSON: {str(err).split(';')[0]}"


class _Scanner:
    """A cursor over a JSON text that decodes one value at a time and refills its buffer on demand."""

    def __init__(self, fh: IO[str], path: Path, chunk_chars: int) -> None:
        self.path = path
        self._fh = fh
        self._chunk = chunk_chars
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters of the file dropped from the front of the buffer
        self._eof = False
        self._decoder = json.JSONDecoder()
        self.where = ""  # the record being read, e.g. "record 12: ", for error messages

    def error(self, what: str, at: int | None = None) -> DataFormatError:
        char = self._offset + (self._pos if at is None else at)
        return DataFormatError(f"{self.path}: {self.where}{what} (character {char})")

    def _fill(self, want: int) -> bool:
        if self._eof:
            return False
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._offset += self._pos
            self._pos = 0
        try:
            data = self._fh.read(max(want, self._chunk))
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{self.path}: not UTF-8 text ({err.reason})") from None
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def peek(self) -> str:
        """The next non-blank character without consuming it; '' at the end of the file."""
        while True:
            m = _NON_BLANK.search(self._buf, self._pos)
            if m is not None:
                self._pos = m.start()
                return self._buf[self._pos]
            self._pos = len(self._buf)
            if not self._fill(self._chunk):
                return ""

    def take(self, char: str) -> None:
        if self.peek() != char:
            found = self.peek() or "end of file"
            raise self.error(f"expected {char!r}, found {found!r}")
        self._pos += 1

    def value(self) -> Any:
        """Decode the next complete JSON value, reading more of the file while it is cut off."""
        if not self.peek():
            raise self.error("unexpected end of file")
        while True:
            try:
                obj, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as err:
                # A value cut by the buffer's end fails inside a string or within a token's length
                # of the end; only then is reading more worth it, any other failure is in the file.
                cut = "Unterminated string" in err.msg or len(self._buf) - err.pos <= 6
                if cut and self._fill(len(self._buf)):
                    continue
                raise self.error(f"invalid JSON: {err.msg}", err.pos) from None
            except (RecursionError, ValueError) as err:
                raise self.error(_unparsable(err)) from None
            if _NUMBER_TAIL.fullmatch(self._buf, end) and self._fill(self._chunk):
                continue  # a number cut by the buffer's end ("12", "-0.", "1e") goes on in the next chunk
            self._pos = end
            return obj

    def key(self) -> str:
        if self.peek() != '"':
            raise self.error("expected an object key")
        return self.value()

    def array_items(self, label: str = "") -> Iterator[Any]:
        """Elements of the array whose '[' is next (`label` prefixes the record in errors)."""
        self.take("[")
        if self.peek() == "]":
            self._pos += 1
            return
        index = 0
        while True:
            self.where = f"{label}record {index}: "
            yield self.value()
            index += 1
            if not self._more("]", "an array"):
                return

    def object_members(self) -> Iterator[str]:
        """Keys of the object whose '{' is next; after each key the scanner stands at its value."""
        self.take("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            key = self.key()
            self.where = f"key {key!r}: "
            self.take(":")
            yield key
            if not self._more("}", "an object"):
                return

    def _more(self, close: str, what: str) -> bool:
        """After a member: True at ',' (another follows), False at the closing bracket, else an error."""
        sep = self.peek()
        self._pos += 1
        if sep == close:
            self.where = ""
            return False
        if sep != ",":
            self._pos -= 1
            raise self.error(f"expected ',' or {close!r} in {what}, found {sep or 'end of file'!r}")
        return True

    def finish(self) -> None:
        if self.peek():
            raise self.error("unexpected data after the top-level value")


def _open(path: str | os.PathLike[str]) -> IO[str]:
    return open(path, encoding="utf-8-sig", newline="")


def iter_array(path: str | os.PathLike[str], *, chunk_chars: int = CHUNK_CHARS) -> Iterator[Any]:
    """Elements of a file whose top-level value is an array, one at a time."""
    path = Path(path)
    with _open(path) as fh:
        sc = _Scanner(fh, path, chunk_chars)
        if sc.peek() != "[":
            raise sc.error("expected a top-level JSON array")
        yield from sc.array_items()
        sc.finish()


def iter_object(path: str | os.PathLike[str], *, chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, Any]]:
    """(key, value) members of a file whose top-level value is an object (e.g. GQA questions)."""
    yield from iter_members(path, (), chunk_chars=chunk_chars)


def iter_members(
    path: str | os.PathLike[str], stream: Collection[str], *, chunk_chars: int = CHUNK_CHARS
) -> Iterator[tuple[str, Any]]:
    """Members of a top-level object; the arrays under the keys in `stream` come as element iterators.

    For a key in `stream` the value yielded is an iterator over that array's elements, valid until
    the next member is requested (unconsumed elements are then skipped), like itertools.groupby.
    This reads `{"info": ..., "annotations": [...]}` files (COCO, VQA) without holding the array.
    """
    path = Path(path)
    with _open(path) as fh:
        sc = _Scanner(fh, path, chunk_chars)
        if sc.peek() != "{":
            raise sc.error("expected a top-level JSON object")
        for key in sc.object_members():
            if key in stream:
                if sc.peek() != "[":
                    raise sc.error(f"key {key!r}: expected an array")
                items = sc.array_items(f"{key!r} ")
                yield key, items
                for _ in items:
                    pass
            else:
                yield key, sc.value()
        sc.finish()


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON-lines file."""
    path = Path(path)
    with _open(path) as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataFormatError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
                    except (RecursionError, ValueError) as err:
                        raise DataFormatError(f"{path}: line {lineno}: {_unparsable(err)}") from None
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text ({err.reason})") from None


def load_json(path: str | os.PathLike[str]) -> Any:
    """A whole (small) JSON file, with a parse error naming the file and position."""
    path = Path(path)
    with _open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}: invalid JSON: {err.msg} (line {err.lineno} column {err.colno})"
            ) from None
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text ({err.reason})") from None
        except (RecursionError, ValueError) as err:
            raise DataFormatError(f"{path}: {_unparsable(err)}") from None


class At:
    """Where a record sits (file + a description formatted only when an error needs it)."""

    __slots__ = ("path", "fmt", "args")

    def __init__(self, path: Path, fmt: str, *args: Any) -> None:
        self.path, self.fmt, self.args = path, fmt, args

    @property
    def where(self) -> str:
        return self.fmt.format(*self.args)

    def error(self, msg: str) -> DataFormatError:
        return DataFormatError(f"{self.path}: {self.where}: {msg}")


_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "number": (int, float), "list": (list,), "dict": (dict,), "bool": (bool,),
}


def is_kind(value: Any, kind: str) -> bool:
    """Whether a JSON value is of `kind` (str, int, number, list, dict, bool); a bool is no number."""
    return isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))


def field(rec: Any, key: str, kind: str, at: At, *, optional: bool = False) -> Any:
    """`rec[key]`, checked to be of `kind`; an error names the file, the record and the key."""
    if not isinstance(rec, dict):
        raise at.error(f"expected a JSON object, got {type(rec).__name__} {rec!r:.80}")
    value = rec.get(key)
    if value is None:
        if optional:
            return None
        raise at.error(f"missing key {key!r}" if key not in rec else f"key {key!r} is null")
    if not is_kind(value, kind):
        raise at.error(f"key {key!r} should be {kind}, got {value!r:.80}")
    return value


def first_field(rec: Any, keys: tuple[str, ...], kind: str, at: At, *, optional: bool = False) -> Any:
    """The first of `keys` present in `rec` (releases spell some keys two ways), checked like `field`."""
    for k in keys:
        if isinstance(rec, dict) and rec.get(k) is not None:
            return field(rec, k, kind, at)
    if optional:
        return None
    raise at.error(f"missing key {' or '.join(repr(k) for k in keys)}")


def str_list(rec: Any, key: str, at: At) -> tuple[str, ...]:
    """An optional list of strings (absent: empty)."""
    values = field(rec, key, "list", at, optional=True) or []
    if not all(isinstance(v, str) for v in values):
        raise at.error(f"key {key!r} should be a list of strings, got {values!r:.80}")
    return tuple(values)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temporary file in the same folder, fsync and rename, so readers never see half a file.

    An OS error (disk full...) raises WriteError naming `path`, and the temporary file is removed.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    """json.dump to `path` atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False))
