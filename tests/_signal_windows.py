"""``python tests/_signal_windows.py WINDOW serve ARGS...``: weft serve, held in one window.

A stop signal that lands in a window a few microseconds wide cannot be sent there
on demand, so this widens the window: it runs ``python -m weft_core`` as usual,
except that at WINDOW it writes ``IN WINDOW`` to stderr and waits until the file
named by ``$WEFT_TEST_GATE`` exists (at most 30 s).

- ``listening``: a supervisor's pid file being written, after ``listening on`` and
  before the supervisor's signal handlers go in (a slow disk under ``/run``).
- ``hand-over``: a single process taking HUP, between the HUP being read and the
  supervisor it becomes taking over the signals.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _hold() -> None:
    print("IN WINDOW", file=sys.stderr, flush=True)
    gate = os.environ["WEFT_TEST_GATE"]
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> int:
    window, *argv = sys.argv[1:]
    sys.argv = [sys.argv[0], *argv]
    from weft_core import __main__ as weft_main
    from weft_core import _process, _supervise

    if window == "listening":
        write = _process.PidFile.write

        def slow_write(self: Any) -> None:
            _hold()
            write(self)

        _process.PidFile.write = slow_write  # type: ignore[method-assign]
    elif window == "hand-over":
        build = _supervise._supervisor

        def slow_build(*args: Any, **kwargs: Any) -> Any:
            _hold()
            return build(*args, **kwargs)

        _supervise._supervisor = slow_build
    else:
        raise SystemExit(f"unknown window {window!r}")
    return weft_main.main()


if __name__ == "__main__":
    sys.exit(main())
