"""Writing files and folders so that no run leaves a partial or mixed result behind.

- :func:`atomic_writer` / :func:`write_atomic`: one file, written to a temporary file and renamed
  over the target at the end; an existing file stays intact until the new one is complete.
- :func:`staged_folder`: a whole folder (a results folder, predict's outputs, a generated data
  set), written beside the target and swapped in at the end, so the target holds the files of
  exactly one run, complete, or is left as it was.
- :func:`signals_deferred`: Ctrl-C and SIGTERM wait until a write is complete (torch's model writer
  turns an interruption inside it into a ``RuntimeError`` and a damaged archive), then interrupt.

Temporary files and folders are removed on every exit path: errors, Ctrl-C and SIGTERM (which the
command line turns into ``KeyboardInterrupt``, :func:`utils.boundary.run_command`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from typing import BinaryIO, Iterator

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs; raise ``KeyboardInterrupt`` after it if one came.

    Only the main thread can set signal handlers; elsewhere the block runs unprotected. The
    previous handlers are restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary stream whose content replaces ``path`` only when the ``with`` block succeeds.

    The stream is a temporary file in the target's folder (created if needed), renamed over
    ``path`` at the end (``os.replace`` is atomic on POSIX and Windows). With ``durable`` the
    data is flushed to disk (``fsync``) before the rename: worth it for model files.
    """
    path = os.path.realpath(path)  # through a link: the file it points to is replaced, the link stays
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with signals_deferred(), os.fdopen(handle, "wb") as stream:
            yield stream
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException as exc:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if renamed := _naming_target(exc, temporary, path):  # e.g. a full disk
            raise renamed from None
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path) as stream:
        stream.write(data)
    return os.fspath(path)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, replace: bool = True) -> Iterator[str]:
    """A temporary folder beside ``target`` that becomes ``target`` when the ``with`` block succeeds.

    An existing ``target`` is replaced as a whole (``replace``) or must be empty, so old files
    never sit beside new ones; on any failure or interruption the temporary folder is removed and
    ``target`` is left as it was.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write there ({exc.strerror})", target) from None
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        with signals_deferred():
            _swap(staging, target, replace)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if renamed := _naming_target(exc, staging, target):
            raise renamed from None
        raise


def _naming_target(exc: BaseException, temporary: str, target: str) -> OSError | None:
    """For an ``OSError`` that names a temporary path (or no path), the same error naming the
    matching path under ``target``: the one the user knows. Else None."""
    if not isinstance(exc, OSError) or not (exc.filename is None or str(exc.filename).startswith(temporary)):
        return None
    inside = str(exc.filename)[len(temporary):] if exc.filename is not None else ""
    return OSError(exc.errno, exc.strerror or str(exc), target + inside)


def _swap(staging: str, target: str, replace: bool) -> None:
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", target)
    if replace and os.path.isdir(target) and os.listdir(target):
        retired = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        try:
            os.replace(target, os.path.join(retired, "previous"))
        except OSError:
            os.rmdir(retired)  # the earlier folder cannot be moved (not ours to replace): it stays as it was
            raise
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        os.rename(staging, target)  # POSIX: replaces an empty folder, refuses a non-empty one
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "exists and is not empty", target) from None
        raise


def file_problem(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be read as a file ("not found", "is a folder, not a file", ...), or ""
    if it is a regular file: one wording for every place that expects a file."""
    if os.path.isfile(path):
        return ""
    if os.path.isdir(path):
        return "is a folder, not a file"
    if os.path.lexists(path):
        return "is not a regular file (a broken link, device or pipe)"
    return "not found"


def not_utf8(exc: UnicodeDecodeError) -> str:
    """``is not UTF-8 text (byte 0xe9 at offset 14)``: the one wording for a text file that is not."""
    return f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


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
