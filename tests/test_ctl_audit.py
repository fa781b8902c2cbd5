"""Live control as an outside audit of `weft ctl` found it wanting (issue 16's audit).

One test per finding, each naming the promise and what broke: totals that went back
under --workers, an operator's close blamed on the peer, a lowered limit that let
one more in, a second drain's deadline answered and not kept, answers of success
while the server stopped, a console whose end went unlogged, a PID:ID whose PID was
ignored, "closed" said of a connection still running, and the command line's rough
edges. Real sockets on loopback, real `weft serve` processes where the finding is
about them; every wait is bounded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _every_manager import greeter
from _serving import LISTENING, Client, Served, environment, handler_for, host_port, weft_serve

from weft_core import Server, _registry, available_managers, hookimpl
from weft_core._ctl import ControlError, ControlSocket, request
from weft_core._ctl_commands import server_commands
from weft_core._ctl_console import serve_console
from weft_core._engine import STOP_GRACE

pytestmark = pytest.mark.timeout(90)

#: Generous bound for anything that should happen "at once".
WAIT = 5.0
ALL_MANAGERS = ("asyncio", "gevent", "threads", "trio")


def need(manager: str) -> None:
    if manager not in available_managers():
        pytest.skip(f"the {manager} manager is not installed")


def ctl(path: Path | str, *args: str, **run: Any) -> subprocess.CompletedProcess[str]:
    """``weft ctl --socket PATH ARGS``, as an operator runs it."""
    run.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-m", "weft_core", "ctl", "--socket", str(path), *args],
        stderr=subprocess.PIPE, text=True, timeout=60, env=environment(),
        stdin=subprocess.DEVNULL, **run,
    )  # fmt: skip


def serve(tmp_path: Path, control: Path, manager: str, *extra: str) -> Served:
    need(manager)
    return Served(
        weft_serve(handler_for(manager), "--manager", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", str(control), "--graceful-timeout", "30", *extra),
        cwd=tmp_path,
    )  # fmt: skip


def totals(control: Path) -> dict[str, Any]:
    done = ctl(control, "status")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)["totals"]
    return result


def holding(address: tuple[str, int]) -> Client:
    """A client of the test handler that holds its connection open."""
    client = Client(address)
    client.sock.sendall(b"hold\n")
    assert client.line() == b"holding"
    return client


def until(predicate: Callable[[], object], what: str, wait: float = WAIT) -> None:
    deadline = time.monotonic() + wait
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """A threads Server with a control socket in this process, and the socket's path."""
    server = Server(echo, manager="threads")
    server.run()
    path = str(tmp_path / "ctl.sock")
    control = ControlSocket(
        path,
        server_commands(server, lambda timeout: None),
        console=lambda conn, reader, peer: serve_console(conn, reader, {"server": server}),
    )
    control.open()
    control.start()
    try:
        yield server, path
    finally:
        control.close()
        server.stop(timeout=5)


# -- F1: the totals of a service never go back ----------------------------------------------


def served_by_recycled_workers(served: Served, clients: int) -> tuple[str, int]:
    """``clients`` echoes, one at a time, under ``--max-requests 1``; once each one's
    worker has exited (recycled), the address served. A few clients may come on top of
    max_requests, so a worker is waited for once, whatever it served."""
    (match,) = served.wait_for(LISTENING)
    address = host_port(match.group(1))
    pids = set()
    for _ in range(clients):
        with Client(address) as client:
            assert client.echo(b"x") == b"x"
            pids.add(client.pid)
    for pid in pids:
        served.wait_for(rf"worker {pid} exited")
    return address


def test_totals_under_workers_keep_what_ended_workers_counted(tmp_path: Path) -> None:
    """`weft ctl status`'s totals keep what recycled and killed workers counted.

    Promised: the totals are the service's counters (docs/deployment.md), which never
    go back (as docs/hooks.md says of the metrics). They summed only the workers
    answering now: after 3 clients, each on a worker recycled by max_requests, they
    said 0 accepted; a worker killed took its counts with it.
    """
    control = tmp_path / "ctl.sock"
    with serve(tmp_path, control, "threads", "--workers", "1", "--max-requests", "1") as served:
        address = served_by_recycled_workers(served, 3)
        assert totals(control)["accepted"] == 3, "what the recycled workers counted"
        with holding(address) as held:
            before = totals(control)
            assert before["accepted"] == 4 and before["active"] == 1, before
            os.kill(held.pid, signal.SIGKILL)
            served.wait_for(rf"worker {held.pid} exited")
        after = totals(control)
        assert after["accepted"] >= before["accepted"], (before, after)
        assert after["active"] == 0, after


