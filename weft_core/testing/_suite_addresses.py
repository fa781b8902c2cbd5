"""Conformance tests of where a server listens and what it tells about it (docs/networking.md).

Address families, Unix sockets, several binds, socket options read back from the
kernel, task names, the lifecycle callbacks and hooks, and the TLS fields of
``current_connection()``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from .._connection import ConnectionInfo, current_connection, format_address
from .._errors import BindError
from .._registry import register, unregister
from .._server import Server
from ..hookspecs import hookimpl
from ._adapters import Body, Send
from ._base import ManagerTestBase
from ._bodies import echo
from ._support import WAIT, connect, recv_exactly, recv_until_closed, wait_until

__all__ = ["AddressTests"]

MakeServer = Callable[..., Server]

#: What "at once" means for a stop with nothing to wait for, with room for a loaded CI machine.
PROMPT = 2.0


def echo_once(client: socket.socket, data: bytes = b"ping") -> None:
    """Send ``data`` on ``client`` and expect it back."""
    client.sendall(data)
    assert recv_exactly(client, len(data)) == data, "the handler must echo what the client sent"


def connect_unix(path: str) -> socket.socket:
    """A client connected to the Unix socket at ``path``, with the suite's timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def has_ipv6_loopback() -> bool:
    """True if ``::1`` can be bound here (containers often have IPv6 switched off)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def native_task_name() -> str:
    """The running task's name when the ManagerSpec says nothing: trio task, greenlet, or thread."""
    trio: Any = sys.modules.get("trio")
    if trio is not None:
        try:
            return str(trio.lowlevel.current_task().name)
        except RuntimeError:
            pass  # not in a trio task
    gevent: Any = sys.modules.get("gevent")
    if gevent is not None:
        current = gevent.getcurrent()
        name = getattr(current, "name", None)  # gevent.Greenlet, or a manager's own greenlet
        if isinstance(name, str) and current is not gevent.get_hub():
            return name
    return threading.current_thread().name


