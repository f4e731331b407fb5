"""``python -m cquant ...``: the same as the ``cquant`` command (see :mod:`cquant.cli`)."""
import sys

from .cli import main

sys.exit(main())
