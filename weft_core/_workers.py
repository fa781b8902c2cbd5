"""Supervised worker processes: ``weft serve --workers N`` (DESIGN section 7).

The supervisor binds every listening socket **once**, logs ``listening on ...`` for
each, then starts N workers. A worker is a fresh interpreter running an ordinary
``weft serve`` with the same command line, except ``--workers=1`` and one
``--bind=fd:N`` per inherited socket, and it re-reads the same config file and
``WEFT_*`` variables. So:

- every manager works: gevent's hub and trio's loop start in a process that never
  forked from one (a forked hub or loop is not usable);
- no ``SO_REUSEPORT`` is needed, and no connection attempt is lost while a worker
  restarts: the kernel's queue belongs to the supervisor's socket, which outlives
  every worker;
- a restarted worker imports the handler afresh, so it runs the code on disk now.

The supervisor replaces a worker that exits unasked, after a back-off that grows while
workers keep dying young (see the ``RESTART_*`` constants). SIGTERM or SIGINT stops
it: it closes its own copies of the sockets, sends SIGTERM to every worker (each
stops gracefully within ``graceful_timeout``), waits, and exits 0; a worker still
running ``graceful_timeout + EXIT_MARGIN`` later is killed and the exit status is 1
(4 if a worker exited 4, having left stuck tasks running, and none was killed).
A second signal kills the workers at once. A worker exiting with status 2 before
it was ready, when no worker has ever been (a mistake in the command, the config or
the handler, which no restart can fix), stops everything, and the supervisor exits
2; during a reload it abandons the reload; otherwise (the code on disk changed since)
and after it was ready, status 2 is a crash like any other and the worker is replaced.

The supervisor acts on every signal within half a second whatever it is doing: it
starts workers one at a time, at most ``1 / START_INTERVAL`` a second, reading its
signal pipe between starts. It refuses ``workers`` beyond what the process limit and
the free memory can hold (:func:`check_capacity`), before anything starts. Under
``--workers`` the shutdown port is the supervisor's (workers never open it), and an
approved request stops the whole service as SIGTERM does.

Each worker holds one end of a socket pair whose other end only the supervisor has:
when the supervisor dies, even by SIGKILL, the worker reads end-of-file and stops
gracefully instead of serving on as an orphan. Bytes go both ways on it (the
worker's side and the bytes are in ``_worker_link``): ready, heartbeats and
"max_requests reached" from the worker, "drain" from the supervisor.

Zero-downtime operations (DESIGN section 9; ``_signals`` has the table): HUP starts
a new generation and retires each old worker once a new one is ready; USR2
re-executes the supervisor in place (same PID), which adopts its workers; TTIN/TTOU
change the count; ``max_requests`` recycles a worker and ``timeout`` replaces one
whose loop stopped, after dumping its stacks. The supervisor tells systemd what it
does (``_sdnotify``). How a supervisor is started (``--workers``, a single process's
hand-over, a re-exec) is ``_supervise``'s.

What does not live here: serving (each worker is a plain ``weft serve``), config
(``_config``), opening sockets (``_listeners``), socket activation (``_activation``),
starting a supervisor (``_supervise``), a worker's side (``_worker_link``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import queue
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from ._balance import ENV as BALANCE_ENV
from ._balance import BalanceMap
from ._config import parse_option_value
from ._connection import format_address
from ._errors import ConfigError
from ._exits import EXIT_RUNTIME, EXIT_TASKS_LEFT, EXIT_USAGE, late_signals_ignored
from ._flags import render_flag
from ._jobcontrol import OWN_PROCESS_GROUP
from ._listeners import handing_over
from ._logging import LINE_LOCK_ENV, logs_json, share_line_lock
from ._logsafe import escape_for_log
from ._sdnotify import Notifier, child_environment
from ._signals import (
    CONTROL_SIGNALS,
    DUMP_FD_ENV,
    DUMP_SIGNAL,
    STOP_REPEAT_WINDOW,
    STOP_SIGNALS,
    WORKER_START_BLOCKED,
    reopen_log_files,
)
from ._wakeup import Wakeup
from ._worker_link import (
    BEAT,
    DRAIN,
    HEARTBEAT_SHARE,
    READY,
    RECYCLE,
    STOPPED,
    STOPPING,
    sum_stats,
    take_totals,
)
from ._worker_sockets import WorkerSockets

__all__ = [
    "DUMP_GRACE",
    "DUMP_QUIET",
    "EXIT_MARGIN",
    "RESTART_DELAY_MAX",
    "RESTART_DELAY_MIN",
    "RESTART_RESET_AFTER",
    "START_INTERVAL",
    "SUPERVISOR_ONLY_KEYS",
    "WORKER_MEMORY",
    "WORKER_TASKS",
    "Local",
    "Supervisor",
    "check_capacity",
    "restart_delay",
    "worker_args",
    "worker_kwargs",
]

log = logging.getLogger("weft.workers")
# The "listening on" line is weft serve's own (logger "weft"), whatever the process.
serve_log = logging.getLogger("weft")

#: Back-off before replacing a worker that exited: the first replacement waits
#: RESTART_DELAY_MIN, each further one in a row twice as long, up to RESTART_DELAY_MAX,
#: so a worker that crashes at start costs one start every 10 s rather than a
#: spinning CPU and a flooded log (gunicorn and systemd's RestartSec= back off too).
RESTART_DELAY_MIN = 0.1
RESTART_DELAY_MAX = 10.0
#: A worker that ran this long was healthy: the next replacement is quick again.
#: 30 s is longer than any start-up (imports, a gevent hub, a trio loop) we measured.
RESTART_RESET_AFTER = 30.0
#: Beyond graceful_timeout, how long a stopping worker gets to finish: its stop()
#: interrupts what is left, waits up to STOP_GRACE (2 s, weft_core._engine) for it,
#: leaves behind what still runs, and the interpreter exits. Only a worker still
#: running after that is killed.
EXIT_MARGIN = 5.0
#: How long a ``weft ctl`` request waits for the supervisor's loop to act on it.
CALL_TIMEOUT = 5.0

T = TypeVar("T")
#: The longest the supervisor sleeps without a signal. SIGCHLD and SIGTERM wake it at
#: once through the wakeup pipe; this is only a backstop, so it costs nothing.
_IDLE_WAKE = 5.0
#: How long a reload's new workers may take to start before a reload asked meanwhile
#: replaces them (see Supervisor._replace_hung_start).
RELOAD_PATIENCE = 5.0
#: The shortest pause between two worker starts. Between starts the supervisor reads
#: its signal pipe, so a SIGINT during the start of many workers is acted on at once
#: (issue 14: with every start in one go, 668 workers started after a SIGINT); and
#: 50 interpreters a second is already more than two cores boot.
START_INTERVAL = 0.02
#: What one idle worker holds, measured (``threads`` manager, Python 3.11, 64-bit
#: Linux, every plugin installed): 14 MiB of private memory (21 MiB RSS) and 4
#: threads, which count against RLIMIT_NPROC; a gevent, trio or asyncio worker
#: 18-19 MiB, its backend loaded. A handler's own memory and threads come on top.
WORKER_MEMORY = 14 * 2**20
WORKER_TASKS = 4
#: The most the watchdog waits between asking a stuck worker for its stacks
#: (DUMP_SIGNAL, written at once by faulthandler's C signal handler into the
#: worker's dump pipe) and killing it; it kills it as soon as the dump is read.
DUMP_GRACE = 1.0
#: A dump is whole once its pipe has been quiet this long (faulthandler writes it
#: in one go, a few milliseconds for a hundred threads).
DUMP_QUIET = 0.05
#: Room in a dump pipe for every thread's stack: faulthandler writes from its
#: signal handler and would wait there on a full pipe.
DUMP_PIPE_SIZE = 1 << 20
#: The most of one dump kept, and read in one turn of the loop: the worker (its
#: handler, after the switch of user) may write to the pipe what it likes, and
#: kept whole, 300 MB of it took the root supervisor's memory with it.
DUMP_MAX = DUMP_PIPE_SIZE

# Config keys given on weft serve's command line that a worker gets in another form.
#: A worker listens on the sockets it inherits (``--bind=fd:N``): the supervisor's own
#: address flags would contradict them (``--port N --workers 2`` made every worker
#: exit 2, "give either --bind or --port").
_NOT_PASSED = frozenset({"handler", "bind", "address", "port", "workers", "manager_options"})
#: Settings the supervisor acts on and its workers ignore (they read the same config).
SUPERVISOR_ONLY_KEYS = frozenset({"shutdown_port", "shutdown_secret", "shutdown_allow_no_secret"})


# -- the supervisor's side -----------------------------------------------------------


def check_capacity(workers: int) -> None:
    """Refuse ``workers`` beyond what the process limit and the free memory can hold.

    Each worker is counted as WORKER_TASKS threads against RLIMIT_NPROC (less the
    tasks this user runs already) and WORKER_MEMORY against MemAvailable. Raises a
    one-line ConfigError (key ``workers``) naming the tighter limit and the largest
    count that fits under both.
    """
    limits: list[tuple[int, str]] = []  # (room in workers, why)
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY:
        used = _tasks_of(os.getuid())
        limits.append(
            (
                max(0, soft - used) // WORKER_TASKS,
                f"{workers * WORKER_TASKS:,} processes/threads ({WORKER_TASKS} each), but the"
                f" process limit is {soft:,} (RLIMIT_NPROC, {used:,} in use; raise it with"
                " ulimit -u)",
            )
        )
    available = _mem_available()
    if available is not None:
        limits.append(
            (
                available // WORKER_MEMORY,
                f"about {workers * WORKER_MEMORY // 2**20:,} MiB ({WORKER_MEMORY // 2**20} MiB"
                f" each), but only {available // 2**20:,} MiB is available (MemAvailable in"
                " /proc/meminfo)",
            )
        )
    if limits and workers > (tightest := min(limits))[0]:
        room, why = tightest
        advice = f"use --workers {room} or fewer" if room else "not even one worker fits"
        raise ConfigError(f"{workers:,} workers need {why}; {advice}", key="workers")


def _tasks_of(uid: int) -> int:
    """The threads of ``uid``'s processes (what RLIMIT_NPROC counts on Linux); 0 without /proc."""
    count = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                count += len(os.listdir(f"/proc/{name}/task"))
        except OSError:  # it ended meanwhile
            pass
    return count


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def worker_args(flags: Mapping[str, Any], config_file: str | None) -> list[str]:
    """The ``weft serve`` arguments for a worker: the same settings, ``--workers=1``, no bind.

    Each flag key is given back as its flag (``_flags.render_flag``: ``--backlog=64``,
    ``--certfile=PATH``, ``--no-nodelay``); manager options as
    ``--manager-option=NAME=VALUE`` with the value written so it parses back equal.
    """
    args: list[str] = []
    if flags.get("handler"):
        args.append(str(flags["handler"]))
    if config_file is not None:
        args.append(f"--config={config_file}")
    for key, value in flags.items():
        if value is None or key in _NOT_PASSED:
            continue
        args.append(render_flag(key, value))
    for name, value in (flags.get("manager_options") or {}).items():
        args.append(f"--manager-option={name}={option_text(value)}")
    args.append("--workers=1")
    return args


