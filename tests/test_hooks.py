"""weft's hooks for plugins that are not managers, against a real running Server.

Each lifecycle hook in ``weft_core/hookspecs.py`` is exercised here: a plugin is
registered in-process with ``weft_core._registry.register`` for one test and
unregistered after it, and the test asserts when the hook fires and with what.
The last tests are datasette's: every hook must have a section in
``docs/hooks.md`` and a test in this file whose name names it, and the complete
example in ``docs/hooks.md`` must run.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import weft_core
from weft_core import ConnectionInfo, ManagerSpec, Server, _registry, hookimpl, hookspecs
from weft_core.testing import wait_until

pytestmark = pytest.mark.timeout(30)

DOCS = Path(__file__).parent.parent / "docs" / "hooks.md"

#: The longest a test waits for a hook to fire.
WAIT = 10.0


class Recorder:
    """A plugin implementing every lifecycle hook; records each call and signals it."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _record(self, hook: str, **kwargs: Any) -> None:
        with self._lock:
            self.calls.setdefault(hook, []).append(kwargs)
            self._event(hook).set()

    def _event(self, hook: str) -> threading.Event:
        return self._events.setdefault(hook, threading.Event())

    def wait(self, hook: str) -> list[dict[str, Any]]:
        """Wait until ``hook`` has fired; its calls so far."""
        with self._lock:
            event = self._event(hook)
        assert event.wait(WAIT), f"{hook} did not fire within {WAIT}s"
        with self._lock:
            return list(self.calls[hook])

    def fired(self, hook: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.calls.get(hook, []))

    @hookimpl
    def weft_server_started(self, server: Server, addresses: list[str]) -> None:
        # Seen from inside the hook: is the server already listening?
        self._record(
            "weft_server_started",
            server=server,
            addresses=addresses,
            running=server.running,
            listening=server.socket is not None,
        )

    @hookimpl
    def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        self._record(
            "weft_server_stopped",
            server=server,
            stats=stats,
            stopped=server.stopped,
            listening=server.socket is not None,
        )

    @hookimpl
    def weft_connection_refused(self, server: Server, peer: str, reason: str) -> None:
        self._record("weft_connection_refused", server=server, peer=peer, reason=reason)

    @hookimpl
    def weft_handler_error(
        self, server: Server, connection: ConnectionInfo, exception: BaseException
    ) -> None:
        self._record(
            "weft_handler_error", server=server, connection=connection, exception=exception
        )

    @hookimpl
    def weft_connection_opened(self, server: Server, connection: ConnectionInfo) -> None:
        self._record("weft_connection_opened", server=server, connection=connection)

    @hookimpl
    def weft_connection_closed(
        self,
        server: Server,
        connection: ConnectionInfo,
        duration: float,
        bytes_in: int | None,
        bytes_out: int | None,
        how: str,
    ) -> None:
        self._record(
            "weft_connection_closed",
            server=server,
            connection=connection,
            duration=duration,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            how=how,
        )


@pytest.fixture
def register() -> Iterator[Callable[[object], str]]:
    """``register(plugin)``: register an in-process plugin for this test only."""
    names: list[str] = []

    def add(plugin: object) -> str:
        names.append(_registry.register(plugin, name=f"test-hooks-{len(names)}"))
        return names[-1]

    yield add
    for name in names:
        _registry.unregister(name=name)


