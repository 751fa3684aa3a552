"""Several writers of one folder (utils.files): they take turns on the folder's lock, the later one's
files win, the staging folders of processes that are gone are swept by the next writer, and a folder is
replaced only when it holds nothing but what the same command wrote there (its file list)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from utils.files import FILE_LIST, staged_folder


def _writer(target, then: str) -> subprocess.Popen:
    """Another process in its staged folder for ``target``: it writes ``first.txt``, prints a line, runs ``then``."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {ROOT!r})
        from utils.files import FILE_LIST, staged_folder
        with staged_folder({str(target)!r}, "test") as folder:
            open(os.path.join(folder, "first.txt"), "w").close()
            print(flush=True)
            {then}
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_two_writers_of_one_folder_take_turns_and_the_later_one_wins(tmp_path, recwarn):
    target = str(tmp_path / "results" / "run")
    first = _writer(target, "time.sleep(2)")  # it holds its folder for 2 s
    first.stdout.readline()  # the first writer is inside its folder
    with staged_folder(target, "test") as folder:
        assert _files(target) == ["first.txt"], "the second writer ran while the first one still wrote the folder"
        open(os.path.join(folder, "second.txt"), "w").close()
    assert first.communicate(timeout=60)[0] == "" and first.returncode == 0
    messages = [str(w.message) for w in recwarn]
    assert len(messages) == 1 and "waiting for another process that writes" in messages[0] and target in messages[0]
    assert _files(target) == ["second.txt"]
    assert os.listdir(tmp_path / "results") == ["run"]  # no staging folder left, no lock file


def _killed_writer(parent) -> str:
    """A writer killed (SIGKILL) inside its folder: no clean-up ran, the kernel released its lock."""
    killed = _writer(parent / "run", "os.kill(os.getpid(), signal.SIGKILL)")
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (staging,) = os.listdir(parent)
    assert staging.startswith(".run.tmp-")
    return staging


@pytest.mark.parametrize("name, swept", [
    (".run.tmp-{host}-{ended}-abc_1", True),
    (".run.tmp-{host}-{ended}-xyz_old", True),  # an earlier folder moved aside for the swap
    (".other-run.maps-{host}-{ended}-q0", True),  # any staging folder in the parent, not only the target's
    (_killed_writer, True),
    (".run.tmp-{host}-{alive}-abc", False),  # its process still runs
    (".run.tmp-elsewhere-{ended}-abc", False),  # another machine's process: not ours to judge
    (".run.tmp-notes", False),  # not a staging folder
    ("run.tmp-{host}-{ended}-abc", False),  # not hidden: a user's folder
])
def test_the_next_writer_sweeps_staging_folders_of_ended_processes(tmp_path, recwarn, name, swept):
    """Without waiting: a lock left by a process that is gone was released with it."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    name = name(tmp_path) if callable(name) else name.format(host=host, ended=ended.pid, alive=os.getpid())
    (tmp_path / name / "sub").mkdir(parents=True, exist_ok=True)
    with staged_folder(tmp_path / "run", "test") as staging:
        open(os.path.join(staging, "new.txt"), "w").close()
    assert recwarn.list == []  # it did not wait
    assert sorted(os.listdir(tmp_path)) == sorted(["run"] + ([] if swept else [name]))  # and no lock file
    assert _files(tmp_path / "run") == ["new.txt"]


def _files(folder) -> list[str]:
    """The files in ``folder`` but its file list."""
    return sorted(name for name in os.listdir(folder) if name != FILE_LIST)


@pytest.mark.parametrize("how, error, left", [
    ("written", None, ["new.txt"]),
    ("block fails", RuntimeError, ["earlier.txt"]),
    ("swap fails", OSError, ["earlier.txt"]),  # the new folder cannot take the target's place (a full disk)
    ("not replaced", FileExistsError, ["earlier.txt"]),  # replace=False: an existing folder stays
    ("input kept", None, ["earlier.txt", "new.txt"]),  # a file the run read (evaluate --model <run>/model.pt) stays
    ("input written", None, ["earlier.txt", "new.txt"]),  # ... unless the run wrote it again: the new file wins
    ("a user's file", FileExistsError, ["earlier.txt", "notes.txt"]),  # one no run wrote there is never removed
    ("a user's hidden file", FileExistsError, [".git", "earlier.txt"]),  # hidden is not the system's: .git/HEAD
    ("a system file", None, ["new.txt"]),  # .DS_Store, which Finder puts there, is not a user's
    ("a user's empty folder", FileExistsError, ["earlier.txt", "mine"]),  # folders and links count, not only files
    ("a user's link", FileExistsError, ["earlier.txt", "mine"]),  # to a folder: never followed, never removed
    ("another command's", FileExistsError, ["earlier.txt"]),  # written by another writer (predict into evaluate's)
    ("inside a written folder", FileExistsError, ["earlier.txt"]),  # no run writes into another's folder
])
def test_a_staged_folder_is_swapped_in_whole_or_not_at_all(tmp_path, monkeypatch, how, error, left):
    written = tmp_path / "run"
    with staged_folder(written, "other" if how == "another command's" else "test") as folder:
        with open(os.path.join(folder, "earlier.txt"), "w") as handle:
            handle.write("kept")
    extras = {"a user's file": "notes.txt", "a user's hidden file": ".git/HEAD", "a system file": ".DS_Store"}
    if extra := extras.get(how):
        (written / extra).parent.mkdir(exist_ok=True)
        (written / extra).write_text("x")
    if how == "a user's empty folder":
        (written / "mine").mkdir()
    if how == "a user's link":
        (written / "mine").symlink_to(tmp_path, target_is_directory=True)
    target = written / "sub" if how == "inside a written folder" else written
    rename = os.rename

    def failing(source, destination):
        if os.fspath(destination) == os.fspath(target) and "new.txt" in os.listdir(source):
            raise OSError(errno.ENOSPC, "No space left on device")
        rename(source, destination)

    if how == "swap fails":
        monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(error) if error else contextlib.nullcontext():
        inputs = [str(target / "earlier.txt")] if how.startswith("input") else []
        with staged_folder(target, "test", replace=how != "not replaced", inputs=inputs) as folder:
            open(os.path.join(folder, "new.txt"), "w").close()
            if how == "input written":
                with open(os.path.join(folder, "earlier.txt"), "w") as handle:
                    handle.write("new")
            if how == "block fails":
                raise RuntimeError("fails half-way")
    assert os.listdir(tmp_path) == ["run"] and _files(written) == left
    if "earlier.txt" in left:
        assert (written / "earlier.txt").read_text() == ("new" if how == "input written" else "kept")
    if how == "written":
        assert json.loads((written / FILE_LIST).read_text()) == {"writer": "test", "files": ["new.txt"]}
