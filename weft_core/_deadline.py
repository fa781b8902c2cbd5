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

import faulthandler
import logging
import os
import sys
import tempfile
import time
from typing import Any

from ._exits import EXIT_TASKS_LEFT
from ._osthreads import thread_primitives

__all__ = ["Deadline"]

log = logging.getLogger("weft")

#: How long after the deadline faulthandler's timer exits, if the thread could not.
BACKSTOP = 1.0
#: How long the report may wait for stderr to take it before the exit goes on without it.
REPORT_WAIT = 0.4


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object with no descriptor
        return 2


#: The backstop's own descriptor of stderr (see :func:`_backstop_fd`), opened once.
_backstop: int | None = None


def _backstop_fd() -> int:
    """Where faulthandler's timer writes: stderr's file opened anew, non-blocking.

    Its C thread writes without a bound: to a pipe nobody reads it blocked in
    ``write()`` before its exit, and the main thread, finalizing, waited for it for
    good (a process that never exited after SIGTERM). A file of its own (a pipe or a
    FIFO, a regular file, appended to, a terminal) makes a full pipe's write fail at
    once instead; where stderr cannot be opened anew (a socket: journald's), the
    stacks go nowhere, and the Python-level report has written them as far as
    stderr took them.
    """
    global _backstop
    if _backstop is None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            _backstop = os.open(f"/proc/self/fd/{_stderr_fd()}", flags)
        except OSError:
            _backstop = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _backstop


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
        start, allocate = thread_primitives()
        lock = allocate()
        lock.acquire()
        self._lock = lock
        # Each needs a thread of its own. With none to spare (a pids cgroup or
        # TasksMax at its cap, RLIMIT_NPROC) the stop goes on without its last
        # resort: the RuntimeError escaped the signal's handling and ended the process
        # at once, exit 1, cutting the replies the stop would have let finish.
        try:
            faulthandler.dump_traceback_later(seconds + BACKSTOP, exit=True, file=_backstop_fd())
        except (RuntimeError, OSError):
            pass
        try:
            start(_expire, (lock, seconds, message))
        except RuntimeError as exc:
            log.warning(
                "cannot start the stop's last resort (%s): the stop goes on, but nothing"
                " ends the process if a handler keeps it from ending",
                exc,
            )

    def remaining(self) -> float | None:
        """Seconds left until the exit, or None when not armed."""
        if self._lock is None:
            return None
        return max(0.0, self._until - time.monotonic())

    def disarm(self) -> None:
        """The stop ended: no exit."""
        lock, self._lock = self._lock, None
        if lock is not None:
            faulthandler.cancel_dump_traceback_later()
            lock.release()


def _expire(lock: Any, seconds: float, message: str) -> None:
    if lock.acquire(True, seconds):
        return
    try:
        _report(message)
    finally:
        os._exit(EXIT_TASKS_LEFT)


def _report(message: str) -> None:
    """The line and every thread's stack, as far as stderr takes them within REPORT_WAIT.

    A stderr nobody reads (a full pipe) must not keep the process from exiting.
    Under ``--log-format json`` the stacks go inside the line, as ``stacks``.
    """
    from ._logging import flush_own_log, logs_json, stderr_line, writable, write_within

    fd = _stderr_fd()
    # One budget for all of it, well inside BACKSTOP: a report still writing when the
    # backstop's timer fires lost the exit status to it (1 for 4).
    until = time.monotonic() + REPORT_WAIT
    flush_own_log(REPORT_WAIT)  # what was logged before (the signal, the stop): first
    if logs_json():
        with tempfile.TemporaryFile() as dump:
            faulthandler.dump_traceback(file=dump, all_threads=True)
            dump.seek(0)
            stacks = dump.read().decode("utf-8", "backslashreplace")
        write_within(fd, stderr_line(message, logging.CRITICAL, stacks=stacks) + "\n", until)
    elif write_within(fd, stderr_line(message) + "\n", until) and writable(fd, until):
        faulthandler.dump_traceback(file=fd, all_threads=True)
