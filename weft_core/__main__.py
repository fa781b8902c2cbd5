"""``python -m weft_core`` and the ``weft`` command (see :mod:`weft_core._cli`).

The signals a starting ``weft serve`` holds (HUP, USR1, USR2, TTIN, TTOU: by
default they kill or stop a process) are held here, before the command line and
the rest of weft are even loaded; a command that does not serve gives them their
defaults back once it knows it is one.
"""

from __future__ import annotations

import sys

from ._signals import hold_while_starting

hold_while_starting()

from . import _cli, _exits  # noqa: E402  (after the hold: loading it takes tens of ms)

__all__ = ["main"]


def main() -> int:
    """The ``weft`` command, as a process that exits when it returns (``_exits.EXITS_AFTER``)."""
    _exits.EXITS_AFTER = True
    return _cli.main()


if __name__ == "__main__":
    sys.exit(main())
