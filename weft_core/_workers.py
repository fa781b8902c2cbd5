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

The supervisor replaces a worker that exits, after a back-off that grows while
workers keep dying young (see the ``RESTART_*`` constants). SIGTERM or SIGINT stops
it: it closes its own copies of the sockets, sends SIGTERM to every worker (each
stops gracefully within ``graceful_timeout``), waits, and exits 0; a worker still
running ``graceful_timeout + EXIT_MARGIN`` later is killed and the exit status is 1.
A second signal kills the workers at once. A worker exiting with status 2 before
it was ready (a mistake in the command, the config or the handler, which no restart
can fix) stops everything, and the supervisor exits 2; after it was ready, status 2
is a crash like any other and the worker is replaced.

The supervisor acts on every signal within half a second whatever it is doing: it
starts workers one at a time, at most ``1 / START_INTERVAL`` a second, reading its
signal pipe between starts. It refuses ``workers`` beyond what the process limit and
the free memory can hold (:func:`check_capacity`), before anything starts. Under
``--workers`` the shutdown port is the supervisor's (workers never open it), and an
approved request stops the whole service as SIGTERM does.

Each worker holds one end of a socket pair whose other end only the supervisor has:
when the supervisor dies, even by SIGKILL, the worker reads end-of-file and stops
gracefully instead of serving on as an orphan. Once listening, the worker writes a
byte into it, which tells the supervisor, when the worker exits, that it was ready.

What does not live here: serving (each worker is a plain ``weft serve``), config
(``_config``), opening sockets (``_listeners``), socket activation (``_activation``).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._config import Config, parse_option_value
from ._connection import format_address
from ._endpoints import listen_endpoints
from ._errors import ConfigError
from ._exits import EXIT_RUNTIME, EXIT_USAGE
from ._flags import render_flag
from ._listeners import close_listener, open_listeners
from ._server import DEFAULT_BACKLOG, DEFAULT_MANAGER
from ._settings import SETTINGS
from ._shutdown_port import ShutdownPort, check_allow_no_secret
from ._wakeup import Wakeup