def worker_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's Server keywords: ``kwargs`` without what the supervisor owns (the shutdown port)."""
    return {k: v for k, v in kwargs.items() if k not in SUPERVISOR_ONLY_KEYS}


def option_text(value: Any) -> str:
    """Text that ``parse_option_value`` reads back as ``value`` (a TOML value, or text)."""
    if isinstance(value, str) and parse_option_value(value) == value:
        return value
    return _toml(value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise ConfigError(f"cannot pass {value!r} to a worker", key="manager_options")


def restart_delay(previous: float | None, ran: float) -> float:
    """The pause before replacing a worker that ran ``ran`` seconds.

    ``previous`` is the pause before the one that just exited (None for the first).
    """
    if previous is None or ran >= RESTART_RESET_AFTER:
        return RESTART_DELAY_MIN
    return min(previous * 2, RESTART_DELAY_MAX)


def describe_exit(code: int) -> str:
    """``"1"`` for an exit status, ``"SIGKILL"`` for a death by signal."""
    if code >= 0:
        return str(code)
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _dump_pipe() -> tuple[int, int]:
    """A worker's stack-dump pipe: the read end (ours, non-blocking) and the write end."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with contextlib.suppress(OSError, AttributeError):  # F_SETPIPE_SZ: Linux only
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, DUMP_PIPE_SIZE)
    return read_end, write_end


def _dump_text(dumped: bytes | bytearray, dropped: int) -> str:
    """A worker's dump as log text that can forge no line.

    faulthandler's lines begin ``Thread 0x``, ``Current thread 0x`` or with spaces;
    anything else in the pipe (the worker writes there as the service user) is
    indented, so no line of it reads as a record of the log's, and every line is
    escaped (a terminal's escape sequences, other control characters).
    """
    lines = []
    for raw in dumped.decode("utf-8", "backslashreplace").rstrip("\n").split("\n"):
        line = escape_for_log(raw)
        if line and not line.startswith(("Thread 0x", "Current thread 0x", " ")):
            line = "  " + line
        lines.append(line)
    if dropped:
        lines.append(f"  ({dropped} more bytes dropped: a dump is kept to {DUMP_MAX} bytes)")
    return "\n".join(lines)


def _log_stacks(pid: int, stacks: str) -> None:
    """A worker's dump as one ERROR record: a ``stacks`` field in JSON, the text after the line."""
    what = "worker %d: every thread's stack (DUMP_SIGNAL)"
    if logs_json():
        log.error(what, pid, extra={"stacks": stacks})
    else:
        log.error(what + ":\n%s", pid, stacks)


@dataclass
class _Worker:
    pid: int
    link: socket.socket  # our end of the worker's socket pair; closing it tells the worker to stop
    started: float
    delay: float | None  # the back-off that preceded this worker
    ready: bool = False
    #: Its server has stopped (STOPPED): a signal that kills it now cuts nothing.
    stopped: bool = False
    #: It began a graceful stop on a TERM or INT sent to it (STOPPING): our own TERM
    #: would be its second, which quits at once.
    stopping: bool = False
    #: We sent it SIGKILL (a deadline passed, or a second stop signal).
    killed: bool = False
    #: Replaced (a reload, max_requests, the watchdog): it serves on until a newer
    #: worker is ready, then it is retired. Not counted against the worker count.
    old: bool = False
    #: Sent SIGTERM (or SIGQUIT, or killed) by the supervisor: no replacement on exit.
    retiring: bool = False
    beat: float = 0.0  # the last heartbeat (or readiness), monotonic
    kill_at: float | None = None  # SIGKILL it then if it still runs
    #: ``weft ctl drain SECONDS``: SIGQUIT it then (what is left is cut), if it still runs.
    quit_at: float | None = None
    eof: bool = False  # its end of the link is closed: it is exiting
    stuck: bool = False  # the watchdog dumped its stacks and kills it at kill_at
    recycled: bool = False  # it reached max_requests
    told: str = ""  # how it was told to stop ("SIGTERM", "SIGQUIT", "a drain request")
    #: Which sockets it inherited (``WorkerSockets``): its replacement takes the same.
    slot: int = 0
    #: Its cell of the accept balance map (None: it has none, adopted or beyond the map).
    cell: int | None = None
    #: The read end of its stack-dump pipe (None: closed, or a worker of an older
    #: image), what came through it not yet logged, and when the last of that came.
    dump: int | None = None
    dumped: bytearray = field(default_factory=bytearray)
    dump_at: float = 0.0
    dump_dropped: int = 0  # bytes of the dump past DUMP_MAX, read and not kept
    #: Its ``stats()`` as last learned: its own report as its server stopped (TOTALS
    #: on the link), else its last answer to ``weft ctl status``; None: none yet.
    stats: dict[str, Any] | None = None
    #: The start of a TOTALS report on its link not yet read whole.
    report: bytes = b""


class Adopted(NamedTuple):
    """A worker of the image a supervisor re-executed from (USR2), as it hands it on."""

    pid: int
    link: socket.socket
    started: float
    ready: bool
    slot: int = 0
    #: It was retiring or exiting: it is watched to its end, never made current again.
    leaving: bool = False
    #: Its deadlines as the image before set them (``time.monotonic()``, which is the
    #: system's clock, the same across the exec): a re-exec must not push them back.
    kill_at: float | None = None
    quit_at: float | None = None
    #: The read end of its stack-dump pipe, if the image before had one.
    dump: int | None = None
    #: Its ``stats()`` as the image before last learned them (None: not yet).
    stats: dict[str, Any] | None = None
    #: It said STOPPING to the image before: a TERM of ours would be its second.
    stopping: bool = False


class Local(Protocol):
    """The in-process server of a single ``weft serve`` that became a supervisor (HUP, USR2)."""

    retired: bool

    def retire(self, wake: Callable[[], None]) -> None:
        """Start draining in the background; ``wake()`` once done."""

    def stop(self, quick: bool) -> None:
        """Stop it as a stop signal does (``quick``: at once), draining or not, in the background."""

    def done(self) -> bool:
        """True once retired and drained."""
        ...


class Supervisor:
    """Keep ``count`` workers serving; reload, resize, recycle and watch them; stop on a signal.

    ``command(link_fd, sockets)`` gives a worker's argv; each worker inherits its
    slot's ``sockets`` (one set shared by all, or one per slot with ``reuse_port``);
    ``on_stop`` runs as stopping starts. ``timeout`` is the watchdog (None: off);
    ``local`` an in-process server to retire once a worker is ready; ``adopted``
    workers (pid, link, started) of the image this one re-executed, which are
    replaced at once; ``reexec(state)`` re-executes for USR2 and does not return.
    :meth:`run` returns the exit status; :meth:`stop` (any thread) stops gracefully.
    """

    def __init__(
        self,
        command: Callable[[int, Sequence[socket.socket]], list[str]],
        sockets: WorkerSockets,
        count: int,
        graceful_timeout: float,
        *,
        on_stop: Callable[[], None] | None = None,
        timeout: float | None = None,
        local: Local | None = None,
        adopted: Sequence[Adopted] = (),
        reexec: Callable[[str], None] | None = None,
        upgrade: bool = False,
        notifier: Notifier | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
        ended_stats: Mapping[str, Any] | None = None,
    ) -> None:
        self._command = command
        self._on_worker_exit = on_worker_exit
        #: The file whose lock the workers and this process take to write a long log
        #: line whole to the stderr they share (None: none could be made).
        self._line_lock = share_line_lock()
        #: Where the workers say how many connections each holds, to take turns at a
        #: shared listener (None: it cannot be made; they go unbalanced).
        self._turns = BalanceMap.make()
        #: Functions other threads asked the loop to run (:meth:`call`), with their futures.
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._sockets = sockets
        self._count = count
        self._graceful_timeout = graceful_timeout
        #: ``weft ctl drain SECONDS``'s seconds: each worker still running then is
        #: sent SIGQUIT, as one process cuts what is left (None: graceful_timeout).
        self._drain_for: float | None = None
        self._on_stop = on_stop
        self._timeout = timeout
        self._local = local
        self._reexec = reexec
        self._notifier = notifier or Notifier({})
        self._workers: dict[int, _Worker] = {}  # by pid
        self._due: list[tuple[float, float | None]] = []  # starts: (when, its back-off)
        #: The control socket's listening descriptor (-1: none), kept across a USR2.
        self.control_fd = -1
        self._stopping = False
        self._only_draining = False
        #: What the workers that have ended counted (``stats()`` summed, none open):
        #: ``weft ctl status`` adds it to its totals, which so never go back, not
        #: even across a USR2 (the image before hands it on, as ``ended_stats``).
        self._ended_stats: dict[str, Any] = dict(ended_stats or {})
        #: The stop under way is a quick one (SIGQUIT): a QUIT now is a second one.
        self._quick = False
        #: When the signal that began the stop came (the loop's clock): a TERM or INT
        #: within STOP_REPEAT_WINDOW of it is the same one sent twice.
        self._stop_signal_at = -math.inf
        self._status = 0
        self._next_start = 0.0
        self._stop_asked = threading.Event()
        self._wakeup: Wakeup | None = None
        self._upgrade = upgrade
        self._reloading = local is not None or bool(adopted)
        #: A reload was asked while one was under way: it follows once that one is
        #: done (a storm of HUPs makes two generations, not one per signal).
        self._again = False
        #: READY=1 sent. A supervisor one weft serve became (HUP, USR2, TTIN), or a
        #: re-executed one (USR2), starts mid-reload of a service systemd was told of:
        #: its first READY=1 is the reload's end, not its first worker's start (which
        #: ended `systemctl reload` before the new workers were ready).
        self._announced = self._reloading
        #: The STATUS= systemd was last told (see _progress), and what it says first
        #: until the next reload ("the last reload failed; ").
        self._said = ""
        self._note = ""
        self._next_alive: float | None = None
        now = time.monotonic()
        for worker in adopted:
            worker.link.setblocking(False)
            kill_at = worker.kill_at
            if kill_at is None and worker.leaving:  # handed on without one: from now
                kill_at = now + graceful_timeout + EXIT_MARGIN
            self._workers[worker.pid] = _Worker(
                worker.pid,
                worker.link,
                worker.started,
                None,
                ready=worker.ready,
                old=True,
                beat=now,
                slot=worker.slot,
                retiring=worker.leaving,
                told="a drain request" if worker.leaving else "",
                kill_at=kill_at,
                quit_at=worker.quit_at,
                dump=worker.dump,
                stats=worker.stats,
                stopping=worker.stopping,
            )

    def stop(self) -> None:
        """Stop gracefully, as on SIGTERM (the shutdown port's request); any thread."""
        self._stop_asked.set()
        self._wake()

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT) -> T:
        """Run ``fn()`` in the supervisor's loop and return its result; from any thread.

        ``weft ctl``'s requests act through this, so the loop's state is only ever
        touched by the loop. Raises TimeoutError if the loop has not run it in time.
        """
        future: Future[T] = Future()
        self._calls.put((fn, future))
        self._wake()
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"the supervisor did not answer within {timeout:g}s") from None

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    @property
    def stopping(self) -> bool:
        """True once a stop or a drain is under way."""
        return self._stopping

    def service_stats(self, reported: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
        """The service's counters: what ended workers counted, and each one's latest.

        ``reported``: the workers' ``stats()`` as they answered just now, by pid; a
        worker that did not answer counts with what it said last. So the totals
        never go back when a worker ends (recycled, reloaded, retired, killed).
        """
        for pid, stats in reported.items():
            worker = self._workers.get(pid)
            if worker is not None:
                worker.stats = dict(stats)
        latest = [w.stats for w in self._workers.values() if w.stats is not None]
        return sum_stats([self._ended_stats, *latest])

    def worker_pids(self) -> list[int]:
        """The workers serving now (ready, not exiting), old ones of a reload included."""
        return [w.pid for w in self._workers.values() if w.ready and not w.eof]

    def leaving_pids(self) -> set[int]:
        """The workers told to go (retiring, or replaced by a reload).

        They may close their control socket at any moment, their drain done.
        """
        return {w.pid for w in self._workers.values() if w.retiring or w.old}

    def resize(self, delta: int, why: str) -> int:
        """Add (or, below 0, remove) workers, never below one; the new count."""
        if self._stopping:
            raise RuntimeError("the server is stopping")
        self._count = max(1, self._count + delta)
        log.info("%s: %d worker(s) now", why, self._count)
        return self._count

    def reload(self, why: str) -> None:
        """Start a graceful reload, as SIGHUP does."""
        if self._stopping:
            raise RuntimeError("the server is stopping")
        self._reload(why)

    def drain(self, timeout: float | None, why: str) -> bool:
        """Stop gracefully, giving connections ``timeout`` (None: graceful_timeout).

        True if a drain was under way already: an earlier deadline than its own
        brings its cut forward (:meth:`_hurry_drain`), a later one changes nothing.
        """
        if self._stopping and self._only_draining:
            if timeout is not None:
                self._hurry_drain(time.monotonic() + timeout)
            return True
        if self._stopping:
            raise RuntimeError("the server is stopping already")
        self._drain_for = timeout
        log.info(
            "%s: stopping %d worker(s) when idle (at most %ss)",
            why,
            len(self._workers),
            f"{self._graceful_timeout if timeout is None else timeout:g}",
        )
        self._begin_stop(time.monotonic(), soft=True)
        return False

    def _hurry_drain(self, cut: float) -> None:
        """A later ``weft ctl drain`` with an earlier deadline: cut what is left at ``cut``.

        Each draining worker still running then is sent SIGQUIT, as at the first
        drain's own deadline (and killed EXIT_MARGIN later if that does not end it).
        It answered with the later deadline and kept the first.
        """
        for worker in self._workers.values():
            if worker.stopped or worker.killed:
                continue
            if worker.quit_at is not None and worker.quit_at <= cut:
                continue
            if worker.kill_at is not None and worker.kill_at - EXIT_MARGIN <= cut:
                continue  # its own graceful timeout ends it first
            worker.quit_at = cut
            kill_at = cut + EXIT_MARGIN
            worker.kill_at = kill_at if worker.kill_at is None else min(worker.kill_at, kill_at)
        self._wake()

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    def run(self, started: Callable[[], object] | None = None) -> int:
        """Supervise until stopped and every worker has exited; return the exit status.

        ``started()``, if given, is called once this loop's signal handlers are in.
        """
        signals = (*STOP_SIGNALS, *CONTROL_SIGNALS, signal.SIGCHLD)
        with Wakeup(signals, on_exit=late_signals_ignored(signals)) as wakeup:
            self._wakeup = wakeup
            try:
                if started is not None:
                    started()
                now = time.monotonic()
                if self._notifier.watchdog is not None:
                    self._next_alive = now
                received: list[int] = []
                while True:
                    now = time.monotonic()
                    # Links first: a worker writes "ready" before it logs so, so a
                    # signal sent on seeing that line finds it ready here.
                    self._read_links(now)
                    self._read_dumps(now)
                    self._handle_signals(received, now)
                    self._run_calls()
                    if self._stop_asked.is_set() and not self._stopping:
                        log.info(
                            "stop requested on the shutdown port: stopping %d worker(s)"
                            " (graceful timeout %ss)",
                            len(self._workers),
                            f"{self._graceful_timeout:g}",
                        )
                        self._begin_stop(now)
                    self._reap(now)
                    local_busy = self._local is not None and not self._local.done()
                    if self._stopping and not self._workers and not local_busy:
                        break
                    self._kill_overdue(now)
                    if not self._stopping:
                        self._watch(now)
                        self._balance(now)
                        self._start_due(now)
                        self._progress()
                        self._replace_hung_start(now)
                        if self._upgrade and not local_busy and self._reexec is not None:
                            self._upgrade = False  # reexec returns only if it failed
                            self._reexec(self._state())
                            self._note = "the last upgrade failed; "
                            self._tell_ready("upgrade failed: serving on the old code")
                    self._alive(now)
                    links: list[socket.socket | int] = [
                        w.link for w in self._workers.values() if not w.eof
                    ]
                    links += [w.dump for w in self._workers.values() if w.dump is not None]
                    received = wakeup.wait(self._wait_time(now), links)
                log.info("all workers stopped")
                return self._status
            finally:
                self._wakeup = None
                self._abandon()
                self._sockets.close()

    # -- signals ------------------------------------------------------------------------

    def _handle_signals(self, received: list[int], now: float) -> None:
        for signum in received:
            if signum == signal.SIGCHLD:
                continue  # it only wakes the loop, which then reaps
            name = signal.Signals(signum).name
            if signum in STOP_SIGNALS or signum == signal.SIGQUIT:
                quick = signum == signal.SIGQUIT
                if not self._stopping or self._only_draining:
                    log.info(
                        "received %s: stopping %d worker(s) %s",
                        name,
                        len(self._workers),
                        "at once"
                        if quick
                        else f"(graceful timeout {self._graceful_timeout:g}s;"
                        " send it again to quit at once)",
                    )
                    self._begin_stop(now, quick=quick)
                    if not quick:
                        self._stop_signal_at = now
                elif not quick and now - self._stop_signal_at < STOP_REPEAT_WINDOW:
                    # The same request sent twice (timeout(1) signals its child, then
                    # its process group): not a second one, which kills the workers.
                    log.debug("received %s again at once: the same request", name)
                elif quick and not self._quick:
                    # As one process does: QUIT cuts a graceful stop short (exit 0),
                    # where a second TERM or INT kills (exit 1).
                    log.warning(
                        "received SIGQUIT during the graceful stop: cutting it short,"
                        " the workers' connections are interrupted now"
                    )
                    self._begin_stop(now, quick=True)
                else:
                    local = self._local
                    if local is not None and not local.done():
                        log.warning(
                            "received %s again: stopping the in-process server at once", name
                        )
                        local.stop(quick=True)
                    if self._workers:
                        log.warning("received %s again: killing the workers", name)
                        self._kill_all()
            elif self._stopping:
                log.info("received %s while stopping: ignored", name)
            elif signum == signal.SIGUSR1:
                reopened = reopen_log_files()
                log.info(
                    "received SIGUSR1: reopened %d log file(s); telling the workers", reopened
                )
                # Only ready ones: one still starting has no handler yet (USR1 would
                # kill it), and opens its log files afresh anyway.
                for worker in self._workers.values():
                    if worker.ready:
                        _send(worker.pid, signal.SIGUSR1)
            elif signum == signal.SIGHUP:
                self._reload("received SIGHUP: reloading")
            elif signum == signal.SIGUSR2:
                if self._reexec is None:
                    log.warning("received SIGUSR2: cannot re-execute here; reloading instead")
                    self._reload("received SIGUSR2: reloading")
                else:
                    log.info("received SIGUSR2: upgrading in place (re-executing, same pid)")
                    self._notifier.reloading("upgrading in place")
                    self._upgrade = True
                    if self._local_alone():
                        # A hand-over was abandoned: the in-process server serves with
                        # no worker, and the exec waits for it to drain, which it does
                        # only once a worker serves. So a worker first, as on the first
                        # USR2 (the upgrade had waited for good, RELOADING never ended).
                        self._reload(
                            "upgrading: first a worker to take the in-process server's place"
                        )
            elif signum == signal.SIGTTIN:
                self._count += 1
                log.info("received SIGTTIN: %d worker(s) now", self._count)
            elif signum == signal.SIGTTOU:
                if self._count > 1:
                    self._count -= 1
                    log.info("received SIGTTOU: %d worker(s) now", self._count)
                else:
                    log.warning("received SIGTTOU: one worker is the fewest; nothing to do")

    def _reload(self, why: str) -> None:
        if self._reloading:
            if not self._again:
                log.info("%s: after the reload under way is done", why)
            self._again = True
            self._replace_hung_start(time.monotonic())
            return
        current = self._current()
        serving = [w for w in self._old() if w.ready]  # a reload replaced, still serving
        self._count = max(self._count, 1)  # 0 after a failed hand-over (_abandon_reload)
        log.info(
            "%s: starting %d new worker(s); the %d old one(s) drain once the new are ready",
            why,
            self._count,
            len(current) + len(serving) + (self._local is not None and not self._local.retired),
        )
        self._notifier.reloading("reloading")
        self._note = ""
        self._reloading = True
        self._due.clear()  # whatever was due is started as part of the new generation
        for worker in current:
            worker.old = True

    def _starting(self) -> list[_Worker]:
        """The current workers not ready yet (during a reload: the new generation's)."""
        return [w for w in self._current() if not w.ready]

    def _replace_hung_start(self, now: float) -> None:
        """A reload asked for again while the one under way waits on a start that hangs.

        A new worker may never be ready (an import that never returns): waiting for
        it put the next HUP, the operator's way out once the code is fixed, off for
        good, and the reload never ended (nor told systemd READY=1). Once the oldest
        has been starting for RELOAD_PATIENCE, they go (they never served) and the
        reload starts over with the code on disk now. Sooner, the HUP waits its turn,
        so that a storm of HUPs makes one more reload, not one each.
        """
        if not self._reloading or not self._again or self._stopping:
            return
        starting = self._starting()
        waited = now - min((w.started for w in starting), default=now)
        if waited < RELOAD_PATIENCE:
            return
        log.warning(
            "the reload under way still waits for %d worker(s) started %.0fs ago (%s), and"
            " another was asked for: stopping them and reloading again",
            len(starting),
            waited,
            ", ".join(str(w.pid) for w in starting),
        )
        for worker in starting:
            worker.old = True  # never ready: retired at once by _balance (see _retire)
        self._reloading = self._again = False
        self._reload("reloading again: asked while the last reload hung in its start")
        self._wake()  # the loop goes round at once: retire them, start the new

    def _progress(self) -> None:
        """Log the end of a reload, and tell systemd we are READY (first time or again).

        Between those, STATUS= follows how many workers serve: it said "serving with
        2 worker(s)" while none could start, and after TTIN and TTOU.
        """
        current = self._current()
        ready = sum(w.ready for w in current)
        status = f"serving with {ready} worker(s)"
        if self._local is not None and not self._local.retired:
            status = "serving in the first process" + (f" and {ready} worker(s)" if ready else "")
        elif ready < self._count:
            status += f" of {self._count}" if ready else f": none yet of {self._count}"
        status = self._note + status
        if not self._announced and ready:
            self._announced = True
            self._tell_ready(status)
        if self._reloading and ready >= self._count and not self._old():
            self._reloading = False
            log.info("reload done: %d new worker(s) serving", ready)
            if not self._upgrade:  # else the re-executed image says READY=1, at its end
                self._tell_ready(status)
            self._reload_again()
        if self._announced and not self._reloading and status != self._said:
            self._notifier.status(status)
            self._said = status

    def _tell_ready(self, status: str) -> None:
        """READY=1 with ``status``, which STATUS= then says until it changes (_progress)."""
        self._notifier.ready(status)
        self._said = status

    # -- the workers' links: ready, heartbeats, max_requests --------------------------------

    def _read_links(self, now: float) -> None:
        for worker in self._workers.values():
            if not worker.eof:
                self._read_link(worker, now)

    def _read_link(self, worker: _Worker, now: float) -> None:
        while True:
            try:
                data = worker.link.recv(512)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                worker.eof = True
                return
            reports, worker.report = take_totals(worker.report, data)
            if reports:
                worker.stats = reports[-1]
            if READY in data and not worker.ready:
                worker.ready = True
            if READY in data or BEAT in data:
                worker.beat = now
            if STOPPED in data:
                worker.stopped = True
            if STOPPING in data:
                worker.stopping = True
            if RECYCLE in data and not worker.old and not worker.retiring:
                log.info("worker %d reached max_requests: replacing it", worker.pid)
                worker.old = worker.recycled = True

    def _read_dumps(self, now: float) -> None:
        for worker in self._workers.values():
            if worker.dump is not None or worker.dumped:
                self._read_dump(worker, now)

    def _read_dump(self, worker: _Worker, now: float, final: bool = False) -> None:
        """Read a worker's stack dump; log it as one record once whole; kill it if stuck.

        Whole: its pipe quiet for DUMP_QUIET, or the worker gone (``final``). One
        record, written by this process's log writer: no other process's line lands
        inside it, and the worker's GIL plays no part.
        """
        fd = worker.dump
        left = DUMP_MAX  # read in this turn: a worker writing without end holds no loop
        while fd is not None and left > 0:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # every write end is closed: the worker is gone
                os.close(fd)
                worker.dump = fd = None
                break
            left -= len(data)
            kept = data[: max(0, DUMP_MAX - len(worker.dumped))]
            worker.dumped += kept
            worker.dump_dropped += len(data) - len(kept)
            worker.dump_at = now
        if not worker.dumped or (not final and now - worker.dump_at < DUMP_QUIET):
            return
        stacks = _dump_text(worker.dumped, worker.dump_dropped)
        worker.dumped.clear()
        worker.dump_dropped = 0
        if final and worker.dump is not None:
            os.close(worker.dump)
            worker.dump = None
        _log_stacks(worker.pid, stacks)
        if worker.stuck and worker.kill_at is not None:
            worker.kill_at = min(worker.kill_at, now)  # its stacks are in the log

    def _watch(self, now: float) -> None:
        """The watchdog: a ready worker silent for ``timeout`` is dumped and replaced.

        A draining one too (retired by a reload, TTOU, ``max_requests``): its loop
        beats until its server has stopped, so silence there is a blocked loop as
        well, which had lingered, undumped, until the drain's deadline.
        """
        if self._timeout is None:
            return
        for worker in self._workers.values():
            if (
                worker.ready
                and not worker.stuck
                and not worker.stopped  # its server has stopped: no more beats, it exits
                and (worker.kill_at is None or worker.retiring)
                and now - worker.beat > self._timeout
            ):
                log.error(
                    "worker %d%s: no heartbeat from its runtime loop for %ss (blocked?):"
                    " dumping its stacks to the log and %s it",
                    worker.pid,
                    " (draining)" if worker.retiring else "",
                    f"{self._timeout:g}",
                    "killing" if worker.retiring else "replacing",
                )
                _send(worker.pid, DUMP_SIGNAL)
                worker.old = worker.retiring = worker.stuck = True
                soon = now + DUMP_GRACE  # sooner once its dump is read
                worker.kill_at = soon if worker.kill_at is None else min(worker.kill_at, soon)

    # -- keeping the count ---------------------------------------------------------------

    def _current(self) -> list[_Worker]:
        return [w for w in self._workers.values() if not w.old and not w.retiring]

    def _old_in_retiring_order(self, current: list[_Worker]) -> list[_Worker]:
        """The old workers, those to retire first first: the oldest.

        With a socket per worker, those whose slot a ready new worker serves come
        first, so every slot keeps a worker, and a reload abandoned halfway leaves
        each old one in a slot of its own.
        """
        old = self._old()
        if not self._sockets.spread:
            return old
        served = {w.slot for w in current if w.ready}
        return sorted(old, key=lambda w: w.slot not in served)  # stable: oldest first

    def _old(self) -> list[_Worker]:
        return sorted(
            (w for w in self._workers.values() if w.old and not w.retiring),
            key=lambda w: w.started,
        )

    def _balance(self, now: float) -> None:
        """Start or retire workers until ``count`` are current; retire old ones the new replace."""
        current = self._current()
        missing = self._count - len(current) - len(self._due)
        if missing < 0 and self._sockets.spread:
            # Workers in the slots given up go first, before a start still due: that
            # start fills a lower slot, whose socket would otherwise have no worker.
            placed = sorted(current, key=lambda w: (w.slot, w.started), reverse=True)
            for worker in [w for w in placed if w.slot >= self._count][:-missing]:
                log.info("worker %d: retiring it (fewer workers wanted)", worker.pid)
                self._retire(worker, now)
                missing += 1
            current = self._current()
        self._due.extend((now, None) for _ in range(max(0, missing)))
        while missing < 0 and self._due:
            self._due.pop()
            missing += 1
        # The highest slots go (the newest first among equals), so the slots left are
        # 0..count-1 and the sockets of the others can close. But first a worker whose
        # slot another serves: after a reload abandoned (its new code broken in one
        # slot), a new worker still starting in a slot its old one serves goes, not
        # the only worker of another slot, whose socket would be left with none.
        leaving = sorted(current, key=lambda w: (w.slot, w.started), reverse=True)
        in_slot = collections.Counter(w.slot for w in current)
        leaving.sort(key=lambda w: in_slot[w.slot] == 1)  # stable: the order above within
        for worker in leaving[: max(0, -missing)]:
            log.info("worker %d: retiring it (fewer workers wanted)", worker.pid)
            self._retire(worker, now)
        self._sockets.trim(max(self._count, 1), {w.slot for w in self._current()})
        # Old workers go as new ones are ready, so as many serve as before throughout.
        ready = sum(w.ready for w in current)
        old: list[_Worker | None] = []
        for worker in self._old_in_retiring_order(current):
            if not worker.ready:  # not serving yet: it ends, or drains what it took
                self._retire(worker, now)
            elif worker.recycled and ready:
                # Past max_requests, and another worker serves: go now, so the count
                # holds; a lone worker serves on until its replacement is ready.
                self._retire(worker, now)
            else:
                old.append(worker)
        local = self._local
        if local is not None and not local.retired:
            old.insert(0, None)  # the in-process server: the oldest
        while old and ready + len(old) > self._count:
            oldest = old.pop(0)
            if oldest is not None:
                self._retire(oldest, now)
            elif local is not None and ready:
                # Only a worker that serves takes over: after a reload abandoned (its
                # new code broken) the count is 0 and the in-process server serves on.
                log.info("a worker is ready: the in-process server drains now")
                local.retire(self._wake)

    def _retire(self, worker: _Worker, now: float) -> None:
        """Ask ``worker`` to drain (:func:`drain`): the byte DRAIN on its link.

        One not ready yet is asked the same: if it has not begun to accept, its link
        ends it at once, even in an import that never returns (``WorkerLink``); if it
        has, it drains. It was sent SIGTERM, and a worker that had begun to accept
        before its READY arrived cut the clients it had taken.
        """
        worker.retiring = True
        worker.told = "a drain request"
        cut = self._drain_for if self._only_draining else None
        if cut is not None and cut < self._graceful_timeout:
            # A worker drains within its own graceful timeout: past the drain's
            # seconds it is told to cut what is left (SIGQUIT), and killed only
            # if even that does not end it.
            worker.quit_at = now + cut
            worker.kill_at = now + cut + EXIT_MARGIN
        elif worker.kill_at is None:
            worker.kill_at = now + self._graceful_timeout + EXIT_MARGIN
        try:
            worker.link.send(DRAIN)
        except OSError:  # it is exiting already
            pass

    # -- stopping ---------------------------------------------------------------------------

    def _begin_stop(self, now: float, quick: bool = False, soft: bool = False) -> None:
        """Stop every worker: SIGTERM (graceful), SIGQUIT (``quick``), or a drain (``soft``).

        A drain (``weft ctl drain``) retires each worker as a reload does: no new
        connections, and open ones end by themselves within the graceful timeout; no
        connection's input is ended, so a client between two requests goes on.
        """
        first = not self._stopping
        self._stopping = True
        self._quick = self._quick or (quick and not soft)
        #: A drain (weft ctl drain) is under way, no stop signal yet: the first one
        #: still stops the workers as it always does (TERM gracefully, QUIT at once).
        self._only_draining = soft
        self._due.clear()
        if first:
            self._notifier.stopping("stopping")
            if self._on_stop is not None:
                self._on_stop()
            self._sockets.close()  # new clients are refused at once, as on_stop's are
        local = self._local
        if local is not None and not local.done():
            # Draining after a reload or not, its connections stop as the workers' do.
            if not local.retired:
                local.retire(self._wake)
            if not soft:
                local.stop(quick)
        if soft:
            for worker in self._workers.values():
                if not worker.retiring:
                    self._retire(worker, now)
            return
        deadline = now + EXIT_MARGIN + (0.0 if quick else self._graceful_timeout)
        for worker in self._workers.values():
            worker.retiring = True
            worker.told = "SIGQUIT" if quick else "SIGTERM"
            worker.kill_at = deadline if worker.kill_at is None else min(worker.kill_at, deadline)
            if not quick:
                self._read_link(worker, now)  # a STOPPING it wrote since the last turn
                if worker.stopping:
                    continue  # stopping gracefully already: ours would be its second TERM
            _send(worker.pid, signal.SIGQUIT if quick else signal.SIGTERM)

    def _kill_overdue(self, now: float) -> None:
        for worker in self._workers.values():
            if worker.quit_at is not None and now >= worker.quit_at:
                worker.quit_at = None
                worker.told = "SIGQUIT"
                log.info("worker %d: the drain's time is up, cutting what is left", worker.pid)
                _send(worker.pid, signal.SIGQUIT)
            if worker.kill_at is None or now < worker.kill_at:
                continue
            worker.kill_at = math.inf  # killed once
            worker.killed = True
            if self._stopping:
                self._fail(EXIT_RUNTIME)
            if not worker.stuck:
                log.error(
                    "worker %d still running %ss after %s: killing it",
                    worker.pid,
                    f"{EXIT_MARGIN + (0 if worker.told == 'SIGQUIT' else self._graceful_timeout):g}",
                    worker.told,
                )
            _send(worker.pid, signal.SIGKILL)

    def _kill_all(self) -> None:
        self._fail(EXIT_RUNTIME)
        for pid, worker in self._workers.items():
            worker.kill_at = math.inf
            worker.killed = True
            _send(pid, signal.SIGKILL)

    # -- exits -------------------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        # waitpid(-1) rather than each Popen's poll(): as PID 1 in a container the
        # supervisor also inherits orphans (a handler's children), which it must reap.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            worker = self._workers.pop(pid, None)
            if worker is None:
                log.debug("reaped process %d (not a worker), which exited with %s", pid, code)
                continue
            if not worker.eof:
                self._read_link(worker, now)  # a ready byte outlives the worker
            worker.link.close()
            self._keep_stats(worker)
            self._read_dump(worker, now, final=True)
            if worker.cell is not None and self._turns is not None:
                self._turns.release(worker.cell)  # it may have died holding connections
            if self._on_worker_exit is not None:
                self._on_worker_exit(pid)
            self._exited(worker, code, now)

    def _keep_stats(self, worker: _Worker) -> None:
        """Add what an ended worker counted to the service's (its last known stats).

        Its own report as its server stopped; one killed (SIGKILL: the watchdog, a
        deadline, the OOM killer) could not send one, and leaves what it said last,
        so what it counted since the last ``weft ctl status`` is lost. Nothing of it
        is open any more.
        """
        if worker.stats is not None:
            self._ended_stats = sum_stats([self._ended_stats, {**worker.stats, "active": 0}])

    def _fail(self, status: int) -> None:
        """Record why the supervisor will not exit 0.

        The first failure wins, except that tasks left behind (4) give way to a
        worker killed or a fault (1, 2) recorded after them.
        """
        if self._status in (0, EXIT_TASKS_LEFT):
            self._status = status

    def _exited(self, worker: _Worker, code: int, now: float) -> None:
        pid, what = worker.pid, describe_exit(code)
        if code == EXIT_TASKS_LEFT and (self._stopping or worker.retiring):
            # Its stop had to leave tasks running (it said how many): the service's
            # stop did too, and the supervisor's status says so as one process's would.
            log.warning("worker %d exited with %s: it left tasks running", pid, what)
            if self._stopping:
                self._fail(EXIT_TASKS_LEFT)
        elif (
            self._stopping
            and code != 0
            and worker.ready
            and not worker.killed
            and not worker.stopped
        ):
            # Not its own stop's end (STOPPED: a signal that came as it exited cut
            # nothing), nor our SIGKILL: something else ended it, its connections cut:
            # a second TERM sent to it directly (pkill, a control-group kill), the OOM
            # killer. weft's own handler never lets one TERM kill a serving worker.
            hint = (
                " (a second stop signal sent to it directly: signal the supervisor only)"
                if code in (-signal.SIGTERM, -signal.SIGINT)
                else ""
            )
            log.warning(
                "worker %d exited with %s during the stop, not by the stop it was told:"
                " its connections were cut%s",
                pid,
                what,
                hint,
            )
            self._fail(EXIT_RUNTIME)
        elif self._stopping or worker.retiring:
            # One retired before it was ready ends as its link tells it to: expected.
            early = " (retired before it was ready, as asked)" if not worker.ready else ""
            log.info("worker %d exited with %s%s", pid, what, early)
        elif code == EXIT_USAGE and not worker.ready and self._reloading:
            log.error(
                "worker %d exited with %s before it was ready: the new code or config is"
                " broken (see its message above); the reload is abandoned and the old"
                " workers serve on",
                pid,
                what,
            )
            self._abandon_reload()
        elif code == EXIT_USAGE and not worker.ready and self._announced:
            # Served before, so the command is right: the code or config on disk
            # changed since. Retry with the back-off, as for a crash.
            delay = restart_delay(worker.delay, now - worker.started)
            self._due.append((now + delay, delay))
            log.error(
                "worker %d exited with %s before it was ready (see its message above);"
                " starting another in %ss",
                pid,
                what,
                f"{delay:g}",
            )
        elif code == EXIT_USAGE and not worker.ready:
            log.error(
                "worker %d exited with %s before it was ready: a mistake in the command,"
                " config or handler (see its message above), which a restart cannot fix;"
                " stopping",
                pid,
                what,
            )
            self._status = EXIT_USAGE
            self._begin_stop(now)
        elif (dead := self._dead_socket()) is not None:
            log.warning("worker %d exited with %s", pid, what)
            log.error(
                "the listening socket on %s no longer listens: something shut it down"
                " (a worker's stop can, as all share it); stopping",
                dead,
            )
            self._status = EXIT_RUNTIME
            self._begin_stop(now)
        elif worker.old:
            log.warning("worker %d exited with %s before its replacement was ready", pid, what)
        else:
            ran = now - worker.started
            delay = restart_delay(worker.delay, ran)
            self._due.append((now + delay, delay))
            log.warning(
                "worker %d exited with %s after %.1fs; starting another in %ss",
                pid,
                what,
                ran,
                f"{delay:g}",
            )

    def _abandon_reload(self) -> None:
        """The new generation cannot start: the old one becomes current again."""
        self._reloading = False
        self._due.clear()
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if not worker.old and not worker.ready and not worker.retiring:
                # The failed generation's other starts run the same broken code: had
                # they stayed current, the count would have retired an old, serving
                # worker in their place and restarted them for ever, with back-off.
                self._retire(worker, now)
        for worker in self._workers.values():
            if worker.old and not worker.retiring:
                worker.old = False
        if self._local is not None and not self._local.retired:
            self._count = max(0, self._count - 1)  # the in-process server serves alone
            if self._upgrade:
                # Its exec waits for the in-process server to drain, for which no
                # worker is coming: the upgrade is abandoned with the reload.
                self._upgrade = False
                log.error("the upgrade is abandoned too: serving on the old code")
        self._note = "the last reload failed; "
        self._tell_ready("reload failed; serving on the old code")
        self._reload_again()

    def _local_alone(self) -> bool:
        """True while the in-process server serves and no worker is asked for."""
        return self._local is not None and not self._local.retired and self._count == 0

    def _reload_again(self) -> None:
        """Start the reload asked for while the last one was under way, if one was."""
        if self._again and not self._stopping:
            self._again = False
            self._reload("reloading again: asked while the last reload was under way")

    def _dead_socket(self) -> str | None:
        """The address of a shared socket that no longer listens, if there is one.

        ``shutdown()`` on a listening socket stops it listening in *every* process
        that shares it, and a worker's stop may call it. Listening again is no cure:
        with port 0 the kernel picks another port, and a socket shut down twice
        passes its shut read side on to every connection it accepts afterwards. So
        the supervisor stops (exit 1), for the service manager to start it afresh.
        """
        for sock in self._sockets.every():
            if sock.fileno() != -1 and not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                return format_address(sock.getsockname())
        return None

    # -- starting ----------------------------------------------------------------------------

    def _start_due(self, now: float) -> None:
        """Start the first worker that is due, if START_INTERVAL has passed since the last.

        One at a time: the loop reads the signal pipe before the next.
        """
        if now < self._next_start or not self._due:
            return
        first = min(range(len(self._due)), key=lambda i: self._due[i][0])
        when, delay = self._due[first]
        if when <= now:
            del self._due[first]
            self._next_start = now + START_INTERVAL
            self._spawn(delay, now)

    def _spawn(self, delay: float | None, now: float) -> None:
        # The worker holds one end; only we hold the other (socketpair() gives
        # non-inheritable descriptors, and pass_fds names just this worker's).
        taken = {w.slot for w in self._current()}
        slot = next(k for k in range(len(taken) + 1) if k not in taken)
        sockets = self._sockets.of(slot)
        # Out of descriptors (EMFILE, ENFILE) as for the fork: a start to try again,
        # where the OSError escaped the loop and the supervisor ended, killing every
        # worker, its service gone.
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            self._cannot_start(exc, delay, now)
            return
        try:
            dump, dump_end = _dump_pipe()
        except OSError as exc:
            ours.close()
            theirs.close()
            self._cannot_start(exc, delay, now)
            return
        ours.setblocking(False)
        env = child_environment(os.environ)
        env[DUMP_FD_ENV] = str(dump_end)
        env.pop(LINE_LOCK_ENV, None)
        if self._line_lock is not None:
            env[LINE_LOCK_ENV] = str(self._line_lock)
        balance, cell = self._turns, None
        if balance is not None:
            cell = balance.claim({w.cell for w in self._workers.values() if w.cell is not None})
            if cell is not None:
                env[BALANCE_ENV] = balance.environment(cell, self._sockets.shared(sockets))
        # A process group of its own (a Ctrl-C on the terminal reaches the supervisor
        # alone, which forwards one SIGTERM: a second signal would make a worker quit
        # at once rather than drain), in the supervisor's session, not one of its own.
        # The kernel makes each session a CPU autogroup
        # (/proc/sys/kernel/sched_autogroup_enabled): workers in sessions of their own
        # sharing a core preempted each other mid-request, and each preempted thread
        # held its worker's GIL for the rest to queue on; two threads workers on one
        # core served 0.5-0.65 of one worker's requests (docs/performance.md, "workers
        # in the supervisor's session"). A worker leaves the session's terminal at its
        # first line (_jobcontrol.leave_terminal), so job control reaches neither it nor
        # its handler's children.
        # Blocked while the worker starts, and so in it through exec until its first
        # line of Python takes them (WORKER_START_BLOCKED): the job-control stops, so
        # that what the interpreter writes before that (a warning, -X importtime) is
        # not stopped by `stty tostop`, and the signals that would end or dump it
        # before its handlers are in (a quick stop's QUIT, an operator's HUP).
        # Signals for the supervisor go to its other threads meanwhile.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_START_BLOCKED)
        try:
            with handing_over():  # its listening sockets are passed, not let go
                proc = subprocess.Popen(
                    self._command(theirs.fileno(), sockets),
                    pass_fds=(
                        *(s.fileno() for s in sockets),
                        theirs.fileno(),
                        dump_end,
                        *(() if self._line_lock is None else (self._line_lock,)),
                        *(() if cell is None or balance is None else (balance.fd,)),
                    ),
                    stdin=subprocess.DEVNULL,
                    env=env,
                    **OWN_PROCESS_GROUP,
                )
        except OSError as exc:
            ours.close()
            os.close(dump)
            self._cannot_start(exc, delay, now)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            theirs.close()
            os.close(dump_end)
        # We reap it ourselves (_reap); Popen must not wait for it in __del__.
        proc.returncode = 0
        self._workers[proc.pid] = _Worker(
            proc.pid, ours, now, delay, slot=slot, cell=cell, dump=dump
        )
        log.info("worker %d started", proc.pid)

    def _cannot_start(self, exc: OSError, delay: float | None, now: float) -> None:
        """A worker could not be started: try again after the back-off, say so once each."""
        retry = restart_delay(delay, 0.0)
        self._due.append((now + retry, retry))
        log.error("cannot start a worker: %s; trying again in %ss", exc, f"{retry:g}")

    def _wait_time(self, now: float) -> float:
        times = [max(when, self._next_start) for when, _ in self._due]
        times += [w.kill_at for w in self._workers.values() if w.kill_at is not None]
        times += [w.quit_at for w in self._workers.values() if w.quit_at is not None]
        times += [w.dump_at + DUMP_QUIET for w in self._workers.values() if w.dumped]
        if self._timeout is not None and any(w.ready for w in self._workers.values()):
            times.append(now + self._timeout / HEARTBEAT_SHARE)
        if self._next_alive is not None:
            times.append(self._next_alive)
        if self._reloading and self._again:
            starting = self._starting()
            if starting:
                times.append(min(w.started for w in starting) + RELOAD_PATIENCE)
        return max(0.0, min([now + _IDLE_WAKE, *times]) - now)

    def _alive(self, now: float) -> None:
        """WATCHDOG=1 to systemd, from this loop (it runs, so the supervisor is healthy)."""
        interval = self._notifier.watchdog
        if interval is None or self._next_alive is None or now < self._next_alive:
            return
        self._notifier.alive()
        self._next_alive = now + interval

    # -- re-executing (USR2) -------------------------------------------------------------------

    def _state(self) -> str:
        """What the re-executed supervisor needs to adopt the workers (ADOPT_ENV's value)."""
        # Every worker, retiring ones too: the new image watches them to their end
        # (their kill deadline, their exit) and closes their links.
        workers = [
            [
                w.pid,
                w.link.fileno(),
                w.started,
                w.ready,
                w.slot,
                w.retiring or w.eof,
                w.kill_at,
                w.quit_at,
                w.dump,
                w.stats,
                w.stopping,
            ]
            for w in self._workers.values()
        ]
        for w in self._workers.values():
            os.set_inheritable(w.link.fileno(), True)
            if w.dump is not None:
                os.set_inheritable(w.dump, True)
        # The listening sockets: the new image runs the operator's own command line,
        # whose binds these are.
        base = [sock.fileno() for sock in self._sockets.base()]
        for fd in base:
            os.set_inheritable(fd, True)
        slots = self._sockets.state()
        state: dict[str, Any] = {
            "count": self._count,
            "workers": workers,
            "slots": slots,
            "base": base,
            "ended": self._ended_stats,
        }
        if self._line_lock is not None:  # one log lock for the workers of both images
            os.set_inheritable(self._line_lock, True)
            state["log_lock"] = self._line_lock
        if self.control_fd >= 0:  # weft ctl waits in its backlog across the exec
            os.set_inheritable(self.control_fd, True)
            state["control"] = self.control_fd
        return json.dumps(state)

    def _abandon(self) -> None:
        """On an unexpected error: kill and reap whatever workers are left."""
        for pid, worker in list(self._workers.items()):
            _send(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            worker.link.close()
            if worker.dump is not None:
                os.close(worker.dump)
        self._workers.clear()


def _send(pid: int, sig: int) -> None:
    # os.kill, not Popen.send_signal: that polls first, and could reap the worker
    # behind _reap's back. An unreaped worker keeps its pid, so this cannot hit
    # another process.
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
