"""Exception types: every failure a user can cause ends in one of these, with a one-line message.

The command line catches :class:`PadimError` and prints ``error: <message>`` with exit code 2,
so any message raised through these classes must be complete on its own line.
"""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 300 characters), or "(no message)"; a file-system error
    as ``<path>: <what is wrong>``."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    else:
        text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


class PadimError(Exception):
    """Base class of all errors that are the user's to fix (bad config, data or model file)."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's error comes back as type(text with the worker's traceback); the
        # message it carries is the traceback's last line, after the type's name.
        if isinstance(message, str) and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


class ConfigError(PadimError, ValueError):
    """A configuration key is unknown, of the wrong type or out of range."""


class DataError(PadimError, ValueError):
    """Input data is missing, unreadable or inconsistent."""


class BackboneError(PadimError, RuntimeError):
    """A backbone or its weights cannot be built or loaded."""


class ModelFileError(PadimError, ValueError):
    """A saved model file is missing, damaged, foreign or incompatible with the request."""


class DistributedError(PadimError, RuntimeError):
    """A multi-process run failed on some rank."""
