"""``python -m utils``: see :mod:`utils.cli`.

The command-line boundary (:mod:`utils.boundary`) is in place before the command line, and with
it torch, is imported: a Ctrl-C during those seconds is a clean interruption too.
"""

import signal
import sys

from .boundary import command_boundary

with command_boundary() as outcome:
    from .cli import main

    outcome.code = main()
# The result is decided and every file is in place: a signal during the interpreter's teardown
# (about half a second with torch loaded) must not turn it into another exit code.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(outcome.code)
