"""The hooks' promises at their edges, as a stranger writing a hooks plugin finds them.

docs/hooks.md and plugins/weft-prometheus/README.md: the stopped hook has run when
the stop is over (wait(), serve_forever(), a second stop(), a run() again); a
reset connection's bytes are counted on every manager; a hook that raises, even
SystemExit, stops nobody else, and a hook raising on every connection is not a
traceback per client; idle connections cannot shut a scraper out of the metrics
endpoint. Real sockets on 127.0.0.1, real Servers in-process or ``weft serve``
processes. Found by an outside check (each test failed before its fix).
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _every_manager import MANAGERS, aecho, echo, is_async
from _serving import Served, environment, free_port, queued, weft_serve
from test_hooks import Recorder, recorder, register

from weft_core import ConnectionInfo, Server, hookimpl
from weft_core.testing._support import connect, recv_exactly

__all__ = ["recorder", "register"]  # the fixtures, shared with test_hooks

WAIT = 10.0


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.stop(timeout=1)


# -- weft_server_stopped: "stop() returns after the hook" ---------------------------------


class _SlowFinalReport:
    """A plugin whose weft_server_stopped writes a final report; it takes a moment."""

    def __init__(self) -> None:
        self.reported: list[int] = []

    @hookimpl
    def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        time.sleep(0.3)  # flushing the report (a file, a push): quick, but not instant
        self.reported.append(stats["accepted"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_weft_server_stopped_has_run_when_wait_or_a_second_stop_returns(
    register: Callable[[object], str],
    servers: list[Server],
    manager: str,
    options: dict[str, Any],
) -> None:
    """A stop begun inside a handler: wait() and a second stop() return after the hook."""
    plugin = _SlowFinalReport()
    register(plugin)
    holder: list[Server] = []

    def sync(conn: Any) -> None:
        conn.recv(10)
        holder[0].stop()

    async def async_(stream: Any) -> None:
        await stream.receive_some(10)
        holder[0].stop()

    server = Server(
        async_ if is_async(manager) else sync, manager=manager, manager_options=options
    )
    holder.append(server)
    servers.append(server)
    server.run()
    with connect(server.port) as client:
        client.sendall(b"stop")
        assert server.wait(WAIT), "the stop begun inside the handler ended"
        at_wait = list(plugin.reported)
        assert server.stop(timeout=WAIT) is True
        at_second_stop = list(plugin.reported)
    assert (at_wait, at_second_stop) == ([1], [1]), (
        f"weft_server_stopped had not run when wait() returned ({at_wait}) nor when a "
        f"second stop() returned ({at_second_stop})"
    )


_SERVE_FOREVER_SCRIPT = """
import socket, sys, time
from weft_core import Server, hookimpl, _registry

class FinalReport:
    @hookimpl
    def weft_server_stopped(self, server, stats):
        time.sleep(0.2)
        print(f"FINAL accepted={stats['accepted']}", flush=True)

_registry.register(FinalReport(), name="final-report")
holder = []

def handle(conn):
    conn.recv(10)
    holder[0].stop(timeout=5)

server = Server(handle, manager="threads")
holder.append(server)
server.run()
print(f"PORT {server.port}", flush=True)
server.serve_forever()
print("serve_forever returned", flush=True)
"""


@pytest.mark.timeout(60)
def test_weft_server_stopped_hook_is_not_lost_when_serve_forever_returns(tmp_path: Path) -> None:
    """``serve_forever()`` and exit: a stop begun in a thread weft starts (a handler's,
    the shutdown port's) has run the stopped hook before serve_forever returns."""
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(_SERVE_FOREVER_SCRIPT))
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("PORT "), first
        with socket.create_connection(("127.0.0.1", int(first.split()[1])), timeout=WAIT) as c:
            c.sendall(b"stop")
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serve_forever returned" in out
    assert "FINAL accepted=1" in out, (
        f"the weft_server_stopped hook never finished: the process exited first; stdout: {out!r}"
    )


_RERUN_SCRIPT = """
import os, socket, time, urllib.request
from weft_core import Server, _registry, hookimpl

class FinalReport:  # another plugin: its stopped hook takes a moment
    @hookimpl
    def weft_server_stopped(self, server, stats):
        time.sleep(0.3)

_registry.register(FinalReport(), name="final-report")
holder = []

def handle(conn):
    if conn.recv(10) == b"restart":
        holder[0].stop()

server = Server(handle, manager="threads")
holder.append(server)
server.run()
with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
    c.sendall(b"restart")
    assert server.wait(10)
server.run()  # the application starts it again once it has stopped
deadline = time.monotonic() + 2.0
url = "http://%s/metrics" % os.environ["WEFT_PROMETHEUS_ADDRESS"]
result = "never tried"
while time.monotonic() < deadline:  # the endpoint must answer, and stay
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            result = str(reply.status)
    except OSError as exc:
        result = type(exc).__name__ + " " + str(exc)
        break
    time.sleep(0.1)
print("SCRAPE", result, "RUNNING", server.running, flush=True)
server.stop(timeout=1)
"""


