"""Faults and bad input that every installed manager survives, with nothing lost.

One test per case of docs/reliability.md, each run against every installed manager
(handlers are written once as bodies, see ``_fault_handlers.py``). Everything is on
loopback, bounded in count and time, and waits on events or log lines with a
timeout. Servers run in this process, except where the case is about ``weft serve``
itself (signals, exit status), which runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _fault_handlers import (
    Boom,
    Gauge,
    Misbehaviour,
    big_reply,
    counted_echo,
    echo,
    expected_reply,
    handler,
    misbehave,
)
from _fault_support import Readers, WeftServe, closed_without_data, reset

from weft_core import (
    ManagerSpec,
    PluginError,
    Server,
    ServerError,
    _registry,
    available_managers,
    hookimpl,
)
from weft_core._acceptpolicy import BACKOFF_MAX, AcceptAction, Backoff, classify_accept_error
from weft_core.testing import Body
from weft_core.testing._support import (
    WAIT,
    connect,
    fd_count,
    recv_exactly,
    recv_until_closed,
    wait_until,
)

MANAGERS = sorted(available_managers())

#: Timing tolerance for "about N seconds": generous enough for a loaded 2-core CI box.
SLACK = 0.5

Serve = Callable[..., Server]


@pytest.fixture(params=MANAGERS)
def manager(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def serve(manager: str) -> Iterator[Serve]:
    """``serve(body, **kw)``: a running Server on ``manager`` whose handler runs ``body``."""
    servers: list[Server] = []

    def make(body: Callable[..., Body], *, start: bool = True, **kw: Any) -> Server:
        server = Server(handler(body, manager), manager=manager, **kw)
        servers.append(server)
        if start:
            server.run()
        return server

    yield make
    for server in servers:
        server.stop(timeout=1)


@pytest.fixture
def weft_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[logging.LogRecord]]:
    """The records weft has logged so far (INFO and up)."""
    caplog.set_level(logging.INFO, logger="weft")
    return lambda: [r for r in caplog.records if r.name.startswith("weft")]


def handler_kind(manager: str) -> str:
    return available_managers()[manager].handler_kind


# -- 2. accept errors by kind ---------------------------------------------------------

ACCEPT_ERRORS = {
    AcceptAction.SKIP: [
        "ECONNABORTED", "EPERM", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
        "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ECONNRESET",
    ],
    AcceptAction.BACKOFF: ["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"],
    AcceptAction.FATAL: ["EBADF", "EINVAL", "ENOTSOCK", "EFAULT"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "action"),
    [(name, action) for action, names in ACCEPT_ERRORS.items() for name in names],
)
def test_accept_error_policy_by_errno(name: str, action: AcceptAction) -> None:
    """The peer's errors are skipped, capacity errors backed off, a broken listener fatal."""
    code = getattr(errno, name)
    assert classify_accept_error(OSError(code, name)) is action


def test_accept_error_without_errno_is_fatal() -> None:
    assert classify_accept_error(OSError("no errno")) is AcceptAction.FATAL


def test_backoff_doubles_to_its_ceiling_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.next() for _ in range(10)]
    assert delays[:3] == [0.01, 0.02, 0.04]
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX
    backoff.reset()
    assert backoff.next() == 0.01


def break_listener(server: Server) -> int:
    """Put /dev/null over the listening descriptor (accept: ENOTSOCK); a duplicate is returned.

    The duplicate keeps the socket itself alive, so epoll-based runtimes are still
    woken by a client and call accept() on the descriptor (see _fault_sabotage.py).
    """
    fd = server.socket.fileno()
    keep = os.dup(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)
    return keep


