"""Fingerprints of what input paths hold, so a task's output folder follows its inputs' contents.

The rule (why: docs/cluster.md, "Outputs follow contents"):
- a file named directly is hashed (sha256 of its bytes) when it is at most HASH_LIMIT bytes, else
  described by its size and modification time (mtime_ns);
- a folder is described by the sorted (name, size, mtime_ns) of every file below it, skipping names that
  start with "." (editor, OS and NFS leftovers), and a list file (of images) by its own fingerprint and
  the (name, size, mtime_ns) of the files it names.
A fingerprint is computed once per process and path (Luigi asks for outputs many times).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from extractor.fileio import file_sha256

HASH_LIMIT = 16 * 2**20
"""Files named directly up to this many bytes are hashed: a few milliseconds each, and the same bound under
which the checks before work already parse JSON inputs in full."""

Members = Callable[[Path], Sequence[Path]]
"""The files a list file names (extractor's list_images for image lists); a folder stands for all its files."""

_MEMO: dict[tuple[str, Members | None], dict[str, Any]] = {}


def fingerprint(path: str | os.PathLike, members: Members | None = None) -> dict[str, Any]:
    """{"digest", "files", "bytes"} of what `path` holds; `members` gives the files a list file names.

    digest is "sha256:<hex>" (a small file's bytes), "stat:<hex>" (sizes and mtimes), "missing" or
    "unreadable: <why>"; the checks before work report the last two, so they never raise here.
    """
    key = (os.path.abspath(path), members)
    if key not in _MEMO:
        _MEMO[key] = _describe(Path(path), members)
    return _MEMO[key]


def forget_fingerprints() -> None:
    """Drop the memo, for a long-lived process that must see inputs changed since it first looked."""
    _MEMO.clear()


def _describe(path: Path, members: Members | None) -> dict[str, Any]:
    try:
        if not path.exists():
            return {"digest": "missing", "files": 0, "bytes": 0}
        if path.is_dir():
            return _folder(path)
        own = _file(path)
        listed = [p for p in members(path) if p != path] if members else []
    except (OSError, ValueError) as e:
        return {"digest": f"unreadable: {e}", "files": 0, "bytes": 0}
    if not listed:
        return own
    rest = _listing(path.parent, listed)
    digest = hashlib.sha256(f"{own['digest']}\n{rest['digest']}".encode()).hexdigest()
    return {"digest": f"stat:{digest}", "files": 1 + rest["files"], "bytes": own["bytes"] + rest["bytes"]}


def _file(path: Path) -> dict[str, Any]:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        return {"digest": f"sha256:{file_sha256(path)}", "files": 1, "bytes": st.st_size}
    stamp = hashlib.sha256(f"{st.st_size}\t{st.st_mtime_ns}".encode()).hexdigest()
    return {"digest": f"stat:{stamp}", "files": 1, "bytes": st.st_size}


def _folder(root: Path) -> dict[str, Any]:
    """Every non-hidden file below `root` (symlinked files followed, symlinked folders not), as _listing."""
    lines, total = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith("."):
                total += _line(os.path.join(folder, name), os.path.normpath(os.path.join(rel, name)), lines)
    return _digest(lines, total)


def _listing(root: Path, files: Sequence[Path]) -> dict[str, Any]:
    """The (name relative to root, size, mtime_ns) of each file; one that cannot be stat'ed counts as such."""
    lines: list[str] = []
    total = sum(_line(str(p), os.path.relpath(p, root), lines) for p in files)
    return _digest(lines, total)


def _line(path: str, name: str, lines: list[str]) -> int:
    try:
        st = os.stat(path)
    except OSError as e:
        lines.append(f"{name}\tunreadable {e.errno}")
        return 0
    lines.append(f"{name}\t{st.st_size}\t{st.st_mtime_ns}")
    return st.st_size


def _digest(lines: list[str], total: int) -> dict[str, Any]:
    lines.sort()
    return {"digest": f"stat:{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()}", "files": len(lines),
            "bytes": total}