@pytest.mark.timeout(60)
def test_prometheus_endpoint_survives_a_restart_after_wait(tmp_path: Path) -> None:
    """Stopped from a handler, wait()ed for and run() again: the endpoint listens (the
    old stop's hook, which closes it, ran before the new run's started hook)."""
    pytest.importorskip("weft_prometheus")
    script = tmp_path / "rerun.py"
    script.write_text(textwrap.dedent(_RERUN_SCRIPT))
    env = {k: v for k, v in environment().items() if not k.startswith("PROMETHEUS_")}
    env["WEFT_PROMETHEUS_ADDRESS"] = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, env=env,
        check=False,
    )  # fmt: skip
    assert "SCRAPE" in result.stdout, result.stderr[-800:]
    assert "SCRAPE 200 RUNNING True" in result.stdout, (
        f"the server runs again, its metrics endpoint: {result.stdout.strip()!r}"
    )


# -- weft_connection_closed: the kernel's byte counts, on every manager ----------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_weft_connection_closed_counts_bytes_of_a_connection_the_peer_reset(
    recorder: Recorder,
    servers: list[Server],
    manager: str,
    options: dict[str, Any],
) -> None:
    """A connection the client reset still reports the kernel's byte counts (on asyncio,
    whose transport closes the socket before the server reads them)."""
    server = Server(
        aecho if is_async(manager) else echo,
        manager=manager,
        manager_options=options,
        exception_handler=lambda *a: None,
    )
    servers.append(server)
    server.run()
    client = connect(server.port)
    client.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    [closed] = recorder.wait("weft_connection_closed")
    bytes_in, bytes_out, how = closed["bytes_in"], closed["bytes_out"], closed["how"]
    assert how == "error"
    assert (bytes_in, bytes_out) == (5, 5), (
        f"a TCP connection on Linux reported bytes_in={bytes_in}, bytes_out={bytes_out}"
    )
    stats = server.stats()
    assert (stats["bytes_in"], stats["bytes_out"]) == (5, 5)


# -- a plugin that raises -----------------------------------------------------------------


class _Broken:
    @hookimpl
    def weft_connection_opened(self, server: Server, connection: ConnectionInfo) -> None:
        raise RuntimeError("probe: this plugin is broken")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_hook_raising_on_every_connection_is_not_a_traceback_per_connection(
    register: Callable[[object], str],
    servers: list[Server],
    caplog: pytest.LogCaptureFixture,
    manager: str,
    options: dict[str, Any],
) -> None:
    """A per-connection hook raising for every client: one traceback, not one each."""
    caplog.set_level(logging.ERROR, logger="weft.plugins")
    register(_Broken())
    server = Server(aecho if is_async(manager) else echo, manager=manager, manager_options=options)
    servers.append(server)
    server.run()
    for _ in range(40):
        with connect(server.port) as client:
            client.sendall(b"x")
            assert recv_exactly(client, 1) == b"x", "served despite the broken plugin"
    server.stop(timeout=WAIT)
    records = [r for r in caplog.records if r.name == "weft.plugins"]
    tracebacks = [r for r in records if r.exc_info]
    assert records, "the broken plugin is reported"
    assert len(tracebacks) <= 1 and len(records) <= 5, (
        f"40 connections: {len(records)} log records from weft.plugins, "
        f"{len(tracebacks)} with a traceback"
    )


# -- the prometheus exporter under hostile scrapers ---------------------------------------


