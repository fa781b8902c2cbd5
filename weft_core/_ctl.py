"""The control socket: how ``weft ctl`` steers a running ``weft serve``.

A Unix stream socket, never TCP, so the network cannot reach it and the kernel tells
who is asking (``SO_PEERCRED``). Only the server's own user (and root) are served;
anybody else is logged with their uid and closed unread. The file is made mode 0600
and, at the default path, inside a 0700 directory, so the mode is a second lock and
the peer check the first.

The protocol is one JSON object a line: the client sends ``{"command": NAME, "args":
{...}}`` and reads ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
TEXT}``, then the connection ends. ``console`` is the one exception: after its
answer the connection carries a Python REPL (:mod:`._ctl_console`).

What the commands do is the owner's business: the serve loop of one process and the
supervisor of workers each hand :class:`ControlSocket` their own table of
:data:`Command` functions. Every command is logged with the uid and pid that asked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ._endpoints import SUN_PATH_MAX
from ._errors import BindError, ConfigError, WeftError
from ._files import IN_USE, clear_stale_socket, set_socket_mode
from ._logsafe import escape_for_log

__all__ = [
    "Command",
    "Console",
    "ControlError",
    "ControlSocket",
    "Peer",
    "default_path",
    "inherit_listening",
    "peer_credentials",
    "request",
    "timeout_seconds",
]

log = logging.getLogger("weft.ctl")

#: ``command(args, peer) -> result``; the result must be JSON-serialisable. Raising
#: :class:`ControlError` answers with its message; anything else is logged in full
#: and answered with its one-line summary.
Command = Callable[[Mapping[str, Any], "Peer"], Any]
#: ``console(conn, reader, peer)``: serve a REPL on the connection; ``reader`` holds
#: what the client sent after its request line. It may return how it ended (a
#: string, for the log line of its end).
Console = Callable[[socket.socket, BinaryIO, "Peer"], object]

# A request is one short JSON line; a client sending more is not a weft ctl client.
MAX_REQUEST = 64 * 1024
# How long a client gets to send its request (a stalled client must not pin a thread).
REQUEST_TIMEOUT = 10.0
# How long an answer may take to go out: a client that stops reading (a stack dump
# it never takes) gives up its thread and slot then, rather than hold them for ever.
ANSWER_TIMEOUT = 10.0
# The longest timeout a command takes: a year. Past the platform's time_t, a wait on
# it raises OverflowError after the stop it bounds has begun.
MAX_TIMEOUT = 365 * 24 * 3600.0
# The longest answer weft ctl reads (a stack dump of many tasks is long).
MAX_ANSWER = 16 * 1024 * 1024
# Requests served at once; more are answered "busy" and closed.
MAX_CLIENTS = 8
# Connections the kernel holds while the acceptor catches up with a burst.
BACKLOG = 64
# accept() errors that pass: out of descriptors or memory for the moment. The control
# socket waits this long and tries again.
SHORTAGES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
SHORTAGE_PAUSE = 0.1
# What a worker's socket adds to the supervisor's path (".worker-" and a pid of 7
# digits); the path itself holds at most SUN_PATH_MAX bytes.
WORKER_SUFFIX = len(".worker-") + 7
# How long close() waits for the threads of requests in progress.
CLOSE_WAIT = 2.0
# struct ucred (pid_t pid; uid_t uid; gid_t gid), as SO_PEERCRED returns it on Linux.
_UCRED = struct.Struct("3i")


class ControlError(WeftError):
    """A control request failed: no server at the path, refused, or a bad command."""


class Peer:
    """Who is on the other end of a control connection, from the kernel."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid

    def __str__(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def peer_credentials(conn: socket.socket) -> Peer:
    """The pid, uid and gid of the process that connected ``conn`` (Linux SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw))


def default_path() -> str:
    """Where the control socket lives when config does not say.

    ``$XDG_RUNTIME_DIR/weft/ctl.sock`` for a user session, ``/run/weft/ctl.sock``
    for root, else ``weft-UID/ctl.sock`` in the temporary directory.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "weft" / "ctl.sock")
    if os.geteuid() == 0:
        return "/run/weft/ctl.sock"
    return str(Path(tempfile.gettempdir()) / f"weft-{os.geteuid()}" / "ctl.sock")


