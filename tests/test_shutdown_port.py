"""The shutdown port (Sagittarius' shutdown-port): ``Server(shutdown_port=...)``.

A client of 127.0.0.1:``shutdown_port`` that sends the right ``shutdown_secret``
(and is approved by ``shutdown_handler`` when there is one) gets ``OK`` and the
server stops gracefully; anybody else gets ``DENIED``, is logged, and nothing stops.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from weft_core import BindError, ConfigError, Server, available_managers
from weft_core import _shutdown_port as shutdown_port_module
from weft_core._registry import get_manager_spec
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
    assert len(denials) == 4 and all(r.levelno == logging.WARNING for r in denials)
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


def test_without_secret_connecting_is_enough(make_server: Any) -> None:
    server = make_server(shutdown_port=0)
    host, port = split(server.shutdown_address)
    assert host == "127.0.0.1" and port > 0, "port 0 picks a free port"
    assert request(server.shutdown_address) == b"OK\n"
    assert server.wait(WAIT)


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
        server = make_server(shutdown_port=port, start=False)
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
    ],
)
def test_settings_are_checked(kw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Server(handler_for(MANAGERS[0]), manager=MANAGERS[0], **kw)
    assert info.value.key == key
