"""What ``weft ctl`` commands do: in a process that serves, and in a supervisor.

Each command takes the request's args and the asking :class:`~._ctl.Peer` and returns
something JSON can carry. In one process (:func:`server_commands`) they act on the
Server; ``reload`` and ``workers +N`` are SIGHUP and SIGTTIN, the process becoming a
supervisor as it does on those signals; ``drain`` is a graceful stop with its own
deadline, through the serve loop. Under ``--workers`` (:func:`supervisor_commands`)
the supervisor acts on its own loop for ``reload``, ``workers`` and ``drain``, and fans
the rest out to each worker's own control socket (:func:`worker_socket_path`), summing
``status``. :func:`open_control` is how either opens its socket.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from ._connection import format_address
from ._ctl import (
    ANSWER_TIMEOUT,
    WORKER_SUFFIX,
    Command,
    Console,
    ControlError,
    ControlSocket,
    Peer,
    check_path_length,
    connect,
    format_stacks,
    request,
    timeout_seconds,
)
from ._ctl_console import serve_console
from ._engine import STOP_GRACE
from ._errors import BindError, ConfigError, WeftError
from ._logsafe import escape_for_log
from ._worker_link import sum_stats

if TYPE_CHECKING:
    from ._config import Config
    from ._control import ConnectionSnapshot
    from ._server import Server
    from ._workers import Supervisor

__all__ = [
    "InProcess",
    "connection_record",
    "open_control",
    "server_commands",
    "supervisor_commands",
    "worker_socket_path",
]

log = logging.getLogger("weft.ctl")

#: How long the supervisor waits for each worker's answer (asked all at once).
WORKER_TIMEOUT = 5.0
#: ``weft ctl close``'s default: the connection is interrupted after this many seconds.
CLOSE_TIMEOUT = 10.0
#: The most seconds ``weft ctl close`` takes: its answer comes once the connection has
#: ended, and a client is not kept waiting longer than an hour for it.
CLOSE_MAX = 3600.0
#: What the supervisor waits for a worker's close beyond its SECONDS and STOP_GRACE.
CLOSE_MARGIN = 5.0

#: ``drain(timeout)``: stop accepting, let connections finish within ``timeout``
#: (None: the configured graceful timeout), then exit.
Drain = Callable[[float | None], None]

#: What a supervisor asks its in-process server too, while it lasts: reading, and
#: ``close`` (routed to it). Not pause, resume, set or drain: it is draining already,
#: or about to.
IN_PROCESS_COMMANDS = ("status", "connections", "close")


@dataclass(frozen=True)
class InProcess:
    """A single ``weft serve`` turned supervisor (HUP, USR2, TTIN): its own server.

    That server serves until the first worker is ready, then drains its connections
    for up to the graceful timeout; meanwhile they are listed and closable with the
    workers', where they were invisible to ``weft ctl``.
    """

    #: The process's own command table (:func:`server_commands`).
    commands: Mapping[str, Command]
    #: True while it serves or drains.
    serving: Callable[[], bool]
    #: True once it drains (its answers say ``"leaving": true``).
    leaving: Callable[[], bool]


def close_wait(seconds: float) -> float:
    """How long a ``close`` given ``seconds`` may take to answer: they, the grace, a margin.

    The connection is interrupted after ``seconds`` and waited for ``STOP_GRACE``
    more; a supervisor forwarding it waited 30 s whatever the seconds, and gave up on
    a close still under way.
    """
    return seconds + STOP_GRACE + CLOSE_MARGIN


def _drain_answer(timeout: float | None, *, again: bool) -> str:
    """What ``drain`` answers: the first one, or one during a drain (``again``)."""
    if not again:
        shown = "the graceful timeout" if timeout is None else f"{timeout:g}s"
        return f"draining: no new connections; exiting when idle or after {shown}"
    if timeout is None:
        return "draining already: exiting when idle or at the deadline of the drain under way"
    return f"draining already: exiting when idle, or cutting what is left in at most {timeout:g}s"


def _stopping(command: str) -> ControlError:
    return ControlError(
        f"{command}: the server is stopping (a drain or a stop is under way); nothing changed"
    )


def connection_record(item: ConnectionSnapshot) -> dict[str, Any]:
    """One entry of ``Server.connections()`` as JSON can carry it."""
    record: dict[str, Any] = {
        "task_id": str(item.task_id),
        "peer": item.peer_str,
        "age": round(item.age, 3),
        "bytes_in": item.bytes_in,
        "bytes_out": item.bytes_out,
        "stop_requested": item.stop_requested,
    }
    if item.proxy_peer is not None:  # the proxy the connection came through
        record["proxy_peer"] = format_address(item.proxy_peer)
    if item.tls_version:
        record["tls_version"] = item.tls_version
    return record


def server_commands(server: Server, drain: Drain) -> dict[str, Command]:
    """The command table of a process serving ``server``."""

    def status(args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        stats = server.stats()
        return {
            "pid": os.getpid(),
            "manager": server.manager_name,
            "addresses": server.addresses,
            "running": server.running,
            "paused": server.paused,
            "max_connections": server.max_connections,
            "stats": stats,
            # As a supervisor answers: one path (.totals.active) reads either.
            "totals": {"workers": 0, "answered": 0, **stats},
        }

    def connections(args: Mapping[str, Any], peer: Peer) -> list[dict[str, Any]]:
        return [connection_record(item) for item in server.connections()]

    def accepting(command: str) -> None:
        """Refuse ``command`` once a drain or a stop has closed the listeners.

        Its answer said "paused", "accepting" or "max-connections N" while the
        server, stopping, did nothing of the kind (a resume cannot reopen them).
        """
        if not server.running or not server.sockets:
            raise _stopping(command)

    def pause(args: Mapping[str, Any], peer: Peer) -> str:
        accepting("pause")
        server.pause_accepting()
        return "paused: the listener stays bound; new clients wait in its backlog"

    def resume(args: Mapping[str, Any], peer: Peer) -> str:
        accepting("resume")
        server.resume_accepting()
        return "accepting"

    def set_(args: Mapping[str, Any], peer: Peer) -> str:
        accepting("set")
        name, value = args.get("name"), args.get("value")
        if name not in ("max-connections", "max_connections"):
            raise ControlError(f"cannot set {name!r}; settable while running: max-connections")
        if isinstance(value, str) and value.strip().lower() in ("none", "unlimited"):
            value = None  # refused by the server while running, with its reason
        elif isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ControlError(
                    f"max-connections takes a whole number, 1 or more, got {value!r}"
                ) from None
        try:
            server.max_connections = value
        except (ValueError, TypeError, WeftError) as exc:  # ServerError: None <-> N live
            raise ControlError(str(exc)) from None
        return f"max-connections {value}"

    def drain_(args: Mapping[str, Any], peer: Peer) -> str:
        timeout = timeout_seconds(args.get("timeout"), "drain")
        if not server.running:  # a stop (a signal, the shutdown port): as a supervisor says
            raise ControlError("the server is stopping already")
        if not server.sockets:
            # A drain is under way: one with an earlier deadline brings the cut
            # forward (the serve loop's); it answered "after 1s" and kept the first
            # drain's 30.
            drain(timeout)
            return _drain_answer(timeout, again=True)
        # The listeners close before the answer says so: the serve loop's own
        # stop_accepting() came a moment after it, and a client connecting on seeing
        # the answer was still accepted (then served: nothing was lost). The request
        # is made first: with nothing open the server ends as its listeners close,
        # and a serve loop woken by that before the request was made took the end
        # for a worker's retirement, and told systemd no STOPPING.
        drain(timeout)
        server.stop_accepting()
        return _drain_answer(timeout, again=False)

    def reload(args: Mapping[str, Any], peer: Peer) -> str:
        os.kill(os.getpid(), signal.SIGHUP)
        return "reloading (as SIGHUP)"

    def workers(args: Mapping[str, Any], peer: Peer) -> str:
        delta = _delta(args)
        if delta < 0:
            raise ControlError("one process is the fewest; start with --workers N to shrink")
        if delta > 1:
            # SIGTTIN makes one process the supervisor of two workers, whatever N.
            raise ControlError(
                f"workers +{delta}: one process first becomes the supervisor of two workers"
                " (weft ctl workers +1, as SIGTTIN); add more then"
            )
        os.kill(os.getpid(), signal.SIGTTIN)
        return "workers +1: this process becomes the supervisor of two workers (as SIGTTIN)"

    def close(args: Mapping[str, Any], peer: Peer) -> str:
        wanted, timeout = _close_args(args)
        worker = args.get("worker")
        if worker is not None and worker != os.getpid():
            # A PID:ID from another service's listing, or from before a restart:
            # the id alone closed whichever connection has it here now.
            raise ControlError(
                f"no worker {worker} here: this is one process, pid {os.getpid()}; see"
                " weft ctl connections"
            )
        for item in server.connections():
            if str(item.task_id) == wanted:
                try:
                    ended = server.close_connection(item.task_id, timeout)
                except LookupError:
                    break  # it ended meanwhile
                if ended:
                    return f"closed {wanted}"
                if not any(str(i.task_id) == wanted for i in server.connections()):
                    return f"closed {wanted} (interrupted after {timeout:g}s)"
                # Its task ignored the request and the interruption (a thread cannot
                # be killed): "closed (interrupted)" said so of a connection still listed.
                raise ControlError(
                    f"task {wanted} was asked to stop, then interrupted after {timeout:g}s,"
                    f" and still runs: its handler ignores both; its socket is shut down,"
                    " and it stays listed in weft ctl connections until it returns"
                )
        raise ControlError(f"no open connection has task id {wanted}; see weft ctl connections")

    def stacks(args: Mapping[str, Any], peer: Peer) -> str:
        return format_stacks()

    return {
        "close": close,
        "status": status,
        "connections": connections,
        "pause": pause,
        "resume": resume,
        "set": set_,
        "drain": drain_,
        "reload": reload,
        "workers": workers,
        "stacks": stacks,
    }


def _close_args(args: Mapping[str, Any]) -> tuple[str, float]:
    wanted, timeout = args.get("task_id"), args.get("timeout")
    if not isinstance(wanted, str) or not wanted:
        raise ControlError(f"close takes a task id (see weft ctl connections), got {wanted!r}")
    seconds = timeout_seconds(timeout, "close")
    if seconds is not None and seconds > CLOSE_MAX:
        raise ControlError(f"close's timeout is at most {CLOSE_MAX:g} seconds, got {timeout!r}")
    return wanted, CLOSE_TIMEOUT if seconds is None else seconds


def _delta(args: Mapping[str, Any]) -> int:
    delta = args.get("delta")
    if not isinstance(delta, int) or isinstance(delta, bool) or delta == 0:
        raise ControlError(f"workers takes +N or -N, got {delta!r}")
    return delta


def worker_socket_path(path: str, pid: int) -> str:
    """The control socket of worker ``pid`` of the supervisor listening at ``path``."""
    return f"{path}.worker-{pid}"


def supervisor_commands(
    supervisor: Supervisor, path: str, here: InProcess | None = None
) -> dict[str, Command]:
    """The command table of a supervisor of workers, whose socket is at ``path``.

    ``here``: the supervisor's own in-process server, asked as a worker of its own
    PID while it lasts (``IN_PROCESS_COMMANDS``).
    """

    def ask_here(command: str, args: Mapping[str, Any], peer: Peer) -> dict[str, Any] | None:
        if here is None or command not in IN_PROCESS_COMMANDS or not here.serving():
            return None
        answer: dict[str, Any] = {"pid": os.getpid()}
        try:
            answer["result"] = here.commands[command](args, peer)
        except ControlError as exc:
            answer["error"] = str(exc)
        if here.leaving():
            answer["leaving"] = True
        return answer

    def fan_out(
        command: str, args: Mapping[str, Any], peer: Peer | None = None
    ) -> list[dict[str, Any]]:
        mine = None if peer is None else ask_here(command, args, peer)
        pids = on_loop(supervisor.worker_pids)
        if not pids:
            if mine is not None:
                return [mine]
            raise ControlError("no worker is serving yet; try again in a moment")
        leaving = on_loop(supervisor.leaving_pids)

        def ask(pid: int) -> dict[str, Any]:
            try:
                result = request(
                    worker_socket_path(path, pid), command, args, timeout=WORKER_TIMEOUT
                )
            except ControlError as exc:
                # Leaving when the fan-out began (it may be reaped by now), or since.
                if pid in leaving or pid in on_loop(supervisor.leaving_pids):
                    # A reload's old worker, or one retired, that closed its socket
                    # as its drain ended: it is going, not failing ("no weft serve is
                    # running with the control socket ..." said otherwise).
                    return {"pid": pid, "leaving": True}
                return {"pid": pid, "error": str(exc)}
            return {"pid": pid, "result": result}

        with ThreadPoolExecutor(len(pids), thread_name_prefix="weft ctl fan-out") as pool:
            answers = list(pool.map(ask, pids))
        return answers if mine is None else [mine, *answers]

    def on_loop(fn: Callable[[], Any]) -> Any:
        try:
            return supervisor.call(fn)
        except (RuntimeError, TimeoutError) as exc:
            raise ControlError(str(exc)) from None

    def status(args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        answers = fan_out("status", args, peer)
        reported = {a["pid"]: a["result"]["stats"] for a in answers if "result" in a}
        answered = len(reported)
        # The in-process server's (a process turned supervisor), served or drained:
        # a stopped Server's stats() are its last run's.
        own = reported.pop(os.getpid(), None)
        if own is None and here is not None:
            own = here.commands["status"]({}, peer)["stats"]
        # What ended workers counted stays in the totals: they summed only the
        # workers answering now, and every recycle, reload or kill took its counts away.
        service = on_loop(lambda: supervisor.service_stats(reported))
        totals = sum_stats([service] if own is None else [service, own])
        return {
            "pid": os.getpid(),
            "workers": answers,
            "totals": {"workers": len(answers), "answered": answered, **totals},
        }

    def each(command: str) -> Command:
        def run(args: Mapping[str, Any], peer: Peer) -> list[dict[str, Any]]:
            if on_loop(lambda: supervisor.stopping):
                # Its workers drain or stop: each said "leaving", and weft ctl exit 0.
                raise _stopping(command)
            answers = fan_out(command, args)
            if all("result" not in answer for answer in answers) and any(
                "error" in answer for answer in answers
            ):
                # Nothing was done: a failure (weft ctl exits 1), as on one process.
                reasons = sorted({str(a["error"]) for a in answers if "error" in a})
                raise ControlError(f"every worker refused {command}: " + "; ".join(reasons))
            return answers

        return run

    def connections(args: Mapping[str, Any], peer: Peer) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for answer in fan_out("connections", args, peer):
            if "result" not in answer:  # an error, or a worker leaving
                out.append(answer)
            else:
                out.extend({"worker": answer["pid"], **item} for item in answer["result"])
        return out

    def drain(args: Mapping[str, Any], peer: Peer) -> str:
        timeout = timeout_seconds(args.get("timeout"), "drain")
        why = f"control: drain asked by {peer}"
        again = on_loop(lambda: supervisor.drain(timeout, why))
        return _drain_answer(timeout, again=again)

    def reload(args: Mapping[str, Any], peer: Peer) -> str:
        on_loop(lambda: supervisor.reload(f"control: reload asked by {peer}"))
        return "reloading: new workers start; the old ones drain once they are ready"

    def workers(args: Mapping[str, Any], peer: Peer) -> str:
        delta = _delta(args)
        if delta > 0:
            from ._workers import check_capacity  # loaded already: this is its supervisor

            try:
                check_capacity(delta)  # as --workers N is: a count the machine can hold
            except ConfigError as exc:
                raise ControlError(f"workers {delta:+d}: {exc.message}") from None
        count = on_loop(lambda: supervisor.resize(delta, f"control: workers {delta:+d}"))
        return f"workers {delta:+d}: {count} now"

    def close(args: Mapping[str, Any], peer: Peer) -> Any:
        wanted, timeout = _close_args(args)
        worker = args.get("worker")
        owners = [
            c["worker"]
            for c in connections({}, peer)
            if c.get("task_id") == wanted and worker in (None, c.get("worker"))
        ]
        if not owners:
            raise ControlError(
                f"no worker has an open connection with task id {wanted}; see weft ctl connections"
            )
        if len(owners) > 1:
            raise ControlError(
                f"task id {wanted} is open in workers {', '.join(map(str, owners))} (ids are"
                f" per worker): say which, as weft ctl close PID:{wanted}"
            )
        forwarded = {"task_id": wanted, "timeout": timeout}
        if here is not None and owners[0] == os.getpid():
            return here.commands["close"](forwarded, peer)
        return request(
            worker_socket_path(path, owners[0]), "close", forwarded, timeout=close_wait(timeout)
        )

    def stacks(args: Mapping[str, Any], peer: Peer) -> str:
        parts = [f"== supervisor {os.getpid()}\n{format_stacks()}"]
        for answer in fan_out("stacks", args):
            text = answer.get(
                "result",
                "(leaving)" if answer.get("leaving") else f"(no answer: {answer.get('error')})",
            )
            parts.append(f"== worker {answer['pid']}\n{text}")
        return "\n".join(parts)

    return {
        "close": close,
        "status": status,
        "connections": connections,
        "pause": each("pause"),
        "resume": each("resume"),
        "set": each("set"),
        "drain": drain,
        "reload": reload,
        "workers": workers,
        "stacks": stacks,
    }


def relay_console(supervisor: Supervisor, path: str) -> Console:
    """The supervisor's console: the same REPL, relayed to its first serving worker."""

    def console(conn: socket.socket, reader: BinaryIO, peer: Peer) -> None:
        pids = supervisor.call(supervisor.worker_pids)
        if not pids:
            conn.sendall(b"weft console: no worker is serving yet\n")
            return
        # A worker that does not answer (stopped, wedged) must not hold one of the
        # supervisor's control slots for ever: it has ANSWER_TIMEOUT to open its
        # console; from then on the console waits on its operator.
        try:
            target = connect(worker_socket_path(path, pids[0]), timeout=ANSWER_TIMEOUT)
        except ControlError as exc:  # no socket (it could not open one), or not its own
            conn.sendall(f"weft console: worker {pids[0]}: {exc}\n".encode())
            return
        with target:
            try:
                target.sendall(b'{"command": "console", "args": {}}\n')
                answer = _first_line(target, time.monotonic() + ANSWER_TIMEOUT)
            except TimeoutError:
                conn.sendall(
                    f"weft console: worker {pids[0]} did not answer within"
                    f" {ANSWER_TIMEOUT:g}s; try again, or look at it with weft ctl"
                    " stacks\n".encode()
                )
                return
            target.settimeout(None)
            if not json.loads(answer or b"{}").get("ok"):
                conn.sendall(b"weft console: the worker refused the console\n")
                return
            conn.sendall(f"weft console: in worker {pids[0]}\n".encode())
            _relay(reader, conn, target)

    return console