@pytest.mark.timeout(60)
def test_broken_listener_stops_the_server_with_an_error(manager: str, serve: Serve) -> None:
    """A fatal accept error (ENOTSOCK): the server stops itself; serve_forever raises a ServerError."""
    before = fd_count()
    server = serve(echo, start=False)
    raised: list[BaseException] = []

    def serve_forever() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            raised.append(exc)

    runner = threading.Thread(target=serve_forever)
    runner.start()
    wait_until(lambda: server.running, what="the server to run")
    port = server.port
    keep = break_listener(server)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            runner.join(WAIT)
    finally:
        os.close(keep)
    assert not runner.is_alive(), "serve_forever() returned"
    assert server.stopped and server.socket is None
    error = server.error
    assert isinstance(error, ServerError)
    assert f"127.0.0.1:{port}" in str(error), "the error names the address"
    assert f"[Errno {errno.ENOTSOCK}]" in str(error)
    assert raised == [error], "serve_forever() raises the error"
    wait_until(lambda: fd_count() <= before, what=f"fd count back to {before}")


@pytest.mark.timeout(60)
def test_weft_serve_exits_1_when_its_listener_breaks(manager: str, tmp_path: Path) -> None:
    """`weft serve` whose listener breaks exits 1 with one line naming the address."""
    target = "_fault_sabotage:" + ("echo_async" if handler_kind(manager) == "async" else "echo")
    proc = WeftServe(target, "--manager", manager, "--bind", "127.0.0.1:0", cwd=tmp_path)
    try:
        port = proc.port()
        assert proc.exit_code() == 1
    finally:
        proc.close()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"weft: server stopped: accepting on 127.0.0.1:{port} failed"), last
    assert "Traceback" not in proc.stderr


# -- 3. at the limit ---------------------------------------------------------------------

LIMIT = 10


def hold(port: int, n: int) -> list[socket.socket]:
    """``n`` clients, each greeted (so each has a handler running)."""
    clients = [connect(port) for _ in range(n)]
    for client in clients:
        assert recv_exactly(client, 1) == b"+"
    return clients


@pytest.mark.timeout(60)
def test_at_the_limit_refuse(serve: Serve) -> None:
    """max_connections=10, 11 clients: never more than 10 handlers; the 11th is closed at once, counted."""
    gauge = Gauge()
    server = serve(counted_echo, args=(gauge,), max_connections=LIMIT)
    held = hold(server.port, LIMIT)
    try:
        started = time.monotonic()
        with connect(server.port) as eleventh:
            assert closed_without_data(eleventh)
        assert time.monotonic() - started < SLACK, "refused at once"
        assert server.stats()["refused"] == 1
        assert gauge.peak == LIMIT
    finally:
        for client in held:
            client.close()


@pytest.mark.timeout(60)
def test_at_the_limit_backlog(serve: Serve) -> None:
    """on_full="backlog": the 11th waits in the queue and is served once a slot frees."""
    gauge = Gauge()
    server = serve(counted_echo, args=(gauge,), max_connections=LIMIT, on_full="backlog")
    held = hold(server.port, LIMIT)
    try:
        with connect(server.port) as eleventh:
            held.pop().close()
            assert recv_exactly(eleventh, 1) == b"+"
            eleventh.sendall(b"ok")
            assert recv_exactly(eleventh, 2) == b"ok"
        assert gauge.peak == LIMIT
        assert server.stats()["refused"] == 0
    finally:
        for client in held:
            client.close()


@pytest.mark.timeout(60)
def test_at_the_limit_full_wait(serve: Serve) -> None:
    """full_wait: with no slot coming free the 11th is refused after waiting about full_wait."""
    full_wait = 0.5
    gauge = Gauge()
    server = serve(counted_echo, args=(gauge,), max_connections=LIMIT, full_wait=full_wait)
    held = hold(server.port, LIMIT)
    try:
        started = time.monotonic()
        with connect(server.port) as eleventh:
            assert closed_without_data(eleventh)
        waited = time.monotonic() - started
        assert full_wait * 0.9 <= waited < full_wait + SLACK, waited
        assert server.stats()["refused"] == 1
        assert gauge.peak == LIMIT
    finally:
        for client in held:
            client.close()


# -- 4. graceful drain --------------------------------------------------------------------

DRAIN_CLIENTS = 50
DRAIN_GRACE = 6.0


