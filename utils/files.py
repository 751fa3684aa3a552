"""Writing files and folders so that no run leaves a partial or mixed result behind.

- :func:`atomic_writer` / :func:`write_atomic`: one file, written to a temporary file and renamed
  over the target at the end; an existing file stays intact until the new one is complete.
- :func:`staged_folder`: a whole folder (a results folder, predict's outputs, a generated data
  set), written beside the target and swapped in at the end, so the target holds the files of
  exactly one run, complete, or is left as it was; it lists its files and their writer
  (:data:`FILE_LIST`), and only a folder that holds nothing else is replaced (:func:`check_replaceable`):
  a user's files, or another command's outputs, never are.
- :func:`folder_lock`: writers of one folder take turns (two ``evaluate`` runs into one results
  folder, two ``predict`` runs into one output); the next writer sweeps the staging folders of
  processes that were killed before they could remove them.
- :func:`signals_deferred`: Ctrl-C and SIGTERM wait until a write is complete (torch's model writer
  turns an interruption inside it into a ``RuntimeError`` and a damaged archive), then interrupt.

Temporary files and folders are removed on every exit path: errors, Ctrl-C and SIGTERM (which the
command line turns into ``KeyboardInterrupt``, :func:`utils.boundary.run_command`).
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from typing import BinaryIO, Iterator, Sequence

from filelock import FileLock, Timeout

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
    main = threading.current_thread() is threading.main_thread()
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in INTERRUPTS if main}
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
    with _removed_on_failure(temporary, path):
        with signals_deferred(), os.fdopen(handle, "wb") as stream:
            yield stream
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)


def write_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns the path."""
    with atomic_writer(path) as stream:
        stream.write(data)
    return os.fspath(path)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, writer: str, replace: bool = True,
                  inputs: Sequence[str] = ()) -> Iterator[str]:
    """A temporary folder beside ``target`` that becomes ``target`` when the ``with`` block succeeds.

    An existing ``target`` is replaced as a whole if it may be (:func:`check_replaceable`: an earlier
    output of ``writer``, e.g. "predict"; checked before the block and again before the swap), so old
    files never sit beside new ones; on any failure or interruption the temporary folder is removed and
    ``target`` is left as it was. The block runs holding ``target``'s lock (:func:`folder_lock`): two
    writers of one folder take turns, the later one's files win. ``inputs``, the files the run read (a
    model, data), are never removed: one inside ``target`` is carried into the new folder unless the run
    wrote a file of that name.
    """
    target = os.path.realpath(target)  # a link to the folder stays a link, to the new files
    parent, name = os.path.split(target)
    check_replaceable(target, writer, replace, inputs)  # before the block's work; again under the lock, before the swap
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(parent, exist_ok=True)
            stack.enter_context(folder_lock(target))
            staging = staging_folder(parent, name, "tmp")
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write there ({exc.strerror})", target) from None
        with _removed_on_failure(staging, target):
            yield staging
            _carry(inputs, staging, target)
            listing = {"writer": writer, "files": sorted(_contents(staging))}
            write_atomic(os.path.join(staging, FILE_LIST), json.dumps(listing).encode())
            check_replaceable(target, writer, replace, inputs)
            with signals_deferred():
                _swap(staging, target)


#: Written last into every folder :func:`staged_folder` writes: its writer and the list of its contents.
FILE_LIST = ".padim-files.json"


