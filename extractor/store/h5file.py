"""An HDF5 file written so that an OS error (disk full...) surfaces as a WriteError, never inside HDF5."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from extractor.fileio import write_all, write_error


class _Shielded:
    """The file h5py writes through (its fileobj driver), holding OS errors back from HDF5.

    HDF5 cannot close a file after one of its writes failed: the close may report success with data
    missing, or crash the process (a segfault in H5D_flush_all, seen with HDF5 2.0 on a full disk).
    So a failed write is kept in memory instead, HDF5 goes on and closes normally, and the caller
    raises the error (``check()``) after each block, so at most a block is held.
    """

    def __init__(self, tmp: Path, final: Path) -> None:
        self.final, self.pos, self.size = final, 0, 0
        self.error: OSError | None = None
        self.held: list[tuple[int, bytes]] = []  # (offset, bytes) written after the error
        try:
            self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise write_error(final, e) from e

    def _fail(self, e: OSError) -> None:
        self.error = self.error or e

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                write_all(self.fd, view, self.pos)
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            self.held.append((self.pos, bytes(view)))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def read(self, n: int = -1) -> bytes:
        n = max(0, self.size - self.pos) if n < 0 else n
        out = bytearray(n)  # past the end of the file reads as zeros, as with HDF5's own driver
        got = 0
        try:
            while got < n:
                chunk = os.pread(self.fd, n - got, self.pos + got)
                if not chunk:
                    break
                out[got: got + len(chunk)] = chunk
                got += len(chunk)
        except OSError as e:
            self._fail(e)
        for start, data in self.held:
            lo, hi = max(start, self.pos), min(start + len(data), self.pos + n)
            if lo < hi:
                out[lo - self.pos: hi - self.pos] = data[lo - start: hi - start]
        self.pos += n
        return bytes(out)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self._fail(e)
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; atomic_replace fsyncs the finished file."""

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as e:
            self._fail(e)

    def check(self) -> None:
        """Raise the first OS error of the writes so far, naming the final file."""
        if self.error is not None:
            raise write_error(self.final, self.error) from self.error


@contextmanager
def h5_create(tmp: Path, final: Path) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """A new HDF5 file at ``tmp`` (for ``final``) and a check to call after each block written.

    OS errors surface as WriteError naming ``final``, from the check or at the end, never inside HDF5.
    """
    shield = _Shielded(tmp, final)
    try:
        with h5py.File(shield, "w") as f:
            yield f, shield.check
    finally:
        shield.close()
    shield.check()
