"""The shutdown port (Sagittarius' shutdown-port): ``Server(shutdown_port=...)``.

A client of 127.0.0.1:``shutdown_port`` that sends the right ``shutdown_secret``
(and is approved by ``shutdown_handler`` when there is one) gets ``OK`` and the
server stops gracefully; anybody else gets ``DENIED``, is logged, and nothing stops.

The hostile-peer cases (issue 14) are further down: no secret, a burst of guesses,
silent clients, and the port under ``weft serve --workers``. Every wait is bounded;
the throttle's schedule is pinned with a fake clock, and only the burst test counts
against the wall clock, which is what it measures.
"""

from __future__ import annotations

import logging
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import HOLD, READY, Client, Served, environment, free_port, host_port, weft_serve

from weft_core import BindError, ConfigError, Server, available_managers
from weft_core import _shutdown_port as shutdown_port_module
from weft_core._engine import STOP_GRACE
from weft_core._exits import EXIT_TASKS_LEFT
from weft_core._registry import get_manager_spec
from weft_core._shutdown_port import (
    ALL_SOURCES_FREE_FAILURES,
    BLOCK_MAX,
    BLOCK_MIN,
    FORGET_AFTER,
    FREE_FAILURES,
    MAX_CLIENTS,
    Throttle,
)
from weft_core.testing._support import WAIT, connect, recv_exactly, recv_until_closed

pytestmark = pytest.mark.timeout(60)

MANAGERS = sorted(available_managers())


