"""A worker's side of ``weft serve --workers``: its link to the supervisor.

A worker is an ordinary ``weft serve`` started with ``--supervisor-fd=N``: one end of
a socket pair whose other end only its supervisor holds (``_workers``). Bytes go both
ways on it. The worker writes READY once listening (after that, an exit status 2
is no mistake in the command), BEAT heartbeats from inside its runtime's loop (the
``timeout`` watchdog), RECYCLE once it has accepted ``max_requests`` connections,
and STOPPED once its server has stopped (a signal that kills it after that cuts
nothing), after TOTALS, its final ``stats()``, which the supervisor keeps for
``weft ctl status``. The supervisor writes DRAIN to retire it (:func:`drain`), and its end
closing (the supervisor died, even by SIGKILL) stops the worker as SIGTERM does.

What does not live here: the supervisor (``_workers``), serving (``_cli._run``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from ._balance import worker_balance
from ._config import Config
from ._errors import ConfigError
from ._logging import take_line_lock
from ._signals import WORKER_FLAG, enable_stack_dump

__all__ = [
    "BEAT",
    "DRAIN",
    "HEARTBEAT_SHARE",
    "LISTENING_MESSAGE",
    "READY",
    "RECYCLE",
    "RECYCLE_CHECK",
    "STOPPED",
    "STOPPING",
    "TOTALS",
    "WORKER_READY_MESSAGE",
    "WorkerLink",
    "become_worker",
    "drain",
    "max_requests_for",
    "sum_stats",
    "take_totals",
    "totals_report",
]

log = logging.getLogger("weft.workers")
# The "listening on" line is weft serve's own (logger "weft"), whatever the process.
serve_log = logging.getLogger("weft")

#: What a worker writes to the supervisor: once it listens; as a heartbeat from its
#: runtime's loop; once it accepted max_requests connections.
READY = b"R"
BEAT = b"H"
RECYCLE = b"B"
#: Once the worker's server has stopped, before its signal handlers go: what kills it
#: after that (a stop signal arriving as it exits) cut no connection.
STOPPED = b"E"
#: Once the worker begins a graceful stop on a TERM or INT of its own (``pkill``,
#: systemd's KillMode=control-group): the supervisor's own TERM, however late it
#: comes (held across a USR2's exec, or a slow supervisor), is then not sent, which
#: the worker would take for a second signal and quit at once, cutting its clients.
STOPPING = b"G"
#: Sent just before STOPPED: the worker's final ``stats()`` as ``T``, its JSON in
#: lowercase hex, and a newline. No byte of a report is one of the single-byte
#: messages, which the supervisor looks for anywhere in what it reads.
TOTALS = b"T"
#: The longest report the supervisor reads; a longer one is not weft's, and dropped.
TOTALS_MAX = 1024 * 1024
_REPORT = re.compile(rb"T([0-9a-f]*)\n")
_REPORT_START = re.compile(rb"T[0-9a-f]*\Z")
#: What the supervisor writes to a worker it retires (reload, recycling, TTOU).
DRAIN = b"D"
#: A worker beats HEARTBEAT_SHARE times per ``timeout`` (at most once a second, so
#: a long timeout costs nothing): a late beat or two never trips the watchdog.
HEARTBEAT_SHARE = 4
#: How often a worker with max_requests compares its accepted count with it: a
#: counter read, cheap, and often enough that few connections come on top.
RECYCLE_CHECK = 0.02
#: The message weft serve logs once listening. In a worker it would repeat the
#: supervisor's line (which tools and tests wait for) N times, so a worker logs it
#: as ``worker ready on ...`` instead: the sign that this worker serves.
LISTENING_MESSAGE = "listening on %s (manager %s)"
WORKER_READY_MESSAGE = "worker ready on %s (manager %s)"


class WorkerLink:
    """A worker's end of its supervisor's socket pair: ready, heartbeats, recycling.

    The supervisor reads these bytes: ``R`` once listening (an exit status
    2 after it is no mistake in the command), ``H`` heartbeats from inside the
    runtime's loop (``timeout``), ``B`` once ``max_requests`` connections were
    accepted (start my replacement, then stop me), ``G`` once it begins a graceful
    stop on a signal sent to it (send me no TERM of yours), ``S`` once a stack dump
    relayed as a JSON line is in the log (kill me now), and ``T...`` (TOTALS) then
    ``E`` (STOPPED) once its server has stopped: what it counted, then its end.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._server: Any = None
        self._graceful_timeout = 0.0
        self._drain_asked = threading.Event()
        #: What the drain's log line gives as its reason.
        self._why = "asked to retire"
        # Whether the server may accept (begin_serving) or was retired before it
        # could: one decision, under the lock, whichever of the two threads comes first.
        self._lock = threading.Lock()
        self._serving = False
        self._retired = False
        threading.Thread(
            target=self._watch_supervisor, name="weft worker: supervisor watch", daemon=True
        ).start()

    def begin_serving(self) -> bool:
        """Called just before the server starts accepting: False if it must not.

        False once the supervisor has asked this worker to drain (a reload overtook
        its start): it never served, and ends without ever accepting a client.
        """
        with self._lock:
            if self._retired:
                return False
            self._serving = True
            return True

    def _watch_supervisor(self) -> None:
        """Drain when asked, and when the supervisor is gone.

        Gone: killed, or a USR2 whose new image could not start. The worker drains
        as on a reload, then exits: its clients between two requests are not cut, as
        a stop (what it did, by SIGTERM) cuts them, and nobody replaces it.
        """
        try:
            while data := os.read(self._fd, 512):
                if DRAIN in data:
                    self._retire()
        except OSError:
            pass
        self._why = "the supervisor is gone"
        self._retire()

    def _retire(self) -> None:
        """The supervisor asked this worker to go: drain, or end now if it does not serve yet.

        A worker still starting (importing the application, perhaps in an import that
        never returns) ends at once, by the default action of SIGTERM, which nothing
        catches before the server's own handlers go in: it has accepted nobody. Once
        it may accept, it drains instead, however early: the supervisor cannot tell a
        worker that has begun to accept from one still starting, and a stop would
        have cut the clients it took (a reload's load test lost two of them so).
        """
        with self._lock:
            self._retired = not self._serving
        if self._retired:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._drain_asked.set()
        self._maybe_drain()

    def _maybe_drain(self) -> None:
        server = self._server
        if server is None or not self._drain_asked.is_set():
            return
        self._drain_asked.clear()
        log.log(
            logging.INFO if self._why == "asked to retire" else logging.WARNING,
            "%s: draining (no new connections; open ones get %ss to end)",
            self._why,
            f"{self._graceful_timeout:g}",
        )
        graceful = self._graceful_timeout

        def start() -> None:
            threading.Thread(
                target=drain, args=(server, graceful), name="weft worker: drain", daemon=True
            ).start()

        # Started from the runtime's loop: under gevent's patching a thread started
        # here, in the supervisor watch (a real thread, older than the patching),
        # would be a greenlet of this thread's own hub, which never runs while it
        # waits for the supervisor: the drain never began and the worker was killed.
        server.task_manager.runtime.run_in_loop(start)

    def _send(self, byte: bytes) -> None:
        try:
            os.write(self._fd, byte)
        except OSError:  # the supervisor is gone; the watch thread stops us
            pass

    def stopping(self) -> None:
        """Tell the supervisor this worker has begun a graceful stop of its own."""
        self._send(STOPPING)

    def stopped(self) -> None:
        """Tell the supervisor this worker's server has stopped, and what it counted.

        Its final ``stats()`` first, so the service's totals keep what this worker
        counted once it has gone (``weft ctl status``); then STOPPED: nothing is
        left to cut.
        """
        server = self._server
        report = b"" if server is None else totals_report(server.stats())
        self._send(report + STOPPED)

    def ready(
        self,
        server: Any,
        graceful_timeout: float,
        timeout: float | None,
        max_requests: int | None,
    ) -> None:
        """Tell the supervisor this worker serves; start heartbeats and counting as configured."""
        self._graceful_timeout = graceful_timeout
        self._server = server
        self._maybe_drain()  # asked before it was ready (a reload overtaken by another)
        self._send(READY)
        if timeout is None and max_requests is None:
            return
        threading.Thread(
            target=self._watch_server,
            args=(server, timeout, max_requests),
            name="weft worker: heartbeat",
            daemon=True,
        ).start()

    def _watch_server(self, server: Any, timeout: float | None, max_requests: int | None) -> None:
        interval = (
            RECYCLE_CHECK
            if timeout is None
            else min(RECYCLE_CHECK * 10, timeout / HEARTBEAT_SHARE)
        )
        runtime = server.task_manager.runtime
        recycling = False
        while True:
            began = time.monotonic()
            # run_in_loop needs the runtime's loop to take the call: a blocked gevent
            # hub or trio loop never does, and the heartbeat stops with it.
            if timeout is not None and runtime.run_in_loop(_nothing, interval):
                self._send(BEAT)
            if (
                max_requests is not None
                and not recycling
                and server.stats().get("accepted", 0) >= max_requests
            ):
                recycling = True
                log.info(
                    "served %d connection(s) (max_requests): asking for a replacement",
                    max_requests,
                )
                self._send(RECYCLE)
            if server.wait(max(0.0, interval - (time.monotonic() - began))):
                return


