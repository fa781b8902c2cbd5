"""The running machinery of one ``Server.run()``: what the flavours share, and the stop.

An :class:`Engine` lives from ``run()`` to the end of ``stop()``. It is built from
the run's settings, the manager, the opened listeners and the hooks, and knows the
Server only as the object it hands to user callbacks. Its accept loops run as tasks
of the manager, in the manager's runtime; each accepted connection becomes another
task. The loops and the connection task exist in two flavours, plain functions for
sync runtimes (:mod:`weft_core._engine_sync`) and coroutines for async ones
(:mod:`weft_core._engine_async`), each typed against its own runtime; policy
(limits, errno handling, back-off, shedding, logging, bookkeeping) and the stop are
written once, here.

Resource handling: a connection's socket is closed by its own task when the handler
returns or raises (unless detached); a connection whose task never started (the
manager was full, or dropped a queued task at stop) is closed by the engine.

The stop (DESIGN section 2) is bounded: phase 1 and phase 2 wait for the runtime's
loop at most :data:`LOOP_WAIT`; phase 3 interrupts every remaining task at once and
waits for all of them against one deadline, ``timeout`` plus :data:`STOP_GRACE`
after the stop began. A task still running then is left behind, counted and logged,
so that a stuck handler can never hold a process past its service manager's kill.
"""

from __future__ import annotations

import _thread
import bisect
import contextlib
import ipaddress
import logging
import os
import posix
import select
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from . import _acceptpolicy as policy
from ._accesslog import log_access
from ._balance import NAP, TURN_NAPS, AcceptBalance, worker_balance
from ._blocking import WakeableListener
from ._connection import ConnectionInfo, format_address
from ._control import ConnectionSnapshot
from ._errors import FAILURES, ManagerFullError, ServerError
from ._listeners import Listener, close_listener, remove_socket_file
from ._logsafe import escape_for_log, escape_message, log_untrusted_exception
from ._osthreads import thread_primitives
from ._protocol import AsyncRuntime, Slots, SyncRuntime, TaskManager
from ._proxy import HEADER_TIMED_OUT, ProxyHeader, ProxyHeaderError
from ._tasks import TaskState, current_task
from ._tcpinfo import accept_queue_length, byte_counts

if TYPE_CHECKING:
    from ._registry import Hooks
    from ._settings import Settings

R = TypeVar("R", SyncRuntime, AsyncRuntime)

log = logging.getLogger("weft.server")

#: What ``_preamble_done`` finds of a connection ``_shed_preamble`` took out first.
_SHED = object()

#: What ``Server.stats()`` counts, besides ``active``: connections handed to a handler,
#: closed unserved, and the ways a connection can end badly.
COUNTERS = (
    "accepted",
    "refused",
    "handler_errors",
    "tls_errors",
    "peer_errors",
    "proxy_errors",
    "idle_timeouts",
    "preambles_dropped",
    "left_behind",
)

#: Upper bounds (seconds) of the connection duration histogram in ``stats()["durations"]``:
#: Prometheus' default buckets from 5 ms to 10 s, then the minutes and the hour that
#: long-poll and streaming connections last; weft-prometheus's histogram has the same
#: bounds (a test compares them), so ``weft ctl status`` and a scrape agree.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
)  # fmt: skip

#: Every way a connection can end, as the connection-closed hook and the access log say it.
HOW = ("closed", "error", "idle_timeout", "stopped", "detached", "tls_error", "proxy_error")

#: Linux's IP_TRANSPARENT and IPV6_TRANSPARENT, per family (the socket module
#: names the first only from Python 3.11, the second not at all).
TRANSPARENT = {
    socket.AF_INET: (socket.SOL_IP, getattr(socket, "IP_TRANSPARENT", 19)),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 75),
}

#: The one grace of phase 3: how long after its graceful timeout a stop waits for the
#: tasks it interrupted, all together. A task blocked in I/O ends at once (its socket
#: is shut down, its greenlet killed, its scope cancelled); only one that ignores all
#: of that (pure computation, a blocking call that is not the connection's, a caught
#: TaskShutdown) takes longer, and it is left behind. Two seconds is short enough to
#: budget for: a service manager's kill deadline (docker stop's 10 s, Kubernetes'
#: terminationGracePeriodSeconds, systemd's TimeoutStopSec) must exceed
#: --graceful-timeout plus this (docs/deployment.md, "Stopping").
STOP_GRACE = 2.0
#: Whether accepted TCP sockets take their listener's TCP_NODELAY and SO_KEEPALIVE
#: (Linux's ``inet_csk_clone_lock`` copies the listening socket); see
#: :func:`connection_options`.
OPTIONS_INHERITED = sys.platform.startswith("linux")

#: How long a live limit change waits for a busy loop before returning; the change is
#: queued on the loop and applies when it runs again (a caller never hangs on it).
LOOP_ANSWER = 2.0

#: How long phases 1 and 2 wait for the runtime's loop to take their batch. A loop that
#: does not answer within this is blocked by a task (a handler calling time.sleep on a
#: gevent hub, say); the stop then goes on without it, from its own thread.
LOOP_WAIT = 1.0
#: How many shutdown callbacks that block phase 2 steps past (each after LOOP_WAIT),
#: within the graceful phase, before it ends the other inputs from its own thread.
MOST_STUCK = 8

#: How long the acceptor waits for the slot of a connection it dropped in its preamble
#: (see Engine._shed_preamble): that connection's task only has to notice its socket
#: was shut down.
SHED_WAIT = 1.0

#: While at the limit with on_full="backlog", the acceptor re-checks for a stop this
#: often; it is woken sooner by a slot coming free.
FULL_POLL = 0.1

#: How often an acceptor started by a resume looks whether the one a pause could not
#: end in time (its loop blocked) has ended, before it accepts on the same listener.
PREDECESSOR_POLL = 0.05

#: A worker at its limit with on_full="refuse" leaves a waiting client this long to
#: siblings with room (``--workers``, one shared socket) before it takes the client
#: and refuses it, the siblings passed over: longer than a balancing turn, since the
#: client is refused otherwise. A sibling that is stopped or stuck costs one client
#: this wait once a ``PASS_OVER``, not every client.
FULL_TURN = 0.25


class Conn(ConnectionInfo):
    """One accepted connection as the engine tracks it, its ConnectionInfo, and its thunk.

    ``sock`` is what the engine closes; ``shut`` is what it shuts down from other
    threads: the same socket, except under TLS, where shutting the TLS object down
    would discard its state, so the runtime hands out the plain descriptor's socket.
    ``addr`` is the socket's peer, which a PROXY header may replace in ``peer``.

    One object per connection, not three: a Conn is the ``ConnectionInfo`` that
    ``current_connection()`` returns, and calling it serves it (``serve(conn)``),
    so it is the thunk its task runs; its ``__name__`` (``weft conn HOST:PORT``)
    is made only when a manager asks. What an idle connection holds limits how many
    a server can hold, and every object tracked by the garbage collector makes its
    collections run sooner.
    """

    __slots__ = (
        "addr",
        "how",
        "opened",
        "options",
        "refused",
        "serve",
        "shut",
        "sock",
        "started",
        "state",
    )
    #: Why its preamble refused it (a ``weft_connection_refused`` reason), reported
    #: once its socket is closed; unset (no store per connection) until then.
    refused: str | None

    def __init__(
        self, sock: Any, addr: Any, serve: Callable[[Conn], Any], lt: ListenerTask
    ) -> None:
        # ``local`` is the listener's when all its connections share it, else None
        # until the connection's task reads it.
        ConnectionInfo.__init__(self, addr, lt.local)
        if lt.queued:  # completed before the listener had the options: set each one
            lt.queued -= 1
            self.options = lt.wanted
        else:
            self.options = lt.options
        self.serve = serve
        self.sock = sock
        self.shut = sock
        self.addr = addr
        self.state: TaskState | None = None
        self.started = False
        #: How it ended so far (see HOW); "" until its task has begun serving it.
        self.how = ""
        #: ``time.monotonic()`` when its task began serving it.
        self.opened = 0.0

    def __call__(self) -> Any:
        # run_task calls this as a plain function (no C-level call in between);
        # an async runtime awaits what it returns.
        return self.serve(self)

    @property
    def __name__(self) -> str:
        return f"weft conn {format_address(self.addr)}"

    def end_input(self) -> None:
        """Phase 2 of a stop: the handler's next read sees end-of-input; writing still works."""
        self.shut.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """Phase 3 of a stop: wake the task from any read or write."""
        self.shut.shutdown(socket.SHUT_RDWR)


