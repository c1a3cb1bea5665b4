"""Writing files without losing any: one atomic write, no symbolic link followed, one run per folder.

Every file the library writes (checkpoints, model.pt, history.csv, metrics.json, model cards, the image
cache) goes through :func:`atomic_write` or :func:`replacing`: the bytes go to a new temporary file
beside the target, created exclusively (``O_EXCL``: never through a planted link), are flushed to disk
and then renamed onto the target. A link at the target is replaced, never followed; a failure (a full
disk, a kill) leaves the previous file as it was. :func:`run_folder` takes an exclusive OS lock on an
output folder (``fcntl.flock``, released when the process dies), so a second run stops at once.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"  # temporaries are named .<target>.<random>.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp's 8 random characters
LOCK_NAME = ".resnet-lessons.lock"
WRITE_PROBE = "write-test"  # check_writable's probe: .write-test.<random>.tmp
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no symbolic-link flag to open with
Content = bytes | str | Callable[[IO[bytes]], object]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


class WriteError(OSError):
    """A file could not be written; the message names it, the reason, and what was kept."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderInUse(RuntimeError):
    """Another process holds the output folder's lock."""


def reason(error: OSError) -> str:
    """Why a write failed, in words: a full disk is called a full disk."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({os.strerror(error.errno)})"
    if error.errno == errno.EFBIG:
        return f"the file would be larger than this system allows ({os.strerror(error.errno)})"
    return str(error.strerror or error)


def _write_error(error: OSError, path: Path, what: str, existed: bool) -> WriteError:
    if isinstance(error, WriteError):
        return error
    kept = f"the last good {what} {path} is kept" if existed else f"no {what} was left at {path}"
    return WriteError(error.errno or errno.EIO, f"cannot write {path}: {reason(error)}; {kept}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike, *, what: str = "file", suffix: str = TEMP_SUFFIX) -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` for writers that take a path (ONNX, TorchScript), named
    ``.<name>.<random><suffix>`` (a writer that goes by the file's suffix gets the one it needs).

    When the block ends without an error the temporary is flushed to disk and renamed onto ``path`` (a
    link there is replaced, not followed); on any error it is removed and ``path`` is left as it was.
    An ``OSError`` becomes a :class:`WriteError` naming ``path``, the reason and what was kept."""
    path = Path(path)
    existed = os.path.lexists(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise _write_error(error, path, what, existed) from error
    temporary = Path(name)
    try:
        try:
            os.chmod(fd, 0o666 & ~_UMASK)  # the mode an ordinary new file gets (mkstemp's is 0600)
        finally:
            os.close(fd)
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_error(error, path, what, existed) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


class _Recording:
    """A write-only stream that remembers the ``OSError`` of a failed write: torch.save reports a full
    disk as "[enforce fail at inline_container.cc] unexpected pos", and this keeps the real reason."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self._stream.flush()


def atomic_write(path: str | os.PathLike, content: Content, *, what: str = "file") -> Path:
    """Write ``content`` (bytes, text, or a function that writes into a binary stream) to ``path``
    atomically through :func:`replacing`; return ``path``."""
    path = Path(path)
    with replacing(path, what=what) as temporary:
        fd = os.open(temporary, os.O_WRONLY | NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "wb") as raw:
            stream = _Recording(raw)
            try:
                if callable(content):
                    content(stream)  # type: ignore[arg-type]
                else:
                    stream.write(content.encode() if isinstance(content, str) else content)
                raw.flush()
            except OSError:
                raise
            except Exception as error:
                if stream.error is not None:  # the writer wrapped a failed write in its own error
                    raise stream.error from error
                raise
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and make sure files can be written into it; else an ``OSError``
    naming it. The probe is a fresh temporary file (``O_EXCL``), so a planted link is never written."""
    folder = Path(folder)
    _make_folders(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{WRITE_PROBE}.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as error:
        raise PermissionError(f"cannot write into the output folder {folder}: {reason(error)}") from None
    os.close(fd)
    os.unlink(probe)


def remove_stale_temporaries(
    folder: str | os.PathLike, *, names: Iterable[str] | None = None, older_than: float | None = None
) -> list[Path]:
    """Remove the temporaries (``.<name>.<random>.tmp``) that an earlier, killed write left in ``folder``:
    only those of ``names`` when given (a user's own files are never touched), and only those older than
    ``older_than`` seconds when given. Returns what was removed."""
    wanted = None if names is None else set(names)
    removed = []
    now = time.time()
    for candidate in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        match = _TEMPORARY.match(candidate.name)
        if match is None or (wanted is not None and match["name"] not in wanted):
            continue
        try:
            info = candidate.lstat()
            if older_than is not None and now - info.st_mtime < older_than:
                continue
            candidate.unlink()  # a link is removed itself, its target is untouched
        except FileNotFoundError:
            continue
        removed.append(candidate)
    return removed


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"the output folder {folder} is a file") from None
    except OSError as error:
        raise PermissionError(
            f"cannot write into the output folder {folder} (it cannot be created: {reason(error)})"
        ) from None
    if not folder.is_dir():
        raise NotADirectoryError(f"the output folder {folder} is a file")
    return missing


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


def _lock(folder: Path) -> int | None:
    """An open descriptor of ``folder/LOCK_NAME`` holding an exclusive ``flock`` with this PID written in it
    (None where the system has no ``flock``: Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = folder / LOCK_NAME
    for _ in range(20):  # the holder removes the file as it ends; then try the new one
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise WriteError(error.errno, f"refusing to use {path}: it is a symbolic link; remove it") from None
            raise WriteError(error.errno or errno.EIO,
                             f"cannot write into the output folder {folder}: {reason(error)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by another resnet-lessons run ({holder}); wait for it to end, "
                "or choose another output folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:  # who holds it, for the message of a second run; the lock holds without it (a full disk)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
            return fd
        os.close(fd)
    raise FolderInUse(f"{folder}: could not take the lock {path}; is another run starting and ending there?")


def _unlock(folder: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(folder / LOCK_NAME)  # while still holding it: a waiting process then retries the new file
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@contextmanager
def run_folder(folder: str | os.PathLike, names: Iterable[str] = ()) -> Iterator[Path]:
    """Hold ``folder`` for one run: create it if needed, take its exclusive lock (a second run raises
    :class:`FolderInUse` naming this process), and remove the temporaries of ``names`` (the files the run
    writes) that a killed run left behind.
    If the block fails, the folders this call created are removed again when nothing was written into them."""
    folder = Path(folder)
    created = _make_folders(folder)
    try:
        fd = _lock(folder)
    except BaseException:
        _remove_empty(created)
        raise
    succeeded = False
    try:
        remove_stale_temporaries(folder, names=[*names, WRITE_PROBE])
        yield folder
        succeeded = True
    finally:
        _unlock(folder, fd)
        if not succeeded:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return


__all__ = [
    "FolderInUse",
    "LOCK_NAME",
    "WriteError",
    "atomic_write",
    "check_writable",
    "reason",
    "remove_stale_temporaries",
    "replacing",
    "run_folder",
]