class _Lifecycle:
    """A plugin recording weft_server_started/stopped into a shared list."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    @hookimpl
    def weft_server_started(self, server: Server, addresses: list[str]) -> None:
        self.calls.append(("started", list(addresses)))

    @hookimpl
    def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        self.calls.append(("stopped", None))


class AddressTests(ManagerTestBase):
    """Families, Unix sockets, binds, socket options, names, lifecycle, TLS details."""

    #: The manager names each connection's thread, greenlet or task ``weft conn
    #: HOST:PORT`` (the connection thunk's ``__name__``), so that debuggers, ``py-spy``
    #: and trio's task tree show which client a task serves. None: as the
    #: ManagerSpec's ``conformance.names_tasks`` says.
    names_tasks: ClassVar[bool | None] = None

    def current_task_name(self) -> str:
        """The runtime's name for the running task: the spec's ``conformance.task_name``.

        A subclass may override it; without either, trio's, gevent's or the thread's.
        """
        read = self.spec().conformance.task_name
        return read() if read is not None else native_task_name()

    @pytest.fixture
    def sock_dir(self) -> Iterator[str]:
        """A short temporary directory for Unix sockets (paths are limited to 107 bytes)."""
        path = tempfile.mkdtemp(prefix="weft-")
        yield path
        shutil.rmtree(path, ignore_errors=True)

    @pytest.fixture
    def lifecycle(self) -> Iterator[list[tuple[str, Any]]]:
        """Every on_start/on_stop call and lifecycle hook, in order, while the test runs."""
        calls: list[tuple[str, Any]] = []
        plugin = _Lifecycle(calls)
        name = register(plugin, name=f"weft-conformance-lifecycle-{id(plugin)}")
        yield calls
        unregister(name=name)

    # -- families ------------------------------------------------------------------------

    def test_family_ipv6(self, make_server: MakeServer) -> None:
        """family="ipv6" listens on a v6-only socket; a ::1 client is served and seen as ::1."""
        if not has_ipv6_loopback():
            pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
        peers: list[Any] = []

        def record() -> Body:
            peers.append(current_connection().peer)
            yield from echo()

        server = make_server(record, address="::1", family="ipv6")
        assert server.addresses == [f"[::1]:{server.port}"], (
            "family='ipv6' on ::1 lists one address, [::1]:PORT"
        )
        listener: Any = server.socket
        assert listener.family == socket.AF_INET6, "family='ipv6' listens on an AF_INET6 socket"
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1, (
            "family='ipv6' listens on a v6-only socket (IPV6_V6ONLY=1)"
        )
        with connect(server.port, "::1") as client:
            echo_once(client)
        assert peers[0][0] == "::1", "current_connection().peer of a ::1 client is ::1"

    def test_family_dual(self, make_server: MakeServer) -> None:
        """family="dual" on :: takes v6 and v4 clients on one socket; v4 peers are ::ffff:a.b.c.d.

        Each connection's ``local`` is the address that client dialled.
        """
        if not has_ipv6_loopback():
            pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
        peers: list[Any] = []
        locals_: list[Any] = []

        def record() -> Body:
            peers.append(current_connection().peer)
            locals_.append(current_connection().local)
            yield from echo()

        server = make_server(record, address="::", family="dual")
        assert server.addresses == [f"[::]:{server.port}"], (
            "family='dual' on :: lists one address, [::]:PORT"
        )
        listener: Any = server.socket
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0, (
            "family='dual' listens on a socket that takes v4 clients too (IPV6_V6ONLY=0)"
        )
        for host in ("::1", "127.0.0.1"):
            with connect(server.port, host) as client:
                echo_once(client)
        assert [p[0] for p in peers] == ["::1", "::ffff:127.0.0.1"], (
            "family='dual': a v6 client is seen as ::1, a v4 client as ::ffff:a.b.c.d"
        )
        # A wildcard listener: each connection's local address is its own.
        assert [a[:2] for a in locals_] == [
            ("::1", server.port),
            ("::ffff:127.0.0.1", server.port),
        ], "on a wildcard listener each connection's local address is the one its client dialled"

    def test_family_ipv4(self, make_server: MakeServer) -> None:
        """family="ipv4" binds only the IPv4 addresses of a name."""
        server = make_server(echo, address="localhost", family="ipv4")
        assert server.sockets and all(s.family == socket.AF_INET for s in server.sockets), (
            "family='ipv4' binds only AF_INET sockets"
        )
        with connect(server.port, "127.0.0.1") as client:
            echo_once(client)

    def test_family_auto_binds_every_address_of_a_name(self, make_server: MakeServer) -> None:
        """family="auto": a name resolving to several addresses gets a socket each, on one port."""
        infos = socket.getaddrinfo(
            "localhost", 0, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        hosts = sorted({str(info[4][0]) for info in infos})
        server = make_server(echo, address="localhost")
        bound = sorted(s.getsockname()[0] for s in server.sockets)
        assert bound == hosts, "family='auto' binds every address a name resolves to"
        assert {s.getsockname()[1] for s in server.sockets} == {server.port}, (
            "family='auto' binds every address of a name on one port"
        )
        for host in hosts:
            with connect(server.port, host) as client:
                echo_once(client)

    # -- Unix sockets --------------------------------------------------------------------

    def test_unix_socket_echo_mode_and_removal(
        self, make_server: MakeServer, sock_dir: str
    ) -> None:
        """unix:/path serves over AF_UNIX, applies unix_mode, and removes the file on stop."""
        path = os.path.join(sock_dir, "s.sock")
        server = make_server(echo, address=f"unix:{path}", unix_mode=0o660)
        assert server.addresses == [f"unix:{path}"], "unix:/path lists its address as unix:/path"
        assert os.stat(path).st_mode & 0o777 == 0o660, "unix_mode is applied to the socket file"
        with connect_unix(path) as client:
            echo_once(client)
        server.stop()
        assert not os.path.exists(path), "the socket file is removed on stop"

    def test_unix_socket_stale_file_is_replaced(
        self, make_server: MakeServer, sock_dir: str
    ) -> None:
        """A socket file left by a dead server is replaced; one a live server listens on is a BindError."""
        path = os.path.join(sock_dir, "s.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(path)  # closed without unlinking: what a killed server leaves
        assert os.path.exists(path), "(setup) the stale socket file exists"
        live = make_server(echo, address=f"unix:{path}")
        with connect_unix(path) as client:
            echo_once(client)
        second = make_server(echo, address=f"unix:{path}", start=False)
        with pytest.raises(BindError, match="another server is listening"):
            second.run()
        with connect_unix(path) as client:
            echo_once(client, b"still served")
        assert live.running, (
            "a second server on a live Unix socket fails without disturbing the first"
        )

    def test_unix_socket_stop_is_prompt(self, make_server: MakeServer, sock_dir: str) -> None:
        """stop() of a Unix socket server whose acceptor is waiting returns at once."""
        path = os.path.join(sock_dir, "s.sock")
        server = make_server(echo, address=f"unix:{path}")
        with connect_unix(path) as client:
            echo_once(client)  # the acceptor is now waiting in accept() again
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < PROMPT, (
            "stop() of a Unix socket server whose acceptor waits in accept() returns at once"
        )

    def test_several_binds(self, make_server: MakeServer, sock_dir: str) -> None:
        """bind=[TCP, unix] listens on both at once; a port-0 bind's port is read from addresses."""
        path = os.path.join(sock_dir, "s.sock")
        server = make_server(echo, bind=["127.0.0.1:0", f"unix:{path}"])
        assert server.addresses == [f"127.0.0.1:{server.port}", f"unix:{path}"], (
            "bind=[TCP, unix] lists both addresses, the TCP one with its bound port"
        )
        with connect(server.port) as tcp, connect_unix(path) as unix:
            echo_once(tcp, b"tcp")
            echo_once(unix, b"unix")
        server.stop()
        assert server.addresses == [] and not os.path.exists(path), (
            "stop() closes every listener and removes the Unix socket file"
        )

    def test_inherited_listener_serves_the_clients_waiting_on_it(
        self, make_server: MakeServer
    ) -> None:
        """bind=["fd:N"] serves a socket the process inherited, and the clients queued on it.

        Such a listener may be shared with other processes (``--workers``, systemd), so
        the acceptor yields to the runtime after each client (``runtime.sleep(0)``):
        every waiting client must still be served, and the stop must still close it.
        """
        listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        port = listener.getsockname()[1]
        waiting = [connect(port) for _ in range(5)]  # in the backlog before run()
        try:
            server = make_server(echo, bind=[f"fd:{listener.detach()}"])
            assert server.port == port, "the inherited socket's port is the server's"
            for i, client in enumerate(waiting):
                echo_once(client, b"queued %d" % i)
            server.stop()
        finally:
            for client in waiting:
                client.close()
        with pytest.raises(OSError):
            connect(port).close()  # closed by the stop: refused

    def test_port_as_a_service_name(self, make_server: MakeServer) -> None:
        """port="http" is resolved to 80: bound (as root) or a BindError naming port 80."""
        try:
            http = socket.getservbyname("http", "tcp")
        except OSError:
            pytest.skip("no services database here (/etc/services)")
        server = make_server(echo, port="http", start=False)
        try:
            server.run()
        except BindError as exc:
            assert f"127.0.0.1:{http}" in str(exc), (
                "a BindError names the address and port it could not bind"
            )
            return
        assert server.port == http, "port='http' binds port 80"
        with connect(server.port) as client:
            echo_once(client)

    # -- socket options ------------------------------------------------------------------

    def test_backlog_reaches_the_kernel(self, make_server: MakeServer) -> None:
        """Backlog is passed to listen(): the kernel reports it (ss's Send-Q for a listener)."""
        ss = shutil.which("ss")
        if ss is None:
            pytest.skip("the backlog is read back with `ss` (iproute2), which is not installed")
        server = make_server(echo, backlog=7)
        result = subprocess.run(
            [ss, "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True, timeout=WAIT
        )
        rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or len(rows) != 1:
            pytest.skip(f"`ss` could not list the listener: {result.stderr.strip() or rows}")
        assert rows[0][2] == "7", f"Send-Q of the listener is its backlog: {rows[0]}"

    def test_reuse_port(self, make_server: MakeServer) -> None:
        """reuse_port=True sets SO_REUSEPORT, so a second server can listen on the same port."""
        if not hasattr(socket, "SO_REUSEPORT"):
            pytest.skip("this platform has no SO_REUSEPORT")
        plain = make_server(echo)
        assert plain.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0, (
            "without reuse_port the listener has no SO_REUSEPORT"
        )
        first = make_server(echo, reuse_port=True)
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0, (
            "reuse_port=True sets SO_REUSEPORT on the listener"
        )
        second = make_server(echo, port=first.port, reuse_port=True)
        assert second.port == first.port, (
            "reuse_port=True lets a second server listen on the same port"
        )

    # -- names, lifecycle ---------------------------------------------------------------

    def test_tasks_are_named_after_the_peer(self, make_server: MakeServer) -> None:
        """Each connection's thread, greenlet or task is named ``weft conn HOST:PORT``."""
        names_tasks = self.names_tasks
        if names_tasks is None:
            names_tasks = self.spec().conformance.names_tasks
        if not names_tasks:
            pytest.skip(
                f"{self._name()} declares names_tasks=False: its runtime has no task names"
            )
        names: list[str] = []

        def record() -> Body:
            names.append(self.current_task_name())
            yield Send(b"!")

        server = make_server(record)
        expected: list[str] = []
        # One after another, each ended first: a worker (a thread, a greenlet) reused
        # for the next connection must carry the next one's name, not its last.
        for _ in range(3):
            with connect(server.port) as client:
                assert recv_exactly(client, 1) == b"!", "the handler must run and reply"
                expected.append(f"weft conn {format_address(client.getsockname())}")
            wait_until(lambda: server.stats()["active"] == 0, what="the connection to end")
        assert names == expected, (
            "each connection's task is named `weft conn HOST:PORT` (the thunk's __name__),"
            " a worker reused for the next connection included; check the ManagerSpec's"
            f" Conformance(task_name=...) reads your runtime's task name: saw {names}"
        )

    def test_lifecycle_callbacks_and_hooks(
        self, make_server: MakeServer, lifecycle: list[tuple[str, Any]]
    ) -> None:
        """on_start, weft_server_started, on_stop, weft_server_stopped: once each, in order, with the addresses."""
        server = make_server(
            echo,
            start=False,
            on_start=lambda s: lifecycle.append(("on_start", list(s.addresses))),
            on_stop=lambda s: lifecycle.append(("on_stop", None)),
        )
        server.run()
        bound = server.addresses
        assert bound == [f"127.0.0.1:{server.port}"], (
            "addresses lists the bound address with its port"
        )
        server.stop()
        server.stop()
        assert lifecycle == [
            ("on_start", bound),
            ("started", bound),
            ("on_stop", None),
            ("stopped", None),
        ], (
            "on_start, weft_server_started, on_stop, weft_server_stopped are called once each, in that order, with the addresses"
        )

    def test_on_start_that_raises(
        self, make_server: MakeServer, lifecycle: list[tuple[str, Any]]
    ) -> None:
        """An on_start that raises: run() raises it, the server is stopped, no started hook fires."""

        class Boom(Exception):
            pass

        ports: list[int] = []

        def on_start(server: Server) -> None:
            ports.append(int(server.port))
            raise Boom("on_start failed")

        server = make_server(echo, start=False, on_start=on_start)
        with pytest.raises(Boom):
            server.run()
        assert server.stopped and not server.running and server.socket is None, (
            "an on_start that raises leaves the server stopped, with no listener"
        )
        try:
            connect(ports[0]).close()
        except ConnectionRefusedError:
            pass
        else:
            pytest.fail(
                "an on_start that raises leaves no listener: a client was still taken (the"
                " acceptor must end, and the listener close, when run() fails after binding)"
            )
        assert ("started", [f"127.0.0.1:{ports[0]}"]) not in lifecycle, (
            "weft_server_started does not fire when on_start raised"
        )

    # -- TLS details ---------------------------------------------------------------------

    @pytest.fixture
    def client_certs(self, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
        """A CA, a server certificate for 127.0.0.1 and a client certificate, by trustme."""
        trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme")
        ca = trustme.CA()
        folder = tmp_path_factory.mktemp("client-certs")
        paths = {"ca": str(folder / "ca.pem")}
        ca.cert_pem.write_to_path(paths["ca"])
        for role, identity in (("server", "127.0.0.1"), ("client", "client.example.org")):
            cert = ca.issue_cert(identity)
            paths[f"{role}_cert"] = str(folder / f"{role}.pem")
            paths[f"{role}_key"] = str(folder / f"{role}.key")
            cert.private_key_pem.write_to_path(paths[f"{role}_key"])
            for i, blob in enumerate(cert.cert_chain_pems):
                blob.write_to_path(paths[f"{role}_cert"], append=i > 0)
        return paths

    def test_tls_details_with_a_client_certificate(
        self, make_server: MakeServer, client_certs: dict[str, str]
    ) -> None:
        """current_connection() gives the TLS version, cipher and the client's certificate."""
        infos: list[ConnectionInfo] = []

        def record() -> Body:
            infos.append(current_connection())
            yield from echo()

        paths = client_certs
        server = make_server(
            record,
            tls={
                "certfile": paths["server_cert"],
                "keyfile": paths["server_key"],
                "cafile": paths["ca"],
                "require_client_cert": True,
            },
        )
        context = ssl.create_default_context(cafile=paths["ca"])
        context.load_cert_chain(paths["client_cert"], paths["client_key"])
        with context.wrap_socket(connect(server.port), server_hostname="127.0.0.1") as client:
            echo_once(client)
            version, cipher = client.version(), client.cipher()
        info = infos[0]
        assert (info.tls_version, info.tls_cipher) == (version, cipher and cipher[0]), (
            "current_connection() gives the TLS version and cipher the client negotiated"
        )
        assert info.tls_peer_certificate is not None, (
            "current_connection().tls_peer_certificate is the client's certificate"
        )
        assert ("DNS", "client.example.org") in info.tls_peer_certificate["subjectAltName"], (
            "current_connection().tls_peer_certificate is the client's certificate"
        )

        anonymous = ssl.create_default_context(cafile=paths["ca"])

        def without_certificate() -> bytes:
            try:
                with anonymous.wrap_socket(connect(server.port), server_hostname="127.0.0.1") as c:
                    c.sendall(b"no certificate")
                    return recv_until_closed(c)
            except (ssl.SSLError, OSError):  # TLS 1.2 fails in the handshake, 1.3 after it
                return b""

        assert without_certificate() == b"", "a client without a certificate is not served"
        wait_until(lambda: server.stats()["tls_errors"] == 1, what="the refusal to be counted")
        assert len(infos) == 1, "a client without the required certificate is not served"
