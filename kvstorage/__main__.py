"""``python -m kvstorage``: the ``kvstorage`` command line (see :mod:`kvstorage.cli`)."""

import sys

from .cli import main

sys.exit(main())