def echo(conn: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


async def aecho(stream: Any) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


def handler_for(manager: str) -> Any:
    return aecho if get_manager_spec(manager).handler_kind == "async" else echo


@pytest.fixture
def make_server() -> Iterator[Any]:
    """``make_server(manager=..., **kw)``: a running echo Server, stopped after the test."""
    servers: list[Server] = []

    def make(manager: str = MANAGERS[0], start: bool = True, **kw: Any) -> Server:
        server = Server(handler_for(manager), manager=manager, **kw)
        servers.append(server)
        if start:
            server.run()
        return server

    yield make
    for server in servers:
        server.stop(timeout=1)


def split(address: str | None) -> tuple[str, int]:
    assert address is not None, "the shutdown port is not listening"
    host, _, port = address.rpartition(":")
    return host, int(port)


def request(address: str | None, payload: bytes = b"") -> bytes:
    """Connect to the shutdown port, send ``payload``, return everything it answers."""
    host, port = split(address)
    with connect(port, host) as client:
        if payload:
            client.sendall(payload)
        return recv_until_closed(client)


def test_wrong_secret_is_denied_and_logged(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="weft.shutdown")
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    for wrong in (b"guess\n", b"s3cre\n", b"s3cret-and-more\n", b"\n"):
        assert request(server.shutdown_address, wrong) == b"DENIED\n"
    assert server.running
    with connect(server.port) as client:
        client.sendall(b"still serving")
        assert recv_exactly(client, 13) == b"still serving"
    denials = [r for r in caplog.records if "denied" in r.getMessage()]
    assert len(denials) == 1, "denials are logged at a bounded rate (one per LOG_INTERVAL)"
    assert denials[0].levelno == logging.WARNING
    assert "127.0.0.1:" in denials[0].getMessage() and "wrong secret" in denials[0].getMessage()
    assert "s3cret" not in caplog.text and "guess" not in caplog.text, "secrets are never logged"


@pytest.mark.parametrize("manager", MANAGERS)
def test_right_secret_stops_gracefully(make_server: Any, manager: str) -> None:
    stopped: list[bool] = []
    server = make_server(
        manager=manager,
        shutdown_port=0,
        shutdown_secret="s3cret",
        on_stop=lambda s: stopped.append(True),
    )
    forever = threading.Thread(target=server.serve_forever)
    forever.start()
    with connect(server.port) as client:
        client.sendall(b"a")
        assert recv_exactly(client, 1) == b"a"
        address = server.shutdown_address
        assert request(address, b"s3cret\r\n") == b"OK\n"
        assert server.wait(WAIT), "the server stops"
        assert recv_until_closed(client) == b"", "open connections see end of input"
    forever.join(WAIT)
    assert not forever.is_alive(), "serve_forever() returns"
    assert stopped == [True] and server.shutdown_address is None
    with pytest.raises(ConnectionRefusedError):
        request(address)


def test_without_secret_connecting_is_enough_when_allowed(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="weft.shutdown")
    server = make_server(shutdown_port=0, shutdown_allow_no_secret=True)
    host, port = split(server.shutdown_address)
    assert host == "127.0.0.1" and port > 0, "port 0 picks a free port"
    (warning,) = [r for r in caplog.records if "no secret" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"{host}:{port}" in warning.getMessage()
    assert "any local process can stop the server" in warning.getMessage()
    assert request(server.shutdown_address) == b"OK\n"
    assert server.wait(WAIT)


def test_without_secret_it_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="shutdown_allow_no_secret = true") as info:
        Server(handler_for(MANAGERS[0]), manager=MANAGERS[0], shutdown_port=0)
    assert info.value.key == "shutdown_port"
    # A shutdown_handler is an authorisation of the user's own: no flag needed.
    Server(handler_for(MANAGERS[0]), manager=MANAGERS[0], shutdown_port=0,
           shutdown_handler=lambda server, conn: False)  # fmt: skip


def test_handler_decides(make_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    asked: list[bytes] = []

    def polite(server: Server, conn: socket.socket) -> bool:
        line = conn.makefile("rb").readline()
        asked.append(line)
        if line == b"boom\n":
            raise RuntimeError("shutdown_handler failed")
        return line == b"please\n"

    server = make_server(shutdown_port=0, shutdown_secret="s3cret", shutdown_handler=polite)
    assert request(server.shutdown_address, b"nope\nplease\n") == b"DENIED\n"
    assert asked == [], "the handler is asked only after the right secret"
    assert request(server.shutdown_address, b"s3cret\nno\n") == b"DENIED\n"
    assert request(server.shutdown_address, b"s3cret\nboom\n") == b"DENIED\n"
    assert "shutdown_handler" in caplog.text and server.running
    assert request(server.shutdown_address, b"s3cret\nplease\n") == b"OK\n"
    assert server.wait(WAIT)
    assert asked == [b"no\n", b"boom\n", b"please\n"], "the handler reads what follows the secret"


def test_handler_may_stop_the_server_itself(make_server: Any) -> None:
    def stop_now(server: Server, conn: socket.socket) -> bool:
        return server.stop(timeout=WAIT)

    server = make_server(shutdown_port=0, shutdown_handler=stop_now)
    assert request(server.shutdown_address) == b"OK\n"
    assert server.wait(WAIT)


def non_loopback_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
            host = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if host.startswith("127.") else host


def test_binds_loopback_only(make_server: Any) -> None:
    server = make_server(address="0.0.0.0", shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    assert host == "127.0.0.1"
    outside = non_loopback_address()
    if outside is None:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    with pytest.raises(ConnectionRefusedError):
        connect(port, outside).close()
    with connect(server.port, outside) as client:  # while the main listener is everywhere
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"


def test_closed_on_stop_and_opened_again_on_run(make_server: Any) -> None:
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    first = server.shutdown_address
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        request(first)
    server.run()
    assert server.shutdown_address is not None
    assert request(server.shutdown_address, b"s3cret\n") == b"OK\n"
    assert server.wait(WAIT)


def test_silent_client_is_denied_after_a_timeout(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown_port_module, "SECRET_TIMEOUT", 0.2)
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    with connect(port, host) as silent:
        assert recv_until_closed(silent) == b"DENIED\n"
    assert request(server.shutdown_address, b"s3cret\n") == b"OK\n"
    assert server.wait(WAIT)


def test_stop_is_not_held_up_by_a_client_of_the_shutdown_port(make_server: Any) -> None:
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    with connect(port, host) as silent:
        silent.sendall(b"s3c")  # half a secret, then nothing
        started = time.monotonic()
        assert server.stop(timeout=WAIT) is True
        assert time.monotonic() - started < shutdown_port_module.SECRET_TIMEOUT
        assert recv_until_closed(silent) in (b"", b"DENIED\n")


def test_port_in_use_is_a_bind_error(make_server: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = make_server(shutdown_port=port, shutdown_secret="s3cret", start=False)
        with pytest.raises(BindError, match=f"127.0.0.1:{port}.*shutdown_port"):
            server.run()
    assert server.stopped and server.socket is None and server.addresses == []


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"shutdown_secret": "s3cret"}, "shutdown_secret"),
        ({"shutdown_handler": lambda s, c: True}, "shutdown_handler"),
        ({"shutdown_port": "9999"}, "shutdown_port"),
        ({"shutdown_port": True}, "shutdown_port"),
        ({"shutdown_port": 70000}, "shutdown_port"),
        ({"shutdown_port": 0, "shutdown_secret": ""}, "shutdown_secret"),
        ({"shutdown_port": 0, "shutdown_secret": "a\nb"}, "shutdown_secret"),
        ({"shutdown_port": 0, "shutdown_handler": "yes"}, "shutdown_handler"),
        ({"shutdown_port": 0}, "shutdown_port"),  # the key set: its source is named
        ({"shutdown_port": 0, "shutdown_allow_no_secret": "yes"}, "shutdown_allow_no_secret"),
    ],
)
def test_settings_are_checked(kw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Server(handler_for(MANAGERS[0]), manager=MANAGERS[0], **kw)
    assert info.value.key == key


# -- a hostile peer (issue 14) ------------------------------------------------------------


def attempt(address: str | None, payload: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``payload`` from ``source``; the answer, or b"" if closed unread (even by a reset)."""
    host, port = split(address)
    with socket.socket() as client:
        client.settimeout(WAIT)
        client.bind((source, 0))
        client.connect((host, port))
        try:
            client.sendall(payload)
            return recv_until_closed(client)
        except (ConnectionResetError, BrokenPipeError):
            return b""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_blocks_a_source_for_a_growing_period() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    for _ in range(FREE_FAILURES - 1):
        assert throttle.failed("127.0.0.1") == 0.0
    assert throttle.failed("127.0.0.1") == BLOCK_MIN, "blocked after FREE_FAILURES"
    assert throttle.blocked_for("127.0.0.1") == BLOCK_MIN
    assert throttle.blocked_for("127.0.0.2") == 0.0, "other sources are not blocked"
    blocks = []
    for _ in range(12):
        clock.now += throttle.blocked_for("127.0.0.1")  # a failure needs the block to end
        assert throttle.blocked_for("127.0.0.1") == 0.0
        blocks.append(throttle.failed("127.0.0.1"))
    assert blocks[:3] == [2 * BLOCK_MIN, 4 * BLOCK_MIN, 8 * BLOCK_MIN]
    assert blocks[-1] == BLOCK_MAX and max(blocks) == BLOCK_MAX
    clock.now += FORGET_AFTER
    assert throttle.failed("127.0.0.1") == 0.0, "a quiet source starts afresh"
    throttle.succeeded("127.0.0.1")
    for _ in range(FREE_FAILURES - 1):
        assert throttle.failed("127.0.0.1") == 0.0, "the right secret forgets the failures"


def test_throttle_holds_back_a_guesser_who_rotates_addresses() -> None:
    clock = FakeClock()
    throttle = Throttle(clock)
    for n in range(ALL_SOURCES_FREE_FAILURES - 1):
        assert throttle.failed(f"127.0.{n // 256}.{n % 256}") == 0.0
    assert throttle.failed("127.1.0.1") == BLOCK_MIN
    assert throttle.blocked_for("127.9.9.9") == BLOCK_MIN, "every source waits"


@pytest.mark.timeout(30)
def test_a_burst_of_wrong_secrets_is_throttled(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="weft.shutdown")
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    address = server.shutdown_address
    window = 1.5  # BLOCK_MIN (1 s) and a half: the first block, and the next guess
    evaluated = closed = 0
    end = time.monotonic() + window
    while time.monotonic() < end:
        answer = attempt(address, b"guess%d\n" % (evaluated + closed))
        if answer == b"DENIED\n":
            evaluated += 1
        else:
            assert answer == b"", "a blocked source is closed unread"
            closed += 1
    # Unthrottled, this loop got ~4,000 guesses a second evaluated.
    assert FREE_FAILURES <= evaluated <= FREE_FAILURES + 1, (evaluated, closed)
    assert closed >= 10, "the burst went on, closed unread"
    assert attempt(address, b"s3cret\n") == b"", (
        "the right secret from a blocked source is not read"
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "weft.shutdown"]
    assert 2 <= len(warnings) <= 3, warnings  # one denial, the block, maybe one closing
    assert any("blocked for" in w for w in warnings)
    assert "s3cret" not in caplog.text and "guess" not in caplog.text
    # The operator, from another loopback address, still gets in.
    assert attempt(address, b"s3cret\n", source="127.0.0.2") == b"OK\n"
    assert server.wait(WAIT)


@pytest.mark.timeout(30)
def test_silent_clients_do_not_delay_the_right_request(make_server: Any) -> None:
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    own_timeout = 2.0  # well under SECRET_TIMEOUT (5 s), which each silent client may use
    assert own_timeout < shutdown_port_module.SECRET_TIMEOUT
    silent = [connect(port, host) for _ in range(MAX_CLIENTS - 1)]
    try:
        with socket.create_connection((host, port), timeout=own_timeout) as operator:
            operator.sendall(b"s3cret\n")
            assert recv_until_closed(operator) == b"OK\n"
        assert server.wait(WAIT)
    finally:
        for client in silent:
            client.close()


@pytest.mark.timeout(30)
def test_beyond_max_clients_a_connection_is_closed_at_once(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="weft.shutdown")
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    silent = [connect(port, host) for _ in range(MAX_CLIENTS)]
    try:
        with socket.create_connection((host, port), timeout=2.0) as extra:
            assert recv_until_closed(extra) == b"", "closed at once, not after SECRET_TIMEOUT"
        assert f"{MAX_CLIENTS} requests in progress already" in caplog.text
    finally:
        for client in silent:
            client.close()
    assert server.running


def test_a_trickling_client_gets_one_deadline(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown_port_module, "SECRET_TIMEOUT", 0.5)
    server = make_server(shutdown_port=0, shutdown_secret="s3cret")
    host, port = split(server.shutdown_address)
    with connect(port, host) as trickler:
        began = time.monotonic()
        answered = False
        # A byte every 0.2 s: each within a per-read timeout, but not the whole line.
        for byte in b"s3cret":
            trickler.sendall(bytes([byte]))
            answered = bool(select.select([trickler], [], [], 0.2)[0])
            if answered:
                break
        assert answered, "denied before the line was complete"
        assert recv_until_closed(trickler) == b"DENIED\n"
        assert time.monotonic() - began < 1.0  # SECRET_TIMEOUT and a grace
    assert server.running


# -- the shutdown port of weft serve (real processes) --------------------------------------


def serve_env(**weft: str) -> dict[str, str]:
    return environment() | {f"WEFT_{k.upper()}": v for k, v in weft.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_weft_serve_refuses_a_shutdown_port_without_a_secret(tmp_path: Path, workers: str) -> None:
    result = subprocess.run(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--workers", workers),
        cwd=tmp_path, env=serve_env(shutdown_port="0"), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("weft: ") and "shutdown_allow_no_secret = true" in line
    assert "listening" not in result.stderr and "worker" not in result.stderr


@pytest.mark.timeout(60)
def test_weft_serve_warns_when_allowed_without_a_secret(tmp_path: Path) -> None:
    env = serve_env(shutdown_port="0", shutdown_allow_no_secret="true")
    with Served(weft_serve("_serving:handle", "--bind", "127.0.0.1:0"), cwd=tmp_path,
                env=env) as served:  # fmt: skip
        (found,) = served.wait_for(
            r"\[WARNING\] weft\.shutdown: shutdown port on (\S+) has no secret.*"
            r"any local process can stop the server"
        )
        assert request(found.group(1)) == b"OK\n"
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_shutdown_port_with_workers_stops_the_whole_service(tmp_path: Path) -> None:
    # A fixed port, as in weft.toml: each worker opening it would crash-loop on it.
    env = serve_env(shutdown_port=str(free_port()), shutdown_secret="s3cret")
    argv = weft_serve("_serving:handle", "--workers", "2", "--bind", "127.0.0.1:0",
                      "--graceful-timeout", "20")  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env) as served:
        (listening,) = served.wait_for(r"\] weft: listening on (\S+) ")
        (port_line,) = served.wait_for(r"weft\.shutdown: shutdown port listening on (\S+)")
        workers = {int(m.group(1)) for m in served.wait_for(READY, count=2)}
        with Client(host_port(listening.group(1))) as client:
            client.sock.sendall(HOLD)
            assert client.line() == b"holding"
            assert request(port_line.group(1), b"s3cret\n") == b"OK\n"
            assert client.rest() == b"done\n", "every worker drains gracefully"
        assert served.finish(timeout=30) == 0, served.text
    assert "stop requested on the shutdown port: stopping 2 worker(s)" in served.text
    for pid in workers:
        assert re.search(rf"worker {pid} exited with 0\n", served.text), served.text
    assert served.text.count("shutdown port listening on") == 1, "workers do not open it"
    assert "starting another" not in served.text and "Traceback" not in served.text


@pytest.mark.timeout(60)
def test_a_signal_still_stops_workers_with_a_shutdown_port(tmp_path: Path) -> None:
    env = serve_env(shutdown_port="0", shutdown_secret="s3cret")
    argv = weft_serve("_serving:handle", "--workers", "2", "--bind", "127.0.0.1:0")
    with Served(argv, cwd=tmp_path, env=env) as served:
        (port_line,) = served.wait_for(r"weft\.shutdown: shutdown port listening on (\S+)")
        served.wait_for(READY, count=2)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    with pytest.raises(ConnectionRefusedError):
        request(port_line.group(1))


@pytest.mark.timeout(60)
def test_weft_serve_bounds_a_shutdown_port_stop_by_its_graceful_timeout(tmp_path: Path) -> None:
    """A stuck handler does not keep weft serve alive after the shutdown port's request.

    The request stops as SIGTERM does: within --graceful-timeout plus the stop's grace,
    with exit status 4 for the tasks it had to leave (it used to wait forever).
    """
    env = serve_env(shutdown_port="0", shutdown_secret="s3cret")
    argv = weft_serve("_stuck_handlers:stuck", "--manager", "threads", "--bind", "127.0.0.1:0",
                      "--graceful-timeout", "0.5")  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env) as served:
        (listening,) = served.wait_for(r"\] weft: listening on (\S+) ")
        (port_line,) = served.wait_for(r"weft\.shutdown: shutdown port listening on (\S+)")
        with socket.create_connection(host_port(listening.group(1)), timeout=WAIT) as stuck:
            assert stuck.recv(1) == b"+"
            began = time.monotonic()
            assert request(port_line.group(1), b"s3cret\n") == b"OK\n"
            assert served.finish(timeout=30) == EXIT_TASKS_LEFT, served.text
            took = time.monotonic() - began
    assert "shutdown port: stopping (graceful timeout 0.5s" in served.text
    assert "1 task(s) ignored it and are abandoned" in served.text
    assert took < 0.5 + STOP_GRACE + 2.0, f"took {took:.1f}s"