@pytest.mark.timeout(90)
def test_sigterm_drains_every_exchange(manager: str, tmp_path: Path) -> None:
    """SIGTERM mid-way through 50 two-second replies: each completes, new clients are refused, exit 0."""
    proc = WeftServe(
        f"_fault_handlers:slow_reply_{manager}",
        *("--manager", manager, "--bind", "127.0.0.1:0"),
        *("--graceful-timeout", str(DRAIN_GRACE)),
        cwd=tmp_path,
    )
    readers: Readers | None = None
    try:
        port = proc.port()
        clients = [connect(port) for _ in range(DRAIN_CLIENTS)]
        requests = {c: b"client %02d\n" % i for i, c in enumerate(clients)}
        for client, request in requests.items():
            client.sendall(request)
        readers = Readers(clients)
        readers.pump(lambda: all(readers.data.values()))  # every reply under way
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait_for("received SIGTERM: stopping")
        # New clients: refused while replies are still under way. A client caught between
        # the signal and the listener's close is in flight like the others: served in
        # full, or closed unserved, never cut short.
        late: list[socket.socket] = []
        try:
            while True:
                try:
                    client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
                except ConnectionRefusedError:
                    break
                except ConnectionResetError:
                    pass  # caught in the listen queue as the listener closed
                else:
                    late.append(client)
                    # Sent as any client would. Should the kernel lose the handshake's
                    # last ACK as the listener closes, it drops the half-open connection
                    # silently, and only data sent draws the reset that tells the client.
                    with contextlib.suppress(ConnectionError):
                        client.sendall(b"late %02d\n" % len(late))
                readers.poll(0.01)  # paces the attempts, and sees the drain end
                assert len(readers.closed) < len(clients), "still accepting after the drain"
            for i, client in enumerate(late, 1):
                got = recv_until_closed(client)
                assert got in (b"", expected_reply(b"late %02d\n" % i)), (
                    f"late client {i}: {got!r}"
                )
        finally:
            for client in late:
                client.close()
        readers.until_closed()
        assert proc.exit_code() == 0, proc.stderr
        took = time.monotonic() - signalled
        for client, request in requests.items():
            assert bytes(readers.data[client]) == expected_reply(request), request
        assert not readers.resets
    finally:
        if readers is not None:
            readers.close()
        proc.close()
    assert took < DRAIN_GRACE, f"the drain took {took:.2f}s"
    assert "cut off" not in proc.stderr and "Traceback" not in proc.stderr


# -- 5. drain deadline ------------------------------------------------------------------------

STUBBORN_CLIENTS = 5


@pytest.mark.timeout(60)
def test_graceful_timeout_cuts_off_stubborn_handlers(manager: str, tmp_path: Path) -> None:
    """--graceful-timeout 1 with handlers ignoring shutdown: cut off at ~1 s, counted in the log, exit 0."""
    proc = WeftServe(
        f"_fault_handlers:stubborn_{manager}",
        *("--manager", manager, "--bind", "127.0.0.1:0", "--graceful-timeout", "1"),
        cwd=tmp_path,
    )
    readers: Readers | None = None
    try:
        port = proc.port()
        clients = [connect(port) for _ in range(STUBBORN_CLIENTS)]
        readers = Readers(clients)
        readers.pump(lambda: all(readers.data.values()))
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        readers.until_closed()
        cut = time.monotonic() - signalled
        assert proc.exit_code() == 0, proc.stderr
        took = time.monotonic() - signalled
    finally:
        if readers is not None:
            readers.close()
        proc.close()
    assert 1.0 <= cut < 1.0 + SLACK * 2, f"cut off after {cut:.2f}s"
    assert took < 1.0 + SLACK * 3, f"exited {took:.2f}s after SIGTERM"
    match = re.search(r"(\d+) connection\(s\) still open after the graceful timeout", proc.stderr)
    assert match and int(match.group(1)) == STUBBORN_CLIENTS, proc.stderr
    assert "had to be cut off" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- 6. handler misbehaviour ----------------------------------------------------------------

MISBEHAVING_CONNECTIONS = 1_000
BATCH = 25