__all__ = [
    "EXIT_MARGIN",
    "RESTART_DELAY_MAX",
    "RESTART_DELAY_MIN",
    "RESTART_RESET_AFTER",
    "START_INTERVAL",
    "SUPERVISOR_ONLY_KEYS",
    "WORKER_MEMORY",
    "WORKER_TASKS",
    "Supervisor",
    "become_worker",
    "check_capacity",
    "restart_delay",
    "supervise",
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
#: The longest the supervisor sleeps without a signal. SIGCHLD and SIGTERM wake it at
#: once through the wakeup pipe; this is only a backstop, so it costs nothing.
_IDLE_WAKE = 5.0
#: The shortest pause between two worker starts. Between starts the supervisor reads
#: its signal pipe, so a SIGINT during the start of many workers is acted on at once
#: (issue 14: with every start in one go, 668 workers started after a SIGINT); and
#: 50 interpreters a second is already more than two cores boot.
START_INTERVAL = 0.02
#: What one idle worker holds, measured (``threads`` manager, Python 3.11, 64-bit
#: Linux): about 23 MiB of private memory (36 MB RSS) and 4 threads, which count
#: against RLIMIT_NPROC. A handler's own memory and threads come on top.
WORKER_MEMORY = 24 * 2**20
WORKER_TASKS = 4
#: What a worker writes to the supervisor once it listens.
_READY = b"R"

#: The message weft serve logs once listening. In a worker it would repeat the
#: supervisor's line (which tools and tests wait for) N times, so a worker logs it
#: as ``worker ready on ...`` instead: the sign that this worker serves.
LISTENING_MESSAGE = "listening on %s (manager %s)"
WORKER_READY_MESSAGE = "worker ready on %s (manager %s)"

# Config keys given on weft serve's command line that a worker gets in another form.
_NOT_PASSED = frozenset({"handler", "bind", "workers", "manager_options"})
#: Settings the supervisor acts on and its workers ignore (they read the same config).
SUPERVISOR_ONLY_KEYS = frozenset({"shutdown_port", "shutdown_secret", "shutdown_allow_no_secret"})


# -- the supervisor's side -----------------------------------------------------------


def supervise(
    config: Config,
    flags: Mapping[str, Any],
    config_file: str | None,
    on_listening: Callable[[], object] | None = None,
) -> int:
    """Serve with ``config.workers`` supervised workers; return the exit status.

    ``flags`` are the config keys weft serve's command line set (as given there, None
    for unset) and ``config_file`` its ``--config``: the workers get them again.
    ``on_listening()`` is called once the sockets listen (weft serve writes its pid file).

    Error handling: raises BindError (naming the address) if a socket cannot be
    bound, and ConfigError off POSIX or outside the main thread, before any worker
    starts. Resource handling: the sockets are closed (and a Unix socket file
    removed) when the supervisor starts stopping, so new clients are refused at once.
    """
    if os.name != "posix":
        raise ConfigError("worker processes need a POSIX system", key="workers")
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("worker processes are supervised from the main thread", key="workers")
    shutdown_port = config.values.get("shutdown_port")
    secret = config.values.get("shutdown_secret")
    allow = check_allow_no_secret(
        shutdown_port, secret, None, config.values.get("shutdown_allow_no_secret", False)
    )
    check_capacity(config.workers)
    listeners = open_listeners(
        listen_endpoints(
            config.values.get("bind"),
            config.values.get("address", SETTINGS["address"].default),
            config.values.get("port", SETTINGS["port"].default),
        ),
        family=config.get("family", "auto"),
        backlog=config.get("backlog", DEFAULT_BACKLOG),
        reuse_port=config.get("reuse_port", False),
        unix_mode=config.get("unix_mode"),
    )

    def close_listeners() -> None:
        while listeners:
            close_listener(listeners.pop())

    shutdown: ShutdownPort | None = None
    try:
        manager = config.get("manager") or DEFAULT_MANAGER
        sockets = [listener.sock for listener in listeners]
        args = [*worker_args(flags, config_file), *(f"--bind=fd:{s.fileno()}" for s in sockets)]

        def command(link: int) -> list[str]:
            return [sys.executable, "-m", "weft_core", "serve", *args, f"--supervisor-fd={link}"]

        supervisor = Supervisor(
            command,
            sockets,
            config.workers,
            config.graceful_timeout,
            on_stop=close_listeners,
        )
        if shutdown_port is not None:
            shutdown = ShutdownPort(supervisor, shutdown_port, secret, allow_no_secret=allow)
            shutdown.open()  # a BindError here: before anything listens or starts
        for listener in listeners:
            serve_log.info(LISTENING_MESSAGE, listener.address, manager)
        if on_listening is not None:
            on_listening()
        if shutdown is not None:
            shutdown.start()
        return supervisor.run()
    finally:
        if shutdown is not None:
            shutdown.close()
        close_listeners()


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


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    link: socket.socket  # our end of the worker's socket pair; closing it tells the worker to stop
    started: float
    delay: float | None  # the back-off that preceded this worker


class Supervisor:
    """Start ``count`` workers, replace those that exit, stop them all on a signal.

    ``command(link_fd)`` gives a worker's argv; each worker inherits ``sockets``;
    ``on_stop`` runs as stopping starts. :meth:`run` returns the exit status;
    :meth:`stop` (from any thread) stops gracefully, as SIGTERM does.
    """

    def __init__(
        self,
        command: Callable[[int], list[str]],
        sockets: Sequence[socket.socket],
        count: int,
        graceful_timeout: float,
        *,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._command = command
        self._sockets = tuple(sockets)
        self._count = count
        self._graceful_timeout = graceful_timeout
        self._on_stop = on_stop
        self._workers: dict[int, _Worker] = {}  # by pid
        self._due: dict[int, tuple[float, float | None]] = {}  # slot: (when, its back-off)
        self._stopping = False
        self._deadline: float | None = None
        self._status = 0
        self._next_start = 0.0
        self._stop_asked = threading.Event()
        self._wakeup: Wakeup | None = None

    def stop(self) -> None:
        """Stop gracefully, as on SIGTERM (the shutdown port's request); any thread."""
        self._stop_asked.set()
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    def run(self) -> int:
        """Supervise until stopped and every worker has exited; return the exit status."""
        with Wakeup((signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)) as wakeup:
            self._wakeup = wakeup
            try:
                now = time.monotonic()
                self._due = dict.fromkeys(range(self._count), (now, None))
                received: list[int] = []
                while True:
                    now = time.monotonic()
                    self._handle_signals(received, now)
                    if self._stop_asked.is_set() and not self._stopping:
                        log.info(
                            "stop requested on the shutdown port: stopping %d worker(s)"
                            " (graceful timeout %ss)",
                            len(self._workers),
                            f"{self._graceful_timeout:g}",
                        )
                        self._begin_stop(now)
                    self._reap(now)
                    if self._stopping and not self._workers:
                        break
                    if self._stopping:
                        self._kill_stragglers(now)
                    else:
                        self._start_due(now)
                    received = wakeup.wait(self._timeout(now))
                log.info("all workers stopped")
                return self._status
            finally:
                self._wakeup = None
                self._abandon()

    def _handle_signals(self, received: list[int], now: float) -> None:
        for signum in received:
            if signum == signal.SIGCHLD:
                continue  # it only wakes the loop, which then reaps
            name = signal.Signals(signum).name
            if not self._stopping:
                log.info(
                    "received %s: stopping %d worker(s) (graceful timeout %ss;"
                    " send it again to quit at once)",
                    name,
                    len(self._workers),
                    f"{self._graceful_timeout:g}",
                )
                self._begin_stop(now)
            elif self._workers:
                log.warning("received %s again: killing the workers", name)
                self._kill_all()

    def _begin_stop(self, now: float) -> None:
        self._stopping = True
        self._due.clear()
        if self._on_stop is not None:
            self._on_stop()
        self._deadline = now + self._graceful_timeout + EXIT_MARGIN
        for pid in self._workers:
            _send(pid, signal.SIGTERM)

    def _kill_stragglers(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        self._deadline = None
        for pid in self._workers:
            log.error(
                "worker %d still running %ss after SIGTERM: killing it",
                pid,
                f"{self._graceful_timeout + EXIT_MARGIN:g}",
            )
        self._kill_all()

    def _kill_all(self) -> None:
        self._deadline = None
        self._status = self._status or EXIT_RUNTIME
        for pid in self._workers:
            _send(pid, signal.SIGKILL)

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
            worker.proc.returncode = code  # reaped here, so Popen must not wait for it
            ready = _was_ready(worker.link)
            worker.link.close()
            self._exited(pid, worker, code, ready, now)

    def _exited(self, pid: int, worker: _Worker, code: int, ready: bool, now: float) -> None:
        what = describe_exit(code)
        if self._stopping:
            log.info("worker %d exited with %s", pid, what)
        elif code == EXIT_USAGE and not ready:
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
        else:
            ran = now - worker.started
            delay = restart_delay(worker.delay, ran)
            self._due[worker.slot] = (now + delay, delay)
            log.warning(
                "worker %d exited with %s after %.1fs; starting another in %ss",
                pid,
                what,
                ran,
                f"{delay:g}",
            )

    def _dead_socket(self) -> str | None:
        """The address of a shared socket that no longer listens, if there is one.

        ``shutdown()`` on a listening socket stops it listening in *every* process
        that shares it, and a worker's stop may call it. Listening again is no cure:
        with port 0 the kernel picks another port, and a socket shut down twice
        passes its shut read side on to every connection it accepts afterwards. So
        the supervisor stops (exit 1), for the service manager to start it afresh.
        """
        for sock in self._sockets:
            if sock.fileno() != -1 and not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                return format_address(sock.getsockname())
        return None

    def _start_due(self, now: float) -> None:
        """Start the first worker that is due, if START_INTERVAL has passed since the last.

        One at a time: the loop reads the signal pipe before the next.
        """
        if now < self._next_start or not self._due:
            return
        slot, (when, delay) = min(self._due.items(), key=lambda item: item[1][0])
        if when <= now:
            del self._due[slot]
            self._next_start = now + START_INTERVAL
            self._spawn(slot, delay, now)

    def _spawn(self, slot: int, delay: float | None, now: float) -> None:
        # The worker holds one end; only we hold the other (socketpair() gives
        # non-inheritable descriptors, and pass_fds names just this worker's).
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            proc = subprocess.Popen(
                self._command(theirs.fileno()),
                pass_fds=(*(s.fileno() for s in self._sockets), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C on the terminal reaches the supervisor
                # alone, which forwards one SIGTERM. Two signals would make a worker
                # quit at once rather than drain.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            retry = restart_delay(delay, 0.0)
            self._due[slot] = (now + retry, retry)
            log.error("cannot start a worker: %s; trying again in %ss", exc, f"{retry:g}")
            return
        finally:
            theirs.close()
        self._workers[proc.pid] = _Worker(slot, proc, ours, now, delay)
        log.info("worker %d started", proc.pid)

    def _timeout(self, now: float) -> float:
        times = [max(when, self._next_start) for when, _ in self._due.values()]
        if self._deadline is not None:
            times.append(self._deadline)
        return max(0.0, min([now + _IDLE_WAKE, *times]) - now)

    def _abandon(self) -> None:
        """On an unexpected error: kill and reap whatever workers are left."""
        for pid, worker in list(self._workers.items()):
            _send(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            worker.proc.returncode = -signal.SIGKILL
            worker.link.close()
        self._workers.clear()


def _was_ready(link: socket.socket) -> bool:
    """Whether the worker wrote its ready byte before it exited (the byte outlives it)."""
    try:
        return link.recv(1) == _READY
    except OSError:  # nothing written: BlockingIOError
        return False


def _send(pid: int, sig: int) -> None:
    # os.kill, not Popen.send_signal: that polls first, and could reap the worker
    # behind _reap's back. An unreaped worker keeps its pid, so this cannot hit
    # another process.
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the worker's side --------------------------------------------------------------


def become_worker(supervisor_fd: int) -> Callable[[], None]:
    """Make this ``weft serve`` a worker of the supervisor that started it.

    Stops gracefully (as on SIGTERM) when ``supervisor_fd``, a socket whose other end
    only the supervisor holds, reaches end-of-file: the supervisor is gone. Logs
    ``worker ready on ...`` where weft serve logs ``listening on ...``. Returns
    ``ready()``, to call once listening: the supervisor then knows that an exit
    status 2 is no mistake in the command, config or handler.

    Raises ConfigError if ``supervisor_fd`` is not open (it is set by the supervisor,
    not by hand).
    """
    try:
        flags = fcntl.fcntl(supervisor_fd, fcntl.F_GETFD)
        fcntl.fcntl(supervisor_fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"--supervisor-fd {supervisor_fd}: {exc.strerror}; this flag is set by"
            " `weft serve --workers N` for its workers, not by hand",
            source="command line",
        ) from None
    serve_log.addFilter(_worker_ready)
    threading.Thread(
        target=_watch_supervisor,
        args=(supervisor_fd,),
        name="weft worker: supervisor watch",
        daemon=True,
    ).start()

    def ready() -> None:
        try:
            os.write(supervisor_fd, _READY)
        except OSError:  # the supervisor is gone; the watch thread stops us
            pass

    return ready


def _worker_ready(record: logging.LogRecord) -> bool:
    if record.msg == LISTENING_MESSAGE:
        record.msg = WORKER_READY_MESSAGE
    return True


def _watch_supervisor(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except OSError:
        pass
    log.warning("the supervisor is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
