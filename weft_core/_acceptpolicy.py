"""What the accept loop does about each accept() error, and how it backs off.

One policy for every manager's acceptor (the shared ``Engine`` in ``_engine.py``
and the sync and async accept loops in ``_engine_sync.py`` and ``_engine_async.py``
all consult it), so that the errno sets live in one place.
"""

from __future__ import annotations

import errno
import logging
import os
import posix
import select
import time
from enum import Enum

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "CAPACITY_ERRNOS",
    "PEER_ERRNOS",
    "AcceptAction",
    "Backoff",
    "RateLimitedLog",
    "SpareDescriptor",
    "classify_accept_error",
]

#: The peer's doing: the connection died in the queue, or a firewall refused it.
#: The listener is fine; skip it and accept the next (Linux accept(2) lists the
#: network errors it may pass through; trio and Twisted skip the same set).
PEER_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPERM,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ECONNRESET,
    }
)

#: Out of capacity: file descriptors (process or system) or kernel memory. These
#: pass when something else closes, so back off and try again; never exit, never spin.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: First and longest pause after a capacity error. Doubling from 10 ms keeps a short
#: spike cheap; the 0.5 s ceiling means a server serves again within about half a
#: second of descriptors coming back (trio sleeps a flat 0.1 s; Twisted uses none
#: but sheds with a spare descriptor, as we also do).
BACKOFF_INITIAL = 0.01
BACKOFF_MAX = 0.5

#: At most this many waiting clients are shed per capacity episode step, so the
#: acceptor cannot be kept busy shedding by a flood.
SHED_BATCH = 64

#: Warnings that could repeat once per connection are logged at most once per this many seconds.
LOG_INTERVAL = 5.0


class AcceptAction(Enum):
    """What to do after a failed accept()."""

    SKIP = "skip"
    BACKOFF = "backoff"
    FATAL = "fatal"


def classify_accept_error(exc: OSError) -> AcceptAction:
    """SKIP for the peer's errors, BACKOFF for capacity errors, FATAL for the rest.

    FATAL errors (EBADF, EINVAL, ENOTSOCK, ...) mean the listening socket itself is
    broken: retrying would spin, so the server stops with the error.
    """
    if exc.errno in PEER_ERRNOS:
        return AcceptAction.SKIP
    if exc.errno in CAPACITY_ERRNOS:
        return AcceptAction.BACKOFF
    return AcceptAction.FATAL


class Backoff:
    """Exponential pause between accept retries while out of capacity."""

    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        """The pause to take now; each call doubles it up to BACKOFF_MAX."""
        self.delay = BACKOFF_INITIAL if self.delay == 0 else min(self.delay * 2, BACKOFF_MAX)
        return self.delay

    def reset(self) -> None:
        """Back to no pause after a successful accept."""
        self.delay = 0.0


class RateLimitedLog:
    """Log a recurring condition at most once per ``interval``, with how often it recurred."""

    __slots__ = ("_interval", "_last", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless one was logged less than ``interval`` ago."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d more like this in the last %.0fs)"
            args = (*args, self._suppressed, now - self._last)
        self._last = now
        self._suppressed = 0
        self._logger.log(level, msg, *args)


class SpareDescriptor:
    """One descriptor held in reserve to shed clients when the process runs out.

    When accept() fails with EMFILE the waiting client would sit in the listen
    queue until it times out. Closing the spare frees one descriptor, so the next
    accept() succeeds and the client can be closed at once (it sees EOF instead of
    hanging); then the spare is taken back. This is Twisted's and libuv's trick.
    """

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    def take(self) -> None:
        """Reserve the descriptor again (quietly fails if none is free yet)."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None

    def release(self) -> bool:
        """Give the descriptor back to the process, at once; False if none was held.

        ``posix.close``, never ``os.close``: gevent's monkey-patching makes the latter
        close only once its hub runs, and the accept that the freed descriptor was for
        came first, failed again (EMFILE), and the spare was lost for good: waiting
        clients were left hanging, none shed.
        """
        if self._fd is None:
            return False
        posix.close(self._fd)
        self._fd = None
        return True

    def close(self) -> None:
        """Drop the reserve for good."""
        self.release()


def pending(fileno: int) -> bool:
    """True if a connection is waiting on the listening ``fileno`` (never blocks)."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))
