"""Clients weft did not write: ``openssl s_client`` and ``socat`` against every manager.

The conformance suite talks to servers with Python's own ``ssl`` module, which
shares OpenSSL's defaults with the server; these tests make sure a separately built
client negotiates TLS 1.2 and 1.3 with each manager, that junk sent by a plain TCP
tool is counted as a TLS error, and that a plain exchange works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from _serving import server_certs

from weft_core import Server, available_managers, current_connection
from weft_core._registry import get_manager_spec
from weft_core.testing._support import wait_until

pytestmark = pytest.mark.timeout(60)

#: The longest one outside client may take; they normally finish in milliseconds.
WAIT = 20.0

OPENSSL = shutil.which("openssl")
SOCAT = shutil.which("socat")
needs_openssl = pytest.mark.skipif(
    OPENSSL is None, reason="openssl is not installed (apt-get install openssl)"
)
needs_socat = pytest.mark.skipif(
    SOCAT is None, reason="socat is not installed (apt-get install socat)"
)


def _tag() -> bytes:
    version = current_connection().tls_version
    return (version or "plain").encode()


def echo_line(conn: Any) -> None:
    """Read one line, answer ``<TLS version or plain>: <line>``, return (the server closes)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    conn.sendall(_tag() + b": " + data)


async def aecho_line(stream: Any) -> None:
    """The trio flavour of :func:`echo_line`."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        data += chunk
    await stream.send_all(_tag() + b": " + data)


@pytest.fixture(params=sorted(available_managers()))
def manager(request: pytest.FixtureRequest) -> str:
    """Each installed manager's name."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made by trustme."""
    return server_certs(tmp_path_factory.mktemp("outside-certs"))


@pytest.fixture
def serve(manager: str) -> Iterator[Any]:
    """``serve(**kw)``: a running line-echo Server on ``manager``, stopped after the test."""
    servers: list[Server] = []

    def make(**kw: Any) -> Server:
        handler = aecho_line if get_manager_spec(manager).handler_kind == "async" else echo_line
        server = Server(handler, manager=manager, **kw)
        servers.append(server)
        server.run()
        return server

    yield make
    for server in servers:
        server.stop(timeout=1)


def run_client(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run an outside client to completion (it ends when the server closes)."""
    return subprocess.run(args, input=stdin, capture_output=True, timeout=WAIT, check=False)


@needs_openssl
@pytest.mark.parametrize("version", ["1_2", "1_3"])
def test_openssl_s_client(serve: Any, certs: dict[str, str], version: str) -> None:
    server = serve(tls={"certfile": certs["cert"], "keyfile": certs["key"]})
    assert OPENSSL is not None
    result = run_client(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{server.port}",
            f"-tls{version}",
            "-CAfile",
            certs["ca"],
            "-verify_ip",
            "127.0.0.1",
            "-verify_return_error",
            "-quiet",
        ],
        b"hello from openssl\n",
    )
    expected = f"TLSv{version.replace('_', '.')}: hello from openssl\n".encode()
    assert expected in result.stdout, result.stderr.decode(errors="replace")
    stats = server.stats()
    assert stats["tls_errors"] == 0 and stats["handler_errors"] == 0


@needs_socat
def test_socat_garbage_to_the_tls_port_is_counted(serve: Any, certs: dict[str, str]) -> None:
    server = serve(tls={"certfile": certs["cert"], "keyfile": certs["key"]})
    assert SOCAT is not None
    result = run_client(
        [SOCAT, "-t", str(WAIT), "-", f"TCP:127.0.0.1:{server.port}"],
        b"\x00\xffthis is not a TLS ClientHello\r\n" * 4,
    )
    assert b"plain" not in result.stdout, "a handler never sees a failed handshake"
    wait_until(lambda: server.stats()["tls_errors"] == 1, WAIT, "the failed handshake's count")
    assert server.stats()["handler_errors"] == 0


@needs_socat
def test_socat_plain_echo(serve: Any) -> None:
    server = serve()
    assert SOCAT is not None
    result = run_client(
        [SOCAT, "-t", str(WAIT), "-", f"TCP:127.0.0.1:{server.port}"], b"hello from socat\n"
    )
    assert result.stdout == b"plain: hello from socat\n", result.stderr.decode(errors="replace")


@needs_socat
def test_socat_over_a_unix_socket(serve: Any) -> None:
    folder = tempfile.mkdtemp(prefix="weft-")  # short: Unix socket paths are limited to 107 bytes
    try:
        path = os.path.join(folder, "s.sock")
        serve(address=f"unix:{path}")
        assert SOCAT is not None
        result = run_client(
            [SOCAT, "-t", str(WAIT), "-", f"UNIX-CONNECT:{path}"], b"hello over unix\n"
        )
        assert result.stdout == b"plain: hello over unix\n", result.stderr.decode(errors="replace")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
