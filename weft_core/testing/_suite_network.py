"""Conformance tests of how a server talks: TLS, idle timeout, PROXY headers (docs/networking.md)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .._connection import ConnectionInfo, current_connection
from .._proxy import build_v1, build_v2
from .._server import Server
from ._adapters import Body, Recv, Send
from ._base import ManagerTestBase
from ._bodies import echo
from ._support import WAIT, connect, recv_exactly, recv_until_closed, wait_until

__all__ = ["NetworkTests"]

MakeServer = Callable[..., Server]


def reply_once() -> Body:
    """Read one chunk, send it back with the TLS version, return (the server closes)."""
    data = yield Recv()
    version = current_connection().tls_version or "plain"
    yield Send(data + b" " + version.encode())


def _client_hello(certs: dict[str, str]) -> bytes:
    """The bytes a real TLS client opens with (its ClientHello), made in memory."""
    context = ssl.create_default_context(cafile=certs["ca"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _until_the_end(seen: list[bytes], ack: bytes = b"") -> Callable[[], Body]:
    """A body that reads to the end of input, then puts all it read in ``seen``.

    With ``ack``, it answers that once its first bytes came (the client then knows
    the handler runs). A read that raises leaves ``seen`` empty.
    """

    def body() -> Body:
        data = b""
        while True:
            chunk = yield Recv()
            if not chunk:
                seen.append(data)
                return
            if ack and not data:
                yield Send(ack)
            data += chunk

    return body


class NetworkTests(ManagerTestBase):
    """TLS, idle timeouts and PROXY headers, the same on every manager."""

    @pytest.fixture
    def certs(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
        """A CA and a server certificate for 127.0.0.1 and localhost, made by trustme."""
        trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme")
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        folder = tmp_path_factory.mktemp("certs")
        paths = {
            "ca": str(folder / "ca.pem"),
            "cert": str(folder / "cert.pem"),
            "key": str(folder / "key.pem"),
        }
        ca.cert_pem.write_to_path(paths["ca"])
        cert.cert_chain_pems[0].write_to_path(paths["cert"])
        for blob in cert.cert_chain_pems[1:]:
            blob.write_to_path(paths["cert"], append=True)
        cert.private_key_pem.write_to_path(paths["key"])
        yield paths

    def tls_client(
        self, port: int | str, certs: dict[str, str], version: ssl.TLSVersion | None = None
    ) -> ssl.SSLSocket:
        """A verifying TLS client connected to the server."""
        context = ssl.create_default_context(cafile=certs["ca"])
        if version is not None:
            context.minimum_version = context.maximum_version = version
        return context.wrap_socket(connect(port), server_hostname="127.0.0.1")

    @pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
    def test_tls_round_trip(
        self, make_server: MakeServer, certs: dict[str, str], version: str
    ) -> None:
        """tls={certfile, keyfile}: the handshake happens in the connection's task; TLS 1.2 and 1.3."""
        server = make_server(reply_once, tls={"certfile": certs["cert"], "keyfile": certs["key"]})
        with self.tls_client(server.port, certs, ssl.TLSVersion[version]) as client:
            client.sendall(b"hello")
            assert recv_until_closed(client) == b"hello " + version.replace("_", ".").encode(), (
                "tls: the handshake happens in the connection's task and the handler sees the TLS version"
            )

    def test_tls_end_without_close_notify_is_an_end(
        self, make_server: MakeServer, certs: dict[str, str]
    ) -> None:
        """A TLS client that closes without close_notify ends the handler's input.

        Many clients do (Python's own ``SSLSocket.close()`` sends none): the
        handler's read gives ``b""`` once it has had everything sent, as over plain
        TCP, and nothing is counted as an error (the sync runtimes' rule, and the
        async ones': a runtime whose stream raised ``SSLEOFError`` passed every other
        test).
        """
        seen: list[bytes] = []
        body = _until_the_end(seen)
        # The application's own context: weft's (from a [tls] table) lets OpenSSL
        # itself take such an end for one (OP_IGNORE_UNEXPECTED_EOF), this one does not.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs["cert"], certs["key"])
        server = make_server(body, tls=context)
        with self.tls_client(server.port, certs) as client:
            client.sendall(b"abc")
            # A FIN with no close_notify (SSLSocket.shutdown drops the TLS state first).
            # Not close(): with the server's session tickets still unread, the kernel
            # would send a reset, which is no end but an error.
            client.shutdown(socket.SHUT_WR)
            wait_until(
                lambda: server.stats()["accepted"] == 1 and server.stats()["active"] == 0,
                what="the connection to end",
            )
        stats = server.stats()
        errors = {k: stats[k] for k in ("tls_errors", "peer_errors", "handler_errors")}
        assert seen == [b"abc"] and not any(errors.values()), (
            f"a TLS peer's end without close_notify must read as the end of input (b''): the "
            f"handler saw {seen} (nothing: its read raised), and {errors}"
        )

    def test_tls_reset_is_no_end(self, make_server: MakeServer, certs: dict[str, str]) -> None:
        """A TLS client that resets mid-conversation: the handler's next read raises.

        A reset is no end of input: read as one (``b""``, as the stdlib's
        ``suppress_ragged_eofs`` does), a request cut by a reset looks whole to the
        handler. It raises a ``ConnectionError`` and counts as the peer's
        (``peer_errors``), as over plain TCP (docs/writing-a-manager.md, section 4).
        """
        seen: list[bytes] = []
        body = _until_the_end(seen, ack=b"!")

        server = make_server(body, tls={"certfile": certs["cert"], "keyfile": certs["key"]})
        with self.tls_client(server.port, certs) as client:
            client.sendall(b"abc")
            assert recv_exactly(client, 1) == b"!", "the handler must run and reply"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_until(
            lambda: server.stats()["accepted"] == 1 and server.stats()["active"] == 0,
            what="the connection to end",
        )
        stats = server.stats()
        assert seen == [] and stats["peer_errors"] == 1, (
            f"a TLS peer's reset must make the handler's read raise a ConnectionError (counted"
            f" in peer_errors), not read as an end: the handler saw {seen} and the server"
            f" counted peer_errors={stats['peer_errors']}"
        )

    def test_tls_accepts_an_ssl_context(
        self, make_server: MakeServer, certs: dict[str, str]
    ) -> None:
        """Tls may be an ssl.SSLContext."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs["cert"], certs["key"])
        server = make_server(reply_once, tls=context)
        with self.tls_client(server.port, certs) as client:
            client.sendall(b"ctx")
            assert recv_until_closed(client).startswith(b"ctx TLSv1."), (
                "tls may be an ssl.SSLContext: the client is served over TLS"
            )

    def test_tls_garbage_and_silence_are_counted(
        self, make_server: MakeServer, certs: dict[str, str]
    ) -> None:
        """Plain text to a TLS port, and a silent client, are closed and counted; others are served."""
        server = make_server(
            reply_once,
            tls={"certfile": certs["cert"], "keyfile": certs["key"]},
            tls_handshake_timeout=0.5,
        )
        with connect(server.port) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            recv_until_closed(plain)
        with connect(server.port) as silent:
            started = time.monotonic()
            recv_until_closed(silent)
            assert time.monotonic() - started < WAIT, (
                "tls_handshake_timeout closes a silent client"
            )
        wait_until(lambda: server.stats()["tls_errors"] == 2, what="both failures to be counted")
        with self.tls_client(server.port, certs) as client:
            client.sendall(b"still")
            assert recv_until_closed(client).startswith(b"still "), (
                "clients after failed handshakes are served"
            )
        assert server.stats()["handler_errors"] == 0, (
            "a failed TLS handshake is not a handler error"
        )

    def test_tls_abuse_never_blocks_the_acceptor(
        self, make_server: MakeServer, certs: dict[str, str]
    ) -> None:
        """Clients that stall or vanish mid-handshake are closed and counted; others are served meanwhile."""
        server = make_server(
            reply_once,
            tls={"certfile": certs["cert"], "keyfile": certs["key"]},
            tls_handshake_timeout=1.0,
        )
        hello = _client_hello(certs)
        stalled = connect(server.port)
        stalled.sendall(hello[: len(hello) // 2])  # then silence, mid-handshake
        with connect(server.port) as vanishing:
            vanishing.sendall(hello[: len(hello) // 2])
        with self.tls_client(server.port, certs) as client:  # served while one stalls
            client.sendall(b"meanwhile")
            assert recv_until_closed(client).startswith(b"meanwhile "), (
                "a client stalled mid-handshake never blocks the acceptor: others are served meanwhile"
            )
        with stalled:
            assert recv_until_closed(stalled) == b"", (
                "tls_handshake_timeout closes the stalled one"
            )
        wait_until(lambda: server.stats()["tls_errors"] == 2, what="both to be counted")

    def test_idle_timeout_closes_a_silent_client(self, make_server: MakeServer) -> None:
        """idle_timeout closes a connection that sent nothing for that long, freeing its slot."""
        server = make_server(echo, idle_timeout=0.3, max_connections=1)
        with connect(server.port) as client:
            # Before the send: the server's wait for more begins after it, however late
            # this thread is woken by the echo on a loaded machine.
            started = time.monotonic()
            client.sendall(b"a")
            assert recv_exactly(client, 1) == b"a", "the handler must echo what the client sent"
            assert recv_until_closed(client) == b"", "idle_timeout closes a silent connection"
            elapsed = time.monotonic() - started
        assert 0.25 < elapsed < WAIT, (
            "idle_timeout closes a connection that sent nothing for that long (0.3 s), not sooner"
        )
        wait_until(lambda: server.stats()["active"] == 0, what="the slot to be freed")
        counts = {key: server.stats()[key] for key in ("idle_timeouts", "handler_errors")}
        assert counts == {"idle_timeouts": 1, "handler_errors": 0}, (
            f"an idle timeout is counted in stats()['idle_timeouts'], not as a handler error"
            f" (got {counts}): the connection's read must raise TimeoutError once"
            " idle_timeout runs out, not return b'' as if the client had ended"
        )
        with connect(server.port) as again:
            again.sendall(b"b")
            assert recv_exactly(again, 1) == b"b", "the slot is free again"

    def test_proxy_header_sets_peer(self, make_server: MakeServer) -> None:
        """proxy_protocol: the PROXY header's client address becomes current_connection().peer."""
        infos: list[ConnectionInfo] = []

        def record() -> Body:
            infos.append(current_connection())
            data = yield Recv()
            yield Send(data)

        server = make_server(record, proxy_protocol=True)
        for header in (
            build_v1(("203.0.113.7", 4242), ("127.0.0.1", 80)),
            build_v2(("2001:db8::1", 5353), ("::1", 80)),
        ):
            with connect(server.port) as client:
                client.sendall(header + b"payload")
                assert recv_exactly(client, 7) == b"payload", (
                    "bytes after the header reach the handler"
                )
        assert [i.peer[:2] for i in infos] == [("203.0.113.7", 4242), ("2001:db8::1", 5353)], (
            "the PROXY header's client address becomes current_connection().peer"
        )
        assert all(i.proxy_peer[0] == "127.0.0.1" for i in infos), (
            "current_connection().proxy_peer is the proxy's own address"
        )

    def test_proxy_header_rejections(self, make_server: MakeServer) -> None:
        """A malformed, missing or late PROXY header, or an untrusted sender: closed unserved, counted."""
        seen: list[Any] = []

        def record() -> Body:
            seen.append(1)
            yield Send(b"served")

        server = make_server(record, proxy_protocol=True, proxy_header_timeout=0.3)
        with connect(server.port) as bad:
            bad.sendall(b"PROXY TCP4 1.2.3.4\r\n")
            assert recv_until_closed(bad) == b"", (
                "a malformed PROXY header: the connection is closed unserved"
            )
        with connect(server.port) as missing:
            missing.sendall(b"hello there, no header here\r\n")
            assert recv_until_closed(missing) == b"", (
                "a missing PROXY header: the connection is closed unserved"
            )
        with connect(server.port) as late:
            assert recv_until_closed(late) == b"", (
                "no PROXY header within proxy_header_timeout: the connection is closed unserved"
            )
        untrusting = make_server(record, proxy_protocol=True, trusted_proxies=["192.0.2.0/24"])
        with connect(untrusting.port) as stranger:
            stranger.sendall(build_v1(("203.0.113.7", 1), ("127.0.0.1", 2)))
            assert recv_until_closed(stranger) == b"", (
                "a PROXY header from an untrusted sender: the connection is closed unserved"
            )
        assert seen == [], "the handler never sees a byte of a rejected connection"
        assert server.stats()["proxy_errors"] == 3 and untrusting.stats()["proxy_errors"] == 1, (
            "each rejected PROXY connection is counted in stats()['proxy_errors']"
        )

    def test_socket_options_are_set(self, make_server: MakeServer) -> None:
        """Nodelay (on by default) and keepalive are set on accepted sockets; SO_REUSEADDR on listeners."""
        options: list[tuple[int, int]] = []

        def look() -> Body:
            sock = current_connection().conn
            raw: Any = getattr(sock, "socket", sock)
            options.append(
                (
                    raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                )
            )
            yield Send(b"!")

        server = make_server(look, keepalive=True)
        listener: Any = server.socket
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0, (
            "listeners have SO_REUSEADDR"
        )
        with connect(server.port) as client:
            assert recv_exactly(client, 1) == b"!", "the handler must run and reply"
        quiet = make_server(look, nodelay=False)
        with connect(quiet.port) as client:
            assert recv_exactly(client, 1) == b"!", "the handler must run and reply"
        assert [(bool(a), bool(b)) for a, b in options] == [(True, True), (False, False)], (
            "nodelay (on by default) and keepalive are set on accepted sockets, and nodelay=False turns TCP_NODELAY off"
        )