@pytest.fixture
def recorder(register: Callable[[object], str]) -> Recorder:
    plugin = Recorder()
    register(plugin)
    return plugin


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test made; each is stopped after the test."""
    made: list[Server] = []
    yield made
    for server in made:
        server.stop(timeout=1)


def greet_then_echo(conn: socket.socket) -> None:
    conn.sendall(b"+")
    while data := conn.recv(65536):
        conn.sendall(data)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def recv_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# -- weft_server_started -----------------------------------------------------------------


def test_weft_server_started_fires_once_listening_with_addresses(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    assert recorder.fired("weft_server_started") == []
    server.run()
    # run() calls the hook before it returns: no waiting needed, and exactly once.
    [call] = recorder.fired("weft_server_started")
    assert call["server"] is server
    assert call["addresses"] == server.addresses == [f"127.0.0.1:{server.port}"]
    assert call["running"] and call["listening"], "it fires once the server listens"
    with connect(server) as client:
        assert recv_exactly(client, 1) == b"+"


def test_weft_server_started_lists_every_bound_address(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads", bind=["127.0.0.1:0", "127.0.0.1:0"])
    servers.append(server)
    server.run()
    [call] = recorder.fired("weft_server_started")
    assert len(call["addresses"]) == 2
    assert call["addresses"] == server.addresses


def test_weft_server_started_fires_again_on_rerun(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    server.stop()
    server.run()
    calls = recorder.fired("weft_server_started")
    assert len(calls) == 2 and calls[1]["addresses"] == server.addresses


def test_weft_server_started_not_fired_on_bind_error(
    recorder: Recorder, servers: list[Server]
) -> None:
    first = Server(greet_then_echo, manager="threads")
    servers.append(first)
    first.run()
    second = Server(greet_then_echo, manager="threads", port=first.port)
    with pytest.raises(OSError):
        second.run()
    assert [c["server"] for c in recorder.fired("weft_server_started")] == [first]


# -- weft_server_stopped -----------------------------------------------------------------


def test_weft_server_stopped_fires_once_stopped_with_final_stats(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    for _ in range(2):
        with connect(server) as client:
            assert recv_exactly(client, 1) == b"+"
    assert recorder.fired("weft_server_stopped") == []
    assert server.stop(timeout=WAIT) is True
    [call] = recorder.fired("weft_server_stopped")  # stop() returns after the hook ran
    assert call["server"] is server
    assert call["stopped"] and not call["listening"], "it fires once nothing is left running"
    stats = call["stats"]
    assert stats["accepted"] == 2 and stats["active"] == 0 and stats["refused"] == 0
    assert stats == server.stats()
    server.stop()
    assert len(recorder.fired("weft_server_stopped")) == 1, "a second stop() fires nothing"


def test_weft_server_stopped_fires_after_stop_accepting_drains(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    client = connect(server)
    assert recv_exactly(client, 1) == b"+"
    server.stop_accepting()
    assert recorder.fired("weft_server_stopped") == [], "open connections go on"
    client.close()
    [call] = recorder.wait("weft_server_stopped")
    assert call["stats"]["accepted"] == 1


# -- weft_connection_refused -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"max_connections": 1}, "full"),
        # limit=2: the acceptor holds one, the first connection the other.
        ({"max_connections": None, "manager_options": {"limit": 2}}, "manager-full"),
    ],
)
def test_weft_connection_refused_fires_at_the_limit(
    recorder: Recorder, servers: list[Server], options: dict[str, Any], reason: str
) -> None:
    server = Server(greet_then_echo, manager="threads", **options)
    servers.append(server)
    server.run()
    with connect(server) as held:
        assert recv_exactly(held, 1) == b"+"
        assert recorder.fired("weft_connection_refused") == []
        with connect(server) as refused:
            assert recv_until_closed(refused) == b"", "the refused client is closed unserved"
            [call] = recorder.wait("weft_connection_refused")
            host, port = refused.getsockname()[:2]
            assert call["server"] is server
            assert call["peer"] == f"{host}:{port}"
            assert call["reason"] == reason
    assert server.stats()["refused"] == 1


def _tls_context() -> ssl.SSLContext:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"proxy_protocol": True}, "proxy"),
        ({"proxy_protocol": True, "trusted_proxies": ["192.0.2.0/24"]}, "untrusted"),
        ({"tls": "context"}, "tls"),
    ],
)
def test_weft_connection_refused_fires_for_a_bad_header_or_handshake(
    recorder: Recorder, servers: list[Server], options: dict[str, Any], reason: str
) -> None:
    if options.get("tls") == "context":
        options = {"tls": _tls_context(), "tls_handshake_timeout": WAIT}
    server = Server(greet_then_echo, manager="threads", **options)
    servers.append(server)
    server.run()
    with connect(server) as client:
        client.sendall(b"NOT A PROXY HEADER OR A TLS HELLO\r\n\r\n")
        assert recv_until_closed(client) == b"", "closed unserved: the handler never ran"
        [call] = recorder.wait("weft_connection_refused")
        host, port = client.getsockname()[:2]
    assert call["server"] is server
    assert call["peer"] == f"{host}:{port}"
    assert call["reason"] == reason


def test_weft_connection_refused_not_fired_when_serving(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads", max_connections=2)
    servers.append(server)
    server.run()
    with connect(server) as a, connect(server) as b:
        assert recv_exactly(a, 1) == recv_exactly(b, 1) == b"+"
    server.stop(timeout=WAIT)
    assert recorder.fired("weft_connection_refused") == []


# -- weft_handler_error ------------------------------------------------------------------


def test_weft_handler_error_gets_the_handlers_own_exception(
    recorder: Recorder, servers: list[Server]
) -> None:
    raised: list[BaseException] = []
    handled: list[BaseException] = []

    def failing(conn: socket.socket) -> None:
        if conn.recv(10) == b"fail":
            exc = ValueError("hooks: deliberate failure")
            raised.append(exc)
            raise exc
        conn.sendall(b"ok")

    server = Server(
        failing, manager="threads", exception_handler=lambda s, c, e: handled.append(e)
    )
    servers.append(server)
    server.run()
    with connect(server) as good:
        good.sendall(b"fine")
        assert recv_exactly(good, 2) == b"ok"
    with connect(server) as bad:
        bad.sendall(b"fail")
        assert recv_until_closed(bad) == b""
        [call] = recorder.wait("weft_handler_error")
        local = bad.getsockname()[:2]
    assert call["server"] is server
    assert call["exception"] is raised[0], "the handler's own exception, not a wrapper"
    connection = call["connection"]
    assert isinstance(connection, ConnectionInfo)
    assert connection.peer[:2] == local
    assert connection.task_id is not None
    assert handled == raised, "exception_handler is still called"
    assert server.stats()["handler_errors"] == 1


# -- weft_connection_opened and weft_connection_closed ------------------------------------


def test_weft_connection_opened_fires_in_the_task_before_the_handler(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    with connect(server) as client:
        assert recv_exactly(client, 1) == b"+"
        [call] = recorder.wait("weft_connection_opened")
        assert call["server"] is server
        assert call["connection"].peer == client.getsockname()
        [live] = server.connections()
        assert call["connection"].task_id == live.task_id is not None
        assert recorder.fired("weft_connection_closed") == []


def test_weft_connection_closed_reports_duration_bytes_and_how(
    recorder: Recorder, servers: list[Server]
) -> None:
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    with connect(server) as client:
        client.sendall(b"hello")
        assert recv_exactly(client, 6) == b"+hello"
    [call] = recorder.wait("weft_connection_closed")
    assert call["how"] == "closed"
    assert call["bytes_in"] == 5, "the kernel's count of bytes received"
    assert call["bytes_out"] == 6, "the kernel's count of bytes sent and acknowledged"
    assert 0 < call["duration"] < WAIT
    assert call["connection"] is recorder.fired("weft_connection_opened")[0]["connection"]
    stats = server.stats()
    assert (stats["bytes_in"], stats["bytes_out"]) == (5, 6)
    assert stats["durations"]["+Inf"] == 1 and stats["duration_sum"] > 0


def _raises(conn: socket.socket) -> None:
    conn.recv(1)
    raise RuntimeError("boom")


def _detaches(conn: socket.socket) -> None:
    weft_core.detach(conn)
    conn.close()


def _waits(conn: socket.socket) -> None:
    conn.sendall(b"+")
    while conn.recv(1):
        pass


@pytest.mark.parametrize(
    ("handler", "options", "how"),
    [
        (_raises, {}, "error"),
        (_detaches, {}, "detached"),
        (_waits, {"idle_timeout": 0.05}, "idle_timeout"),
        (_waits, {"proxy_protocol": True}, "proxy_error"),
    ],
)
def test_weft_connection_closed_says_how_it_ended(
    recorder: Recorder,
    servers: list[Server],
    handler: Callable[[socket.socket], None],
    options: dict[str, Any],
    how: str,
) -> None:
    server = Server(handler, manager="threads", exception_handler=lambda *a: None, **options)
    servers.append(server)
    server.run()
    with connect(server) as client:
        client.sendall(b"x\r\n")
        [call] = recorder.wait("weft_connection_closed")
    assert call["how"] == how


def test_weft_connection_closed_says_stopped_and_none_for_unix_sockets(
    recorder: Recorder, servers: list[Server], tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    server = Server(_waits, manager="threads", address=f"unix:{path}")
    servers.append(server)
    server.run()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(WAIT)
        client.connect(str(path))
        assert recv_exactly(client, 1) == b"+"
        server.stop(timeout=WAIT)
    [call] = recorder.wait("weft_connection_closed")
    assert call["how"] == "stopped"
    assert (call["bytes_in"], call["bytes_out"]) == (None, None), "the kernel cannot tell"


def test_access_log_writes_one_escaped_line_per_connection(
    servers: list[Server], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.access")
    path = tmp_path / "s.sock"
    server = Server(_waits, manager="threads", address=f"unix:{path}", access_log=True)
    servers.append(server)
    server.run()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(WAIT)
        client.bind(str(tmp_path / "evil\nFORGED"))
        client.connect(str(path))
        assert recv_exactly(client, 1) == b"+"
    # Its end logged before the stop: a stop that met it first would say "stopped".
    wait_until(
        lambda: any(r.name == "weft.access" for r in caplog.records),
        what="the access log's line",
    )
    server.stop(timeout=WAIT)
    [record] = [r for r in caplog.records if r.name == "weft.access"]
    assert "\n" not in record.getMessage() and "evil\\nFORGED" in record.getMessage()
    assert record.how == "closed" and record.bytes_in is None  # type: ignore[attr-defined]
    assert record.peer.endswith("evil\\nFORGED")  # type: ignore[attr-defined]
    assert isinstance(record.duration, float)  # type: ignore[attr-defined]


def test_access_log_is_off_by_default(
    servers: list[Server], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.access")
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    server.run()
    with connect(server) as client:
        assert recv_exactly(client, 1) == b"+"
    server.stop(timeout=WAIT)
    assert [r for r in caplog.records if r.name == "weft.access"] == []


# -- weft_managers -----------------------------------------------------------------------


class _Plugin:
    """A manager plugin registered in-process: threads' factory under another name."""

    @hookimpl
    def weft_managers(self) -> list[ManagerSpec]:
        threads = _registry.get_manager_spec("threads")
        return [ManagerSpec("hooks-test", threads.factory, "threads, renamed", "sync")]


