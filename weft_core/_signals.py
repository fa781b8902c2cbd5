"""What each signal means to ``weft serve`` (DESIGN section 9), and the small actions behind them.

The meanings are gunicorn's, the same with one process and under ``--workers``:

========  ================================================================
TERM/INT  graceful stop within ``graceful_timeout``; a second one: at once
QUIT      quick stop: connections are interrupted at once
HUP       graceful reload: new workers (new code), old ones drain
USR2      upgrade in place: re-exec the supervisor, keeping sockets and PID
USR1      reopen log files (after logrotate moved them)
TTIN      one worker more
TTOU      one worker fewer (never below one)
========  ================================================================

The loops that act on them live in ``_cli`` (one process) and ``_workers`` (the
supervisor); this module holds the signal sets they share, reopening log files,
and the stack dump a stuck worker gives before the watchdog kills it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import MutableMapping

from ._files import open_log_file
from ._jobcontrol import JOB_STOPS, leave_terminal
from ._logsafe import escape_for_log
from ._wakeup import die_by

__all__ = [
    "CONTROL_SIGNALS",
    "DUMP_FD_ENV",
    "DUMP_SIGNAL",
    "STOP_REPEAT_WINDOW",
    "STOP_SIGNALS",
    "WORKER_FLAG",
    "WORKER_IGNORED",
    "WORKER_START_BLOCKED",
    "enable_stack_dump",
    "hold_while_starting",
    "is_worker",
    "release_starting_hold",
    "reopen_log_files",
]

#: Graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: A stop signal this soon after the one that began the stop is the same request sent
#: twice, not a second one (which quits at once): coreutils' ``timeout`` sends TERM to
#: its child and then to its process group, the child included, within a millisecond.
#: A person pressing Ctrl-C twice takes longer.
STOP_REPEAT_WINDOW = 0.1
#: Everything else ``weft serve`` answers (QUIT, HUP, USR1, USR2, TTIN, TTOU).
CONTROL_SIGNALS = (
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
#: What a worker ignores (with a log line): they are the supervisor's to act on, and
#: by default HUP and USR2 would kill the worker, TTIN/TTOU stop it.
WORKER_IGNORED = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
#: The signal on which a worker writes every thread's Python stack to stderr
#: (faulthandler, so even a loop blocked in C code answers). WINCH: used by none of
#: the meanings above, ignored by default (a process that did not register it is
#: unharmed), and never sent by a terminal to a worker: a terminal sends it to its
#: foreground process group, and a worker's process group is its own.
DUMP_SIGNAL = signal.SIGWINCH
#: The option the supervisor starts each worker with (``weft serve --supervisor-fd N``).
WORKER_FLAG = "--supervisor-fd"
#: What a supervisor that read no config file gives its workers (see ``_cli``).
NO_CONFIG_FLAG = "--no-config-file"

log = logging.getLogger("weft")
#: What a process still starting (reading its config, importing the application)
#: holds rather than dies of: by default HUP, USR1 and USR2 kill it and TTIN and TTOU
#: stop it, so a logrotate USR1 or a `systemctl reload` arriving during a slow import
#: would take the service down. TERM and INT keep their defaults: a stop. QUIT, whose
#: default also dumps core, stops it as TERM does (:meth:`_Held.quit`).
STARTING_HELD = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


#: What a worker is started with blocked (its supervisor blocks them across the
#: spawn, and the mask goes through exec): the held signals, QUIT, and the job-control
#: stops. Between exec and :func:`hold_while_starting` (the interpreter's start and
#: weft_core's import, a tenth of a second or more) each would act by its default: a
#: QUIT sent to every worker by a quick stop dumped the core of one still starting,
#: and an operator's ``pkill -HUP`` killed it. Pending instead, each reaches the
#: hold's handlers once they are in. TERM and INT stay deliverable: a stop.
WORKER_START_BLOCKED = frozenset({*STARTING_HELD, signal.SIGQUIT, *JOB_STOPS})


def is_worker(argv: list[str]) -> bool:
    """True if ``argv`` (``sys.argv``) is a worker's: the supervisor gave it WORKER_FLAG."""
    return any(arg == WORKER_FLAG or arg.startswith(WORKER_FLAG + "=") for arg in argv[1:])


def hold_while_starting() -> list[str]:
    """Note the control signals that arrive until the server's own handlers go in.

    Returns the list their names are added to, for the caller to report once it
    listens (a reload or a reopen asked before there was anything to act on).
    Only in the main thread, where signal handlers live. Called again while its
    handlers are still in (``python -m weft_core`` holds them before the rest of
    weft is imported, ``weft serve`` once more as it starts), it returns the same
    list: nothing noted meanwhile is lost. A worker leaves its terminal here, then
    takes the signals blocked since its start (``WORKER_START_BLOCKED``): any that
    came meanwhile is delivered now, to these handlers.
    """
    global _held
    if threading.current_thread() is not threading.main_thread():
        return []
    if _held is not None and signal.getsignal(STARTING_HELD[0]) == _held.note:
        return _held.arrived
    _held = _Held()
    for signum in STARTING_HELD:
        signal.signal(signum, _held.note)
    signal.signal(signal.SIGQUIT, _held.quit)
    if os.getpid() == 1:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, _held.stop)
    if is_worker(sys.argv):
        leave_terminal()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_START_BLOCKED)
    return _held.arrived