@pytest.mark.timeout(60)
def test_prometheus_idle_connections_do_not_shut_out_the_real_scrape(tmp_path: Path) -> None:
    """MAX_SCRAPES connections that send nothing hold every slot: a real scrape is
    still answered (the oldest idle one gives way)."""
    pytest.importorskip("weft_prometheus")
    from weft_prometheus._exporter import MAX_SCRAPES

    metrics = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in environment().items() if not k.startswith("PROMETHEUS_")}
    env["WEFT_PROMETHEUS_ADDRESS"] = metrics
    host, port = metrics.split(":")
    with Served(
        weft_serve("_serving:handle", "-k", "threads", "--bind", "127.0.0.1:0",
                   "--control-socket", "off"),
        cwd=tmp_path, env=env,
    ) as served:  # fmt: skip
        served.wait_for(r"listening on (\S+) \(manager threads\)")
        url = f"http://{metrics}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as reply:
            assert reply.status == 200
        idle = [
            socket.create_connection((host, int(port)), timeout=WAIT) for _ in range(MAX_SCRAPES)
        ]
        try:
            deadline = time.monotonic() + WAIT  # the exporter has accepted every one
            while queued(int(port)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            try:
                with urllib.request.urlopen(url, timeout=WAIT) as reply:
                    status: object = reply.status
            except OSError as exc:
                status = exc
            assert status == 200, (
                f"{MAX_SCRAPES} connections that sent nothing: the real scrape got {status!r}"
            )
        finally:
            for sock in idle:
                sock.close()
        served.signal(15)
        served.finish(30)


_EXITS_SCRIPT = """
import json, os, socket, sys
sys.path.insert(0, {tests!r})
from _every_manager import aecho, echo, is_async
from weft_core import Server, _registry, hookimpl

class Exits:
    calls = 0

    @hookimpl
    def weft_connection_opened(self, server, connection):
        Exits.calls += 1
        if Exits.calls == 1:
            raise SystemExit(3)  # a sys.exit() deep in a library the plugin calls

_registry.register(Exits(), name="exits")
manager, options = sys.argv[1], json.loads(sys.argv[2])
server = Server(aecho if is_async(manager) else echo, manager=manager,
                manager_options=options, exception_handler=lambda *a: None)
server.run()
with socket.create_connection(("127.0.0.1", server.port), timeout=3) as first:
    first.sendall(b"x")
    try:
        first.recv(1)
    except OSError:
        pass
served = []
for _ in range(3):
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as client:
        client.sendall(b"hi")
        try:
            served.append(client.recv(2).decode())
        except OSError as exc:
            served.append(type(exc).__name__)
print("SERVED", json.dumps(served), flush=True)
server.stop(timeout=1)
os._exit(0)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_hook_raising_systemexit_does_not_stop_everyone_elses_service(
    tmp_path: Path, manager: str, options: dict[str, Any]
) -> None:
    """A hook raising SystemExit ends nothing else: later clients are served (it
    crashed asyncio's loop). In a process of its own, in case it escapes."""
    import json

    script = tmp_path / "exits.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(textwrap.dedent(_EXITS_SCRIPT).replace("{tests!r}", repr(tests)))
    result = subprocess.run(
        [sys.executable, str(script), manager, json.dumps(options)],
        capture_output=True, text=True, timeout=50, env=environment(), check=False,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("SERVED ")]
    assert lines, f"no result; exit {result.returncode}; stderr: {result.stderr[-800:]}"
    served = json.loads(lines[0].split(" ", 1)[1])
    assert served == ["hi"] * 3, (
        f"after one plugin's SystemExit, later clients got {served}; "
        f"stderr: {result.stderr[-400:]}"
    )


class _SlowRefusal:
    """A weft_connection_refused hook that blocks until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    @hookimpl
    def weft_connection_refused(self, server: Server, peer: str, reason: str) -> None:
        self.entered.set()
        self.gate.wait(WAIT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_slow_refused_hook_keeps_no_refused_peer_connected(
    register: Callable[[object], str],
    servers: list[Server],
    manager: str,
    options: dict[str, Any],
) -> None:
    """A PROXY header that is garbage: the peer is refused, and the refused hook blocks.
    Promise (hooks.md: the hook runs just after the connection is closed): the peer
    sees its connection closed while the hook still runs. Seen: the hook ran first,
    so a slow one kept the refused, maybe hostile, peer connected and its slot held."""
    hook = _SlowRefusal()
    register(hook)
    server = Server(
        aecho if is_async(manager) else echo,
        manager=manager,
        manager_options=options,
        proxy_protocol=True,
    )
    servers.append(server)
    server.run()
    try:
        with connect(server.port) as client:
            client.settimeout(3)  # the hook waits up to WAIT (10 s)
            client.sendall(b"PROXY garbage\r\n")
            assert hook.entered.wait(WAIT), "the refusal reaches the hook"
            got: bytes | None
            try:
                got = client.recv(16)
            except ConnectionResetError:
                got = b""
            except TimeoutError:
                got = None
            assert got == b"", "the refused peer sees its connection closed while the hook runs"
    finally:
        hook.gate.set()
    server.stop(timeout=WAIT)
