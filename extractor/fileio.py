"""The project's file primitives: atomic writes, fsync, one-writer locks and file hashes.

A failed write raises WriteError: one line naming the file and the errno, with what to do. No
temporary file is left behind, and a finished file appears at its name whole or not at all
(temporary sibling, fsync, rename, fsync of the folder). Every byte goes through os.write /
os.pwrite, so tests inject faults in one place. Imports nothing from the project, so the feature
store, the detector, the training loop and the pipeline all use it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ADVICE = {errno.ENOSPC: "free space and rerun", errno.EDQUOT: "free space (or raise the quota) and rerun",
           errno.EROFS: "make the filesystem writable and rerun", errno.EACCES: "fix the permissions and rerun",
           errno.EPERM: "fix the permissions and rerun"}


class WriteError(OSError):
    """An output could not be written because of the OS; str() is one line naming the file and errno."""

    def __str__(self) -> str:
        if self.errno is None:
            return f"cannot write {self.filename}: {self.strerror}; rerun once the cause is fixed"
        code = errno.errorcode.get(self.errno, str(self.errno))
        advice = _ADVICE.get(self.errno, "fix the filesystem and rerun")
        return f"cannot write {self.filename}: {self.strerror} ({code}); {advice}: finished work is kept"


def write_error(path: str | os.PathLike[str], exc: OSError) -> WriteError:
    """`exc` as a WriteError naming `path` (a WriteError is returned as it is: it already names its file)."""
    if isinstance(exc, WriteError):
        return exc
    return WriteError(exc.errno, exc.strerror or str(exc), str(path))


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError raised inside into a WriteError naming the file (the one the error names, else `path`).

    Python's own write errors (file.write, os.write) carry no file name; this puts it back.
    """
    try:
        yield
    except OSError as exc:
        raise write_error(exc.filename or path, exc) from exc


def remove_quietly(path: str | os.PathLike[str]) -> None:
    """Delete a temporary file while an error is raised; never replaces that error with another."""
    try:
        os.unlink(path)
    except OSError:
        pass


def temporary_sibling(final: str | os.PathLike[str]) -> Path:
    """Temporary name for `final` in its own folder (so os.replace is atomic), per process."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Push a file's (or folder's) bytes to disk, so a rename after it cannot expose a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a finished temporary file onto its final name, durably; a failure names `final`."""
    final = Path(final)
    with writing(final):
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    """Write every byte at the file position (or at `offset`), looping over short writes."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:]) if offset is None else os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        done += n


class FdWriter:
    """A minimal binary file object over a descriptor, for libraries that write to one (torch.save, pickle).

    It keeps the first OS error, because some libraries replace it with their own (torch.save raises
    a RuntimeError about the zip position when the file's write failed).
    """

    def __init__(self, fd: int) -> None:
        self.fd, self.size = fd, 0
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            write_all(self.fd, view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing is buffered here: every write went straight to the descriptor."""

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False


@contextmanager
def atomic_output(path: str | os.PathLike[str], tmp: str | os.PathLike[str] | None = None) -> Iterator[FdWriter]:
    """Write `path` through a temporary sibling: fsynced and renamed on success, removed on any error.

    `tmp` names the temporary file where a crash-recovery protocol expects a fixed name; by default it
    is a fresh `.<name>.tmp-*` file. OS errors come out as WriteError naming `path`.
    """
    path = Path(path)
    exclusive = tmp is None
    tmp = Path(tmp) if tmp is not None else path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with writing(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC), 0o666)
    writer = FdWriter(fd)
    try:
        with writing(path):
            try:
                yield writer
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException as exc:
        remove_quietly(tmp)
        if writer.error is not None and isinstance(exc, Exception) and not isinstance(exc, OSError):
            raise write_error(path, writer.error) from exc  # the library hid the OS error behind its own
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str, tmp: str | os.PathLike[str] | None = None) -> None:
    """Write a whole file atomically (str as UTF-8); see atomic_output."""
    with atomic_output(path, tmp) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_file(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write a whole file in place (str as UTF-8), for files of a folder that is renamed into place whole."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            write_all(fd, data.encode("utf-8") if isinstance(data, str) else data)
        finally:
            os.close(fd)


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append to a file, all or nothing: after a failed write the file is cut back to its old length."""
    path = Path(path)
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                write_all(fd, text.encode("utf-8"))
            except OSError:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)


@contextmanager
def _renamed(tmp: Path, final: Path) -> Iterator[None]:
    """Report a WriteError inside the temporary folder `tmp` under its name in `final`."""
    try:
        yield
    except WriteError as exc:
        name = Path(exc.filename)
        if name == tmp or tmp in name.parents:
            raise WriteError(exc.errno, exc.strerror, str(final / name.relative_to(tmp))) from exc
        raise


@contextmanager
def atomic_directory(final: str | os.PathLike[str], sync: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and swap it onto `final` when the block succeeds.

    With `sync` its files are fsynced before the swap (a folder of thousands of files that can be
    made again may skip it). On any error the temporary folder is removed and an existing `final`
    is left as it was; OS errors come out as WriteError naming the file in `final` (or the folder,
    when the error does not say which file).
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    moved = False
    try:
        with _renamed(tmp, final), writing(final):
            for stale in (tmp, old):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            yield tmp
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()) if sync else []:
                fsync_path(file)
            if final.exists():
                os.replace(final, old)
                moved = True
            os.replace(tmp, final)
            moved = False
            fsync_path(final.parent)
    except BaseException:
        if moved:
            os.replace(old, final)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (weights and checkpoints are hundreds of MB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _lock_now(fd: int) -> bool:
    """Take the exclusive lock of an open file without waiting; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def try_lock(path: str | os.PathLike[str]) -> int | None:
    """Lock `path` (created if absent) for this process without waiting: the descriptor that holds the lock
    (closing it releases the lock, and the kernel does if the process dies), or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        locked = _lock_now(fd)
    finally:
        if not locked:
            os.close(fd)
    return fd if locked else None


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock so two processes never build the same output at once; a second process waits
    for the holder (saying who it is) instead of failing, and the kernel frees the lock if the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock_now(fd):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            print(f"[lxmert] {what} is being built by pid {holder} (lock {lock_path}); waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
