"""Starting a supervisor (``_workers.Supervisor``) three ways.

- :func:`supervise`: ``weft serve --workers N`` (or ``timeout``/``max_requests``,
  which need one even for one worker) binds its sockets and supervises.
- :func:`hand_over`: a single ``weft serve`` receiving HUP, USR2 or TTIN hands
  copies of its listening sockets to a worker and becomes its supervisor, in the
  same process, while its own server drains.
- A supervisor re-executed on USR2 (:func:`_reexec`) finds its workers in
  ``ADOPT_ENV`` (:func:`take_adopted`) and adopts them.

What does not live here: supervising (``_workers``), a worker's side
(``_worker_link``), the meanings of the signals (``_signals``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

from ._config import Config
from ._ctl import ControlSocket, inherit_listening
from ._ctl_commands import (
    InProcess,
    open_control,
    relay_console,
    supervisor_commands,
    worker_socket_path,
)
from ._endpoints import listen_endpoints
from ._errors import ConfigError
from ._listeners import Listener, close_listener, open_listeners
from ._logging import share_line_lock
from ._logsafe import escape_for_log
from ._sdnotify import NOTIFY_ENV, Notifier, taken_environment
from ._server import DEFAULT_BACKLOG, DEFAULT_MANAGER
from ._settings import SETTINGS
from ._shutdown_port import ShutdownPort, check_allow_no_secret
from ._signals import CONTROL_SIGNALS, NO_CONFIG_FLAG, STOP_SIGNALS, WORKER_FLAG
from ._wakeup import Wakeup, carry_signals_across_exec, raise_carried_signals
from ._worker_link import LISTENING_MESSAGE, drain
from ._worker_sockets import WorkerSockets
from ._workers import Adopted, Local, Supervisor, check_capacity, worker_args

__all__ = ["ADOPT_ENV", "hand_over", "supervise", "take_adopted"]

log = logging.getLogger("weft.workers")
# The "listening on" line is weft serve's own (logger "weft"), whatever the process.
serve_log = logging.getLogger("weft")


def supervise(
    config: Config,
    flags: Mapping[str, Any],
    on_listening: Callable[[], object] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Serve with ``config.workers`` supervised workers; return the exit status.

    ``flags`` are the config keys weft serve's command line set (as given there, None
    for unset): the workers get them again, with the config file read, if any. A
    supervisor re-executed on USR2 finds its workers in ADOPT_ENV and adopts them.
    ``on_listening()`` is called once the sockets listen and the supervisor's signal
    handlers are in (weft serve writes its pid file, and logs the signals it held).
    ``argv``, weft's own command line (``serve ...``), is what a USR2 re-executes.

    Error handling: raises BindError (naming the address) if a socket cannot be
    bound, and ConfigError off POSIX or outside the main thread, before any worker
    starts. Resource handling: the sockets are closed (and a Unix socket file
    removed) when the supervisor starts stopping, so new clients are refused at once.
    """
    if os.name != "posix":
        raise ConfigError("worker processes need a POSIX system", key="workers")
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("worker processes are supervised from the main thread", key="workers")
    # From before anything listens until the supervisor's own handlers are in, a
    # stop signal is caught here and handed to them (a Wakeup entered inside another
    # takes what it caught): a TERM just after "listening on" (a service manager
    # stopping a unit as it starts) was a death by SIGTERM by default, which systemd
    # counts as clean. Not a blocked mask: threads started earlier in the process
    # would take the signal, and its default action, in the main thread's place.
    # The control signals are the start's hold's (``_signals.hold_while_starting``).
    with Wakeup(STOP_SIGNALS):
        return _supervise(config, flags, on_listening, argv)


