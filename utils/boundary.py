"""The boundary between a command and its user: what a failure looks like on the command line.

A user's error (:class:`~utils.errors.PadimError`) or any file-system failure ends as one
``error:`` line naming the path, exit 2; any other exception too, as one line with its type (set
the environment variable ``PADIM_DEBUG=1`` for its traceback); Ctrl-C and SIGTERM end as one line, exit 130, with
temporary files removed on the way out (:mod:`utils.files`). Only the standard library and
:mod:`utils.errors` are imported here, so ``python -m utils`` has this in place before torch is
imported (which takes seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import PadimError

#: Environment variable: when set, an unexpected exception prints its traceback instead of one line.
DEBUG_ENV = "PADIM_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit 2), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclass
class Outcome:
    """The exit code of a command run inside :func:`command_boundary`."""

    code: int = 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: temporary files are removed on the way out


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)  # not the source line that raised it


@contextlib.contextmanager
def command_boundary() -> Iterator[Outcome]:
    """Run the block as a command-line program; the yielded :class:`Outcome` holds its exit code
    (set it in the block; 2 after a user's error, 130 after an interruption, printed as one line).
    The SIGTERM handler and the one-line warnings live only while the block runs."""
    outcome = Outcome()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with warnings.catch_warnings():  # restores the warning printer afterwards
            warnings.showwarning = _one_line_warning
            yield outcome
    except PadimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        outcome.code = 2
    except OSError as exc:  # any file-system failure: the path and what is wrong, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        outcome.code = 2
    except KeyboardInterrupt:
        print("interrupted: no partial files were written", file=sys.stderr)
        outcome.code = 130
    except Exception as exc:  # not the user's to fix, but still one line: PADIM_DEBUG=1 shows where it came from
        if os.environ.get(DEBUG_ENV):
            raise
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
        print(f"error: {type(exc).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        outcome.code = 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_command(command: Callable[[], int]) -> int:
    """``command()``'s exit code, run inside :func:`command_boundary`."""
    with command_boundary() as outcome:
        outcome.code = command()
    return outcome.code
