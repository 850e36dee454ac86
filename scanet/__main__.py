"""``python -m scanet``: the ``scanet`` command (scanet.cli)."""

import sys

from scanet.cli import main

sys.exit(main())