def check_replaceable(target: str, writer: str, replace: bool = True, inputs: Sequence[str] = ()) -> None:
    """Refuse (``FileExistsError``, ``NotADirectoryError``) to replace ``target`` unless it is absent or empty,
    or (``replace``) holds only what its :data:`FILE_LIST`, written by ``writer``, names or what a run reads
    (``inputs``): never a user's files, folders or links (hidden ones too: ``.git``) or another command's
    outputs; only :func:`system_file` files do not count. Nor is a folder inside another run's replaced."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", target)
    refuse_inside_written(target)
    contents = _contents(target) if os.path.isdir(target) else iter(())
    if not replace:
        if next(contents, None) is not None:
            raise FileExistsError(errno.EEXIST, "exists and is not empty", target)
        return
    try:
        with open(os.path.join(target, FILE_LIST), encoding="utf-8") as handle:
            listing = json.load(handle)
        listed = set(listing["files"]) if listing["writer"] == writer else set()
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        listed = set()
    listed |= {relative_inside(path, target) for path in inputs}
    if others := [path for path in contents if path not in listed]:
        raise FileExistsError(errno.EEXIST, f"holds files that no {writer} run wrote ({others[0]}), or an earlier "
                              "version did; it is replaced as a whole, and other files never are: move them out, or "
                              "choose another folder", target)


def _contents(folder: str) -> Iterator[str]:
    """Every file, folder and link below ``folder`` (relative paths; links not followed) but :func:`system_file`
    files and the :data:`FILE_LIST`; a folder that cannot be read is an error, never passed over."""
    for parent, folders, files in os.walk(folder, onerror=_raise):
        for name in folders + [name for name in files if not system_file(name)]:
            if (path := os.path.relpath(os.path.join(parent, name), folder)) != FILE_LIST:
                yield path


def _raise(exc: OSError) -> None:
    raise exc


def refuse_inside_written(path: str, folder: bool = False) -> None:
    """Refuse (``FileExistsError``) ``path`` (a file; with ``folder``, a folder that may itself be one) inside a
    folder that :func:`staged_folder` wrote (it holds a :data:`FILE_LIST`, links resolved): its files belong
    together, and no other run adds or replaces one."""
    here = os.path.realpath(path) if folder else os.path.dirname(os.path.realpath(path))
    while not os.path.isfile(os.path.join(here, FILE_LIST)):
        if here == (here := os.path.dirname(here)):
            return
    raise FileExistsError(errno.EEXIST, f"is inside {here}, which another run wrote as a whole; choose a place "
                          "outside it", os.fspath(path))


def _carry(inputs: Sequence[str], staging: str, target: str) -> None:
    """Copy each of ``inputs`` that lies inside ``target`` to the same place in ``staging``, unless one is there."""
    for path in inputs:
        if relative := relative_inside(path, target):
            copy = os.path.join(staging, relative)
            if not os.path.lexists(copy):
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                shutil.copy2(path, copy)


def relative_inside(path: str, folder: str) -> str | None:
    """``path`` relative to ``folder`` when it is ``folder`` ("") or lies below it, links resolved; else None."""
    real, base = os.path.realpath(path), os.path.realpath(folder) + os.sep
    return real[len(base):] if (real + os.sep).startswith(base) else None


@contextlib.contextmanager
def folder_lock(target: str) -> Iterator[None]:
    """Hold the lock of the folder ``target`` (a :mod:`filelock` lock): a second writer waits until
    the first is done, and says so once. Holding it, the writer sweeps the staging folders that
    processes now gone left beside ``target`` (:func:`staging_folder`).

    The lock files live in :data:`LOCKS` (this user's, in the system's temporary folder), one per
    folder path, not beside ``target``: filelock keeps a lock file after its release (removing it
    would let two writers lock two files of one name), and the user's folders stay as written.
    """
    os.makedirs(LOCKS, mode=0o700, exist_ok=True)
    lock = FileLock(os.path.join(LOCKS, hashlib.sha256(os.path.realpath(target).encode()).hexdigest() + ".lock"))
    try:
        held = lock.acquire(blocking=False)
    except Timeout:
        warnings.warn(f"waiting for another process that writes {target} to finish")
        held = lock.acquire()
    with held:  # releases it
        _sweep(os.path.dirname(target))
        yield


#: The folder of the lock files of :func:`folder_lock`.
LOCKS = os.path.join(tempfile.gettempdir(), f"padim-locks-{os.getuid() if hasattr(os, 'getuid') else 0}")
#: A staging folder: ``.<name>.<kind>-<host>-<pid>-<random>`` (:func:`staging_folder`).
STAGING = re.compile(r"\..+\.(?:tmp|maps)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")


def staging_folder(parent: str, name: str, kind: str) -> str:
    """A new hidden folder in ``parent`` for the files of ``<parent>/<name>`` (``kind``: tmp or
    maps), named after this host and process: once the process is gone (killed before it could
    clean up), the next writer in ``parent`` removes it."""
    folder = tempfile.mkdtemp(prefix=f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-", dir=parent)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes 0700: the folder becomes a results folder
    return folder


def _sweep(parent: str) -> None:
    for entry in os.scandir(parent):
        found = STAGING.fullmatch(entry.name)
        if found and found["host"] == socket.gethostname() and _gone(int(found["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (signal 0 only asks; on Windows it would end the process:
    nothing is swept there)."""
    try:
        if os.name == "posix":
            os.kill(pid, 0)
    except OSError as exc:  # PermissionError: another user's process
        return isinstance(exc, ProcessLookupError)
    return False