def sum_stats(each: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Several processes' ``stats()`` as one: numbers added, tables (histograms) by key."""
    total: dict[str, Any] = {}
    for stats in each:
        for key, value in stats.items():
            mine = total.get(key)
            if isinstance(value, Mapping):
                total[key] = sum_stats([mine, value] if isinstance(mine, Mapping) else [value])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = (mine if isinstance(mine, int | float) else 0) + value
            elif key not in total:
                total[key] = value
    return total


def totals_report(stats: Mapping[str, Any]) -> bytes:
    """A TOTALS report of ``stats``, as a worker sends it on its link."""
    return TOTALS + json.dumps(stats, default=str).encode().hex().encode() + b"\n"


def take_totals(pending: bytes, data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The TOTALS reports whole in ``pending + data``, and the start of the next.

    ``pending``: what the last read left of a report; the link is read in pieces.
    """
    text = pending + data
    reports = []
    for match in _REPORT.finditer(text):
        try:
            stats = json.loads(bytes.fromhex(match.group(1).decode()))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError too
            continue
        if isinstance(stats, dict):
            reports.append(stats)
    rest = _REPORT_START.search(text)
    left = b"" if rest is None or len(rest.group(0)) > TOTALS_MAX else rest.group(0)
    return reports, left


def _nothing() -> None:
    """What the heartbeat runs in the runtime's loop: arriving there is the point."""


def max_requests_for(config: Config) -> int | None:
    """This worker's ``max_requests``, with its ``max_requests_jitter`` drawn (gunicorn's)."""
    limit: int | None = config.get("max_requests")
    if limit is None:
        return None
    return limit + random.randint(0, int(config.get("max_requests_jitter") or 0))


def become_worker(supervisor_fd: int) -> WorkerLink:
    """Make this ``weft serve`` a worker of the supervisor that started it.

    Stops gracefully (as on SIGTERM) when ``supervisor_fd``, a socket whose other end
    only the supervisor holds, reaches end-of-file: the supervisor is gone. Logs
    ``worker ready on ...`` where weft serve logs ``listening on ...``, and dumps
    its stacks on DUMP_SIGNAL (the watchdog's) into the pipe the supervisor reads
    them from. Returns the link, whose ``ready()``
    is called once listening.

    Raises ConfigError if ``supervisor_fd`` is not open (it is set by the supervisor,
    not by hand).
    """
    try:
        flags = fcntl.fcntl(supervisor_fd, fcntl.F_GETFD)
        fcntl.fcntl(supervisor_fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        # Read with blocking os.read: a supervisor monkey-patched by gevent (one process
        # that became a supervisor on HUP) made its socket pair non-blocking, a flag the
        # two ends share, and EAGAIN would read as "the supervisor is gone".
        os.set_blocking(supervisor_fd, True)
    except OSError as exc:
        raise ConfigError(
            f"{WORKER_FLAG} {supervisor_fd}: {exc.strerror}; this flag is set by"
            " `weft serve --workers N` for its workers, not by hand",
            source="command line",
        ) from None
    # Its cell of the accept balance and its own open file of the log's line lock,
    # taken now, before the application is imported: a process it starts then must
    # inherit neither the descriptors nor their variables.
    worker_balance()
    take_line_lock()
    serve_log.addFilter(_worker_ready)
    enable_stack_dump(os.environ)
    return WorkerLink(supervisor_fd)


def _worker_ready(record: logging.LogRecord) -> bool:
    if record.msg == LISTENING_MESSAGE:
        record.msg = WORKER_READY_MESSAGE
    return True


def drain(server: Any, graceful_timeout: float) -> None:
    """Retire ``server`` softly: stop accepting, let connections end by themselves.

    What a reload, recycling and TTOU do to the process they replace: unlike a stop
    on SIGTERM, no connection's input is ended, so a client between two requests is
    not cut. Those still open after ``graceful_timeout`` are then stopped at once
    (``stop(timeout=0)``).
    """
    server.stop_accepting()
    if not server.wait(graceful_timeout):
        server.stop(timeout=0.0)
