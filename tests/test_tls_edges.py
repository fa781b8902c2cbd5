"""TLS at its edges on every manager, asyncio's own TLS among them (session 11's check).

Each test failed when written on the managers its docstring names and passes since
its fix, but for a gap marked xfail (strict: mending it makes it fail, to be
unmarked): threads and gevent read a record cut by a reset as the end of input.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _every_manager import MANAGERS, aecho, echo, tls_files
from _every_manager import serve as serve  # the fixture
from _serving import server_certs

from weft_core import Server
from weft_core._engine import STOP_GRACE
from weft_core.testing import WAIT, wait_until

REPLY = 200_000


# -- handlers: answer once the input has ended ---------------------------------------------


def answer_at_eof(conn: Any) -> None:
    """Say ready, read until end of input, then answer ``REPLY`` bytes and ``done``."""
    conn.sendall(b"ready\n")
    got = 0
    while data := conn.recv(65536):
        got += len(data)
    conn.sendall(b"y" * REPLY + b"\ndone %d\n" % got)


async def aanswer_at_eof(stream: Any) -> None:
    await stream.send_all(b"ready\n")
    got = 0
    while data := await stream.receive_some(65536):
        got += len(data)
    await stream.send_all(b"y" * REPLY + b"\ndone %d\n" % got)


def say_bye(conn: Any) -> None:
    conn.sendall(b"bye\n")


async def asay_bye(stream: Any) -> None:
    await stream.send_all(b"bye\n")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return server_certs(tmp_path_factory.mktemp("probe-tls"))


class TLSClient:
    """A client whose TLS runs over memory buffers: it sends exactly what the test says."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.received = b""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed during the handshake") from None
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.received:
            how = self._read_some()
            if how is not None:
                raise AssertionError(f"the connection ended ({how}) before {marker!r}")
        return self.received

    def read_to_end(self) -> tuple[bytes, str]:
        """Everything until the connection ends, and how it ended.

        ``close_notify`` (a clean TLS end), ``eof`` (a bare FIN: truncation cannot be
        told from the end), or the error.
        """
        while True:
            how = self._read_some()
            if how is not None:
                return self.received, how

    def _read_some(self) -> str | None:
        try:
            data = self.obj.read(65536)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            return "close_notify"
        except ssl.SSLError as exc:
            return f"TLS error {exc}"
        else:
            if not data:
                return "close_notify"
            self.received += data
            return None
        try:
            raw = self.sock.recv(65536)
        except OSError as exc:
            return repr(exc)
        if not raw:
            return "eof"
        self.incoming.write(raw)
        return None

    def close(self) -> None:
        self.sock.close()


