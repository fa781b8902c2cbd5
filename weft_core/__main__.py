"""``python -m weft_core``: the ``weft`` command (see :mod:`weft_core._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
