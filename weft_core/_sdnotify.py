"""systemd's notification protocol (``sd_notify``), without libsystemd.

A service started with ``Type=notify`` finds a datagram socket's path in
``NOTIFY_SOCKET`` (``@`` at the start means Linux's abstract namespace) and writes
newline-separated ``KEY=VALUE`` assignments to it: ``READY=1``, ``RELOADING=1``,
``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``, ``MAINPID=...``. Without
``NOTIFY_SOCKET`` every call here does nothing, so the rest of weft calls it freely.

Workers never notify: the supervisor (the process systemd started) speaks for the
service, and :func:`child_environment` gives the environment its children get.

What does not live here: when weft says what (``_workers``, ``_cli``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = [
    "NOTIFY_ENV",
    "Notifier",
    "child_environment",
    "take_environment",
    "taken_environment",
    "watchdog_interval",
]

log = logging.getLogger("weft")

#: How long a notification may wait for room in the service manager's queue. The
#: socket is a datagram socket with a short queue (``net.unix.max_dgram_qlen``, 10
#: here): a service manager that stops reading it fills it with a few watchdog pings,
#: and a send with no bound then held the supervisor's loop, and a stop, for good.
NOTIFY_WAIT = 0.1

#: The notifications that change the service's state in systemd's eyes.
_STATES = frozenset({"READY", "RELOADING", "STOPPING"})

#: The variables of the protocol (sd_notify(3), sd_watchdog_enabled(3)); children of
#: the notifying process must not see them, or they would speak for the service too.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


#: The shortest and longest time between two pings: a ``WATCHDOG_USEC`` of 1 sent a
#: datagram in a busy loop, one of 2e16 overflowed the wait and killed the pinging thread.
PING_MIN = 0.01
PING_MAX = 86_400.0


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when systemd set no watchdog (``WatchdogSec=``), set it for another process,
    or set something that is not a decimal number of microseconds (``str.isdigit``
    alone takes ``²``, which ``int()`` then refused with a traceback). Bounded to
    ``PING_MIN``..``PING_MAX``.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return min(max(int(usec) / 2e6, PING_MIN), PING_MAX)


#: The protocol's variables this process took out of its environment (sd_notify(3)'s
#: ``unset_environment``), kept for :class:`Notifier` and for a re-exec of itself.
_taken: dict[str, str] = {}


def take_environment() -> Mapping[str, str]:
    """Take the notification variables out of ``os.environ`` (kept here); what was taken.

    As sd_notify's ``unset_environment`` does: a program a handler starts
    (systemd-notify, a shell) must not speak for the service, and systemd took it
    for this process, whose PID it sends. Before the handler is imported, so that
    its import-time code does not see them either.
    """
    for key in NOTIFY_ENV:
        if key in os.environ:
            _taken[key] = os.environ.pop(key)
    return _taken


def taken_environment() -> dict[str, str]:
    """The notification variables taken out of ``os.environ``: a USR2 re-exec puts them back."""
    return dict(_taken)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the notification variables: what a worker gets."""
    return {k: v for k, v in environ.items() if k not in NOTIFY_ENV}


class Notifier:
    """Writes notifications to ``NOTIFY_SOCKET``; does nothing when it is unset.

    Errors are logged once at WARNING and never raised: a service manager that
    stopped listening is no reason to stop serving. Nor one that stopped reading:
    a notification waits at most ``NOTIFY_WAIT`` for room in its queue and is
    dropped past that; once one was, the next are tried without waiting until one
    gets through.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = take_environment() if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        self.watchdog = watchdog_interval(env, os.getpid()) if self._address else None
        self._warned = False
        #: The last notification was dropped, its queue full: the next do not wait.
        self._full = False
        #: A change of state dropped for a full queue, to send again (see notify).
        self._pending: bytes | None = None

    @property
    def enabled(self) -> bool:
        """True when ``NOTIFY_SOCKET`` names a socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> None:
        """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) in one datagram.

        A change of state (READY, RELOADING, STOPPING) dropped for a full queue is
        sent again with the next notification that gets through (a watchdog ping, a
        status): systemd acts on them, where a lost STATUS or ping costs nothing.
        """
        if self._address is None:
            return
        data = "\n".join(assignments).encode()
        state = assignments[0].split("=", 1)[0] in _STATES
        if state:
            self._pending = None  # this one says the state now
        if self._pending is not None and self._send(self._pending):
            self._pending = None
        if not self._send(data):
            if state:
                self._pending = data
            self._warn(
                f"its queue stayed full for {NOTIFY_WAIT:g}s (the service manager is not"
                f" reading it): {assignments[0]} was dropped, as are later ones while it"
                " stays full (a READY, RELOADING or STOPPING is sent again once one gets"
                " through)"
            )

    def _send(self, data: bytes) -> bool:
        """One datagram; False if the queue stayed full (other errors are warned of)."""
        assert self._address is not None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                # Connected, a datagram socket is writable only while the receiver's
                # queue has room: the timeout bounds the wait for it.
                sock.settimeout(0.0 if self._full else NOTIFY_WAIT)
                sock.send(data)
        except (TimeoutError, BlockingIOError):
            self._full = True
            return False
        except OSError as exc:
            self._warn(str(exc))
            return True  # not the queue: sending it again would not help
        self._full = False
        return True

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot notify systemd on NOTIFY_SOCKET: %s; weft serves on", why)

    def ready(self, status: str) -> None:
        """``READY=1`` with a status line (also the end of a reload)."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC``, which systemd 253+ wants with it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        """``STOPPING=1`` with a status line."""
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A status line alone (``systemctl status`` shows it)."""
        self.notify(f"STATUS={status}")

    def alive(self) -> None:
        """``WATCHDOG=1``: call it only from a loop that is known to be healthy."""
        self.notify("WATCHDOG=1")