def test_totals_are_kept_across_a_usr2_re_exec(tmp_path: Path) -> None:
    """The re-executed supervisor starts from what the image before it counted.

    They started again at 0: the ended workers' counts were the old image's alone.
    The image before now hands them on with its workers, each with its last stats.
    """
    control = tmp_path / "ctl.sock"
    with serve(tmp_path, control, "threads", "--workers", "1", "--max-requests", "1") as served:
        address = served_by_recycled_workers(served, 2)
        before = totals(control)
        assert before["accepted"] == 2, before
        served.signal(signal.SIGUSR2)
        served.wait_for(r"re-executed \(pid \d+\)")
        after = totals(control)
        assert after["accepted"] == 2, (before, after)
        assert after["bytes_in"] == before["bytes_in"], (before, after)
        with Client(address) as client:
            assert client.echo(b"x") == b"x"
        until(lambda: totals(control)["accepted"] == 3, "the new client counted")


# -- F2: a close during the preamble is the server's doing ----------------------------------


class ClosedHow:
    """A plugin recording how each connection ended and each refusal's reason."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.refused: list[str] = []
        self.ended = threading.Event()

    @hookimpl
    def weft_connection_closed(self, server: Server, connection: Any, duration: float,
                               bytes_in: Any, bytes_out: Any, how: str) -> None:  # fmt: skip
        self.closed.append(how)
        self.ended.set()

    @hookimpl
    def weft_connection_refused(self, server: Server, peer: str, reason: str) -> None:
        self.refused.append(reason)


@pytest.fixture
def closed_how() -> Iterator[ClosedHow]:
    plugin = ClosedHow()
    name = _registry.register(plugin, name="test-ctl-audit-closed-how")
    try:
        yield plugin
    finally:
        _registry.unregister(name=name)


@pytest.mark.parametrize("manager", ["threads", "trio"])
@pytest.mark.parametrize("preamble", ["tls", "proxy"])
def test_closing_a_connection_in_its_preamble_is_not_the_peers_failure(
    tmp_path: Path,
    closed_how: ClosedHow,
    caplog: pytest.LogCaptureFixture,
    manager: str,
    preamble: str,
) -> None:
    """close_connection() of a client still in its TLS handshake or PROXY header.

    Promised: close_connection is "the stop's phases for one connection"
    (docs/api.md), and a stop does not count, log or report such a connection as the
    peer's failure. The close was counted in tls_errors (proxy_errors), logged as a
    WARNING blaming the peer and reported to the hooks as a refusal.
    """
    need(manager)
    if preamble == "tls":
        from _serving import server_certs

        pems = server_certs(tmp_path)
        options: dict[str, Any] = {"tls": {"certfile": pems["cert"], "keyfile": pems["key"]}}
    else:
        options = {"proxy_protocol": True}
    server = Server(greeter(manager), manager=manager, **options)
    server.run()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT):
            until(server.connections, "the silent client is listed")
            [item] = server.connections()
            with caplog.at_level(logging.INFO, logger="weft"):
                server.close_connection(item.task_id, 1.0)
                assert closed_how.ended.wait(WAIT)
        stats = server.stats()
    finally:
        server.stop(timeout=1)
    assert (stats["tls_errors"], stats["proxy_errors"]) == (0, 0), stats
    assert closed_how.closed == ["stopped"] and closed_how.refused == [], (
        closed_how.closed,
        closed_how.refused,
    )
    blamed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert blamed == [], blamed


# -- F3: a lowered limit holds at once with on_full="backlog" ------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", ALL_MANAGERS)
def test_a_lowered_limit_admits_nobody_more_with_on_full_backlog(manager: str) -> None:
    """2 open at limit 3, the limit lowered to 1: a new client waits until both have ended.

    Promised: max_connections "effective at once; lowering it cuts nobody, new
    clients wait" (docs/api.md). With on_full="backlog" the acceptor waits in
    accept() holding a slot taken before it, which the lowering could not take
    back: the next client was served on it, 3 open at limit 1.
    """
    need(manager)
    server = Server(greeter(manager), manager=manager, max_connections=3, on_full="backlog")
    server.run()
    clients = []
    try:
        for _ in range(2):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=WAIT))
            assert clients[-1].recv(1) == b"+"
        server.max_connections = 1
        with socket.create_connection(("127.0.0.1", server.port), timeout=1.0) as late:
            with pytest.raises(TimeoutError):
                got = late.recv(1)
                pytest.fail(f"served at once though 2 are open at limit 1 (got {got!r})")
            assert server.stats()["active"] == 2
            clients.pop().close()
            with pytest.raises(TimeoutError):
                late.recv(1)  # 1 open at limit 1: still full
            clients.pop().close()
            late.settimeout(WAIT)
            assert late.recv(1) == b"+", "served once there is room"
    finally:
        for client in clients:
            client.close()
        server.stop(timeout=1)


# -- F4 and F6: a second drain, and controls during a drain ----------------------------------


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_later_drain_with_an_earlier_deadline_brings_the_end_forward(
    tmp_path: Path, workers: str | None
) -> None:
    """`drain 30`, then `drain 1`: the process exits about 1 s later, not 30.

    Promised: `weft ctl drain SECONDS` cuts what is left after SECONDS
    (docs/deployment.md). One process answered "after 1s" and kept the first
    drain's 30; --workers refused the second ("stopping already"). Meanwhile pause,
    resume and set answer that the server is stopping, exit 1: they answered
    "paused", "accepting" and "max-connections 3", exit 0, doing nothing of it.
    """
    control = tmp_path / "ctl.sock"
    extra = () if workers is None else ("--workers", workers)
    with serve(tmp_path, control, "threads", *extra) as served:
        (match,) = served.wait_for(LISTENING)
        if workers is not None:
            served.wait_for(r"worker ready on", count=int(workers))
        with holding(host_port(match.group(1))):
            first = ctl(control, "drain", "30")
            assert first.returncode == 0, first.stderr
            for command in (("pause",), ("resume",), ("set", "max-connections", "3")):
                done = ctl(control, *command)
                assert done.returncode == 1, f"{command}: {done.stdout!r} {done.stderr!r}"
                assert "stopping" in done.stderr and done.stderr.count("\n") == 1, done.stderr
            began = time.monotonic()
            second = ctl(control, "drain", "1")
            assert second.returncode == 0, second.stderr
            assert "1s" in second.stdout, second.stdout
            served.finish(timeout=1 + STOP_GRACE + 10)
            took = time.monotonic() - began
        assert took < 15, f"exited {took:.1f}s after `drain 1`, the first drain's 30 kept"


# -- F5: weft ctl close waits for the SECONDS it asked for ---------------------------------


def test_close_waits_for_its_seconds_and_refuses_too_many(tmp_path: Path) -> None:
    """`weft ctl close ID SECONDS` waits SECONDS and the grace; SECONDS has a bound.

    Promised: the close interrupts the connection SECONDS after its input ended
    (docs/deployment.md) and says how it went. weft ctl and the supervisor's
    forward gave up after 30 s whatever SECONDS, exit 1 "no answer", while the
    close went on; SECONDS up to a year were taken.
    """
    from weft_core._ctl_cli import ANSWER_WAIT, answer_wait
    from weft_core._ctl_commands import close_wait

    assert answer_wait("close", {"task_id": "1", "timeout": 100.0}) >= 100 + STOP_GRACE
    assert close_wait(100.0) >= 100 + STOP_GRACE
    assert answer_wait("close", {"task_id": "1"}) >= ANSWER_WAIT
    done = ctl(tmp_path / "none.sock", "close", "3", "86400")
    assert done.returncode == 2 and "at most" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


# -- F6: controls while stopping, one process in-process -----------------------------------


def test_pause_resume_and_set_after_stop_accepting_say_it_is_stopping(
    served: tuple[Server, str],
) -> None:
    """As a drain leaves the server: pause, resume and set are refused, saying why."""
    server, path = served
    server.stop_accepting()
    for command, args in (("pause", {}), ("resume", {}), ("set", {"name": "max-connections",
                                                                   "value": "2"})):  # fmt: skip
        with pytest.raises(ControlError, match="stopping"):
            request(path, command, args)


# -- F7: the console's end is logged, and exit() ends only the console ---------------------


#: SO_LINGER on, 0 seconds: close() resets the connection, as a killed client's does.
RESET_ON_CLOSE = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def console_session(path: str, lines: bytes, *, vanish: bool = False) -> bytes:
    """Run ``lines`` in the console at ``path``; what came back (nothing if ``vanish``)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(path)
        sock.sendall(b'{"command": "console", "args": {}}\n' + lines)
        if vanish:
            sock.recv(65536)  # the answer and the banner: it runs
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            return b""
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    ("code", "how"),
    [
        (b"raise SystemExit(3)\n", "SystemExit(3)"),
        (b"exit()\n", "SystemExit()"),
        (b"quit(0)\n", "SystemExit(0)"),
    ],
)
def test_the_console_ended_by_its_code_says_so_and_leaves_stdin_open(
    served: tuple[Server, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    code: bytes,
    how: str,
) -> None:
    """exit(), quit() and SystemExit end the console, told and logged; sys.stdin stays.

    Promised: the console's opening and end are logged (docs/deployment.md).
    SystemExit ended the request's thread silently, nothing logged, the rest of
    the input dropped without a word; site's exit() closed the server's sys.stdin.
    """
    _, path = served
    stdin = io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    with caplog.at_level(logging.WARNING, logger="weft.ctl"):
        out = console_session(path, code + b"print('not run')\n")
        until(lambda: "console closed" in caplog.text, "the console's end is logged")
    assert f"ended by {how}".encode() in out, out
    assert b"not run" not in out
    assert f"ended by {how}" in caplog.text, caplog.text
    assert not stdin.closed, "the server's own stdin was closed"


def test_a_console_whose_client_vanishes_is_logged_as_ended(
    served: tuple[Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A client killed mid-statement: the console's end is still logged (it was not)."""
    _, path = served
    with caplog.at_level(logging.WARNING, logger="weft.ctl"):
        console_session(path, b"import time; time.sleep(0.3); print('x' * 100000)\n", vanish=True)
        until(lambda: "console closed" in caplog.text, "the console's end is logged")
    assert "went away" in caplog.text, caplog.text


# -- F8 and F9: close -------------------------------------------------------------------------


def test_close_with_a_pid_that_is_not_this_process_is_refused(
    served: tuple[Server, str],
) -> None:
    """On one process, `close PID:ID` with another PID closes nothing (it ignored the PID).

    Promised: PID:ID names the worker (docs/deployment.md); under --workers an
    unknown PID is refused. A stale or foreign PID:ID closed whichever connection
    had that id here.
    """
    server, path = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
        until(server.connections, "the client is listed")
        [item] = server.connections()
        with pytest.raises(ControlError, match="one process"):
            request(path, "close", {"task_id": str(item.task_id), "worker": os.getpid() + 1})
        client.sendall(b"x")
        assert client.recv(1) == b"x", "the connection is still served"


def test_close_of_a_task_that_ignores_it_does_not_say_closed(tmp_path: Path) -> None:
    """A handler deaf to the stop: `close` says it still runs, not "closed (interrupted)".

    Its socket is shut down, but its task (a thread, which nothing can kill) runs
    on and stays listed; weft ctl said "closed 2 (interrupted)", exit 0.
    """
    release = threading.Event()

    def deaf(conn: socket.socket) -> None:
        conn.sendall(b"+")
        release.wait(60)

    server = Server(deaf, manager="threads")
    server.run()
    path = str(tmp_path / "ctl.sock")
    control = ControlSocket(path, server_commands(server, lambda timeout: None))
    control.open()
    control.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
            assert client.recv(1) == b"+"
            [item] = server.connections()
            with pytest.raises(ControlError, match="still runs"):
                request(path, "close", {"task_id": str(item.task_id), "timeout": 0})
            assert server.connections(), "the task runs on, listed"
    finally:
        release.set()
        control.close()
        server.stop(timeout=5)


# -- F10: the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--socket", "", "status"), "empty"),
        (("--socket", "/tmp/" + "x" * 120, "status"), "too long"),
        (("close", "12:"), "PID:TASK_ID"),
        (("close", ":12"), "PID:TASK_ID"),
        (("close",), "[PID:]TASK_ID"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    """A wrong command line exits 2 in one line (docs/deployment.md).

    An empty --socket fell back to the default path; a path too long for a Unix
    socket exited 1; `close 12:` reached the server and exited 1; the close usage
    did not show [PID:].
    """
    command = [sys.executable, "-m", "weft_core", "ctl", *args]
    if "--socket" not in args:
        command[4:4] = ["--socket", str(tmp_path / "ctl.sock")]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=environment(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert said in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_an_answer_that_cannot_be_written_is_one_line_not_a_traceback(
    served: tuple[Server, str],
) -> None:
    """`weft ctl status > /dev/full`: one line and exit 1 (it printed a traceback)."""
    _, path = served
    with open("/dev/full", "w") as full:
        done = ctl(path, "status", stdout=full)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