def _first_line(sock: socket.socket, deadline: float, limit: int = 4096) -> bytes:
    """The first line ``sock`` receives, and not a byte more (the rest is relayed as is).

    TimeoutError if it is not whole by ``deadline`` (``time.monotonic()``): a peer
    dripping a byte at a time cannot stretch it.
    """
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no whole line by the deadline")
        sock.settimeout(left)
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def _relay(reader: BinaryIO, conn: socket.socket, target: socket.socket) -> None:
    """Client input (``reader``, buffered on ``conn``) to ``target``, its output back."""

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while chunk := reader.read1(65536):  # type: ignore[attr-defined]
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)  # the console sees the end of its input

    threading.Thread(target=upstream, name="weft ctl console relay", daemon=True).start()
    with contextlib.suppress(OSError):
        while data := target.recv(65536):
            conn.sendall(data)


def open_control(
    config: Config,
    commands: Mapping[str, Command],
    *,
    namespace: Mapping[str, Any] | None = None,
    console: Console | None = None,
    worker: bool = False,
) -> ControlSocket | None:
    """Open (bind) the control socket ``config`` asks for; None if it is off.

    The caller starts it (:meth:`ControlSocket.start`) once the server listens.

    ``namespace``: what the console binds (``server``), if config allows it; or
    ``console``, a console of the caller's. A worker listens at its own path beside
    the supervisor's. If the socket cannot be made at the *default* path (another
    server answers there, which two servers of one user commonly do; another user
    squatted its directory in /tmp; the disk is full), this one logs a warning and
    goes without; at a configured path that is an error (BindError).
    """
    path = config.control_socket
    if path is None:
        return None
    if worker:
        path = worker_socket_path(path, os.getpid())
    else:  # its workers' sockets, if it ever has any, must fit beside it
        check_path_length(path, WORKER_SUFFIX)
    if config.console and console is None and namespace is not None:
        # Read as each console opens (a copy each): the caller may fill it in after
        # this opens the socket (the server is made once the user has switched).
        names = namespace

        def console(conn: socket.socket, reader: BinaryIO, peer: Peer) -> str:
            return serve_console(conn, reader, names)

    control = ControlSocket(path, commands, console=console if config.console else None)
    try:
        control.open()
    except BindError as exc:
        if worker:
            # A worker serves without one (the supervisor's fan-out lists it with the
            # error), where it exited 1 and was restarted for ever: a directory full
            # or removed by a cleaner meant no new worker, and a reload never ended.
            log.warning("this worker serves without a control socket: %s", exc)
            return None
        explicit = config.values.get("control_socket") is not None
        if explicit:
            raise
        # The default path is in a shared place (/tmp without XDG_RUNTIME_DIR) that
        # another user can squat, or another server of this user's holds: the server
        # starts without the socket it did not ask for, where it exited 1.
        if exc.errno == errno.EADDRINUSE:
            log.warning(
                "another weft serve answers on the default control socket %s: this one"
                " has none (give it its own with control_socket)",
                escape_for_log(path),
            )
        else:
            log.warning("this server has no control socket: %s (weft ctl cannot reach it)", exc)
        return None
    return control
