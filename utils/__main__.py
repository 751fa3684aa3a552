"""``python -m utils``: see :mod:`utils.cli`."""

import sys

from .cli import main

sys.exit(main())
