"""``python -m utils``: see :mod:`utils.cli`."""

import signal
import sys

from .cli import main

code = main()
# The result is decided and every file is in place: a signal during the interpreter's teardown
# (about half a second with torch loaded) must not turn it into another exit code.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(code)