def _supervise(
    config: Config,
    flags: Mapping[str, Any],
    on_listening: Callable[[], object] | None,
    argv: Sequence[str] | None,
) -> int:
    """:func:`supervise`'s body, a stop signal caught from its start."""
    inherited = take_adopted(os.environ)
    carried = raise_carried_signals(os.environ)
    # A child's end (SIGCHLD) is raised again too, for the reaping, but not an
    # operator's signal: every USR2 carried one (the drained in-process server's
    # worker), and the line named a signal weft answers with no action of its own.
    told = [signal.Signals(s).name for s in carried if s != signal.SIGCHLD]
    if told:
        log.info("re-executed: %s, caught during the exec, acted on now", ", ".join(told))
    count, adopted, slots, base, ended = (
        inherited if inherited is not None else Inherited(config.workers, [], [], [], {})
    )
    shutdown_port = config.values.get("shutdown_port")
    secret = config.values.get("shutdown_secret")
    allow = check_allow_no_secret(
        shutdown_port, secret, None, config.values.get("shutdown_allow_no_secret", False)
    )
    if inherited is None:
        check_capacity(count)
    listeners = open_listeners(
        listen_endpoints(
            # Re-executed on USR2: the sockets it inherited, whatever its command says.
            [f"fd:{fd}" for fd in base] or config.values.get("bind"),
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
    control: ControlSocket | None = None
    try:
        manager = config.get("manager") or DEFAULT_MANAGER
        notifier = Notifier()
        supervisor = _supervisor(
            config,
            flags,
            listeners,
            count=count,
            on_stop=close_listeners,
            adopted=adopted,
            slots=slots,
            notifier=notifier,
            argv=argv,
            ended_stats=ended,
        )
        control = open_control(config, {})  # a BindError: before any worker starts
        if control is not None:
            steer(control, supervisor, config)
            control.start()
        if shutdown_port is not None:
            shutdown = ShutdownPort(supervisor, shutdown_port, secret, allow_no_secret=allow)
            shutdown.open()  # a BindError here: before anything listens or starts
        if inherited is None:
            for listener in listeners:
                serve_log.info(LISTENING_MESSAGE, listener.address, manager)
        else:
            log.info(
                "re-executed (pid %d): adopted %d worker(s), replacing them with %d new",
                os.getpid(),
                len(adopted),
                count,
            )
        if shutdown is not None:
            shutdown.start()
        # Once the supervisor's own handlers are in: a HUP sent on seeing the pid
        # file was held by the start's hold, unacted and unsaid, in between.
        return supervisor.run(started=on_listening)
    finally:
        if control is not None:
            control.close()
        if shutdown is not None:
            shutdown.close()
        close_listeners()


def steer(
    control: ControlSocket,
    supervisor: Supervisor,
    config: Config,
    here: InProcess | None = None,
) -> None:
    """Make ``control`` answer for ``supervisor``: its commands, the console in a worker.

    ``here``: the process's own server, when one ``weft serve`` became the supervisor.
    """
    control.commands = supervisor_commands(supervisor, control.path, here)
    supervisor.control_fd = control.fileno()  # kept open across a USR2 re-exec
    if config.console:
        control.console = relay_console(supervisor, control.path)


class _LocalServer:
    """The in-process Server of a single ``weft serve`` that handed its sockets over."""

    def __init__(self, server: Any, graceful_timeout: float) -> None:
        self._server = server
        self._graceful_timeout = graceful_timeout
        self._drained = threading.Event()
        self.retired = False

    def retire(self, wake: Callable[[], None]) -> None:
        self.retired = True

        def run() -> None:
            try:
                drain(self._server, self._graceful_timeout)
                log.info("the in-process server has drained")
            finally:
                self._drained.set()
                wake()

        threading.Thread(target=run, name="weft serve: drain", daemon=True).start()

    def stop(self, quick: bool) -> None:
        # Its drain, if under way, ends with it: the drain waits for the server to stop.
        timeout = 0.0 if quick else self._graceful_timeout
        threading.Thread(
            target=self._server.stop, args=(timeout,), name="weft serve: stop", daemon=True
        ).start()

    def done(self) -> bool:
        return self.retired and self._drained.is_set()


def hand_over(
    server: Any,
    config: Config,
    flags: Mapping[str, Any],
    signum: int,
    notifier: Notifier,
    control: ControlSocket | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Make a single ``weft serve`` the supervisor of its own workers; return the exit status.

    ``control``, the process's control socket, answers for the supervisor from then on.

    On HUP (or TTIN: two workers) the listening sockets are duplicated for a worker
    that imports the handler afresh; once it is ready, the in-process ``server``
    drains (:func:`~weft_core._worker_link.drain`) while the worker serves, and this process
    stays on as its supervisor, so its PID never changes. On USR2 the same, then,
    once drained, it re-executes itself (:func:`_reexec`).
    """
    listeners: list[Listener] = []
    # The engine's ListenerTasks: Server has no public way to lend its sockets out,
    # nor to keep a Unix socket file when its listener closes.
    for task in server._engine.listeners:
        # The runtime owns the socket now (the stdlib object may be detached): copy
        # the descriptor of its own.
        copy = socket.socket(fileno=os.dup(task.native.fileno()))
        mine = task.listener
        listeners.append(Listener(copy, mine.unix_path, mine.unix_file, shared=mine.shared))
        mine.unix_path = None  # the supervisor's copy removes the socket file, at its stop

    def close_listeners() -> None:
        while listeners:
            close_listener(listeners.pop())

    try:
        name = signal.Signals(signum).name
        log.info(
            "received %s: becoming the supervisor of %s; the in-process server drains"
            " once it is ready",
            name,
            "two workers" if signum == signal.SIGTTIN else "a worker",
        )
        notifier.reloading(f"{name}: starting a worker")
        local = _LocalServer(server, config.graceful_timeout)
        supervisor = _supervisor(
            config,
            flags,
            listeners,
            count=2 if signum == signal.SIGTTIN else 1,
            on_stop=close_listeners,
            local=local,
            upgrade=signum == signal.SIGUSR2,
            notifier=notifier,
            argv=argv,
        )
        if control is not None:
            # Its connections stay in weft ctl's answers while they drain.
            here = InProcess(control.commands, lambda: not local.done(), lambda: local.retired)
            steer(control, supervisor, config, here)
        return supervisor.run()
    finally:
        close_listeners()


def _supervisor(
    config: Config,
    flags: Mapping[str, Any],
    listeners: Sequence[Listener],
    *,
    count: int,
    on_stop: Callable[[], None],
    notifier: Notifier,
    local: Local | None = None,
    upgrade: bool = False,
    adopted: Sequence[Adopted] = (),
    slots: Sequence[Sequence[int]] = (),
    argv: Sequence[str] | None = None,
    ended_stats: Mapping[str, Any] | None = None,
) -> Supervisor:
    sockets = WorkerSockets(
        [listener.sock for listener in listeners],
        spread=config.get("reuse_port", False),
        backlog=config.get("backlog", DEFAULT_BACKLOG),
        # A re-executed supervisor's own sockets come back as fd:N, and are its own.
        foreign=[listener.shared and not adopted for listener in listeners],
        adopted=slots,
    )
    # The file this supervisor read settings from, found or named, or none: never one
    # a worker finds in the working directory by itself (another user may have put
    # one there since). A file that gave none (a pyproject.toml without [tool.weft])
    # counts as none: named, it would be an error.
    file = config.file
    read = file is not None and any(str(file) in origin for origin in config.origins.values())
    args = worker_args(flags, str(file) if read else None)
    if not read:
        args.append(NO_CONFIG_FLAG)
    timeout = config.get("timeout")
    if timeout is None and notifier.watchdog is not None:
        # systemd's watchdog sees only this process's loop from now on: the workers'
        # are watched by the supervisor, at WatchdogSec. One process whose loop
        # systemd watched kept no protection once a HUP made it a supervisor.
        timeout = 2 * notifier.watchdog
        args.append(f"--timeout={timeout:g}")
        log.info(
            "WatchdogSec is set and --timeout is not: the workers' loops are watched"
            " with timeout=%ss",
            f"{timeout:g}",
        )
    base = [f"--bind=fd:{s.fileno()}" for s in sockets.base()]
    control_path = config.control_socket

    def forget_socket(pid: int) -> None:
        # A worker that switched user cannot remove its socket file; the supervisor can.
        assert control_path is not None
        with contextlib.suppress(OSError):
            os.unlink(worker_socket_path(control_path, pid))

    def command(link: int, inherited: Sequence[socket.socket]) -> list[str]:
        binds = (f"--bind=fd:{s.fileno()}" for s in inherited)
        return [*_SELF, *args, *binds, f"{WORKER_FLAG}={link}"]

    return Supervisor(
        command,
        sockets,
        count,
        config.graceful_timeout,
        on_stop=on_stop,
        timeout=timeout,
        local=local,
        adopted=adopted,
        # The operator's own command line when known, so that ps and pgrep -f see the
        # same process after an upgrade; else the workers' with the sockets' fd:N.
        reexec=lambda state: _reexec(
            _own_command(argv) if argv else [*_SELF, *args, *base], state
        ),
        upgrade=upgrade,
        notifier=notifier,
        on_worker_exit=None if control_path is None else forget_socket,
        ended_stats=ended_stats,
    )


#: How weft starts itself (a worker; a supervisor re-executed whose command line is
#: not known; a --reload child): ``python -m weft_core``, but without the current
#: directory first on ``sys.path``, where ``-m`` puts it. Under --user a worker starts
#: as root, and a module the service user left in the working directory (a
#: ``weft_core/``, a ``json.py``) ran as root before the switch. The handler's own
#: directory is put on the path by ``import_handler``, after the switch.
PYTHON_M_WEFT = (
    sys.executable,
    "-c",
    "import sys; sys.path[:1] == [''] and sys.path.pop(0); import runpy;"
    " runpy.run_module('weft_core', run_name='__main__', alter_sys=True)",
)
_SELF = (*PYTHON_M_WEFT, "serve")
#: The environment variable that hands a re-executed supervisor its workers (JSON:
#: the worker count; each worker's pid, link descriptor, start time, readiness,
#: slot, whether it is leaving, its deadlines, its dump pipe and its last stats;
#: each slot's sockets, ``WorkerSockets.state``; the ended workers' stats summed).
#: Not a WEFT_* name: those are settings. Read once and removed.
ADOPT_ENV = "_WEFT_ADOPT"


def _own_command(argv: Sequence[str]) -> list[str]:
    """The command line this process was started with, if it ran weft with ``argv``.

    Exactly as started (the ``weft`` script, or ``python -m weft_core``) when the
    interpreter's own arguments end with ``argv``; else (``main()`` called by a
    program of its own) ``python -m weft_core`` with ``argv``.
    """
    started = list(getattr(sys, "orig_argv", []))
    if len(started) > len(argv) and started[len(started) - len(argv) :] == list(argv):
        return [sys.executable, *started[1:]]
    return [sys.executable, "-m", "weft_core", *argv]


#: How long the check that the new image would start may take (a cold disk, a slow
#: machine); past it the upgrade is refused as if the check had failed.
PRECHECK_TIMEOUT = 30.0

#: Set for a supervisor's check, before it binds, that its command would start:
#: ``weft serve`` runs as ``--check-config`` does, quietly (``_cli._start_check``).
START_CHECK_ENV = "_WEFT_START_CHECK"

#: Set for the check that a USR2's new image would start: ``weft serve`` loads its
#: config and manager, then exits (``_cli._upgrade_check``), binding nothing.
UPGRADE_CHECK_ENV = "_WEFT_UPGRADE_CHECK"


def run_check(argv: list[str], marker: str, timeout: float) -> tuple[int, str] | None:
    """Run ``argv`` as one of weft's checks (``marker`` set in its environment).

    Its status and the last line of its stderr (its one-line error), or None if it
    took more than ``timeout`` (it is killed). Its stdout is dropped and its stderr
    goes to a file, not a pipe: what the application it imports leaves behind (a
    child process holding stderr) cannot keep the check from ending; the check ends
    its own process at once (``_cli``), non-daemon threads and all, and ends with
    its parent.
    """
    with tempfile.TemporaryFile() as errors:
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                # As a worker's: systemd's notification variables are the supervisor's.
                env={
                    **{k: v for k, v in os.environ.items() if k not in NOTIFY_ENV},
                    marker: "1",
                },
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        errors.seek(0)
        lines = errors.read().decode("utf-8", "replace").strip().splitlines()
    return done.returncode, lines[-1] if lines else ""


def _new_image_fails(argv: list[str]) -> str | None:
    """Why the new image, ``argv`` run now, would not start, or None if it would.

    Run before the exec: an image that cannot start (a broken upgrade of weft or of
    what it needs, a config file edited into a mistake, a manager uninstalled) would
    leave no supervisor, and every worker drains and exits for want of one. Checked
    so, the old image serves on. The same command line runs in a fresh interpreter,
    up to its config, logging and manager (:data:`UPGRADE_CHECK_ENV`); the
    application is the new workers' to load, and a reload whose code is broken is
    abandoned, the adopted workers serving on. ``--check-config`` is added: an image
    of a weft older than the check does not know its marker, and would otherwise
    serve (and bind) as the check; it checks its whole config instead, binding
    nothing.
    """
    try:
        result = run_check([*argv, "--check-config"], UPGRADE_CHECK_ENV, PRECHECK_TIMEOUT)
    except OSError as exc:
        return f"{argv[0]}: {exc.strerror or exc}"
    if result is None:
        return f"its check took more than {PRECHECK_TIMEOUT:g}s"
    status, line = result
    if status == 0:
        return None
    return escape_for_log(_said(line) if line else f"exit status {status}")


def _said(line: str) -> str:
    """What a ``weft serve`` line of stderr says: its message without ``weft:``, or JSON's."""
    if line.startswith("weft: "):
        return line[len("weft: ") :]
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        message = record.get("message") if isinstance(record, dict) else None
        if isinstance(message, str):
            return message
    return line


def _reexec(argv: list[str], state: str) -> None:
    """USR2: replace this process's image with a fresh ``weft serve`` of the same PID.

    The listening sockets and the workers' links are inherited (made inheritable in
    ``Supervisor._state``); the new image adopts the workers and replaces them as
    on HUP. Every signal weft answers is blocked across the exec (the mask is
    inherited) and unblocked once the new image has its handlers, so a signal in
    between is acted on rather than killing the process. Returns only if the exec
    failed (logged).
    """
    problem = _new_image_fails(argv)
    if problem is not None:
        log.error(
            "cannot upgrade: the new image would not start (%s); serving on the old code",
            problem,
        )
        return
    # The notification variables this process took for itself: the new image is
    # the same service, the same PID.
    env = {**os.environ, **taken_environment(), ADOPT_ENV: state}
    handled = {*STOP_SIGNALS, *CONTROL_SIGNALS, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    carried, undo = carry_signals_across_exec()
    env.update(carried)
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        undo()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        log.error("cannot re-execute %s: %s; serving on", argv[0], exc)


class Inherited(NamedTuple):
    """What a supervisor re-executed on USR2 inherits from the image before it."""

    worker_count: int
    workers: list[Adopted]
    #: Each slot's socket descriptors (``WorkerSockets.state``).
    slots: list[list[int]]
    #: The listening sockets' descriptors.
    base: list[int]
    #: What the workers that ended before counted (``Supervisor``'s ``ended_stats``).
    ended: dict[str, Any]


def take_adopted(environ: MutableMapping[str, str]) -> Inherited | None:
    """What a re-executed supervisor inherits (ADOPT_ENV), removing it."""
    text = environ.pop(ADOPT_ENV, None)
    if not text:
        return None
    state = json.loads(text)
    workers = []
    for pid, fd, started, ready, *rest in state["workers"]:
        link = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        slot, leaving, kill_at, quit_at, dump, stats, stopping = (
            *rest, 0, False, None, None, None, None, False
        )[:7]  # fmt: skip
        if dump is not None:
            os.set_inheritable(dump, False)
        workers.append(
            Adopted(
                int(pid),
                link,
                float(started),
                bool(ready),
                int(slot),
                bool(leaving),
                None if kill_at is None else float(kill_at),
                None if quit_at is None else float(quit_at),
                None if dump is None else int(dump),
                stats if isinstance(stats, dict) else None,
                bool(stopping),
            )
        )
    slots = [[int(fd) for fd in fds] for fds in state.get("slots", [])]
    if isinstance(state.get("log_lock"), int):
        share_line_lock(state["log_lock"])  # the Supervisor made next shares it on
    if isinstance(state.get("control"), int):
        inherit_listening(state["control"])  # open_control takes it rather than bind
    base = [int(fd) for fd in state.get("base", [])]
    ended = state.get("ended")
    return Inherited(
        int(state["count"]), workers, slots, base, ended if isinstance(ended, dict) else {}
    )
