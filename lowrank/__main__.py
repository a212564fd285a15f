"""``python -m lowrank``: the ``lowrank`` command (see :mod:`lowrank.cli`)."""

import sys

from .cli import main

sys.exit(main())
