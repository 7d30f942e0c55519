"""Injected OS errors for the disk-full tests: the nth write-like call on files under a folder fails.

The project writes every byte through os.write / os.pwrite (extractor/fileio.py and the feature store's
HDF5 file object), so patching those, plus os.fsync, os.ftruncate and os.replace, reaches every
kind of write. A subprocess gets the same faults from the LXMERT_TEST_FAULT environment variable
through the sitecustomize module that `sitecustomize_dir` writes.
"""
from __future__ import annotations

import errno
import json
import os
from collections import Counter
from pathlib import Path

CALLS = ("write", "pwrite", "fsync", "ftruncate", "replace")
ENV = "LXMERT_TEST_FAULT"


class Faults:
    """Counts the write-like calls on files under `root` (whose path contains `match`) and fails one.

    With `short`, the chosen call first writes half its bytes and reports it, as a filling disk does,
    and the call after it fails.
    """

    def __init__(self, root: str | os.PathLike, call: str | None = None, nth: int = 0, err: int = errno.ENOSPC,
                 match: str = "", short: bool = False) -> None:
        self.root, self.match = os.path.realpath(root), match
        self.call, self.nth, self.err, self.short = call, nth, err, short
        self.counts: Counter[str] = Counter()
        self.fired: str | None = None  # the path the fault hit
        self.replaced: list[str] = []  # destinations of the renames done before the fault

    def _path(self, name: str, args: tuple) -> str | None:
        if name == "replace":
            return os.path.realpath(os.path.abspath(args[1]))
        try:
            return os.readlink(f"/proc/self/fd/{args[0]}")
        except OSError:
            return None

    def _wrap(self, name: str, orig):
        def wrapped(*args, **kwargs):
            path = self._path(name, args)
            if path is None or not path.startswith(self.root) or self.match not in path or self.fired:
                return orig(*args, **kwargs)
            self.counts[name] += 1
            n = self.counts[name]
            if name == self.call and n == self.nth and self.short and name in ("write", "pwrite") \
                    and len(args[1]) > 1:
                half = memoryview(args[1])[: len(args[1]) // 2]
                return orig(args[0], half, *args[2:], **kwargs)
            if name == self.call and n == self.nth + (1 if self.short else 0):
                self.fired = path
                raise OSError(self.err, os.strerror(self.err))
            result = orig(*args, **kwargs)
            if name == "replace":
                self.replaced.append(path)
            return result
        return wrapped

    def install(self, monkeypatch=None) -> Faults:
        """Patch the os functions (through pytest's monkeypatch when given, so they are restored)."""
        for name in CALLS:
            wrapped = self._wrap(name, getattr(os, name))
            if monkeypatch is not None:
                monkeypatch.setattr(os, name, wrapped)
            else:
                setattr(os, name, wrapped)
        return self

    def to_env(self) -> str:
        return json.dumps({"root": self.root, "call": self.call, "nth": self.nth, "err": self.err,
                           "match": self.match, "short": self.short})


def install_from_env() -> None:
    """Install the faults LXMERT_TEST_FAULT describes (called by the generated sitecustomize)."""
    spec = os.environ.get(ENV)
    if spec:
        Faults(**json.loads(spec)).install()


def sitecustomize_dir(folder: Path) -> Path:
    """A folder holding a sitecustomize.py that installs the faults of LXMERT_TEST_FAULT at start-up."""
    folder.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(here)!r})\nimport faults\nfaults.install_from_env()\n")
    return folder
