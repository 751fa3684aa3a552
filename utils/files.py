"""Atomic file writing: every file this package writes (models, figures, tables) goes through
:func:`atomic_writer`, so an interrupted write (an error, Ctrl-C, a full disk) never leaves a
partial file at the target path, and an existing file there stays intact until the new one is
complete."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import BinaryIO, Iterator


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary stream whose content replaces ``path`` only when the ``with`` block succeeds.

    The stream is a temporary file in the target's folder (created if needed), renamed over
    ``path`` at the end (``os.replace`` is atomic on POSIX and Windows). With ``durable`` the
    data is flushed to disk (``fsync``) before the rename: worth it for model files.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path) as stream:
        stream.write(data)
    return os.fspath(path)


def writable_folder(folder: str | os.PathLike) -> str:
    """Check, before any work is done, that ``folder`` can be created (or exists) and written to.

    Nothing is created here, so a run that fails later (bad data) leaves no empty folder behind.
    Raises the ``OSError`` that writing would raise later (not a directory, permission denied),
    naming the path; the command line prints it as one ``error:`` line.
    """
    folder = os.fspath(folder)
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "no permission to write there", existing)
    return folder
