"""How ``weft serve`` sets up logging: text or JSON lines, or the user's own config file.

- ``--log-format text`` (the default): ``TIME [PID] [LEVEL] LOGGER: MESSAGE``, the
  time in ISO 8601 with its zone offset (``2026-12-03T23:39:20.123+00:00``), so
  lines from hosts in different zones, or read after a DST change, sort and compare.
- ``--log-format json``: one JSON object a line, with ``time``, ``level``,
  ``logger``, ``pid`` and ``message``, plus every ``extra`` field the record carries
  (the access log's ``peer``, ``duration``, ``bytes_in``, ``bytes_out``, ``how``) and
  ``exc_info`` as text. JSON escapes every control character, so nothing a peer sent
  can forge a line.
- ``--log-config FILE``: the user's own config, read by the standard library:
  ``logging.config.dictConfig`` for ``.toml`` and ``.json``, ``fileConfig`` for INI
  (``.ini``, ``.conf``, ``.cfg``). It replaces the two above and ``--log-level``.

The stderr handler of the first two never makes the code that logs wait for
stderr: lines go to a thread of their own that writes them, so a log reader that
stalls (a full pipe, a stopped collector) stops neither the serving nor the stop.
Past ``BACKLOG_LINES`` waiting, lines are dropped and counted, and the count is
logged once stderr takes lines again; at exit, what waits gets ``EXIT_FLUSH``
seconds.

What does not live here: what is logged (each module's own logger), escaping of
peer data in text lines (``_logsafe``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import fcntl
import json
import logging
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from ._config import toml_loads
from ._errors import ConfigError
from ._jobcontrol import JOB_STOPS
from ._logsafe import escape_for_log, json_safe
from ._osthreads import thread_primitives

__all__ = [
    "JsonFormatter",
    "StderrHandler",
    "TextFormatter",
    "flush_at_exit_by",
    "flush_own_log",
    "json_asked_for",
    "logs_json",
    "print_line",
    "setup_logging",
    "share_line_lock",
    "stderr_line",
    "take_line_lock",
    "writable",
    "write_within",
]

#: Lines waiting for stderr beyond which more are dropped (and counted).
BACKLOG_LINES = 10_000
#: At exit, how long the lines still waiting may take to reach stderr.
EXIT_FLUSH = 2.0
#: When (``time.monotonic()``) the exit's flush must give up at the latest, if a
#: bound on the process's exit was set (:func:`flush_at_exit_by`).
_exit_by: float | None = None
#: How often a line waiting for the lock of the processes sharing stderr tries it.
LOCK_NAP = 0.01

_TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"

#: A LogRecord's own attributes; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

#: Suffixes read as dictConfig documents; anything else is an INI file for fileConfig.
_DICT_SUFFIXES = (".toml", ".json")


def _iso_time(record: logging.LogRecord) -> str:
    """The record's time in local time with its offset, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(record.created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """weft's text lines, with ISO 8601 times that carry their zone offset."""

    def __init__(self, fmt: str = _TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 with the zone, ignoring ``datefmt``."""
        return _iso_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the record's fields and every ``extra`` it carries."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (no newline inside it, whatever the message holds)."""
        out: dict[str, Any] = {
            "time": _iso_time(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            # exc_text first: an untrusted exception's, its messages escaped
            # (log_untrusted_exception), as the text format prints it.
            out["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        # JSON escapes the C0 controls; json_safe the rest a reader must not get raw.
        return json_safe(json.dumps(out, default=str, ensure_ascii=False))


def setup_logging(
    level: str, log_format: str = "text", config_file: str | None = None, *, check: bool = False
) -> None:
    """Configure logging for ``weft serve``; ConfigError if ``config_file`` is unusable.

    Without ``config_file``, one stderr handler on the root logger at ``level``,
    unless the root logger already has handlers (an embedding program's, pytest's):
    then only the ``weft`` logger's level is set. ``check``: for one of weft's
    checks (``--check-config``, a supervisor's start check, a USR2's), which open
    the config's log files as serve does, but never empty one (see
    :func:`_appending_only`).
    """
    global _own_handler
    if config_file is not None:
        with _appending_only() if check else contextlib.nullcontext():
            _apply_file(Path(config_file))
        _report_failures_quietly()
        return
    root = logging.getLogger()
    if not root.handlers:
        formatter = JsonFormatter() if log_format == "json" else TextFormatter()
        handler = StderrHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(level)
        _own_handler = handler
        _route_stray_output(handler)
    logging.getLogger("weft").setLevel(level)


#: How often a handler of the log config that keeps failing is said to (see below).
FAILURE_REPORT_EVERY = 60.0


def _report_failures_quietly() -> None:
    """Give every handler the log config made a ``handleError`` that says so once a minute.

    The standard library's writes every failure (its traceback, twice over) to
    stderr as it happens: a file handler on a full disk wrote a block per record
    (6 MB for 600 connections), and, with stderr a pipe nobody read, blocked every
    caller that logged, which stopped the serving. Now one line a minute, counting the
    records lost, written only as far as stderr takes it at once.
    """
    reports: list[_FailureReport] = []
    for handler in _logger_handlers():
        # A handler class with a handleError of its own keeps it: its author chose.
        if type(handler).handleError is logging.Handler.handleError:
            report = _FailureReport(handler)
            handler.handleError = report  # type: ignore[method-assign]
            reports.append(report)
    if reports:
        atexit.register(_said_at_exit, reports)


def _logger_handlers() -> Iterator[logging.Handler]:
    """Each handler on a logger (the root, or one made so far), once."""
    seen: set[int] = set()
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):  # a PlaceHolder has none
            if id(handler) not in seen:
                seen.add(id(handler))
                yield handler


def _said_at_exit(reports: list[_FailureReport]) -> None:
    """The records lost since each handler's last line, said as the process exits."""
    for report in reports:
        report.say(time.monotonic())


class _FailureReport:
    """A handler's ``handleError``: lost records counted, said at most once a minute."""

    def __init__(self, handler: logging.Handler) -> None:
        self._name = escape_for_log(handler)
        self._lost = 0
        self._error: BaseException | None = None
        self._said_at = -FAILURE_REPORT_EVERY

    def __call__(self, record: logging.LogRecord) -> None:
        self._lost += 1
        self._error = sys.exc_info()[1]
        now = time.monotonic()
        if now - self._said_at >= FAILURE_REPORT_EVERY:
            self.say(now)

    def say(self, now: float) -> None:
        """One line for the records lost since the last, if any (as far as stderr takes it)."""
        if not self._lost:
            return
        self._said_at = now
        error = self._error
        line = stderr_line(
            f"log handler {self._name} failed: {type(error).__name__}: "
            f"{escape_for_log(error)}; {self._lost} record(s) lost (said at most once a"
            f" minute, and at exit)",
            logging.ERROR,
        )
        self._lost = 0
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            return
        write_within(fd, line + "\n", now)  # as far as stderr takes it at once


def _route_stray_output(handler: StderrHandler) -> None:
    """What Python itself writes to stderr goes through ``handler`` as log lines too.

    A warning, an exception that ends a thread, an exception nothing could raise
    (``sys.unraisablehook``), a record no handler took (``logging.lastResort``):
    each a line in the log's format (JSON stays JSON), in order with the others,
    the messages of exceptions escaped as weft's own are.
    """
    import threading

    from ._logsafe import log_untrusted_exception

    logging.captureWarnings(True)
    last_resort = _Forward(handler)
    last_resort.setLevel(logging.WARNING)  # as the standard library's own
    logging.lastResort = last_resort
    log = logging.getLogger("weft")

    def thread_ended(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return  # as threading's own hook
        name = args.thread.name if args.thread is not None else "?"
        log_untrusted_exception(log, logging.ERROR, args.exc_value, "exception in thread %s", name)

    def unraisable(args: Any) -> None:
        if args.exc_value is None:
            return
        log_untrusted_exception(
            log,
            logging.ERROR,
            args.exc_value,
            "%s: %r",
            args.err_msg or "exception ignored in",
            args.object,
        )

    threading.excepthook = thread_ended
    sys.unraisablehook = unraisable


class _Forward(logging.Handler):
    """``logging.lastResort``: what reaches no handler goes to weft's own."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self._target = target

    def emit(self, record: logging.LogRecord) -> None:
        self._target.handle(record)


#: The stderr handler :func:`setup_logging` made, if it made one: what weft writes
#: outside logging goes through it, in its format.
_own_handler: StderrHandler | None = None


def logs_json() -> bool:
    """True once :func:`setup_logging` made weft's stderr log JSON lines."""
    return _own_handler is not None and isinstance(_own_handler.formatter, JsonFormatter)


def stderr_line(message: str, level: int = logging.ERROR, **fields: Any) -> str:
    """``message`` as a line of weft's own stderr log, for what is written outside logging.

    A JSON object under ``--log-format json`` (with ``fields``), so that every line
    a log pipeline reads parses; ``weft: message`` otherwise, fields left out.
    """
    formatter: logging.Formatter | None = None
    if _own_handler is not None and (logs_json() or _whole_lines):
        formatter = _own_handler.formatter
    elif _own_handler is None and _json_asked:
        formatter = JsonFormatter()
    if formatter is not None:
        record = logging.LogRecord("weft", level, __file__, 0, "%s", (message,), None)
        record.__dict__.update(fields)
        return formatter.format(record)
    return f"weft: {message}"


#: A worker's: its one-line failures are whole log lines (time, pid, level) in the
#: text format too, since they land among its siblings' and its supervisor's, which
#: points to them ("see its message above"). Set by :func:`whole_lines`.
_whole_lines = False


def whole_lines() -> None:
    """Make :func:`stderr_line` write whole log lines once logging is set up (a worker)."""
    global _whole_lines
    _whole_lines = True


#: ``--log-format json`` or ``WEFT_LOG_FORMAT=json`` was given, seen before the
#: config is read (see :func:`json_asked_for`).
_json_asked = False


def json_asked_for(flag: str | None, environ: Mapping[str, str]) -> None:
    """Before the config is read: say its errors as JSON if the flag or variable asks.

    The log format is a setting like any other, so the config's own mistakes (a bad
    ``--backlog``, a bad ``--bind``) were found before it was known, and said as
    plain text to a pipeline that reads JSON. The flag, else ``WEFT_LOG_FORMAT``,
    decides them now; a ``log_format`` in a config file is known only once the
    file is read.
    """
    global _json_asked
    value = flag if flag is not None else environ.get("WEFT_LOG_FORMAT", "")
    _json_asked = value.strip().lower() == "json"


class StderrHandler(logging.Handler):
    """Log lines to a stream from a thread of their own: whoever logs never waits for it.

    A stream nobody reads (a pipe to a stalled collector) blocks only that thread.
    The thread is an OS thread even in a gevent-patched process, and the handoff
    uses the unpatched lock, so a greenlet logging never switches.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        try:
            stream.flush()  # what was printed before goes first
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor: the stream's own write
            self._fd = None
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._lines: collections.deque[str] = collections.deque()
        #: One item per line dropped: appended and taken whole from any thread, where
        #: an int's ``+= 1`` could lose a count.
        self._dropped: collections.deque[None] = collections.deque()
        #: Lines the stream refused (full disk, closed pipe, no stderr at all), counted
        #: in the writer alone, and said once a line gets through again.
        self._lost = 0
        start, allocate = thread_primitives()
        #: Released when lines wait: the writer's wake-up (a binary semaphore).
        self._wake = allocate()
        self._wake.acquire()
        #: Held by the writer while it writes, so that a flush knows when it is done.
        self._writing = allocate()
        #: Never released: a timed wait on it is a sleep, unpatched, in any thread of
        #: a gevent-patched process (where time.sleep would need a hub).
        self._nap = allocate()
        self._nap.acquire()
        #: Lines written so far, and that count when a flush last gave up waiting.
        self._written = 0
        self._stuck_at = -1
        start(self._write_forever, ())
        atexit.register(self._flush_at_exit)

    def emit(self, record: logging.LogRecord) -> None:
        """Format here, in the logging thread (the record's arguments may change later)."""
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) >= BACKLOG_LINES:
            self._dropped.append(None)
            return
        self._queue(line)

    def write_line(self, text: str) -> None:
        """Queue ``text`` (a line written outside logging) after the lines waiting, never dropped."""
        self._queue(text + "\n")

    def _queue(self, line: str) -> None:
        self._lines.append(line)
        try:
            self._wake.release()
        except RuntimeError:  # released already: the writer will see this line too
            pass

    def _write_forever(self) -> None:
        # The job-control stops blocked in this thread alone (JOB_STOPS): a
        # process writing to its terminal from the background under `stty tostop`
        # draws TTOU for each write unless the writing thread blocks or ignores it, and
        # with weft's handler in, the write was refused and retried for ever, each TTOU
        # taken as "one worker fewer". Sent by hand, they still reach the main thread.
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_sigmask(signal.SIG_BLOCK, JOB_STOPS)
        lines = self._lines
        while True:
            self._wake.acquire()
            with self._writing:
                while lines:
                    written = self._put(lines.popleft())
                    self._written += 1  # written or lost: not waited for by a flush
                    if not written:
                        # Refused (ENOSPC, EPIPE, closed): lost. Said only once a line
                        # gets through: said to the stream refusing it, the report was
                        # itself lost, reported again, for ever, a core spinning.
                        self._lost += 1
                    elif (self._dropped or self._lost) and not lines:
                        self._report_dropped()

    def _put(self, line: str) -> bool:
        """Write one line whole, waiting as long as the stream makes it; False if it is gone.

        To the descriptor itself: a stderr left non-blocking (a parent's, shared)
        answers a full pipe with EAGAIN, which is waited out here, not taken for a
        closed stream; and a partial write goes on where it stopped. Where processes
        share stderr (``--workers``), each line is written under the lock they share:
        a pipe takes a write longer than PIPE_BUF in pieces, and another's line could
        land inside it.
        """
        fd = self._fd
        if fd is None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except Exception:
                return False
            return True
        data = line.encode(self._encoding, "backslashreplace")
        # Every line: a pipe takes a short one whole, but it could land between the
        # pieces of another process's long one.
        lock = _line_lock_fd()
        locked = lock is not None and self._lock_line(lock)
        try:
            while data:
                try:
                    data = data[os.write(fd, data) :]
                except (BlockingIOError, InterruptedError):
                    select.select([], [fd], [])
                except OSError:
                    return False
        finally:
            if locked and lock is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return True

    def _lock_line(self, lock: int) -> bool:
        """Take the lock the processes sharing stderr write their lines under; False: go without.

        Waits for as long as its holder runs: it writes, or waits for the reader
        as this line would. A holder that is stopped (SIGSTOP, a debugger's
        breakpoint) must not stop every other process's log: while it is, lines
        are written without the lock (one may then land inside the stopped
        holder's unfinished line; none is lost). Each holder writes its pid into
        the lock file as it takes the lock, for the others to look it up.
        """
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError:
                return False
            else:
                with contextlib.suppress(OSError):
                    os.pwrite(lock, _PID.pack(os.getpid()), 0)
                return True
            if _holder_stopped(lock):
                return False
            self._nap.acquire(True, LOCK_NAP)

    def _report_dropped(self) -> None:
        dropped = len(self._dropped)
        for _ in range(dropped):
            self._dropped.popleft()
        lost, self._lost = self._lost, 0
        reports: list[tuple[str, tuple[int, ...]]] = []
        if dropped:
            reports.append(
                (
                    "%d log line(s) dropped: stderr took none while %d waited",
                    (dropped, BACKLOG_LINES),
                )
            )
        if lost:
            reports.append(("%d log line(s) lost: writing them to stderr failed", (lost,)))
        for message, args in reports:
            record = logging.LogRecord("weft", logging.WARNING, __file__, 0, message, args, None)
            self._lines.append(self.format(record) + "\n")

    def flush(self) -> None:
        """Wait (a little) for the lines logged so far to be written."""
        self.flush_within(EXIT_FLUSH)

    def _flush_at_exit(self) -> None:
        """The flush at exit: ``EXIT_FLUSH``, or less where the exit has a bound."""
        seconds = EXIT_FLUSH
        if _exit_by is not None:
            seconds = min(seconds, _exit_by - time.monotonic())
        self.flush_within(max(seconds, 0.0))

    def flush_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every waiting line to be written; True if they were.

        Once a wait ran out, the next returns at once unless a line was written
        since: at exit, atexit's flush and logging's own do not wait twice on a
        stderr nobody reads.
        """
        if self._stuck_at == self._written and (self._lines or self._writing.locked()):
            return False
        deadline = time.monotonic() + seconds
        while self._lines or self._writing.locked():
            left = deadline - time.monotonic()
            if left <= 0:
                self._stuck_at = self._written
                return False
            self._nap.acquire(True, min(left, 0.005))
        return True


#: The variable naming the descriptor, inherited from the supervisor, of the file
#: whose lock the processes sharing stderr take to write a line whole. Given to
#: each worker in its own environment, never put in the supervisor's.
LINE_LOCK_ENV = "_WEFT_LOG_LOCK_FD"
#: This process's own open file of the lock (see :func:`_line_lock_fd`).
_line_lock: int | None = None
#: The lock file as a supervisor holds it to pass on to its workers (made, or
#: adopted from the image it re-executed from); None elsewhere.
_shared_fd: int | None = None


def _line_lock_fd() -> int | None:
    """This process's own descriptor of the shared lock file; None if there is none.

    Opened anew (its own open file), so that ``flock`` excludes the other processes,
    from the supervisor's descriptor: its own, or, in a worker, the one it inherited,
    which is then closed and its variable taken out of the environment (a process
    the worker starts inherits neither). On first use; a worker calls
    :func:`take_line_lock` before importing the application.
    """
    global _line_lock
    if _line_lock is None:
        source = _shared_fd
        inherited: int | None = None
        if source is None:
            text = os.environ.pop(LINE_LOCK_ENV, "")
            if not text.isdigit():
                return None
            source = inherited = int(text)
        try:
            _line_lock = os.open(f"/proc/self/fd/{source}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        finally:
            if inherited is not None:
                with contextlib.suppress(OSError):
                    os.close(inherited)
    return _line_lock


#: The holder's pid, as it writes it at the start of the lock file.
_PID = struct.Struct("<q")


def _holder_stopped(lock: int) -> bool:
    """True if the process that holds the line lock is stopped (``T``, ``t``)."""
    try:
        (pid,) = _PID.unpack(os.pread(lock, _PID.size, 0))
    except (OSError, struct.error):
        return False  # no holder written yet: it is about to, wait for it
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False  # gone: its lock went with it; the next holder writes its own pid
    return state in (b"T", b"t")


def take_line_lock() -> None:
    """A worker's first step: open its own description of the lock, let go of the inherited one."""
    _line_lock_fd()


def share_line_lock(adopted: int | None = None) -> int | None:
    """The lock file of the processes about to share this stderr; its descriptor.

    An unlinked temporary file, made once per supervisor; ``adopted`` is the one a
    supervisor re-executed on USR2 inherits from its image before, so that the
    workers of both generations take one lock. The caller passes the descriptor to
    each worker, and its number in :data:`LINE_LOCK_ENV`. None if it cannot be made.
    """
    global _shared_fd
    if adopted is not None:
        with contextlib.suppress(OSError):
            os.set_inheritable(adopted, False)
            _shared_fd = adopted
    if _shared_fd is None:
        import tempfile

        try:
            fd, path = tempfile.mkstemp(prefix="weft-log-lock-")
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.unlink(path)
        _shared_fd = fd
    return _shared_fd


def writable(fd: int, until: float) -> bool:
    """Whether ``fd`` takes a write without waiting, asked until ``until`` (monotonic)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    left = max(until - time.monotonic(), 0.0)
    return any(event & select.POLLOUT for _fd, event in poller.poll(left * 1000))


def write_within(fd: int, text: str, until: float) -> bool:
    """Write ``text`` to ``fd`` a pipe's atomic chunk at a time while it takes them; True if all."""
    data = text.encode("utf-8", "backslashreplace")
    while data:
        if not writable(fd, until):
            return False
        try:
            written = os.write(fd, data[: select.PIPE_BUF])
        except OSError:
            return False
        data = data[written:]
    return True


def print_line(text: str) -> None:
    """Write ``text`` as a line of stderr in order with weft's own log lines.

    Through the log's writer once :func:`setup_logging` made it (a print would come
    before the lines still waiting for it); before, to stderr itself, as far as it
    takes the line within ``EXIT_FLUSH``.
    """
    if _own_handler is not None:
        _own_handler.write_line(text)
        return
    # Before logging is set up (a mistake on the command line): straight to stderr,
    # as far as it takes the line within EXIT_FLUSH, so that a stalled stderr cannot
    # keep the process from exiting.
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object: its own write
        print(text, file=sys.stderr)
        return
    write_within(fd, text + "\n", time.monotonic() + EXIT_FLUSH)


def flush_at_exit_by(when: float) -> None:
    """Make the exit's flush give up by ``when`` (``time.monotonic()``), however stalled stderr is.

    For a process whose exit has a deadline (``_deadline``) that exits it from a
    thread of its own: that thread cannot run once the main thread is finalizing
    the interpreter, so the main thread's own waits must end before it, not race it.
    """
    global _exit_by
    _exit_by = when


def flush_own_log(seconds: float) -> bool:
    """Let the lines weft's stderr handler holds reach stderr, for up to ``seconds``.

    For a way out that skips ``atexit`` (the stop deadline's ``os._exit``).
    """
    return _own_handler is None or _own_handler.flush_within(seconds)


@contextlib.contextmanager
def _appending_only() -> Iterator[None]:
    """While in force, a log file a handler opens to write afresh (mode ``w``) is appended to.

    A check opens the log config's files to find one that serve could not open;
    with ``mode = "w"`` it emptied the log the running server writes: a USR2 that
    the check then refused, or an operator's ``--check-config``, lost that log.
    """
    original = logging.FileHandler._open

    def _open(self: logging.FileHandler) -> Any:
        self.mode = self.mode.replace("w", "a")
        return original(self)

    logging.FileHandler._open = _open  # type: ignore[method-assign]
    try:
        yield
    finally:
        logging.FileHandler._open = original  # type: ignore[method-assign]
        # A handler made with delay=True opens its file at its first record, later.
        for handler in _logger_handlers():
            if isinstance(handler, logging.FileHandler):
                handler.mode = handler.mode.replace("w", "a")


def _apply_file(path: Path) -> None:
    import logging.config  # imports socketserver and more: only when a file is given

    source = f"log config {path}"
    if path.suffix.lower() in (".yaml", ".yml"):  # read as INI, it failed as a puzzle
        raise ConfigError(
            "YAML is not read (weft needs nothing beyond the standard library): write the"
            " same dictConfig as a .toml or .json file, or an INI file for fileConfig",
            source=source,
            key="log_config",
        )
    try:
        if path.suffix.lower() in _DICT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            json_file = path.suffix.lower() == ".json"
            document = json.loads(text) if json_file else toml_loads(text)
            if not isinstance(document, dict):
                raise ValueError("expected a dictConfig table at the top level")
            document.setdefault("version", 1)
            document.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(document)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except Exception as exc:  # json, TOML, configparser and dictConfig errors alike
        # dictConfig says which part failed, and chains the reason.
        why = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        why = " ".join(why.split())  # configparser's reasons run over lines: one line
        raise ConfigError(
            f"cannot use it: {type(exc).__name__}: {why}; see the logging.config docs"
            " (dictConfig for .toml and .json, fileConfig for INI)",
            source=source,
            key="log_config",
        ) from None