@pytest.mark.timeout(90)
def test_misbehaving_handlers_leak_nothing(serve: Serve, weft_log: Any) -> None:
    """Handlers that raise, never close, or return at once: each connection closed, one log per error, no fd leak."""
    plan = Misbehaviour()
    server = serve(misbehave, args=(plan,))
    outcomes: dict[bytes, int] = {}

    def round_of(n: int) -> None:
        clients = [connect(server.port) for _ in range(n)]
        for client in clients:
            got = recv_until_closed(client)  # the framework closed it: EOF
            outcomes[got] = outcomes.get(got, 0) + 1
            client.close()

    round_of(BATCH)  # warm-up: the runtime's own descriptors exist from here on
    wait_until(lambda: server.stats()["active"] == 0, what="warm-up connections to end")
    before = fd_count()
    for _ in range((MISBEHAVING_CONNECTIONS - BATCH) // BATCH):
        round_of(BATCH)
    wait_until(lambda: server.stats()["active"] == 0, what="every connection to end")
    wait_until(lambda: fd_count() <= before, what=f"fd count back to {before} ({fd_count()})")
    assert sum(outcomes.values()) == MISBEHAVING_CONNECTIONS
    assert set(outcomes) == {b"r", b"o", b""}, outcomes
    raised = outcomes[b"r"]
    errors = [r for r in weft_log() if r.levelno >= logging.ERROR]
    assert len(errors) == raised, "one log record per error"
    assert all(r.exc_info and isinstance(r.exc_info[1], Boom) for r in errors)
    stats = server.stats()
    assert stats["handler_errors"] == raised
    assert stats["accepted"] == MISBEHAVING_CONNECTIONS


# -- 7. peers that misbehave ------------------------------------------------------------------


def assert_no_tracebacks(records: list[logging.LogRecord]) -> None:
    tracebacks = [f"{r.levelname} {r.getMessage()}" for r in records if r.exc_info]
    assert tracebacks == [], "a peer's misbehaviour is not the server's error"


def settled(server: Server, accepted: int) -> None:
    """Wait until ``accepted`` connections were taken and every handler has ended."""

    def done() -> bool:
        stats = server.stats()
        return stats["accepted"] >= accepted and stats["active"] == 0

    wait_until(done, what=f"{accepted} connections to be accepted and ended")


def served(port: int) -> None:
    with connect(port) as client:
        client.sendall(b"still here\n")
        assert recv_exactly(client, 11) == b"still here\n"


@pytest.mark.timeout(60)
def test_peer_resets_mid_reply(serve: Serve, weft_log: Any) -> None:
    """Clients that reset while the reply streams: no traceback, not a handler error, next client served."""
    # The reply is far more than the socket buffers hold (the client's receive buffer
    # is kept small, the server's send buffer grows to 4 MiB at most): the handler is
    # still sending when the reset comes, never done before it.
    server = serve(big_reply, args=(64 << 20,))
    for _ in range(5):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.settimeout(WAIT)
        client.connect(("127.0.0.1", server.port))
        client.sendall(b"go\n")
        assert recv_exactly(client, 65536)
        reset(client)
    settled(server, 5)
    assert_no_tracebacks(weft_log())
    stats = server.stats()
    assert stats["handler_errors"] == 0 and stats["peer_errors"] == 5
    echo_server = serve(echo)
    served(echo_server.port)


@pytest.mark.timeout(60)
def test_peer_resets_while_the_handler_reads(serve: Serve, weft_log: Any) -> None:
    """Clients that reset mid-exchange, or vanish before a byte: no traceback, next client served."""
    server = serve(echo)
    for _ in range(5):
        client = connect(server.port)
        client.sendall(b"half")
        assert recv_exactly(client, 4) == b"half"
        reset(client)
        reset(connect(server.port))  # vanishes before sending anything
    settled(server, 10)
    served(server.port)
    assert_no_tracebacks(weft_log())
    stats = server.stats()
    assert stats["handler_errors"] == 0 and stats["peer_errors"] == 10


@pytest.mark.timeout(60)
def test_half_close_gets_the_rest_of_the_reply(serve: Serve, weft_log: Any) -> None:
    """A client that half-closes (SHUT_WR) still receives the whole reply, then EOF."""
    server = serve(echo)
    payload = bytes(range(256)) * 4096  # 1 MiB: most of the reply is still to come
    for _ in range(3):
        with connect(server.port) as client:

            def send_then_half_close(client: socket.socket = client) -> None:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send_then_half_close)
            sender.start()
            assert recv_until_closed(client) == payload
            sender.join(WAIT)
    assert_no_tracebacks(weft_log())
    served(server.port)