class ListenerTask:
    """A listening socket and the acceptor task serving it."""

    __slots__ = (
        "acceptors",
        "address",
        "balanced",
        "generation",
        "listener",
        "local",
        "native",
        "options",
        "queued",
        "shared",
        "task_id",
        "wanted",
    )

    def __init__(
        self, listener: Listener, runtime: SyncRuntime | AsyncRuntime, cfg: Settings
    ) -> None:
        self.listener = listener
        self.address = listener.address  # before adopting: a runtime may take the socket over
        self.local = shared_local_address(listener.sock)
        #: The socket options weft gives each connection, and those each still needs
        #: set on it: decided once, not per connection (a gevent socket's ``family``
        #: is a Python property); none where the listener passes its own on.
        self.wanted = wanted_options(listener.sock, cfg.nodelay, cfg.keepalive)
        self.options = connection_options(listener.sock, self.wanted)
        #: Connections the kernel completed before the listener had the options
        #: (clients queued while the application imported, or before an inherited
        #: socket reached weft: a socket activation's first client) took none of
        #: them: the first this many accepted get them one by one. Read after the
        #: options were set, so every later connection has them. Other processes
        #: accepting on the socket too may take some; any early client still comes
        #: first in the queue, so within the count of whichever process accepts it.
        self.queued = accept_queue_length(listener.sock) if self.wanted and not self.options else 0
        self.native = runtime.adopt_listener(listener.sock)
        self.task_id: Hashable | None = None
        #: Which acceptor is the listener's own: each resume starts a new one. An
        #: acceptor a pause could not end in time (its loop busy) must not close the
        #: listener its successor accepts on when it finally ends.
        self.generation = 0
        #: Acceptor tasks inside their accept loop now (under the engine's lock): two
        #: while one a pause could not end runs beside its successor.
        self.acceptors = 0
        #: Other processes accept on it too (``--workers``): after each client the
        #: acceptor yields to its loop, so the new task runs before the next accept
        #: and a burst of clients spreads over the processes instead of going whole
        #: to whichever woke first (gunicorn sets gevent's ``max_accept = 1`` so).
        self.shared = listener.shared
        #: Its sibling workers share it too, so they take its clients in turns
        #: (:mod:`weft_core._balance`): not a socket of this worker's own
        #: (``--reuse-port``), which no sibling can take a client from.
        self.balanced = False

    def wake_with(self, runtime: SyncRuntime | AsyncRuntime) -> Callable[[], None]:
        """The acceptor's shutdown callback: the runtime wakes a pending accept()."""
        return lambda: runtime.wake_listener(self.native)

    def close(self) -> None:
        """Close the native socket and remove a Unix socket file."""
        self.native.close()
        close_listener(self.listener)


def wanted_options(
    sock: socket.socket, nodelay: bool, keepalive: bool
) -> tuple[tuple[int, int, int], ...]:
    """The socket options weft gives each TCP connection accepted on ``sock``.

    An option turned off is left as it is (the system's default).
    """
    if sock.family == socket.AF_UNIX:
        return ()
    wanted: tuple[tuple[int, int, int], ...] = ()
    if nodelay:
        wanted += ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
    if keepalive:
        wanted += ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
    return wanted


def connection_options(
    sock: socket.socket, wanted: tuple[tuple[int, int, int], ...]
) -> tuple[tuple[int, int, int], ...]:
    """Which of the ``wanted`` options the connections accepted on ``sock`` must each be given.

    Linux gives an accepted TCP socket its listener's ``TCP_NODELAY`` and
    ``SO_KEEPALIVE``, so there they are set once, on the listener, and no
    connection pays a system call for them. Elsewhere, or if the listener refuses
    them, each connection gets them.
    """
    if OPTIONS_INHERITED:
        try:
            for level, option, value in wanted:
                sock.setsockopt(level, option, value)
        except OSError:
            return wanted
        return ()
    return wanted


def shared_local_address(sock: socket.socket) -> Any:
    """The local address every connection accepted on ``sock`` has, or None if they differ.

    A listener bound to one address (or a Unix path) gives each connection that
    address, so it is read once instead of with a ``getsockname()`` per connection.
    A wildcard listener (``0.0.0.0``, ``::``) or a transparent proxy's (where the local
    address is whatever the client dialled) has no such address.
    """
    try:
        local = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            return local
        level, option = TRANSPARENT.get(sock.family, (socket.SOL_IP, 0))
        if not option or sock.getsockopt(level, option):
            return None
    except OSError:
        return None
    if not isinstance(local, tuple) or ipaddress.ip_address(local[0]).is_unspecified:
        return None
    return local


@dataclass(frozen=True)
class StopReport:
    """How a stop ended: ``clean`` if no task had to be interrupted; ``left`` still running."""

    clean: bool
    left: int = 0