def _private_directory(directory: Path) -> None:
    """Make ``directory`` (mode 0700) if missing; refuse one another user owns or can write."""
    shown = escape_for_log(str(directory))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()  # a link another user made here is not followed
    except OSError as exc:
        raise BindError(
            exc.errno, f"cannot make the control socket's directory {shown}: {exc.strerror}"
        ) from exc
    if stat.S_ISLNK(info.st_mode):
        raise BindError(
            errno.EPERM,
            f"the control socket's directory {shown} is a symbolic link (another user may"
            " have made it); remove it, or choose another path with control_socket",
        )
    if info.st_uid not in (os.geteuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BindError(
            errno.EPERM,
            f"the control socket's directory {shown} belongs to uid {info.st_uid} or is"
            " writable by others; choose another path with control_socket",
        )


def check_path_length(path: str, extra: int = 0) -> None:
    """Refuse a control socket path too long for a Unix socket address (ConfigError).

    A mistake in the config, said before anything binds (``weft serve`` exits 2, as
    ``--check-config`` does). ``extra``: bytes other sockets will add to it (a
    worker's, beside the supervisor's).
    """
    length = len(os.fsencode(path)) + extra
    if length > SUN_PATH_MAX:
        also = f", with the {extra} its workers' sockets add (PATH.worker-PID)," if extra else ""
        raise ConfigError(
            f"the control socket path is too long: {length} bytes{also} where a Unix"
            f" socket's path holds at most {SUN_PATH_MAX}; choose a shorter one"
            f" ({escape_for_log(path)})",
            key="control_socket",
        )


def check_control_path(path: str) -> None:
    """Refuse, before anything binds, a control socket path that cannot be bound (ConfigError).

    Its length (with what its workers' sockets add), its directory (there, and
    writable by this user; the default path's is made when it opens), and what is
    there already (a socket, or nothing). A live server answering on it is found
    when binding.
    """
    check_path_length(path, WORKER_SUFFIX)
    where = Path(path)
    if path != default_path():
        _check_directory(where.parent)
    try:
        info = where.lstat()
    except OSError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(
            f"{escape_for_log(path)} exists and is not a socket; remove it or choose another"
            " control_socket",
            key="control_socket",
        )


def _check_directory(directory: Path) -> None:
    """Refuse a control socket directory that is missing or that this user cannot write."""
    shown = escape_for_log(str(directory))
    if not directory.is_dir():
        raise ConfigError(
            f"the control socket's directory {shown} does not exist; create it, or choose"
            " another control_socket",
            key="control_socket",
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"this user may not make the control socket in {shown}; choose another control_socket",
            key="control_socket",
        )


#: The listening control socket a supervisor re-executed on USR2 inherited from the
#: image before (its descriptor), until :meth:`ControlSocket.open` takes it.
_inherited_fd: int | None = None


def inherit_listening(fd: int) -> None:
    """Keep ``fd``, the control socket of the image before a USR2 re-exec, for ``open``.

    Kept open across the exec, its file never leaves the disk and clients that connect
    meanwhile wait in its backlog: ``weft ctl`` is answered throughout, where a
    socket bound afresh refused it for the exec's tenth of a second.
    """
    global _inherited_fd
    os.set_inheritable(fd, False)
    _inherited_fd = fd


def _take_inherited(path: str) -> tuple[socket.socket, os.stat_result] | None:
    """The inherited listening socket if it is the one at ``path`` (and its file's stat)."""
    global _inherited_fd
    fd, _inherited_fd = _inherited_fd, None
    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        # Blocking, as this image serves it: the open file description is the old
        # image's, which may have left it non-blocking (gevent does), and a blocking
        # accept() on it then fails with EAGAIN at once.
        sock.setblocking(True)
        if sock.family == socket.AF_UNIX and sock.getsockname() == path:
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode):
                return sock, info
    except OSError:
        pass
    sock.close()  # the config names another path now: that one is bound afresh
    return None


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one, or anything not a socket."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    shown = escape_for_log(str(path))
    if not stat.S_ISSOCK(info.st_mode):
        raise BindError(
            errno.EEXIST,
            f"{shown} exists and is not a socket; remove it or choose another control_socket",
        )
    refused = clear_stale_socket(str(path), info.st_uid)
    if refused is None:
        return
    err, why = refused
    if why == IN_USE:
        raise BindError(
            err,
            f"another weft serve answers on the control socket {shown}; stop it, or give"
            " this one its own control_socket",
        )
    raise BindError(err, f"cannot listen on the control socket {shown}: {why}")