def _context(ca: str, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def _counters(server: Server) -> dict[str, int]:
    stats = server.stats()
    return {k: stats[k] for k in ("handler_errors", "peer_errors", "tls_errors")}


# -- the end of input over TLS ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_graceful_stop_lets_a_reading_tls_handler_answer(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """A TLS handler waiting for input when a graceful stop comes answers, and stop says True.

    docs/architecture.md, stop phase 2: SHUT_RD "so a handler waiting for input sees
    end-of-input and returns, while one writing a reply finishes it"; docs/managers.md:
    recv returns b"" on every manager (asyncio: "writing still works"). Fails on threads
    and gevent (the client gets a decode_error alert, no reply; "TLS session ...
    failed: EOF occurred in violation of protocol" is logged; tls_errors 1) and trio
    (no reply, bare EOF; the handler's send_all raises BrokenResourceError, logged with
    a traceback as a handler error). OpenSSL 3 takes the SHUT_RD's end of input, which
    has no close_notify, as fatal (ssl.OP_IGNORE_UNEXPECTED_EOF is not set).
    """
    server = serve(manager, options, answer_at_eof, aanswer_at_eof, tls=tls_files(certs))
    client = TLSClient(server.port, _context(certs["ca"]))
    try:
        client.send(b"x" * 10)
        client.read_until(b"ready\n")
        time.sleep(0.2)  # the 10 bytes are in (the handler is back in its read)
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(server.stop(timeout=10)))
        stopper.start()
        got, how = client.read_to_end()
        stopper.join(WAIT)
    finally:
        client.close()
    assert got.endswith(b"\ndone 10\n") and len(got) == len(b"ready\n") + REPLY + len(
        b"\ndone 10\n"
    ), (
        f"{manager}: a handler reading when the stop came could not answer over TLS: "
        f"the client got {len(got)} bytes ending {got[-20:]!r}, then {how}; "
        f"{_counters(server)}"
    )
    assert stopped == [True]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_tls_client_that_half_closes_then_waits_gets_the_answer(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """A TLS client sends its request, half-closes (FIN), and gets the whole answer.

    reliability case 7: a client that half-closes (SHUT_WR) "and expects the rest of the
    reply: the half-closer gets every byte then EOF; no record with a traceback is
    logged, none counts as a handler error". weft_asyncio/_tls_session.py: the FIN
    alone ends the input, "which the other managers' TLS sockets take as the end too".
    Here the handler answers after the end of input (a request-until-EOF protocol).
    Fails on threads and gevent (decode_error alert, no answer, tls_errors 1) and trio
    (no answer, bare EOF, a handler error with a BrokenResourceError traceback).
    """
    server = serve(manager, options, answer_at_eof, aanswer_at_eof, tls=tls_files(certs))
    client = TLSClient(server.port, _context(certs["ca"]))
    try:
        client.send(b"x" * 10)
        client.read_until(b"ready\n")
        client.sock.shutdown(socket.SHUT_WR)
        got, how = client.read_to_end()
    finally:
        client.close()
    assert got.endswith(b"\ndone 10\n"), (
        f"{manager}: the half-closing TLS client got {len(got)} bytes ending "
        f"{got[-20:]!r}, then {how}; {_counters(server)}"
    )
    assert _counters(server)["handler_errors"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_tls_connection_ends_with_close_notify(
    serve: Any,
    manager: str,
    options: dict[str, Any],
    certs: dict[str, str],
    version: ssl.TLSVersion,
) -> None:
    """A handler that answers and returns: the client sees close_notify, not a bare FIN.

    RFC 8446 6.1 (and RFC 5246 7.2.1): each party MUST send close_notify before closing
    the write side; without it a client reading to the end cannot tell a whole reply
    from a truncated one (OpenSSL 3 clients report "unexpected eof while reading",
    Python's with suppress_ragged_eofs=False raise SSLEOFError). asyncio and uvloop
    send it (AsyncioStream._goodbye). Fails on threads, gevent and trio: the reply
    then a bare FIN.
    """
    server = serve(manager, options, say_bye, asay_bye, tls=tls_files(certs))
    client = TLSClient(server.port, _context(certs["ca"], version))
    try:
        got, how = client.read_to_end()
    finally:
        client.close()
    assert got == b"bye\n"
    assert how == "close_notify", f"{manager}: after the reply, {how} instead of close_notify"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_client_without_the_required_certificate_is_told_why(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str], tmp_path: Path
) -> None:
    """require_client_cert refuses a TLS 1.3 client without one with an alert, not a bare FIN.

    docs/networking.md: "require_client_cert: True refuses clients without one"; a TLS
    server refusing a handshake sends the alert (certificate_required, RFC 8446 4.4.2.4)
    so that the client can say why. Failed on trio until weft-trio sent the alert its
    broken SSLStream leaves queued: the client saw a bare EOF, its error said nothing
    of a certificate.
    """
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(paths["cert"], append=i > 0)
    tls = {
        "certfile": paths["cert"],
        "keyfile": paths["key"],
        "cafile": paths["ca"],
        "require_client_cert": True,
    }
    server = serve(manager, options, say_bye, asay_bye, tls=tls)
    # TLS 1.3: the client's side of the handshake ends before the server checks its
    # certificate; the refusal arrives on the client's first read.
    client = TLSClient(server.port, _context(paths["ca"], ssl.TLSVersion.TLSv1_3))
    try:
        try:
            client.send(b"hello\n")
        except ConnectionResetError:
            # The refusal came first: the server closed with part of the client's last
            # flight unread, so its kernel reset. The alert it sent is still queued
            # for the client to read (Linux reads out what arrived before a reset).
            pass
        got, how = client.read_to_end()
    finally:
        client.close()
    assert got == b""
    assert "CERTIFICATE_REQUIRED" in how, (
        f"{manager}: a client refused for want of a certificate saw {how!r}, no alert"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["mid-record", "between-records"])
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_tls_client_that_resets_is_a_peer_error_not_an_end(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str], where: str
) -> None:
    """A TLS client resets (SO_LINGER 0) while the handler reads: a peer error, never an end.

    reliability case 7: clients that reset "while the handler reads ... count as
    peer_errors", as on a plain connection. ``mid-record``: half of a record is in
    when the reset comes, so the request the handler was reading is cut. The
    handler must see an error, not an end of input (which would make a cut request
    look whole): the stdlib's ``ssl`` reports such a reset as an end (its
    ``ECONNRESET`` lost inside OpenSSL's read), and on threads and gevent it was
    taken for one until 2026-12-05. ``between-records``: nothing is pending.
    """
    server = serve(manager, options, echo, aecho, tls=tls_files(certs))
    client = TLSClient(server.port, _context(certs["ca"]))
    client.send(b"first")
    client.read_until(b"first")

    def bytes_in() -> int:
        (conn,) = server.connections()
        return conn.bytes_in or 0

    if where == "mid-record":
        before = bytes_in()
        client.obj.write(b"z" * 5000)
        record = client.outgoing.read()
        client.sock.sendall(record[:2000])
        wait_until(lambda: bytes_in() >= before + 2000, what="the half record to reach the server")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" + b"\x00" * 4)
    client.close()
    wait_until(lambda: server.stats()["active"] == 0, what="the handler to end")
    assert server.stats()["peer_errors"] == 1, (
        f"{manager}: a TLS client's reset ({where}) was counted as {_counters(server)}"
    )


def write_after_the_end(conn: Any) -> None:
    """Wait for the end of input, then write on: what meets a client gone without a word."""
    conn.recv(1)
    for _ in range(20):
        conn.sendall(b"x" * 65536)


async def awrite_after_the_end(stream: Any) -> None:
    await stream.receive_some(1)
    for _ in range(20):
        await stream.send_all(b"x" * 65536)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_tls_client_gone_without_close_notify_is_the_peers_end_not_a_tls_failure(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """A balancer's TLS health check (haproxy's ``check-ssl``): handshake, then close
    with no ``close_notify``. On threads and gevent the handler's next write raised
    ``SSLEOFError`` or ``SSLZeroReturnError``, counted in ``tls_errors`` and logged at
    WARNING, every check, all day (an outside check). It is the peer's going away."""
    server = serve(manager, options, write_after_the_end, awrite_after_the_end,
                   tls=tls_files(certs))  # fmt: skip
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    tls = _context(certs["ca"]).wrap_socket(raw)
    raw_fd = tls.detach()  # the TLS object is dropped unclosed: no close_notify
    socket.socket(fileno=raw_fd).close()
    wait_until(lambda: server.stats()["active"] == 0, what="the handler to end")
    counters = _counters(server)
    assert counters["tls_errors"] == 0 and counters["handler_errors"] == 0, (manager, counters)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_fin_without_close_notify_is_an_end_under_an_applications_context(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """An application's ``SSLContext`` (no ``OP_IGNORE_UNEXPECTED_EOF``), a client that
    closes without ``close_notify``: the handler reads an end, nothing is counted.

    OpenSSL answers such an end with a fatal alert, and the client's kernel answers
    the alert with a reset: on threads and gevent the kernel then held the
    connection as reset by the time weft asked, and the client's ordinary close was
    a ``ConnectionResetError`` in the handler and a ``peer_errors`` count, where
    trio and asyncio read an end (an outside check of the traffic views). A reset
    after the peer's FIN leaves ``EPIPE`` pending, not ``ECONNRESET``.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["cert"], certs["key"])
    again: list[object] = []

    def echo_then_read_again(conn: Any) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
        try:  # an end stays an end (the kernel's answer was read once, and cleared)
            again.append(conn.recv(65536))
        except OSError as exc:
            again.append(exc)

    # threads and gevent read TLS through weft's own socket class; trio's and
    # asyncio's streams have their own rules after an end (trio's raises).
    server = serve(manager, options, echo_then_read_again, aecho, tls=context)
    for n in range(3):
        client = TLSClient(server.port, _context(certs["ca"]))
        client.send(b"hi")
        client.read_until(b"hi")
        client.sock.close()  # a FIN, no close_notify
        wait_until(lambda n=n: server.stats()["accepted"] == n + 1 and server.stats()["active"] == 0,
                   what="the handler to end")  # fmt: skip
    counters = _counters(server)
    assert counters["peer_errors"] == 0 and counters["tls_errors"] == 0, (manager, counters)
    assert counters["handler_errors"] == 0, (manager, counters)
    assert again in ([], [b"", b"", b""]), (manager, again)


@pytest.mark.timeout(60)
def test_an_applications_own_sslsocket_class_is_kept_on_threads(
    serve: Any, certs: dict[str, str]
) -> None:
    """A context whose ``sslsocket_class`` is the application's own: its handler gets that class.

    The threads runtime reads TLS through a class of its own that tells a reset
    from an end (above); it must not replace a class the application chose, nor
    change how that class reads (``suppress_ragged_eofs`` as the stdlib's default).
    """

    class Mine(ssl.SSLSocket):
        pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["cert"], certs["key"])
    context.sslsocket_class = Mine
    seen: list[tuple[type, bool]] = []

    def record(conn: Any) -> None:
        seen.append((type(conn), conn.suppress_ragged_eofs))
        echo(conn)

    server = serve("threads", {}, record, aecho, tls=context)
    client = TLSClient(server.port, _context(certs["ca"]))
    client.send(b"hi")
    client.read_until(b"hi")
    client.close()
    assert seen == [(Mine, True)]


# -- what reliability.md's row 32 lists beside the end of input --------------------------------


CHUNK = 65536
BLAST = 64 << 20


def _blaster(written: list[int]) -> tuple[Any, Any]:
    """Handlers that send 64 MiB once told ``blast``, counting in ``written`` what each send took."""
    chunk = b"z" * CHUNK

    def blast(conn: Any) -> None:
        conn.recv(100)
        for _ in range(BLAST // CHUNK):
            conn.sendall(chunk)
            written[0] += CHUNK

    async def ablast(stream: Any) -> None:
        await stream.receive_some(100)
        for _ in range(BLAST // CHUNK):
            await stream.send_all(chunk)
            written[0] += CHUNK

    return blast, ablast


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_64_mib_to_a_slow_reader_is_held_back_then_sent_whole(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """A handler sends 64 MiB over TLS to a client that reads nothing at first.

    Its sends must wait for the client (back-pressure), holding no more than what the
    kernel's buffers and the TLS layer take, far from 64 MiB: the server's memory
    stays bounded whatever a client leaves unread. Then the client reads, and gets
    every byte.
    """
    written = [0]
    blast, ablast = _blaster(written)
    server = serve(manager, options, blast, ablast, tls=tls_files(certs))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    client = _context(certs["ca"]).wrap_socket(raw)
    with client:
        client.sendall(b"go\n")
        # Wait until the handler's sends stop moving (it waits for the client), or it
        # has gone past any buffer's size.
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and written[0] <= 32 << 20:
            if written[0] != last:
                last, still_since = written[0], time.monotonic()
            elif time.monotonic() - still_since > 0.5:
                break
            time.sleep(0.02)
        held = written[0]
        assert held <= 32 << 20, f"{manager}: {held >> 20} MiB taken with nothing read"
        got = 0
        while got < BLAST:
            data = client.recv(1 << 20)
            assert data, f"{manager}: the connection ended after {got} of {BLAST} bytes"
            got += len(data)
    assert got == BLAST


def _openssl_key_update(port: int, ca: str) -> str:
    """``openssl s_client -tls1_3``: a line, a key update (``K``: the server must answer
    with its own), another line; what it printed."""
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile", ca],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, b"")))
    reader.start()

    def until(marker: bytes) -> None:
        deadline = time.monotonic() + WAIT
        while not any(marker in line for line in out):
            assert time.monotonic() < deadline, b"".join(out).decode(errors="replace")
            time.sleep(0.01)

    try:
        until(b"Verify return code")
        proc.stdin.write(b"before the update\n")
        proc.stdin.flush()
        until(b"before the update")
        proc.stdin.write(b"K\n")
        proc.stdin.flush()
        until(b"KEYUPDATE")
        proc.stdin.write(b"after the update\n")
        proc.stdin.flush()
        until(b"after the update")
    finally:
        proc.stdin.close()
        proc.wait(WAIT)
        reader.join(WAIT)
        proc.stdout.close()
    return b"".join(out).decode(errors="replace")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_key_update_mid_session_is_answered_and_the_session_goes_on(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """TLS 1.3's KeyUpdate from the client, asking for the server's (``openssl s_client``'s
    ``K`` command): the handler's stream goes on, echoing what comes after it."""
    server = serve(manager, options, echo, aecho, tls=tls_files(certs))
    output = _openssl_key_update(server.port, certs["ca"])
    assert "after the update" in output, output  # echoed (s_client does not show what is typed)
    assert _counters(server) == {"handler_errors": 0, "peer_errors": 0, "tls_errors": 0}


def _stalls(written: list[int]) -> tuple[Any, Any]:
    """Handlers: echo a line, then (told ``blast``) send until stopped."""
    chunk = b"z" * CHUNK

    def handler(conn: Any) -> None:
        while data := conn.recv(100):
            if data.startswith(b"blast"):
                while True:
                    conn.sendall(chunk)
                    written[0] += CHUNK
            conn.sendall(data)

    async def ahandler(stream: Any) -> None:
        while data := await stream.receive_some(100):
            if data.startswith(b"blast"):
                while True:
                    await stream.send_all(chunk)
                    written[0] += CHUNK
            await stream.send_all(data)

    return handler, ahandler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step", ["tcp-only", "client-hello", "reading", "writing"])
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_stop_at_each_step_of_a_tls_connection_keeps_its_bound(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str], step: str
) -> None:
    """``stop(timeout=1)`` with one TLS client at each step of its life: connected but
    silent (the handshake waits), half a handshake (a ClientHello, no more), a handler
    waiting for data, a handler blocked writing to a client that reads nothing. The stop
    returns within its timeout plus STOP_GRACE, and the client sees its connection end.
    """
    written = [0]
    handler, ahandler = _stalls(written)
    server = serve(manager, options, handler, ahandler, tls=tls_files(certs))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    conn: Any = raw
    try:
        if step == "client-hello":
            outgoing = ssl.MemoryBIO()
            obj = _context(certs["ca"]).wrap_bio(ssl.MemoryBIO(), outgoing)
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            raw.sendall(outgoing.read())
        elif step in ("reading", "writing"):
            conn = _context(certs["ca"]).wrap_socket(raw)
            conn.sendall(b"hello\n")
            assert conn.recv(100) == b"hello\n"
            if step == "writing":
                conn.sendall(b"blast\n")
                wait_until(lambda: written[0] >= CHUNK, what="the handler to be sending")
        wait_until(lambda: server.stats()["active"] == 1, what="the connection to be served")
        began = time.monotonic()
        server.stop(timeout=1)
        took = time.monotonic() - began
        assert took <= 1 + STOP_GRACE + 0.5, f"{manager}, {step}: stop(timeout=1) took {took:.2f}s"
        assert server.stats()["active"] == 0
        try:  # the client sees its connection end: EOF, close_notify, a reset, an alert
            while conn.recv(1 << 20):
                pass
        except TimeoutError:
            raise AssertionError(f"{manager}, {step}: the connection is still open") from None
        except OSError:
            pass
    finally:
        conn.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_300_tls_clients_at_once_are_all_served(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """300 TLS clients connect at once, each sends a line and reads its echo: all served."""
    server = serve(manager, options, echo, aecho, tls=tls_files(certs))
    context = _context(certs["ca"])
    start = threading.Barrier(300, timeout=WAIT)

    def one(n: int) -> bytes:
        start.wait()
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=3 * WAIT)
        with context.wrap_socket(raw) as client:
            line = b"client %d\n" % n
            client.sendall(line)
            got = b""
            while len(got) < len(line):
                data = client.recv(100)
                if not data:
                    break
                got += data
            return got

    with concurrent.futures.ThreadPoolExecutor(max_workers=300) as pool:
        answers = list(pool.map(one, range(300)))
    missing = [n for n, got in enumerate(answers) if got != b"client %d\n" % n]
    assert not missing, f"{manager}: {len(missing)} of 300 clients not served: {missing[:10]}"
    wait_until(lambda: server.stats()["active"] == 0, what="every connection to end")
    stats = server.stats()
    assert (stats["accepted"], stats["tls_errors"], stats["handler_errors"]) == (300, 0, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_handshakes_the_stop_ends_are_not_the_peers_failures(
    serve: Any,
    manager: str,
    options: dict[str, Any],
    certs: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two clients mid-handshake (one silent, one halfway through its ClientHello) when
    stop() comes. Promise: their connections close, and nothing counts or logs it as a
    TLS failure of theirs. Seen: tls_errors 2, and a WARNING per client blaming it
    (asyncio: "the peer closed during the TLS handshake")."""
    server = serve(manager, options, echo, aecho, tls=tls_files(certs))
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    partial = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    try:
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")
        wait_until(lambda: len(server.connections()) == 2, what="both handshakes under way")
        assert server.stop(timeout=5) is True
        for client in (silent, partial):
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(16) == b""
    finally:
        silent.close()
        partial.close()
    assert server.stats()["tls_errors"] == 0, _counters(server)
    assert "TLS handshake with" not in caplog.text


# -- a peer that makes the session write by itself -------------------------------------------


def _key_updater(obj: ssl.SSLObject) -> Any:
    """A call that queues a KeyUpdate asking for the server's, on ``obj``; or skip.

    Python has no API for it: OpenSSL's ``SSL_key_update`` through ctypes, on the
    ``SSL*`` held after the object header and its socket pointer (checked to be a
    TLS 1.3 session before use).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("ssl")
    if name is None:
        pytest.skip("libssl is not found for ctypes")
    libssl = ctypes.CDLL(name)
    if not hasattr(libssl, "SSL_key_update"):
        pytest.skip("this libssl has no SSL_key_update (OpenSSL 1.1.1 or later has)")
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libssl.SSL_version.argtypes = [ctypes.c_void_p]
    libssl.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    pointer = ctypes.c_void_p.from_address(id(obj._sslobj) + 24).value  # type: ignore[attr-defined]
    if not pointer or libssl.SSL_version(pointer) != 0x0304:
        pytest.skip("cannot find the SSL* of an SSLObject on this Python")

    def update(also_data: bool) -> None:
        assert libssl.SSL_key_update(pointer, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        if also_data:
            obj.write(b"x")  # some data now and then: OpenSSL refuses 32 updates in a row
        else:
            libssl.SSL_do_handshake(pointer)  # writes the update out

    return update


def sink(conn: Any) -> None:
    while conn.recv(65536):
        pass


async def asink(stream: Any) -> None:
    while await stream.receive_some(65536):
        pass


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_key_updates_from_a_peer_that_never_reads_are_held_back(
    serve: Any, manager: str, options: dict[str, Any], certs: dict[str, str]
) -> None:
    """Each KeyUpdate asking for the server's makes its session write one by itself.

    asyncio's stream decrypted every record as it came and wrote each answer out
    whatever its buffer held: from a peer that sends them and never reads, the
    server's memory grew byte for byte with what it sent, for as long as it sent
    (20 MB in 20 s, never slowed), a reading handler and idle_timeout
    notwithstanding. Now the peer's sending stalls, as on the other managers.
    """
    listening = socket.socket()
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # small: a stall comes early
        listening.setsockopt(socket.SOL_SOCKET, option, 32768)
    listening.bind(("127.0.0.1", 0))
    fd = listening.detach()  # the server's now: it closes it as it stops
    server = serve(manager, options, sink, asink, bind=f"fd:{fd}", tls=tls_files(certs))
    context = _context(certs["ca"], ssl.TLSVersion.TLSv1_3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing anyway
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", server.port))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        update = _key_updater(obj)
        sock.settimeout(1.0)
        sent, limit = 0, 4_000_000
        stalled = False
        count = 0
        while sent < limit:
            update(also_data=count % 16 == 0)
            count += 1
            if count % 64:
                continue
            data = outgoing.read()
            try:
                sock.sendall(data)
            except TimeoutError:
                stalled = True
                break
            except OSError:  # the server ended it: as good as a stall
                stalled = True
                break
            sent += len(data)
    assert stalled, f"the peer sent {sent:,} bytes of key updates, never held back"
    assert sent < limit / 2
