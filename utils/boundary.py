"""The boundary between a command and its user: what a failure looks like on the command line.

A user's error (:class:`~utils.errors.PadimError`) or any file-system failure ends as one
``error:`` line naming the path, exit 2; any other exception too, as one line with its type (set
the environment variable ``PADIM_DEBUG=1`` for its traceback); Ctrl-C and SIGTERM end as one line, exit 130, with
temporary files removed on the way out (:mod:`utils.files`). Only the standard library and
:mod:`utils.errors` are imported here, so ``python -m utils`` has this in place before torch is
imported (which takes seconds).
"""

import argparse
import contextlib
import os
import signal
import sys
import threading
import types
import warnings
from typing import Callable, Iterator

from .errors import PadimError, first_line

#: Environment variable: when set, an unexpected exception prints its traceback instead of one line.
DEBUG_ENV = "PADIM_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit 2), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)  # not the source line that raised it


@contextlib.contextmanager
def one_warning_per_kind() -> Iterator[None]:
    """The warnings raised in the block, shown when it ends (or fails) as one per category: the first one
    and how many more of its kind there were (a problem of 500 files is one line naming one of them)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # counted here; the filters outside decide what is shown
            yield
    finally:
        kinds: dict[type, list[str]] = {}
        for found in caught:
            kinds.setdefault(found.category, []).append(str(found.message))
        for category, (first, *more) in kinds.items():
            warnings.warn(first + (f" (and {len(more)} more like it)" if more else ""), category, stacklevel=3)


@contextlib.contextmanager
def command_boundary() -> Iterator[types.SimpleNamespace]:
    """Run the block as a command-line program; the yielded namespace's ``code`` is its exit code
    (set it in the block; 2 after a user's error, 130 after an interruption, printed as one line).
    The SIGTERM handler and the one-line warnings live only while the block runs."""
    outcome = types.SimpleNamespace(code=0)
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM ends a run like Ctrl-C (KeyboardInterrupt): temporary files are removed on the way out
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        with warnings.catch_warnings():  # restores the warning printer afterwards
            warnings.showwarning = _one_line_warning
            yield outcome
    except KeyboardInterrupt:
        print("interrupted: no partial files were written", file=sys.stderr)
        outcome.code = 130
    except Exception as exc:
        if isinstance(exc, PadimError):
            line = str(exc)
        elif isinstance(exc, OSError):  # any file-system failure: the path and what is wrong, not a traceback
            line = first_line(exc)
        elif os.environ.get(DEBUG_ENV) not in (None, "", "0"):  # not the user's to fix: PADIM_DEBUG=1 shows where
            raise
        else:
            line = f"{type(exc).__name__}: {first_line(exc)} (set {DEBUG_ENV}=1 for the traceback)"
        print(f"error: {line}", file=sys.stderr)
        outcome.code = 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_command(command: Callable[[], int]) -> int:
    """``command()``'s exit code, run inside :func:`command_boundary`."""
    with command_boundary() as outcome:
        outcome.code = command()
    return outcome.code