class ControlSocket:
    """Listen on a Unix socket and answer control requests from the owner's user.

    :meth:`open` binds (raising :class:`BindError` with the path and what to do),
    :meth:`start` serves in a daemon thread, :meth:`close` (idempotent, any thread)
    stops, removes the file and waits briefly for requests in progress.
    """

    def __init__(
        self,
        path: str,
        commands: Mapping[str, Command],
        *,
        console: Console | None = None,
    ) -> None:
        self.path = path
        #: The command table; may be replaced while serving (a process that becomes
        #: a supervisor hands its socket to the supervisor's commands).
        self.commands = dict(commands)
        #: Serves ``console`` (None: the console is off); replaceable as ``commands``.
        self.console = console
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._uid = os.geteuid()

    def open(self) -> None:
        """Bind and listen at ``path``, mode 0600 (or take the socket kept across a USR2)."""
        kept = _take_inherited(self.path)
        if kept is not None:
            self._sock, info = kept
            self._inode = (info.st_dev, info.st_ino)
            return
        check_path_length(self.path)
        path = Path(self.path)
        if self.path == default_path():
            _private_directory(path.parent)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            info = set_socket_mode(self.path, 0o600)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise BindError(
                exc.errno,
                f"cannot listen on the control socket {escape_for_log(self.path)}:"
                f" {exc.strerror or exc}",
            ) from exc
        self._sock = sock
        self._inode = (info.st_dev, info.st_ino)

    def fileno(self) -> int:
        """The listening socket's descriptor; -1 before :meth:`open` or after :meth:`close`."""
        sock = self._sock
        return -1 if sock is None else sock.fileno()

    def start(self) -> None:
        """Serve requests in a daemon thread (once)."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("open() the control socket before starting it")
        if self._thread is not None:
            raise RuntimeError("the control socket is served already")
        # Not "listening on": tools wait for weft serve's own "listening on ADDRESS" line.
        log.info("control socket for weft ctl at %s", escape_for_log(self.path))
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="weft control socket", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, remove the socket file if it is still ours, and wait briefly."""
        me = threading.current_thread()
        with self._lock:
            sock, self._sock = self._sock, None
            self._closing.set()
            if sock is None:
                return
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            # Started ones only: joining one whose start() failed raises.
            threads = [
                t
                for t in (self._thread, *self._clients.values())
                if t is not None and t is not me and t.ident is not None
            ]
        self._remove_file()
        for thread in threads:
            thread.join(CLOSE_WAIT)
        sock.close()

    def _remove_file(self) -> None:
        # Only the file we bound: after a reload the path may already be another process's.
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- serving ----------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        shortage_logged = False
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                if exc.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                if exc.errno in SHORTAGES:
                    # Out of descriptors (or memory) for now: the TCP clients hold them.
                    # Try again, as the TCP acceptor does; the socket must outlive it.
                    if not shortage_logged:
                        log.warning("control socket %s: accept failed (%s); retrying",
                                    escape_for_log(self.path), exc)  # fmt: skip
                        shortage_logged = True
                    self._closing.wait(SHORTAGE_PAUSE)
                    continue
                log.error(
                    "control socket %s: accept failed (%s); closed",
                    escape_for_log(self.path),
                    exc,
                )
                # Closed indeed: a socket left listening with nobody to accept would
                # hold every weft ctl in its backlog until its own timeout, where a
                # closed one is refused at once ("cannot be reached").
                sock.close()
                return
            shortage_logged = False
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if peer.uid not in (self._uid, 0):
            log.warning("control socket: refused %s: only uid %d may steer this server",
                        peer, self._uid)  # fmt: skip
            conn.close()
            return
        with self._lock:
            if self._closing.is_set():
                _send(conn, {"ok": False, "error": "closing: this server is stopping"})
                conn.close()
                return
            if len(self._clients) >= MAX_CLIENTS:
                _send(conn, {"ok": False, "error": "busy: too many control requests at once"})
                conn.close()
                return
            thread = threading.Thread(
                target=self._serve_one, args=(conn, peer), name=f"weft ctl {peer}", daemon=True
            )
            self._clients[conn] = thread
        try:
            thread.start()
        except RuntimeError as exc:
            # No thread to spare (a pids cap, RLIMIT_NPROC): this request is refused,
            # the socket serves on. It ended the accept loop, and weft ctl with it, for
            # the rest of the process's life.
            with self._lock:
                self._clients.pop(conn, None)
            _send(conn, {"ok": False, "error": f"busy: no thread to answer with ({exc})"})
            conn.close()

    def _serve_one(self, conn: socket.socket, peer: Peer) -> None:
        try:
            self._answer(conn, peer)
        except OSError:
            pass  # the client went away; nothing to tell it
        finally:
            with self._lock:
                self._clients.pop(conn, None)
            conn.close()

    def _answer(self, conn: socket.socket, peer: Peer) -> None:
        # Closed with the connection: while a makefile is open, close() keeps the fd.
        with conn.makefile("rb") as reader:
            self._dispatch(conn, reader, peer)

    def _dispatch(self, conn: socket.socket, reader: BinaryIO, peer: Peer) -> None:
        try:
            name, args = _read_request(conn, reader)
        except _NoRequest:
            # A probe: another weft serve asking whether this socket is live, or a
            # monitor's connect-and-close. Not a bad request, nor a warning's worth.
            log.debug("control socket: %s connected and ended, sending nothing", peer)
            return
        except ControlError as exc:
            log.warning("control socket: bad request from %s: %s", peer, exc)
            _send(conn, {"ok": False, "error": str(exc)})
            return
        conn.settimeout(None)
        shown = escape_for_log(name)
        console = self.console
        if name == "console":
            if console is None:
                _send(conn, {"ok": False, "error": "the console is off; set console = true in"
                             " config to allow `weft ctl console`"})  # fmt: skip
                return
            log.warning("control: console opened by %s", peer)
            _send(conn, {"ok": True, "result": "console"})
            conn.settimeout(None)  # a console waits on its operator as long as it likes
            self._console(console, conn, reader, peer)
            return
        command = self.commands.get(name)
        if command is None:
            known = ", ".join(sorted([*self.commands, *(["console"] if console else [])]))
            _send(conn, {"ok": False, "error": f"unknown command {name!r}; known: {known}"})
            return
        log.info("control: %s%s by %s", shown, escape_for_log(_describe(args)), peer)
        try:
            result = command(args, peer)
        except ControlError as exc:
            _send(conn, {"ok": False, "error": str(exc)})
            return
        except Exception as exc:
            log.exception("control: %s failed", shown)
            _send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        _send(conn, {"ok": True, "result": result})

    @staticmethod
    def _console(console: Console, conn: socket.socket, reader: BinaryIO, peer: Peer) -> None:
        """Serve the console, and log its end however it ends.

        Its end went unlogged when the client vanished mid-statement (an OSError
        on its socket) or its code raised SystemExit.
        """
        how = "the client went away"
        try:
            ended = console(conn, reader, peer)
            how = ended if isinstance(ended, str) else "end of input"
        except OSError:
            raise
        except BaseException as exc:
            how = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            log.warning("control: console closed by %s (%s)", peer, escape_for_log(how))