@contextlib.contextmanager
def _removed_on_failure(temporary: str, target: str) -> Iterator[None]:
    """On any failure of the block, remove the file or folder ``temporary`` and re-raise; an ``OSError``
    that names a path under ``temporary`` (or no path: a full disk) is raised as the same error
    naming the matching path under ``target``: the one the user knows."""
    try:
        yield
    except BaseException as exc:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.lexists(temporary):
            os.unlink(temporary)
        if not isinstance(exc, OSError) or not (exc.filename is None or str(exc.filename).startswith(temporary)):
            raise
        inside = str(exc.filename)[len(temporary):] if exc.filename is not None else ""
        raise OSError(exc.errno, exc.strerror or str(exc), target + inside) from None


def _swap(staging: str, target: str) -> None:
    """Rename ``staging`` to ``target`` (the folder's lock is held: no other writer swaps meanwhile)."""
    retired = staging + "_old"  # named like a staging folder: swept if this process dies before removing it
    if os.path.isdir(target):
        os.rename(target, retired)  # when the earlier folder cannot be moved (not ours to replace), it stays as it was
    try:
        os.rename(staging, target)
    except OSError:
        if os.path.isdir(retired):
            os.rename(retired, target)  # the earlier folder is back where it was, never left to the sweep
        raise
    shutil.rmtree(retired, ignore_errors=True)


#: What an operating system puts into folders by itself (macOS Finder and its zips, Windows Explorer): never a
#: user's file, and no input.
SYSTEM_FILES = re.compile(r"\.DS_Store|\._.*|__MACOSX|Thumbs\.db|desktop\.ini", re.IGNORECASE)


def hidden(name: str) -> bool:
    """Whether a file or folder ``name`` is no input: hidden (``.x``: ``.ipynb_checkpoints``) or the system's."""
    return name.startswith(".") or system_file(name)


def system_file(name: str) -> bool:
    return SYSTEM_FILES.fullmatch(name) is not None


def files_below(folder: str, recursive: bool = True, folders: bool = False) -> list[str]:
    """Every file (or with ``folders`` every sub-folder) below ``folder``, at any depth or with ``recursive``
    false directly in it, that is not :func:`hidden` nor inside a hidden folder; as sorted paths relative to
    ``folder``."""
    found = []
    for parent, children, names in os.walk(folder):
        children[:] = [name for name in children if not hidden(name)]
        found += [os.path.relpath(os.path.join(parent, name), folder) for name in (children if folders else names)
                  if not hidden(name)]
        if not recursive:
            break
    return sorted(found)


#: What a path that is no regular file is: the first of these that holds, else "not found".
NOT_A_FILE = ((os.path.isfile, ""), (os.path.isdir, "is a folder, not a file"),
              (os.path.lexists, "is not a regular file (a broken link, device or pipe)"))


def file_problem(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be read as a file ("not found", "is a folder, not a file", ...), or ""
    if it is a regular file: one wording for every place that expects a file."""
    return next((problem for holds, problem in NOT_A_FILE if holds(path)), "not found")


def not_utf8(exc: UnicodeDecodeError) -> str:
    """``is not UTF-8 text (byte 0xe9 at offset 14)``: the one wording for a text file that is not."""
    return f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def writable_folder(folder: str | os.PathLike) -> None:
    """Check, before any work is done, that ``folder`` can be created (or exists) and written to.

    Nothing is created here, so a run that fails later (bad data) leaves no empty folder behind.
    Raises the ``OSError`` that writing would raise later (not a directory, permission denied),
    naming the path; the command line prints it as one ``error:`` line.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "no permission to write there", existing)