class Engine(ABC, Generic[R]):
    """Everything one run of a server holds; see the module docstring.

    ``owner`` is what user callbacks and hooks receive as ``server``; the engine
    never reads it. ``on_fatal`` is called (in the acceptor's task) when accepting
    fails for good; :attr:`error` then says why.
    """

    def __init__(
        self,
        settings: Settings,
        manager: TaskManager,
        runtime: R,
        listeners: list[Listener],
        hooks: Hooks,
        owner: Any,
        on_fatal: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = settings
        self.manager = manager
        self.runtime: R = runtime
        self.hooks = hooks
        self.owner = owner
        self.on_fatal = on_fatal
        self.handler = settings.handler
        self.args = settings.args
        #: What the runtime cancels a task with: leaving a handler, passed on to the
        #: manager; another runtime's cancellation is the handler's failure.
        self.cancellations: tuple[type[BaseException], ...] | None = getattr(
            runtime, "cancellations", None
        )
        #: Whether connections have a PROXY header or a TLS handshake before the handler.
        self.preamble = settings.proxy is not None or settings.tls is not None
        # The bookkeeping's lock, taken twice or more per connection: an OS lock even
        # in a gevent-patched process (gevent's costs a Python call per take), which
        # is safe because nothing under it can switch greenlets (no I/O, no logging,
        # no hook, no wait but the condition's, which releases it).
        self.lock = thread_primitives()[1]()
        self.changed = threading.Condition(self.lock)
        #: When a stop's graceful phase ends (monotonic; None: when every connection
        #: has); :meth:`hurry` brings it forward while the stop waits.
        self.stop_until: float | None = None
        #: How many wait_idle() calls wait on ``changed``: a connection ending
        #: notifies only then (notify_all costs a microsecond on every connection,
        #: and waking a waiter a thread switch).
        self.idle_waiters = 0
        self.conns: set[Conn] = set()
        #: Connections still in their preamble (PROXY header, TLS handshake), oldest
        #: first: at the limit, the oldest is dropped to serve a new client.
        self.preambles: dict[Conn, None] = {}
        self.counts = dict.fromkeys(COUNTERS, 0)
        #: The connection slots (None: no limit) and how many they hold now: the
        #: limit, changed live by set_limit(); ``debt`` is how many slots a lowered
        #: limit still has to take back as connections end (none is ever cut).
        self.limit = settings.max_connections
        self.slots: Slots | None = None if self.limit is None else self._slots(self.limit)
        self.debt = 0
        #: Clients accepted at the limit, waiting for a slot (``full_wait``) in
        #: arrival order: (listener task, socket, address, monotonic deadline). One
        #: task serves them while ``queue_served``, so the acceptor goes on accepting.
        self.slot_queue: deque[tuple[ListenerTask, Any, Any, float]] = deque()
        self.queue_served = False
        #: Bytes of ended connections (where the kernel counted them), and their durations.
        self.bytes_in = 0
        self.bytes_out = 0
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        #: Whether anybody listens for connections opening and closing (asked once a run:
        #: the hooks cost a call per connection only when a plugin implements them).
        self.watch_opened = hooks.implemented("weft_connection_opened")
        self.watch_closed = hooks.implemented("weft_connection_closed")
        self.access_log = settings.access_log
        #: ``_serve`` bound once: every Conn keeps this one object, where a bound
        #: method made per connection would be kept by each idle one.
        self.serve_conn: Callable[[Conn], Any] = self._serve
        #: close_connection() waits on these: a connection's end sets its event.
        self.watched: dict[Conn, threading.Event] = {}
        #: Serialises pause, resume and limit changes (never held by the hot path).
        self.control = threading.Lock()
        self.paused = False
        self.spare = policy.SpareDescriptor()
        self.closing = False
        self.error: ServerError | None = None
        self.refuse_log = policy.RateLimitedLog(log)
        self.capacity_log = policy.RateLimitedLog(log)
        #: No task could be started for the last client (no thread to spare): the
        #: acceptor pauses this long before it accepts again, leaving waiting clients
        #: in the backlog, where a sibling worker takes them (or this one, later).
        self.shortage_pause = 0.0
        self.short_of_tasks = policy.Backoff()
        self.proxy_log = policy.RateLimitedLog(log)
        #: Strangers' connections under proxy_protocol, limited apart: a flood of them
        #: must not keep a trusted balancer's failures out of the log.
        self.untrusted_log = policy.RateLimitedLog(log)
        self.tls_log = policy.RateLimitedLog(log)
        self.shed_log = policy.RateLimitedLog(log)
        self.listeners = [ListenerTask(lst, runtime, settings) for lst in listeners]
        self.listeners_closed = False
        #: A worker's share of the clients of the listeners it shares with its
        #: siblings (``--workers``): see :mod:`weft_core._balance`. None elsewhere.
        self.balance: AcceptBalance | None
        balance = worker_balance() if any(lt.shared for lt in self.listeners) else None
        for lt in self.listeners:
            lt.balanced = balance is not None and lt.shared and balance.shares(lt.native)
        self.balance = balance if any(lt.balanced for lt in self.listeners) else None

    # -- what each flavour provides ----------------------------------------------------

    @abstractmethod
    def _slots(self, n: int) -> Slots:
        """``n`` connection slots of the flavour's runtime."""

    @abstractmethod
    def _acceptor_thunk(self, lt: ListenerTask) -> Callable[[], Any]:
        """The thunk of ``lt``'s acceptor task (a plain function, or an async one)."""

    @abstractmethod
    def _slot_queue_thunk(self) -> Any:
        """A task's thunk: give freed slots to ``slot_queue`` until it is empty."""

    @abstractmethod
    def _serve(self, conn: Conn) -> Any:
        """Serve one connection: preamble, handler, close (what its task runs)."""

    @abstractmethod
    def _try_take(self) -> bool:
        """Take a free slot without waiting (in the runtime's loop); True if taken."""

    # -- starting and reading ---------------------------------------------------------------

    def start(self) -> None:
        """Add one acceptor task per listener to the manager."""
        self._accepting(True)
        for lt in self.listeners:
            lt.task_id = self.manager.add_task(self._acceptor_thunk(lt))
            if lt.task_id is None:
                # Without an id the acceptor could be neither paused nor stopped.
                raise ServerError(
                    f"{type(self.manager).__name__}.add_task returned None: a task manager"
                    " returns a hashable id for each task (docs/writing-a-manager.md)"
                )

    def stats(self) -> dict[str, Any]:
        """The counters now, ``active``, bytes, and the duration histogram (cumulative)."""
        with self.lock:
            counts: dict[str, Any] = {**self.counts, "active": len(self.conns)}
            counts["bytes_in"] = self.bytes_in
            counts["bytes_out"] = self.bytes_out
            buckets = list(self.durations)
            counts["duration_sum"] = self.duration_sum
        counts["durations"] = cumulative(buckets)
        return counts

    def sockets(self) -> list[Any]:
        """The runtime's listening sockets while they are open."""
        return [] if self.listeners_closed else [lt.native for lt in self.listeners]

    def addresses(self) -> list[str]:
        """``HOST:PORT`` (or ``unix:/path``) of every listener."""
        return [lt.address for lt in self.listeners]

    def close(self) -> None:
        """Release what the run holds besides its tasks (the spare descriptor)."""
        self.spare.close()

    # -- accepting: the shared policy ------------------------------------------------

    def _accept_failed(
        self, lt: ListenerTask, exc: OSError, state: TaskState | None
    ) -> float | None:
        """Decide what a failed accept means. Returns a pause, 0 to go on, None to stop."""
        if (
            self.closing
            or self.paused
            or self.listeners_closed
            or (state is not None and state.requested)
        ):
            # Woken to end: a stop, a pause, or a drain. A resume racing a drain can
            # start an acceptor on the listener the drain has just closed (EBADF): it
            # ends here, where it was taken for a broken listener and stopped the
            # server, cutting what the drain would have let finish.
            return None
        action = policy.classify_accept_error(exc)
        if action is policy.AcceptAction.SKIP:
            log.debug("accept on %s: %s (skipped)", lt.address, exc)
            return 0.0
        if action is policy.AcceptAction.BACKOFF:
            return -1.0  # caller sheds, then backs off
        self.error = ServerError(
            f"accepting on {lt.address} failed with {exc.__class__.__name__}: {exc}; "
            "the listening socket is unusable, so the server stops"
        )
        log.error("%s", self.error)
        self.on_fatal()
        return None

    def _capacity_pause(
        self, lt: ListenerTask, exc: OSError, backoff: policy.Backoff, shed: int
    ) -> float:
        delay = backoff.next()
        self.capacity_log(
            logging.WARNING,
            "accepting on %s: %s; shed %d waiting client(s), retrying in %.2fs",
            lt.address,
            exc.strerror or exc,
            shed,
            delay,
        )
        return delay

    def _refuse(self, sock: Any, addr: Any, reason: str, why: str = "") -> None:
        with self.lock:
            self.counts["refused"] += 1
        close_quietly(sock)
        peer = format_address(addr)
        self.refuse_log(
            logging.WARNING,
            "refused connection from %s: %s",
            peer,
            f"max_connections={self.limit} reached"
            if reason == "full"
            else why or "the task manager is full",
        )
        self.hooks.connection_refused(self.owner, peer, reason)

    def _acceptor_lost(
        self, lt: ListenerTask, generation: int, state: TaskState | None, exc: BaseException
    ) -> None:
        """An acceptor is ending on ``exc``: unless weft asked it to end, the server stops.

        A stop, a pause, a drain and a resume each end acceptors and say so first. An
        acceptor cancelled or killed from outside (the application's asyncio loop
        ending while the server runs, which cancels every task on it; a greenlet
        killed; a bug) left a server that counted as running, listened no more and
        said nothing, and whose later ``stop()`` reported that nothing had to be
        interrupted. Now it is the server's error, as a broken listener is.
        """
        if (
            self.error is not None
            or self.closing
            or self.paused
            or self.listeners_closed
            or lt.generation != generation
            or (state is not None and state.requested)
        ):
            return
        self.error = ServerError(
            f"accepting on {lt.address} ended without weft asking it to "
            f"({type(exc).__name__}{': ' if str(exc) else ''}{exc}): its task was "
            "cancelled or killed from outside (an application's event loop that ends "
            "while the server runs cancels every task on it; stop the server first), "
            "so the server stops"
        )
        log.error("%s", self.error)
        self.on_fatal()

    def _acceptor_begins(self, lt: ListenerTask) -> bool:
        """Count an acceptor in; True if one before it still runs on the same listener.

        A pause that could not end its acceptor in time (a handler blocking the
        loop) leaves it running when a resume starts the next. The two must not wait
        on the listener together: a runtime may allow one waiter per socket (gevent
        raises ``ConcurrentObjectUseError``, trio ``BusyResourceError``), and the
        successor's error would stop the server. So the successor waits for its
        predecessor to end (the pause's stop reaches it once the loop is free)
        before its first accept: :meth:`_predecessor_runs`.
        """
        with self.lock:
            lt.acceptors += 1
            return lt.acceptors > 1

    def _predecessor_runs(
        self, lt: ListenerTask, generation: int, state: TaskState | None
    ) -> bool:
        """True while an earlier acceptor runs and this one has no reason to end."""
        return lt.acceptors > 1 and not self._acceptor_ends(lt, generation, state)

    def _acceptor_done(self, lt: ListenerTask, generation: int) -> None:
        """An acceptor's way out: close its listener unless paused or succeeded by another."""
        with self.lock:
            lt.acceptors -= 1
        if self.closing or (not self.paused and lt.generation == generation):
            lt.close()  # a paused listener stays open: clients wait in its backlog

    def _still_holding(self, lt: ListenerTask, sock: Any, addr: Any, since: float) -> None:
        """The acceptor ends holding a client it accepted, which waits for a slot.

        A pause interrupts the acceptor, not that client: it joins the queue of
        clients waiting for a slot for the rest of ``full_wait``, then is served or
        refused, counted. At a stop it is closed unserved, as the listener is.
        """
        if self.closing or not self.paused:
            close_quietly(sock)
            return
        self._queue_for_slot(lt, sock, addr, since + self.cfg.full_wait, capped=False)

    def _queue_for_slot(
        self, lt: ListenerTask, sock: Any, addr: Any, deadline: float, *, capped: bool = True
    ) -> bool:
        """Queue a client for the next free slot, until ``deadline``; False if not queued.

        At the limit with ``full_wait``, each client's wait starts when it is
        accepted, and the acceptor goes on accepting: were the acceptor to wait for
        each in turn, the k-th of k clients arriving together would wait k times
        ``full_wait``. One task (started here when none runs) gives freed slots to
        the queue in arrival order and refuses each client its deadline passes. At
        most ``backlog`` clients wait so (``capped``; the kernel's queue would hold
        no more); past that the acceptor waits itself. A manager that takes no task
        refuses them.
        """
        with self.lock:
            if capped and len(self.slot_queue) >= self.cfg.backlog:
                return False
            self.slot_queue.append((lt, sock, addr, deadline))
            if self.queue_served:
                return True
            self.queue_served = True
        try:
            self.manager.add_task(self._slot_queue_thunk())
        except Exception:
            for _, sock, addr, _ in self._drop_queue():
                self._refuse(sock, addr, "manager-full")
        return True

    def _next_in_queue(self) -> tuple[ListenerTask, Any, Any, float] | None:
        """The client longest in the queue; None once it is empty (its task then ends)."""
        with self.lock:
            if self.slot_queue:
                return self.slot_queue[0]
            self.queue_served = False
            return None

    def _leave_queue(self) -> None:
        with self.lock:
            self.slot_queue.popleft()

    def _drop_queue(self) -> list[tuple[ListenerTask, Any, Any, float]]:
        """Empty the queue (its task was cut off, or never started); what was in it."""
        with self.lock:
            left = list(self.slot_queue)
            self.slot_queue.clear()
            self.queue_served = False
        return left

    def _slot_decided(self, lt: ListenerTask, sock: Any, addr: Any, got: bool | None) -> None:
        """A queued client's end: serve (``got``), refuse (False), or close (None).

        None is a wait that did not end: the stop came first.
        """
        if got is None:
            close_quietly(sock)
        elif got:
            self._hand_off(lt, sock, addr)
        else:
            self._refuse(sock, addr, "full")

    def _hand_off(self, lt: ListenerTask, sock: Any, addr: Any) -> None:
        """Give an accepted connection (holding a slot) to the manager as a task.

        Not once the server is stopping: a client waiting for a slot (``full_wait``)
        may be given one the stop itself freed, and a task added then may be dropped
        unstarted by a manager closing down, its socket never closed. It is closed
        here, unserved, as the stop closes the rest of the queue.
        """
        conn = Conn(sock, addr, self.serve_conn, lt)
        with self.lock:
            self.conns.add(conn)
            stopping = self.closing
            if not stopping:
                self.counts["accepted"] += 1
                if self.preamble:
                    self.preambles[conn] = None
            if self.balance is not None:
                self.balance.took(len(self.conns))
        if stopping:
            self._finish(conn)  # gives its slot back
            close_quietly(sock)
            return
        try:
            conn.task_id = self.manager.add_task(conn)
            if self.short_of_tasks.delay:  # a task could be started again
                self.short_of_tasks.reset()
        except ManagerFullError:
            self._finish(conn)
            with self.lock:
                self.counts["accepted"] -= 1
            self._refuse(sock, addr, "manager-full")
        except Exception as exc:
            self._finish(conn)
            if isinstance(exc, MemoryError) or (
                isinstance(exc, RuntimeError) and "thread" in str(exc)
            ):
                # No thread (a pids cgroup, TasksMax, RLIMIT_NPROC: "can't start new
                # thread") or memory to start its task: a refusal for want of
                # capacity, counted and logged at a bounded rate, where each logged a
                # traceback. Anything else is the manager's bug, logged as such.
                with self.lock:
                    self.counts["accepted"] -= 1
                self._refuse(
                    sock, addr, "manager-full", f"the task manager could not start a task ({exc})"
                )
                # The acceptor pauses before the next (see shortage_pause): it took
                # every client it could not serve, about half of them beside a
                # sibling worker with room, each reset.
                self.shortage_pause = self.short_of_tasks.next()
                return
            log.exception(
                "the task manager could not take the connection from %s", format_address(addr)
            )
            close_quietly(sock)

    def _shed_preamble(self) -> bool:
        """Drop the oldest connection still in its preamble, to free a slot; True if one was.

        A client that opens a connection and stalls its TLS handshake or PROXY header
        holds a slot until ``tls_handshake_timeout`` (or ``proxy_header_timeout``); a
        few of them would keep every real client out. So at the limit, rather than
        refuse a new client, the acceptor shuts down the oldest connection still in
        its preamble: a real client's preamble takes milliseconds, a stalled one is
        the oldest, and the new one goes through the same rule.
        """
        with self.lock:
            if not self.preambles:
                return False
            conn = next(iter(self.preambles))
            del self.preambles[conn]
            self.counts["preambles_dropped"] += 1
        self.shed_log(
            logging.WARNING,
            "at max_connections=%s: dropped %s, still in its %s, to serve a new client",
            self.limit,
            conn.peer_str,
            # Where it is stalled: a PROXY header comes before the handshake.
            "PROXY header"
            if self.cfg.proxy is not None and conn.proxy_peer is None
            else "TLS handshake",
        )
        # Ended by the server, as a stop ends it: its task's failed handshake or
        # header is then no failure of the peer's (it was counted in tls_errors, logged
        # a second time blaming the peer's EOF, and reported to the hooks as "tls").
        conn.how = "stopped"
        _shutdown_quietly(conn.abort)
        return True

    def _pay_debt(self) -> bool:
        """Give a slot an acceptor holds to a lowered limit's debt; True if one was owed.

        With ``on_full="backlog"`` the acceptor takes its slot before ``accept()``,
        so a limit lowered meanwhile cannot take that slot back: the next client was
        served on it, one past the new limit (one per listener).
        """
        with self.lock:
            if not self.debt:
                return False
            self.debt -= 1
            return True

    def _preamble_done(self, conn: Conn) -> bool:
        """Its preamble over: False if the limit shed it meanwhile (it ends, unserved).

        A connection shed as its handshake or header completed went on to its
        handler on a socket shut down, a handler failure logged with its traceback,
        and a client that had done nothing wrong cut (the peer check's MED-3).
        """
        with self.lock:
            return self.preambles.pop(conn, _SHED) is not _SHED

    # -- serving a connection: shared parts -----------------------------------------

    def _begin(self, conn: Conn) -> Conn | None:
        """Record the task's state and set the socket up; None if the server is stopping.

        The stop reaches the connection through ``conn`` itself (its state's flag, its
        socket's shutdown), so nothing is registered with the task per connection.
        """
        state = current_task()
        conn.started = True
        conn.state = state
        if self.closing:
            return None
        conn.opened = time.monotonic()
        # A close or the limit's shedding may have ended it before its task began:
        # "stopped" stays, so its preamble's failure is not the peer's.
        conn.how = conn.how or "closed"
        sock = conn.sock
        for level, option, value in conn.options:
            sock.setsockopt(level, option, value)
        if self.cfg.idle_timeout is not None and self.runtime.kind == "sync":
            sock.settimeout(self.cfg.idle_timeout)  # async runtimes apply it in wrap_connection
        if conn.local is None:
            try:
                conn.local = sock.getsockname()
            except OSError:
                pass
        if state is not None:
            conn.task_id = state.id
        if self.watch_opened:
            self.hooks.connection_opened(self.owner, conn)
        return conn

    def _ended(self, conn: Conn) -> None:
        """Account for a connection whose handler is done, before its socket closes.

        Reads the kernel's byte counts, adds them and the duration to ``stats()``,
        then calls the connection-closed hook and writes the access log line, if
        anybody listens. Never raises: the caller goes on to close the socket.
        """
        try:
            duration = time.monotonic() - conn.opened
            bytes_in, bytes_out = byte_counts(conn.sock)
            how = conn.how
            state = conn.state
            if conn.detached:
                how = "detached"
            elif how == "closed" and state is not None and state.requested:
                how = "stopped"
            bucket = bisect.bisect_left(DURATION_BUCKETS, duration)
            with self.lock:
                self.bytes_in += bytes_in or 0
                self.bytes_out += bytes_out or 0
                self.durations[bucket] += 1
                self.duration_sum += duration
            if self.watch_closed:
                self.hooks.connection_closed(self.owner, conn, duration, bytes_in, bytes_out, how)
            if self.access_log:
                log_access(conn.peer_str, duration, bytes_in, bytes_out, how)
        except Exception:
            log.exception("accounting for the end of the connection from %s failed", conn.peer_str)

    def _handler_failed(
        self, conn: Conn, handed: Any, info: ConnectionInfo, exc: BaseException
    ) -> None:
        state = conn.state
        if state is not None and state.interrupted:
            conn.how = "stopped"
            # We cut it off (its socket shut down, its task cancelled): whatever it
            # raised on the way out - OSError, or a runtime's wrapper such as trio's
            # ClosedResourceError - is our doing, not the handler's fault.
            if log.isEnabledFor(logging.DEBUG):  # a stop cuts off thousands at once
                log.debug(
                    "handler for %s cut off by the stop: %s: %s",
                    info.peer_str,
                    type(exc).__name__,
                    escape_message(exc),
                )
            return
        tls_error = _tls_error(exc)
        if tls_error is not None and not _tls_peer_gone(tls_error):
            # The peer broke the TLS session (a renegotiation, a forged record, an
            # alert): its doing, not the handler's, and it must not flood the log.
            self._tls_failed(info, tls_error, stage="session")
            return
        if isinstance(exc, TimeoutError) and self.cfg.idle_timeout is not None:
            conn.how = "idle_timeout"
            with self.lock:
                self.counts["idle_timeouts"] += 1
            log.info(
                "closed %s: %s for %ss (idle_timeout)",
                info.peer_str,
                _idle_way(conn, exc),
                f"{self.cfg.idle_timeout:g}",
            )
            return
        conn.how = "error"
        if _peer_error(exc):
            with self.lock:
                self.counts["peer_errors"] += 1
        else:
            with self.lock:
                self.counts["handler_errors"] += 1
            self.hooks.handler_error(self.owner, info, exc)
        handler = self.cfg.exception_handler
        try:
            if handler is None:
                default_exception_handler(self.owner, handed, exc, info)
            else:
                handler(self.owner, handed, exc)
        except FAILURES as failed:  # sys.exit() too: on asyncio it ended the whole loop
            # Its traceback chains the handler's exception, whose message may carry
            # what the peer sent: escaped, as that one's own report is.
            log_untrusted_exception(
                log, logging.ERROR, failed, "exception_handler %r raised", handler
            )

    def _finish(self, conn: Conn) -> None:
        """Forget the connection and free its slot, once.

        A connection its preamble refused (PROXY, TLS) is reported to the
        ``weft_connection_refused`` hooks here, after its socket was closed and
        before it is forgotten: a slow hook keeps no refused peer connected.
        """
        # Only a preamble's failure can leave a refusal to report; reading the unset
        # slot of every other connection would raise (and catch) an AttributeError.
        if conn.how in _PREAMBLE_FAILED:
            reason = getattr(conn, "refused", None)
            if reason is not None:
                conn.refused = None
                self.hooks.connection_refused(self.owner, conn.peer_str, reason)
        conn.state = None  # let go of the task state as the task ends
        with self.lock:
            present = conn in self.conns
            self.conns.discard(conn)
            if self.balance is not None:
                self.balance.publish(len(self.conns))
            if self.preamble:
                self.preambles.pop(conn, None)
            if self.idle_waiters and not self.conns:
                self.changed.notify_all()
            if present and self.debt:
                self.debt -= 1  # a lowered limit takes this slot back
                present = False
            ended = self.watched.pop(conn, None) if self.watched else None
        if present and self.slots is not None:
            self.slots.release()
        if ended is not None:
            ended.set()

    # -- PROXY protocol and TLS: shared parts ------------------------------------------

    def _untrusted(self, sock: Any, addr: Any) -> bool:
        """Close at once a client that is no trusted proxy, before it takes a slot; True if so.

        Under ``proxy_protocol`` only a listed balancer may connect, and a stranger is
        told by its address alone: the acceptor closes it, unserved and counted,
        rather than its task once it held a slot. A flood of strangers took the
        slots, and at the limit had trusted connections still in their header
        dropped for them (the peer check's MED-1).
        """
        proxy = self.cfg.proxy
        if proxy is None or proxy.trusts(addr):
            return False
        with self.lock:
            self.counts["proxy_errors"] += 1
        close_quietly(sock)
        peer = format_address(addr)
        self.untrusted_log(
            logging.WARNING,
            "closed connection from %s unserved: PROXY header: not a trusted proxy",
            peer,
        )
        self.hooks.connection_refused(self.owner, peer, "untrusted")
        return True

    def _proxy_accepted(self, info: ConnectionInfo, header: ProxyHeader, leftover: bytes) -> bool:
        if leftover:  # read_proxy_header never reads past the header; be sure of it
            return self._proxy_failed(info, ProxyHeaderError("bytes past the header were read"))
        info.proxy_peer = info.peer
        if header.command == "PROXY" and isinstance(header.source, tuple):
            info.peer = header.source
            info.local = header.destination
        return True

    def _proxy_failed(self, info: ConnectionInfo, exc: BaseException) -> bool:
        if self.closing or (isinstance(info, Conn) and info.how == "stopped"):
            # The stop ended the header (it shuts every connection's input), or the
            # limit dropped it (_shed_preamble): no failure of the peer's, as for TLS.
            if isinstance(info, Conn):
                info.how = "stopped"
            return False
        if isinstance(info, Conn):
            info.how = "proxy_error"
        with self.lock:
            self.counts["proxy_errors"] += 1
        proxy = self.cfg.proxy
        if proxy is not None and (isinstance(exc, TimeoutError) or str(exc) == HEADER_TIMED_OUT):
            # One wording on every manager (a socket's timeout, the deadline's, a runtime's).
            why = f"timed out after {proxy.header_timeout:g}s (proxy_header_timeout)"
        else:
            why = escape_for_log(getattr(exc, "reason", None) or exc or exc.__class__.__name__)
        self.proxy_log(
            logging.WARNING,
            "closed connection from %s unserved: PROXY header: %s",
            info.peer_str,
            why,
        )
        self._refused(info, "proxy")
        return False

    def _refused(self, info: ConnectionInfo, reason: str) -> None:
        """Report a refusal to the hooks once the socket is closed (:meth:`_finish`)."""
        if isinstance(info, Conn):
            info.refused = reason
        else:
            self.hooks.connection_refused(self.owner, info.peer_str, reason)

    def _tls_failed(
        self, info: ConnectionInfo, exc: BaseException, stage: str = "handshake"
    ) -> bool:
        """Count and log (rate-limited, no traceback) a TLS failure the peer caused.

        ``stage`` is ``handshake`` (the connection is closed unserved, a refusal for
        the hooks) or ``session`` (it failed while the handler ran).
        """
        if stage == "handshake" and (
            self.closing or (isinstance(info, Conn) and info.how == "stopped")
        ):
            # The stop ended the handshake (it shuts every connection's input), or the
            # limit dropped it (_shed_preamble): no failure of the peer's, and nothing
            # to count or blame it for.
            if isinstance(info, Conn):
                info.how = "stopped"
            return False
        if isinstance(info, Conn):
            info.how = "tls_error"
        with self.lock:
            self.counts["tls_errors"] += 1
        if stage == "handshake" and isinstance(exc, TimeoutError):
            # One wording on every manager: each runtime words its timeout its own way
            # (OpenSSL's "The handshake operation timed out", gevent's, asyncio's).
            reason = f"timed out after {self.cfg.tls_handshake_timeout:g}s (tls_handshake_timeout)"
        else:
            reason = _tls_reason(_tls_error(exc) or exc)
        self.tls_log(logging.WARNING, "TLS %s with %s failed: %s", stage, info.peer_str, reason)
        if stage == "handshake":
            self._refused(info, "tls")
        return False

    # -- taking turns with the workers sharing a listener -----------------------------

    def _accepting(self, accepting: bool) -> None:
        """Tell the sibling workers whether this one takes clients now (and what it holds)."""
        if self.balance is not None:
            with self.lock:
                self.balance.accepting(len(self.conns) if accepting else None)

    def _turn_pauses(self, lt: ListenerTask) -> Iterator[float]:
        """After a client was taken from a shared listener: the pauses before the next.

        The policy of the workers' turns, the same in both engines, which only sleep
        for each pause. When this worker is not ahead of any sibling (or its turns
        used their share of this second), one pause of 0: the acceptor yields,
        once. Else a ``NAP`` at a time until a sibling behind takes a client, none
        waits any more, or this window's naps are spent (``TURN_BUDGET``); after
        ``TURN_NAPS`` naps with clients still waiting, those siblings are passed
        over a while (:meth:`_turn_missed`).
        """
        balance = self.balance
        behind = balance.behind(len(self.conns)) if balance is not None and lt.balanced else None
        if not behind:
            yield 0.0
            return
        assert balance is not None
        fd = lt.native.fileno()
        for _ in range(TURN_NAPS):
            yield NAP
            if not balance.napped() or balance.took_since(behind) or not policy.pending(fd):
                return
        self._turn_missed(behind)

    def _full_waits(
        self, lt: ListenerTask, generation: int, room: dict[int, int] | None, state: Any
    ) -> Iterator[bool | str]:
        """A full worker's wait for a sibling with room: the policy, the same in both engines.

        For a worker at ``max_connections`` with ``on_full="refuse"`` on a listener
        its siblings share. Taking the next client it could only refuse it, while a
        sibling with room could serve it; and waiting in ``accept()`` it would take
        the next client whatever the siblings held by then. So each engine's
        ``_while_full`` does the waits this yields, in its own runtime: ``"nap"``
        while a client waits, ``"slot"`` for a wait of ``FULL_POLL`` for a slot
        (which ends the wait if it gets one), then the decision: True to accept (a
        client waits and no sibling has room, so it is refused as before, or it
        waited ``FULL_TURN`` untaken by the siblings with room, who are passed
        over: stopped, stuck or starved of CPU), False when the acceptor must end.
        A refusal comes up to ``FULL_POLL`` later than from a worker alone.
        """
        fd = lt.native.fileno()
        waiting = policy.pending(fd)
        untaken_since = 0.0  # when a client began to wait untaken by the siblings
        # What the siblings had taken when that wait began: a take is looked for since
        # then, not since the last poll's read, which a take landing between the
        # check and the read would hide, the clock running on across clients.
        since = room or {}
        while room is not None:
            if self._acceptor_ends(lt, generation, state):
                yield False
                return
            if waiting and not room:
                break
            yield "nap" if waiting else "slot"
            waiting = policy.pending(fd)  # after the wait, for this turn and the next
            if not self._untaken(waiting, since):
                untaken_since = 0.0
            elif not untaken_since:
                untaken_since = time.monotonic()
            elif time.monotonic() - untaken_since >= FULL_TURN:
                self._turn_missed(room)
                break
            room = self._room_elsewhere(lt)
            if not untaken_since and room is not None:
                since = room
        yield True

    def _room_elsewhere(self, lt: ListenerTask) -> dict[int, int] | None:
        """At ``max_connections`` on a listener siblings share: those with room (maybe none).

        None when this worker is not full, or shares the listener with nobody. A
        full worker with ``on_full="refuse"`` that accepted the next client would
        have to refuse it, though a sibling could serve it: it leaves the waiting
        clients to those siblings instead (the engines' ``_while_full``).
        """
        balance, limit = self.balance, self.limit
        if balance is None or limit is None or not lt.balanced or len(self.conns) < limit:
            return None
        return balance.with_room(limit)

    def _acceptor_ends(self, lt: ListenerTask, generation: int, state: TaskState | None) -> bool:
        """True once the acceptor must end: a stop, a pause, a newer acceptor, its flag."""
        return (
            self.closing
            or self.paused
            or lt.generation != generation
            or (state is not None and state.requested)
        )

    def _untaken(self, waiting: bool, room: dict[int, int]) -> bool:
        """True if a client is ``waiting`` and none of the siblings with ``room`` took one since."""
        assert self.balance is not None
        return waiting and not self.balance.took_since(room)

    def _turn_missed(self, behind: dict[int, int]) -> None:
        """Every nap passed and clients still wait: those siblings are not counted a while."""
        assert self.balance is not None
        self.balance.pass_over(behind)

    # -- live control (Server.pause_accepting, max_connections, close_connection) ------

    def pause(self) -> None:
        """Stop every acceptor task but keep its listener open: clients wait in the backlog.

        ranch's suspend: the acceptor tasks end as at a stop (woken, killed or
        cancelled by ``stop_task``), and their ``finally`` leaves the listener open
        while ``paused``. Returns once they have ended.
        """
        with self.control:
            if self.paused or self.closing or self.listeners_closed:
                return
            self.paused = True
            self._accepting(False)
            for lt in self.listeners:
                if lt.task_id is not None:
                    self._stop_acceptor(lt)

    def _stop_acceptor(self, lt: ListenerTask) -> None:
        """End ``lt``'s acceptor task (a pause, a stop), whatever the manager does.

        Never shutdown() a listener: it may be shared with other processes (workers,
        systemd). Thread runtimes wake accept() with a pipe; event-loop managers
        interrupt the acceptor (kill, cancel) at once. A broken manager whose
        stop_task raises must not keep it, or the next, accepting: its accept() is
        woken here, and the acceptor, seeing the pause or the stop, ends by itself.
        """
        assert lt.task_id is not None
        try:
            self.manager.stop_task(lt.task_id, timeout=0)
        except Exception:
            log.exception(
                "the task manager's stop_task failed for the acceptor of %s; waking it instead",
                lt.address,
            )
            with contextlib.suppress(Exception):
                self.runtime.wake_listener(lt.native)

    def resume(self) -> None:
        """Start a new acceptor task on each listener kept open by :meth:`pause`."""
        with self.control:
            if not self.paused or self.closing or self.listeners_closed:
                return
            self.paused = False
            self._accepting(True)
            for lt in self.listeners:
                if isinstance(lt.native, WakeableListener):
                    lt.native.clear_wake()  # the wake that ended the paused acceptor
                lt.generation += 1
                lt.task_id = self.manager.add_task(self._acceptor_thunk(lt))
            if self.listeners_closed:  # a drain came meanwhile: its acceptors end at once
                self._accepting(False)

    def set_limit(self, limit: int) -> None:
        """Change how many connections are served at once; at once, cutting none.

        Raised: the extra slots are released (a waiting acceptor goes on at once),
        after paying back what an earlier lowering still owed. Lowered: free slots
        are taken back now and the rest as connections end (``debt``). Runs in the
        runtime's loop, where its semaphore lives.
        """
        slots = self.slots
        assert slots is not None

        def adjust() -> None:
            with self.lock:
                assert self.limit is not None
                delta = limit - self.limit
                self.limit = limit
                paid = min(self.debt, max(delta, 0))
                self.debt -= paid
            for _ in range(max(delta, 0) - paid):
                slots.release()
            owed = max(-delta, 0)
            while owed and self._try_take():
                owed -= 1
            if owed:
                with self.lock:
                    self.debt += owed

        with self.control:
            if not self.runtime.run_in_loop(adjust, LOOP_ANSWER):
                log.warning(
                    "max_connections = %d: the loop did not answer within %g s (a task"
                    " blocks it); the new limit applies as soon as it runs again",
                    limit,
                    LOOP_ANSWER,
                )

    def connections(self) -> list[ConnectionSnapshot]:
        """A snapshot of every open connection (its metadata, age and byte counts)."""
        now = time.monotonic()
        return [snapshot(conn, now) for conn in self.snapshot()]

    def find(self, task_id: Hashable) -> Conn | None:
        """The open connection served by the task ``task_id``, if any."""
        with self.lock:
            for conn in self.conns:
                if conn.task_id == task_id:
                    return conn
        return None

    def close_one(self, conn: Conn, timeout: float | None) -> bool:
        """The phases of a stop for one connection; True if it ended before phase 3."""
        began = time.monotonic()
        with self.lock:
            if conn not in self.conns:
                return True
            # One event per connection, shared by every caller closing it at once.
            ended = self.watched.get(conn)
            if ended is None:
                ended = self.watched[conn] = threading.Event()
            if conn in self.preambles:
                # Ended by the server, as the stop and the limit's shedding end one
                # (_shed_preamble): its handshake or header failing is then no failure
                # of the peer's. It was counted in tls_errors (proxy_errors), logged as
                # the peer's and reported to the hooks as a refusal.
                del self.preambles[conn]
                conn.how = "stopped"
        self.request_shutdown([conn])
        if ended.wait(timeout):
            return True
        assert timeout is not None
        deadline = began + timeout + STOP_GRACE
        self.interrupt([conn], deadline)
        ended.wait(max(deadline - time.monotonic(), 0.0))
        return False

    # -- stopping ------------------------------------------------------------------------

    def stop_acceptors(self, wait: float | None) -> None:
        """Phase 1: close every listener by stopping its acceptor task.

        Waits up to ``wait`` seconds for the acceptors (None: not at all, for a caller
        inside the runtime, which must not block it).
        """
        self.listeners_closed = True
        self._accepting(False)  # draining (a retire, a reload): siblings do not wait for it
        # Unix clients are refused from now on even if the loop cannot close the
        # socket yet (a handler blocks it): the path is gone. A TCP listener stays
        # open until the loop answers; never shutdown() here: another process may
        # accept on it (workers, a reload's or an upgrade's successor, systemd).
        for lt in self.listeners:
            remove_socket_file(lt.listener)

        def stop_them() -> None:
            for lt in self.listeners:
                if lt.task_id is not None:
                    self._stop_acceptor(lt)
                # The acceptor closes its listener on the way out; one that never ran
                # (a manager may drop a queued task) must not leave it open. A paused
                # acceptor left it open: close it in the loop, where a runtime's socket
                # may have to close (trio's).
                if not self.paused or not self.runtime.run_in_loop(lt.close, LOOP_WAIT):
                    lt.close()

        if not call_within(stop_them, wait, "weft stop acceptors") and wait:
            log.warning(
                "the acceptor did not stop within %ss: %s did not end its task in "
                "time (an event loop that a task blocks or a long burst of work keeps "
                "busy; on threads, the acceptor's thread waiting for the GIL behind "
                "many busy ones); the listener closes once it does",
                wait,
                type(self.manager).__name__,
            )

    def stop(
        self, timeout: float | None, interrupting: Callable[[], object] | None = None
    ) -> StopReport:
        """Phases 1 to 3 of a stop, bounded by ``timeout`` plus :data:`STOP_GRACE`.

        ``interrupting()`` is called once tasks must be interrupted, before they are.
        """
        began = time.monotonic()
        self.closing = True
        self._accepting(False)
        self.hurry(None if timeout is None else began + timeout)
        self.stop_acceptors(LOOP_WAIT)
        self.request_shutdown(self.snapshot())
        if self.wait_idle(None, stopping=True):
            return StopReport(clean=True)
        until = self.stop_until
        assert until is not None
        rest = self.snapshot()
        if until > began:
            log.warning(
                "%d connection(s) still open after the graceful timeout (%ss); interrupting them",
                len(rest),
                f"{until - began:.3g}",
            )
        else:
            log.warning("%d connection(s) still open: interrupting them (a quick stop)", len(rest))
        deadline = until + STOP_GRACE
        if interrupting is not None:
            interrupting()
        self.interrupt(rest, deadline)
        if self.wait_idle(deadline):
            return StopReport(clean=False)
        left = self.snapshot()
        log.warning(
            "%d task(s) still running %ss after they were interrupted; they are left "
            "behind (set the log level to debug to see each)",
            len(left),
            f"{STOP_GRACE:g}",
        )
        for conn in left:
            state = conn.state
            log.debug(
                "left behind: task %r serving %s (%s)",
                conn.task_id,
                conn.peer_str,
                "never started" if not conn.started else state.name if state else "?",
            )
        with self.lock:
            self.counts["left_behind"] = len(left)
        return StopReport(clean=False, left=len(left))

    def snapshot(self) -> list[Conn]:
        """The connections open now."""
        with self.lock:
            return list(self.conns)

    def request_shutdown(self, conns: list[Conn]) -> None:
        """Phase 2: flag every connection's task and end its input.

        In the runtime's loop thread (``run_in_loop``): one batch there, rather than a
        GIL hand-off with the loop for every connection. A batch not done within
        :data:`LOOP_WAIT` is held by a shutdown callback that blocks (a ``put()`` on a
        full queue), or by a loop that a task blocks. A callback that blocks costs its
        own connection its end marker, no other: the batch is begun again past it,
        while the graceful phase lasts (at most :data:`MOST_STUCK` times). A loop
        that never took the batch is blocked: then only the inputs are ended from
        here (a socket's shutdown is safe from any thread), so the stop goes on. The
        flags and their shutdown callbacks wait for the loop: a callback touches the
        runtime's own objects (a queue, an event), which only its loop may, so it
        never runs in the stopping thread.
        """
        taken = [0]  # the next connection no batch has taken: every batch goes on from it
        stuck = 0
        while True:
            ran: list[bool] = []
            at = [-1]  # the connection its batch is on (-1: the batch has not begun)
            # From a thread of its own: a runtime without a loop thread (threads) runs
            # the batch where it is called, and a callback that blocks would hold the
            # stop, unbounded.
            batch = self._shutdown_batch(conns, taken, at, ran)
            if call_within(batch, LOOP_WAIT, "weft stop: shutdown flags") and ran and ran[0]:
                return
            if stuck == 0:
                _batch_late("shutdown")
            stuck += 1
            until = self.stop_until
            if (
                at[0] < 0
                or stuck > MOST_STUCK
                or (until is not None and time.monotonic() >= until)
            ):
                break  # the loop never took it, or the graceful phase is over
            _shutdown_quietly(conns[at[0]].end_input)  # its task misses only its end marker
        # The inputs of those no batch has taken yet, ended from here (each takes the GIL
        # back after its system call, and thousands of busy threads make every take
        # slow: not those done already). A batch the loop takes late still flags them.
        for conn in conns[taken[0] :]:
            _shutdown_quietly(conn.end_input)

    def _shutdown_batch(
        self, conns: list[Conn], taken: list[int], at: list[int], ran: list[bool]
    ) -> Callable[[], None]:
        """Phase 2's batch from ``taken[0]`` on, run in the loop.

        ``at`` says which connection it is on; ``ran`` gets whether the loop ran it.
        """

        def batch() -> None:
            ran.append(
                self.runtime.run_in_loop(lambda: self._end_input(conns, taken, at), LOOP_WAIT)
            )

        return batch

    @staticmethod
    def _end_input(conns: list[Conn], taken: list[int], at: list[int]) -> None:
        # Two batches may take one connection (they run side by side once one waits
        # on a callback): flagging is done once, and ending an input twice is harmless.
        while (index := taken[0]) < len(conns):
            at[0], taken[0] = index, index + 1
            conn = conns[index]
            state = conn.state  # read once: the task may finish and clear it meanwhile
            if state is not None:
                state.request_shutdown()
            _shutdown_quietly(conn.end_input)

    def hurry(self, until: float | None) -> None:
        """End the stop's graceful phase by ``until`` (monotonic) if that is sooner.

        A second ``stop(timeout)``, or SIGQUIT during a SIGTERM's stop, shortens the
        one under way instead of waiting out its longer (or unbounded) timeout.
        """
        if until is None:
            return
        with self.changed:
            if self.stop_until is None or until < self.stop_until:
                self.stop_until = until
                self.changed.notify_all()

    def wait_idle(self, until: float | None, *, stopping: bool = False) -> bool:
        """Wait until no connection is open, or the monotonic time ``until``; True if none is.

        ``stopping``: the stop's graceful phase, whose end (``stop_until``) may be
        brought forward while it waits.
        """
        with self.changed:
            self.idle_waiters += 1
            try:
                while self.conns:
                    if stopping:
                        until = self.stop_until
                    if until is None:
                        self.changed.wait()
                        continue
                    left = until - time.monotonic()
                    if left <= 0:
                        return False
                    self.changed.wait(left)
                return True
            finally:
                self.idle_waiters -= 1

    def interrupt(self, conns: list[Conn], deadline: float) -> None:
        """Phase 3: interrupt every remaining task at once; close those that never ran.

        ``TaskState.interrupt()`` runs each task's interrupt callbacks; a manager that
        can kill or cancel overrides it in its TaskState subclass to schedule that
        without waiting (gevent, trio). The socket is shut down both ways, which wakes
        any read or write. Then, in a thread of its own, ``stop_task(id, 0)`` is
        called on each task still running, for managers that interrupt only there,
        until ``deadline``.
        """
        done = 0  # how many of conns interrupt_all has been through

        def interrupt_all() -> None:
            nonlocal done
            for conn in conns:
                state = conn.state
                if state is not None:
                    state.interrupt()  # marks whatever the handler raises next as our doing
                _shutdown_quietly(conn.abort)
                done += 1

        # From a thread of its own, as phase 2's batch: an interrupt callback that
        # blocks must not hold the stop, nor keep the sockets after it from shutting.
        wait = min(LOOP_WAIT, max(deadline - time.monotonic(), 0.0))
        if not call_within(interrupt_all, wait, "weft stop: interrupt"):
            _batch_late("interrupt")
            for conn in conns[done:]:  # those it has not reached (as request_shutdown)
                _shutdown_quietly(conn.abort)
        started = [conn for conn in conns if conn.started]
        unstarted = [conn for conn in conns if not conn.started]
        for conn in unstarted:
            self._finish(conn)  # if its task ever runs, it closes the socket itself

        def close_unstarted() -> None:
            # A runtime's socket may close only in its loop (gevent's hands the close
            # to the hub): bounded, so a blocked loop cannot hold the stop.
            for conn in unstarted:
                _close_outside_the_loop(conn.sock)

        if unstarted:
            call_within(close_unstarted, max(deadline - time.monotonic(), 0.0), "weft close")

        def sweep() -> None:
            for conn in started:
                if time.monotonic() >= deadline:
                    return
                with self.lock:
                    running = conn in self.conns
                if running and conn.task_id is not None:
                    self.manager.stop_task(conn.task_id, timeout=0)

        if started:
            call_within(sweep, None, "weft interrupt")


def cumulative(counts: list[int]) -> dict[str, int]:
    """Per-bucket counts as Prometheus has them: connections that lasted at most each bound."""
    total = 0
    out: dict[str, int] = {}
    bounds = [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out[bound] = total
    return out


def snapshot(conn: Conn, now: float) -> ConnectionSnapshot:
    """A copy of what ``conn`` is now, for ``Server.connections()``."""
    bytes_in, bytes_out = byte_counts(conn.sock)
    state = conn.state
    return ConnectionSnapshot(
        peer=conn.peer,
        local=conn.local,
        task_id=conn.task_id,
        proxy_peer=conn.proxy_peer,
        tls_version=conn.tls_version,
        tls_cipher=conn.tls_cipher,
        tls_peer_certificate=conn.tls_peer_certificate,
        detached=conn.detached,
        age=now - conn.opened if conn.how else 0.0,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        stop_requested=state is not None and state.requested,
    )


def _peer_error(exc: BaseException) -> bool:
    """The peer reset or vanished: a ConnectionError, or a runtime's wrapper of one.

    trio reports a reset as ``trio.BrokenResourceError`` caused by the
    ConnectionResetError; that is the peer's doing too, not the handler's.
    """
    return (
        isinstance(exc, ConnectionError)
        or isinstance(exc.__cause__, ConnectionError)
        or _tls_peer_gone(_tls_error(exc))
    )


def _tls_peer_gone(exc: BaseException | None) -> bool:
    """A TLS peer that has closed its connection, met by a write after it.

    What a balancer's TLS health check does (haproxy's ``check-ssl``): handshake,
    then close, without ``close_notify``. It is the peer's going away, as a reset is,
    not a broken TLS session to warn of: asyncio and trio take it as the end of
    input; on threads and gevent the handler's next write raised ``SSLEOFError`` or
    ``SSLZeroReturnError``, which was counted in ``tls_errors`` and logged at WARNING.
    """
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def _tls_error(exc: BaseException | None) -> BaseException | None:
    """The ``ssl.SSLError`` behind ``exc``, if any (trio wraps it in BrokenResourceError)."""
    ssl = sys.modules.get("ssl")  # no TLS error exists unless ssl was imported
    for _ in range(4):
        if ssl is None or exc is None:
            return None
        # SSLWantReadError and SSLWantWriteError are a memory BIO's "not yet", not a
        # failure: a reset met while refilling after one is the peer's reset.
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLWantReadError | ssl.SSLWantWriteError
        ):
            found: BaseException = exc
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason (``WRONG_VERSION_NUMBER``, ``NO_RENEGOTIATION`` ...), else the text."""
    reason = getattr(exc, "reason", None)
    text = str(exc) or exc.__class__.__name__
    return escape_for_log(f"{reason} ({text})" if reason and reason not in text else text)


def _idle_way(conn: Conn, exc: BaseException) -> str:
    """Which way a connection that timed out was idle: not sending, or not reading.

    A socket that cannot take more bytes (its send buffer full) timed out writing:
    the peer stopped reading. The async runtimes say so in the error itself.
    """
    if "stopped reading" in str(exc):
        return "the peer stopped reading"
    try:
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLOUT)
        writable = bool(poller.poll(0))
    except (OSError, ValueError):
        writable = True
    return "nothing received" if writable else "the peer stopped reading"


#: How a connection its preamble failed ended (``Conn.how``): a refusal may wait.
_PREAMBLE_FAILED = ("proxy_error", "tls_error")


def refuse_unrun(handler: Any, returned: Any, why: str) -> NoReturn:
    """Close an awaitable a handler returned that nobody will run; raise TypeError saying why.

    Closed, it gives no "never awaited" warning: the error names the handler, what it
    returned, and ``why`` nothing ran it.
    """
    close = getattr(returned, "close", None)
    if close is not None:
        close()
    raise TypeError(
        f"handler {getattr(handler, '__qualname__', handler)!r} returned "
        f"{type(returned).__name__} {getattr(returned, '__qualname__', '')!r}{why}"
    )


def close_quietly(obj: Any) -> None:
    """``obj.close()``, ignoring OSError."""
    try:
        obj.close()
    except OSError:
        pass


def close_now(sock: Any) -> None:
    """Close ``sock``'s descriptor at once, ignoring OSError.

    gevent's ``close()`` (its socket's, and ``os.close`` once monkey-patched) frees
    the descriptor only once its hub runs: a client shed to free a descriptor
    (EMFILE) freed none in time for the spare to be taken back.
    """
    try:
        fd = sock.detach()
    except (AttributeError, OSError):
        close_quietly(sock)
        return
    if fd >= 0:
        with contextlib.suppress(OSError):
            posix.close(fd)


def _close_outside_the_loop(sock: Any) -> None:
    """Close a socket no task uses yet, from a thread outside its runtime's loop.

    trio's socket closes only inside trio (``RuntimeError: must be called from async
    context``): its descriptor is detached and closed instead, so the socket object
    is closed too, and a task that runs it later finds it so, rather than a reused
    descriptor number.
    """
    try:
        sock.close()
    except OSError:
        pass
    except RuntimeError:
        detach = getattr(sock, "detach", None)
        if detach is None:
            raise
        with contextlib.suppress(OSError):
            os.close(detach())


def _shutdown_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except OSError:
        pass


def _batch_late(kind: str) -> None:
    log.warning(
        "the tasks' %s callbacks still run after %ss: one blocks (callbacks must not: "
        "docs/managers.md), a task blocks the runtime's loop, or the process's other "
        "threads keep the GIL from them; the stop goes on",
        kind,
        f"{LOOP_WAIT:g}",
    )


def call_within(fn: Callable[[], object], wait: float | None, name: str) -> bool:
    """Run ``fn()`` in a daemon thread and wait up to ``wait`` seconds; True if it ended.

    For the steps of a stop that need the runtime's loop to answer: a loop blocked
    by a task must not block the stop, which goes on once ``wait`` runs out (None:
    does not wait at all). ``threading.Thread.start()`` waits, with no bound, for
    the new thread's first turn at the GIL, and with thousands of handler threads
    taking it in turn (a broadcast to every parked subscriber) that took 15 s of a
    stop bounded at 5: the Thread is started from a ``_thread`` thread of its own,
    whose start returns at once, and the stop's wait is a lock's, timed (gevent's
    when it has patched ``_thread``, as a Thread's are then). A Thread, not a bare
    ``_thread`` one: that one, once it logs, stays listed as a dummy thread for good.
    """
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("%s failed", name)
        finally:
            done.release()

    thread = threading.Thread(target=run, name=name, daemon=True)
    try:
        _thread.start_new_thread(_start_or_run, (thread, run))
    except RuntimeError:
        # No thread to spare (a pids cgroup or TasksMax at its cap): the step runs
        # here, unbounded, where the stop failed and the process ended, cutting what
        # the stop would have let finish.
        run()
        return True
    if wait is None:
        return False
    return bool(done.acquire(True, max(wait, 0.0)))


def _start_or_run(thread: threading.Thread, run: Callable[[], None]) -> None:
    """Start ``thread``; if no other thread can be started, run its target in this one."""
    try:
        thread.start()
    except RuntimeError:
        run()


#: The peers' resets, logged at a bounded rate as their PROXY and TLS failures are: a
#: peer resetting connections as fast as it can open them wrote a line for each.
_peer_ends = policy.RateLimitedLog(log)


def default_exception_handler(
    server: Any, conn: Any, exc: BaseException, info: ConnectionInfo | None = None
) -> None:
    """Log a handler's exception: peer resets in one line, anything else with its traceback.

    The traceback's exception messages are escaped (:func:`format_untrusted_exception`):
    a handler's exception often carries bytes the client sent.
    """
    peer = info.peer_str if info is not None else "?"
    if _peer_error(exc):
        _peer_ends(
            logging.INFO, "connection from %s ended by the peer: %s", peer, type(exc).__name__
        )
    else:
        log_untrusted_exception(
            log, logging.ERROR, exc, "handler for %s raised %s", peer, exc.__class__.__name__
        )