@pytest.mark.timeout(60)
def test_peer_vanishes_without_reading(serve: Serve, weft_log: Any) -> None:
    """A client that asks for a big reply and closes without reading: no traceback, next client served."""
    server = serve(big_reply)
    for _ in range(5):
        with connect(server.port) as client:
            client.sendall(b"go\n")
    settled(server, 5)
    assert_no_tracebacks(weft_log())
    served(serve(echo).port)


# -- 8. silent and slow clients ----------------------------------------------------------------

IDLE = 1.0


@pytest.mark.timeout(60)
def test_idle_timeout_closes_a_silent_client_and_frees_its_slot(
    serve: Serve, weft_log: Any
) -> None:
    """idle_timeout closes a silent client within 10 % of the timeout; a waiting client then gets its slot."""
    server = serve(echo, args=(b"+",), idle_timeout=IDLE, max_connections=1, on_full="backlog")
    with connect(server.port) as silent, connect(server.port) as waiting:
        started = time.monotonic()
        assert recv_exactly(silent, 1) == b"+"
        assert recv_until_closed(silent) == b""
        closed = time.monotonic() - started
        assert recv_exactly(waiting, 1) == b"+", "the freed slot goes to the waiting client"
        waiting.sendall(b"x")
        assert recv_exactly(waiting, 1) == b"x"
    assert IDLE * 0.9 <= closed <= IDLE * 1.1, f"closed after {closed:.3f}s"
    assert_no_tracebacks(weft_log())
    stats = server.stats()
    assert stats["idle_timeouts"] == 1 and stats["handler_errors"] == 0


@pytest.mark.timeout(60)
def test_trickling_clients_cannot_keep_a_client_out(serve: Serve) -> None:
    """Clients trickling a byte a second keep a normal client out no longer than idle_timeout."""
    idle = 0.5
    server = serve(echo, args=(b"+",), idle_timeout=idle, max_connections=2, on_full="backlog")
    stop = threading.Event()
    tricklers = [connect(server.port) for _ in range(2)]

    def trickle(sock: socket.socket) -> None:
        for _ in range(10):
            try:
                sock.sendall(b".")
            except OSError:
                return
            if stop.wait(1.0):
                return

    threads = [threading.Thread(target=trickle, args=(s,)) for s in tricklers]
    try:
        for sock in tricklers:
            assert recv_exactly(sock, 1) == b"+"
        for thread in threads:
            thread.start()
        started = time.monotonic()
        with connect(server.port) as normal:
            assert recv_exactly(normal, 1) == b"+"
            waited = time.monotonic() - started
            normal.sendall(b"hello")
            assert recv_exactly(normal, 5) == b"hello"
        assert waited < idle * 1.1 + 0.2, f"kept out {waited:.2f}s"
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
        for sock in tricklers:
            sock.close()


# -- 10. plugins that misbehave ------------------------------------------------------------------


def test_a_manager_whose_factory_raises_breaks_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manager whose factory raises: a PluginError names it; every other manager still serves."""
    if "threads" not in MANAGERS:
        pytest.skip("needs weft-threads")
    from weft_threads import _plugin as threads_plugin

    def factory(**options: Any) -> Any:
        raise RuntimeError("cannot find its event loop")

    class Bad:
        @hookimpl
        def weft_managers(self) -> list[ManagerSpec]:
            return [ManagerSpec(name="bad", factory=factory, description="raises")]

    monkeypatch.setenv("WEFT_LOAD_PLUGINS", "")
    _registry.reset()
    try:
        _registry.register(Bad(), name="bad")
        _registry.register(threads_plugin, name="threads")
        assert set(_registry.available_managers()) == {"bad", "threads"}
        with pytest.raises(PluginError, match=r"'bad'.*RuntimeError: cannot find its event loop"):
            Server(handler(echo, "threads"), manager="bad")
        with Server(handler(echo, "threads"), manager="threads") as server:
            served(int(server.port))
    finally:
        _registry.reset()