def _describe(args: Mapping[str, Any]) -> str:
    return "".join(f" {key}={value}" for key, value in args.items())


class _NoRequest(Exception):
    """The client ended its connection without sending a byte."""


def _read_request(conn: socket.socket, reader: BinaryIO) -> tuple[str, Mapping[str, Any]]:
    line = _read_line(conn, reader, time.monotonic() + REQUEST_TIMEOUT)
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past Python's depth
        raise ControlError("a request is one JSON object on one line") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ControlError('a request is {"command": NAME, "args": {...}}')
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("a request's args must be a JSON object")
    return request["command"], args


def _read_line(conn: socket.socket, reader: BinaryIO, deadline: float) -> bytes:
    """The request line, whole by ``deadline`` however its bytes drip in.

    The socket's timeout counts per read: a client sending a byte a second would
    otherwise hold its thread, and with ``MAX_CLIENTS`` of them every slot, for
    ever. Nothing past the line is taken from ``reader`` (the console reads on).
    """
    line = b""
    try:
        while len(line) <= MAX_REQUEST and not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
            buffered = reader.peek(1)  # type: ignore[attr-defined]
            if not buffered:
                break
            newline = buffered.find(b"\n")
            wanted = newline + 1 if newline >= 0 else len(buffered)
            line += reader.read(min(wanted, MAX_REQUEST + 1 - len(line)))
    except TimeoutError:
        raise ControlError(f"no request within {REQUEST_TIMEOUT:g}s") from None
    if len(line) > MAX_REQUEST:
        raise ControlError(f"a request is at most {MAX_REQUEST} bytes")
    if not line:
        raise _NoRequest
    if not line.endswith(b"\n"):
        raise ControlError("the connection ended before a whole request")
    return line


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
    """Send one answer line, within ANSWER_TIMEOUT; a client gone or not reading loses it."""
    with contextlib.suppress(OSError):  # TimeoutError too
        conn.settimeout(ANSWER_TIMEOUT)
        conn.sendall(json.dumps(message, default=str).encode() + b"\n")


