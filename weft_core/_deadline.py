"""The last resort of ``weft serve``'s stop: exit by the bound even if no stop can run.

``weft serve`` on gevent monkey-patches the process, so handlers run in the main
thread's hub, the thread that waits for signals and runs the stop. A handler that
blocks it (a C call gevent cannot make cooperative, a busy loop) leaves nobody to
run the stop: the Python-level signal handler still runs (the blocked system call
returns EINTR and the interpreter runs handlers before retrying), and it arms this.

:class:`Deadline` waits in a real OS thread, on a real lock (the originals, when the
process is monkey-patched, since a greenlet in the blocked hub would never wake).
When the stop has not ended by the deadline it writes one line, the stack of every
thread (the culprit's among them) and exits with EXIT_TASKS_LEFT, as a stop that
left tasks behind does. ``faulthandler``'s own timer, a C thread that needs no GIL,
backs it up a second later for a handler that holds the GIL in C (exit status 1).
"""

from __future__ import annotations

import _thread
import faulthandler
import os
import sys
import time
from typing import Any

from ._exits import EXIT_TASKS_LEFT

__all__ = ["Deadline"]

#: How long after the deadline faulthandler's timer exits, if the thread could not.
BACKSTOP = 1.0


def _thread_primitives() -> tuple[Any, Any]:
    """``start_new_thread`` and ``allocate_lock`` as the OS provides them, never patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        start, allocate = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
        return start, allocate
    return _thread.start_new_thread, _thread.allocate_lock


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object with no descriptor
        return 2


class Deadline:
    """Exit the process ``seconds`` after :meth:`arm` unless :meth:`disarm` comes first.

    Safe to call from a signal handler: arming again keeps the sooner deadline (a
    SIGQUIT's quick stop during a SIGTERM's graceful one brings the exit forward).
    """

    def __init__(self) -> None:
        self._lock: Any = None
        self._until = 0.0

    @property
    def armed(self) -> bool:
        return self._lock is not None

    def arm(self, seconds: float, message: str) -> None:
        """From now, ``seconds`` until the exit; ``message`` is its one line on stderr."""
        until = time.monotonic() + seconds
        if self._lock is not None:
            if until >= self._until:
                return
            self.disarm()
        self._until = until
        start, allocate = _thread_primitives()
        lock = allocate()
        lock.acquire()
        self._lock = lock
        faulthandler.dump_traceback_later(seconds + BACKSTOP, exit=True, file=_stderr_fd())
        start(_expire, (lock, seconds, message))

    def disarm(self) -> None:
        """The stop ended: no exit."""
        lock, self._lock = self._lock, None
        if lock is not None:
            faulthandler.cancel_dump_traceback_later()
            lock.release()


def _expire(lock: Any, seconds: float, message: str) -> None:
    if lock.acquire(True, seconds):
        return
    fd = _stderr_fd()
    os.write(fd, f"weft: {message}\n".encode("utf-8", "backslashreplace"))
    faulthandler.dump_traceback(file=fd, all_threads=True)
    os._exit(EXIT_TASKS_LEFT)
