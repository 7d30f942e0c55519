"""Fingerprints of what input paths hold, so a task's output folder follows its inputs' contents.

The rule (why: docs/cluster.md, "Outputs follow contents"):
- a file named directly is hashed (sha256 of its bytes) when it is at most HASH_LIMIT bytes, else
  described by its size and modification time (mtime_ns);
- a folder, and the files a list file names, are described by the sorted (name, size, mtime_ns) of
  their files; names starting with "." (editor, OS and NFS leftovers) are skipped.
A fingerprint is computed once per process and path (Luigi asks for outputs many times).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HASH_LIMIT = 16 * 2**20
"""Files named directly up to this many bytes are hashed: a few milliseconds each, and the same bound under
which the checks before work already parse JSON inputs in full."""

Members = Callable[[Path], Sequence[Path]]
"""What a path stands for besides itself: the images of a folder or of a list file (extractor's list_images)."""

_MEMO: dict[tuple[str, Members | None], dict[str, Any]] = {}


def fingerprint(path: str | os.PathLike, members: Members | None = None) -> dict[str, Any]:
    """{"digest", "files", "bytes"} of what `path` holds; `members` names the files a folder or list stands for.

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
            return _listing(path, members(path) if members else _walk(path))
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
        with open(path, "rb") as f:
            return {"digest": f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}", "files": 1,
                    "bytes": st.st_size}
    stamp = hashlib.sha256(f"{st.st_size}\t{st.st_mtime_ns}".encode()).hexdigest()
    return {"digest": f"stat:{stamp}", "files": 1, "bytes": st.st_size}


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file below `root` (symlinked files followed, symlinked folders not)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / name for name in files if not name.startswith(".")]
    return found


def _listing(root: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Digest of the sorted (name relative to root, size, mtime_ns) lines; an unstatable file counts as such."""
    lines, total = [], 0
    for p in files:
        name = os.path.relpath(p, root)
        try:
            st = os.stat(p)
        except OSError as e:
            lines.append(f"{name}\tunreadable {e.errno}")
            continue
        lines.append(f"{name}\t{st.st_size}\t{st.st_mtime_ns}")
        total += st.st_size
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return {"digest": f"stat:{digest}", "files": len(lines), "bytes": total}