# -- the client side ---------------------------------------------------------------------


def connect(path: str, timeout: float | None = 10.0) -> socket.socket:
    """A connection to the control socket at ``path``, or ControlError saying why not."""
    shown = escape_for_log(path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:  # out of descriptors: a supervisor fanning out says so per worker
        raise ControlError(f"cannot reach the control socket {shown}: {exc}") from None
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(
            f"no weft serve is running with the control socket {shown}; start one, or point"
            " at its socket with --socket PATH (or control_socket in config)"
        ) from None
    except PermissionError:
        sock.close()
        owner = _owner(path)
        raise ControlError(
            f"permission denied on the control socket {shown}{owner}: only the user running"
            " that server (or root) may steer it"
        ) from None
    except BlockingIOError:  # a Unix socket's full backlog
        sock.close()
        raise ControlError(f"the control socket {shown} is busy; try again") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach the control socket {shown}: {exc}") from None
    try:
        server = peer_credentials(sock)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot tell who serves the control socket {shown}: {exc}") from None
    if server.uid not in (os.geteuid(), 0):
        sock.close()
        # Nothing is sent to it: another local user may have put a socket of its own
        # where weft ctl looks (a shared temporary directory), to read what we send.
        raise ControlError(
            f"the control socket {shown} is served by {server}, neither you nor root:"
            " refusing to talk to it; point at your server's socket with --socket PATH"
        )
    return sock


def _owner(path: str) -> str:
    try:
        return f" (it belongs to uid {os.stat(path).st_uid})"
    except OSError:
        return ""


def request(
    path: str, command: str, args: Mapping[str, Any] | None = None, *, timeout: float = 30.0
) -> Any:
    """Send one command to the server at ``path``; its result, or ControlError."""
    began = time.monotonic()
    with connect(path, timeout) as sock:
        return exchange(sock, path, command, args, timeout, began)[0]


def exchange(
    sock: socket.socket,
    path: str,
    command: str,
    args: Mapping[str, Any] | None,
    timeout: float,
    began: float,
) -> tuple[Any, bytes]:
    """Send one command on ``sock``; its result, and what came after the answer's line.

    The answer must come within ``timeout`` seconds of ``began`` (monotonic);
    ControlError says in one line what went wrong.
    """
    message = {"command": command, "args": dict(args or {})}
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A server too busy to listen answers at once and closes: read why below.
            sock.sendall(json.dumps(message).encode() + b"\n")
        line, rest = _read_answer(sock, began + timeout)
    except TimeoutError:
        raise ControlError(f"no answer from {escape_for_log(path)} within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(
            f"the control connection to {escape_for_log(path)} failed: {exc}"
        ) from None
    return _result_of(path, line), rest


def _result_of(path: str, line: bytes) -> Any:
    """The result in the server's answer ``line``, or ControlError saying what went wrong."""
    shown = escape_for_log(path)
    if not line:
        raise ControlError(
            f"the server at {shown} closed the connection without answering (it was"
            " re-executing on USR2, or stopping: ask again; or another user's server"
            " refuses you: see its log)"
        )
    try:
        answer = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(
            f"the control socket {shown} answered {escape_for_log(line[:60].decode('latin-1'))}"
            "..., not as weft serve does: is it a weft control socket?"
        )
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer.get("result")


def _read_answer(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """The answer's line, read by ``deadline`` (TimeoutError past it), and what came after it.

    At most MAX_ANSWER bytes. A socket's timeout counts per read: one that drips a
    byte at a time, each within it, would otherwise hold weft ctl for ever.
    """
    data = bytearray()
    while b"\n" not in data and len(data) <= MAX_ANSWER:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed unread (refused): as an empty answer
            chunk = b""
        if not chunk:
            break
        data += chunk
    line, newline, rest = bytes(data).partition(b"\n")
    return line + newline, rest


def format_stacks() -> str:
    """Every thread's, greenlet's and suspended coroutine's stack, newest call last.

    As ``faulthandler`` shows threads, and more: on gevent, trio and asyncio a
    connection's task is a greenlet or a coroutine, which a thread dump does not show.
    Greenlets and coroutines are found by a walk of the garbage collector's objects
    (gevent's ``format_run_info`` does the same): fine for an operator's command.
    """
    import gc
    import traceback
    import types

    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {ident:#x} ({names.get(ident, '?')}):\n")
        parts.extend(traceback.format_stack(frame))
    greenlet = getattr(sys.modules.get("greenlet"), "greenlet", None)
    coroutines: list[types.CoroutineType[Any, Any, Any]] = []
    for obj in gc.get_objects():
        if isinstance(obj, types.CoroutineType):
            if obj.cr_frame is not None:
                coroutines.append(obj)
        elif greenlet is not None and isinstance(obj, greenlet):
            frame = obj.gr_frame  # None while it runs (a thread's frame shows it) or ended
            if frame is not None:
                name = getattr(obj, "name", None) or getattr(obj, "__name__", "greenlet")
                parts.append(f"Greenlet {id(obj):#x} ({name}):\n")
                parts.extend(traceback.format_stack(frame))
    awaited = {id(c.cr_await) for c in coroutines if c.cr_await is not None}
    for root in coroutines:
        if id(root) in awaited:
            continue  # shown inside the coroutine that awaits it
        frames = []
        current: Any = root
        while isinstance(current, types.CoroutineType) and current.cr_frame is not None:
            frames.append(current.cr_frame)
            current = current.cr_await
        parts.append(f"Coroutine {root.__qualname__}:\n")
        summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
        parts.extend(summary.format())
    return "".join(parts)


def timeout_seconds(value: Any, command: str) -> float | None:
    """A command's timeout: None (its default), or a finite number of seconds, 0 or more.

    NaN and infinity are no timeouts: a drain given NaN crashed the server's wait, and
    a negative one cut every connection at once.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"{command}'s timeout is a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ControlError(f"{command}'s timeout is a number of seconds, 0 or more, got {value!r}")
    if value > MAX_TIMEOUT:
        raise ControlError(
            f"{command}'s timeout is at most {MAX_TIMEOUT:g} seconds (a year), got {value!r}"
        )
    return float(value)