def test_weft_managers_provides_a_manager_by_name(
    register: Callable[[object], str], recorder: Recorder, servers: list[Server]
) -> None:
    register(_Plugin())
    spec = _registry.available_managers()["hooks-test"]
    assert spec.description == "threads, renamed" and spec.distribution is None
    server = Server(greet_then_echo, manager="hooks-test")
    servers.append(server)
    server.run()
    with connect(server) as client:
        assert recv_exactly(client, 1) == b"+"
    assert recorder.fired("weft_server_started")[0]["server"] is server


# -- a plugin's failure never stops the server -----------------------------------------------


class _Raises:
    @hookimpl
    def weft_server_started(self, server: Server, addresses: list[str]) -> None:
        raise RuntimeError("hooks: plugin failure")


def test_weft_server_started_raising_is_logged_and_ignored(
    register: Callable[[object], str],
    recorder: Recorder,
    servers: list[Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    register(_Raises())
    server = Server(greet_then_echo, manager="threads")
    servers.append(server)
    with caplog.at_level(logging.ERROR, logger="weft.plugins"):
        server.run()
    assert server.running
    assert len(recorder.fired("weft_server_started")) == 1, "other plugins are still called"
    assert any("hooks: plugin failure" in r.exc_text for r in caplog.records if r.exc_text)
    with connect(server) as client:
        assert recv_exactly(client, 1) == b"+"


class _ReraisesWhatThePeerSent:
    """A plugin whose hook raises with the handler's exception in its message."""

    @hookimpl
    def weft_handler_error(
        self, server: Server, connection: Any, exception: BaseException
    ) -> None:
        raise RuntimeError(f"could not report {exception}")


def test_a_hooks_exception_carrying_peer_bytes_is_logged_escaped(
    register: Callable[[object], str], servers: list[Server], caplog: pytest.LogCaptureFixture
) -> None:
    """The handler fails with what the client sent in its message; a plugin's hook, handed
    that exception, raises with it in its own. The plugin's error is logged (and
    ignored) with every message in its traceback escaped: a newline from the client
    cannot start a forged log line (it could, before, through ``exc_info``)."""
    register(_ReraisesWhatThePeerSent())

    def failing(conn: socket.socket) -> None:
        raise ValueError(conn.recv(100).decode())

    server = Server(failing, manager="threads", exception_handler=lambda s, c, e: None)
    servers.append(server)
    server.run()
    forged = "x\n2026-12-05 [CRITICAL] weft: forged by the client"
    with caplog.at_level(logging.ERROR, logger="weft.plugins"):
        with connect(server) as client:
            client.sendall(forged.encode())
            assert recv_until_closed(client) == b""
        wait_until(
            lambda: any(r.name == "weft.plugins" for r in caplog.records),
            what="the plugin's error",
        )
    [record] = [r for r in caplog.records if r.name == "weft.plugins"]
    text = logging.Formatter().format(record)
    assert "x\\n2026-12-05 [CRITICAL]" in text, text
    assert "\n2026-12-05 [CRITICAL]" not in text, text


# -- datasette: every hook documented and tested -------------------------------------------


def _hooks() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if name.startswith("weft_") and inspect.isfunction(obj) and hasattr(obj, marker)
    )


def test_hookspecs_are_found() -> None:
    assert "weft_server_started" in _hooks() and "weft_managers" in _hooks()


@pytest.mark.parametrize("hook", _hooks())
def test_hook_is_documented(hook: str) -> None:
    headings = re.findall(r"^##+ `?(weft_\w+)", DOCS.read_text(), flags=re.MULTILINE)
    assert hook in headings, f"{hook} (hookspecs.py) needs a section in docs/hooks.md"


@pytest.mark.parametrize("hook", _hooks())
def test_hook_is_tested(hook: str) -> None:
    tree = ast.parse(Path(__file__).read_text())
    tests = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith(f"test_{hook}_")
    ]
    assert tests, f"{hook} (hookspecs.py) needs a test named test_{hook}_... in {__file__}"


def test_documented_hooks_exist() -> None:
    headings = set(re.findall(r"^##+ `?(weft_\w+)", DOCS.read_text(), flags=re.MULTILINE))
    assert headings <= set(_hooks()), (
        f"docs/hooks.md documents unknown hooks: {headings - set(_hooks())}"
    )


@pytest.mark.timeout(60)
def test_hooks_doc_example_runs(tmp_path: Path) -> None:
    """The complete example in docs/hooks.md runs as written and prints what it says."""
    text = DOCS.read_text()
    blocks = dict(re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", text, flags=re.DOTALL))
    assert {"weft_metrics.py", "run_metrics.py"} <= set(blocks), (
        "the example files in docs/hooks.md"
    )
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    result = subprocess.run(
        [sys.executable, "-W", "error", "run_metrics.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = re.search(r"<!-- output -->\n```text\n(.*?)```", text, flags=re.DOTALL)
    assert expected is not None, "docs/hooks.md shows the example's output"
    assert result.stdout == expected.group(1)