def release_starting_hold() -> None:
    """Give the held signals their defaults back, where the hold's handlers are still in.

    For the ``weft`` commands that do not serve (``ctl``, ``managers``,
    ``conformance``): a HUP ends them as it ends any command.
    """
    held = _held
    if held is None or threading.current_thread() is not threading.main_thread():
        return
    for signum in STARTING_HELD:
        if signal.getsignal(signum) == held.note:
            signal.signal(signum, signal.SIG_DFL)
    if signal.getsignal(signal.SIGQUIT) == held.quit:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == held.stop:
            signal.signal(
                signum,
                signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL,
            )


class _Held:
    """The signals noted while starting, and the handler that notes them."""

    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived: list[str] = []

    def note(self, signum: int, frame: object) -> None:
        self.arrived.append(signal.Signals(signum).name)

    @staticmethod
    def quit(signum: int, frame: object) -> None:
        """QUIT before anything serves: nothing to cut short; end as TERM does, no core dump."""
        die_by(signal.SIGTERM)

    @staticmethod
    def stop(signum: int, frame: object) -> None:
        """TERM or INT before anything serves, as PID 1: what the default action would do.

        The kernel spares PID 1 of a PID namespace every default action, so a TERM
        during a slow import (``docker stop`` as the container boots) was lost, and
        the container served on until its SIGKILL.
        """
        die_by(signum)


#: The hold in force (see :func:`hold_while_starting`), if any.
_held: _Held | None = None


#: The environment variable through which the supervisor gives each worker the
#: write end of its stack-dump pipe (see :func:`enable_stack_dump`).
DUMP_FD_ENV = "_WEFT_DUMP_FD"


def enable_stack_dump(environ: MutableMapping[str, str]) -> None:
    """Write every thread's stack on DUMP_SIGNAL (the watchdog sends it); a worker calls it.

    Into the pipe whose number the supervisor put in ``DUMP_FD_ENV`` (removed here,
    the descriptor made non-inheritable): the supervisor reads it and logs it as
    one record, text or JSON, so neither a stuck worker's GIL nor another process's
    lines can cut it up. faulthandler writes from its C signal handler, without
    the GIL, so even a loop blocked in C code answers. Without the variable (a
    worker of an older image), to stderr as before.
    """
    text = environ.pop(DUMP_FD_ENV, "")
    if text.isascii() and text.isdigit():
        fd = int(text)
        try:
            os.set_inheritable(fd, False)  # the application's children must not hold it
            faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True)
            return
        except (OSError, ValueError):
            pass
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True)


def reopen_log_files() -> int:
    """Reopen the file of every ``logging.FileHandler`` (subclasses too); return how many.

    After ``logrotate`` renamed a log file, a handler still writes to the renamed
    one; reopening by name starts the file afresh (USR1, as nginx and gunicorn do).
    The new file is opened before the old one is closed: one that cannot be opened
    (its directory renamed or gone, no permission) is one ERROR line naming it, and
    its handler goes on writing to the file it had; the process serves on. An old
    file that cannot take its last lines (a full disk) is closed all the same, and
    the loss is one ERROR line.
    """
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    seen: set[int] = set()
    failed: list[tuple[str, OSError]] = []
    lost: list[tuple[str, OSError]] = []
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) or id(handler) in seen:
                continue
            seen.add(id(handler))
            with _locked(handler):
                try:
                    fresh = open_log_file(handler)
                except OSError as exc:
                    failed.append((handler.baseFilename, exc))
                    continue
                stream, handler.stream = handler.stream, fresh
                if stream is not None:
                    try:
                        stream.close()
                    except OSError as exc:
                        # Its last lines could not be flushed (a full disk: the very
                        # moment logrotate runs); the descriptor is closed all the
                        # same. This escaped and ended the process, cutting its clients.
                        lost.append((handler.baseFilename, exc))
    for path, error in failed:  # logged once no handler's lock is held
        log.error(
            "cannot reopen log file %s: %s; still writing to the file it had open"
            " (make its directory writable, then send USR1 again)",
            escape_for_log(path),
            error.strerror or error,
        )
    for path, error in lost:
        log.error(
            "reopened log file %s, but the lines the old file still held were lost: %s",
            escape_for_log(path),
            error.strerror or error,
        )
    return len(seen) - len(failed)


class _locked:
    """A handler's own lock, held while its stream is swapped (emit() takes it too)."""

    def __init__(self, handler: logging.Handler) -> None:
        self._handler = handler

    def __enter__(self) -> None:
        self._handler.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._handler.release()
