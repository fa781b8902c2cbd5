"""weft behind a real HAProxy speaking PROXY protocol v2 to two `weft serve` instances.

Clients through HAProxy are served, the handler sees the client's real address,
SIGTERM to one instance loses no exchange in flight, and HAProxy's health check
moves traffic to the other.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import environment

HERE = Path(__file__).parent
WAIT = 20.0

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy"),
]


class Backend:
    """`weft serve tests._proxy_echo:handle --proxy-protocol` on a free port."""

    def __init__(self, manager: str) -> None:
        env = environment()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weft_core",
                "serve",
                "tests._proxy_echo:handle_asyncio"
                if manager == "asyncio"
                else "tests._proxy_echo:handle",
                "--manager",
                manager,
                "--bind",
                "127.0.0.1:0",
                "--proxy-protocol",
                "--graceful-timeout",
                "10",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=HERE.parent,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "listening on" in line:
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                return
        raise AssertionError(f"weft serve did not start: exit {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture(params=["threads", "gevent", "asyncio"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, list[Backend]]]:
    backends = [Backend(request.param)]
    try:
        backends.append(Backend(request.param))
    except BaseException:
        backends[0].close()
        raise
    # HAProxy takes its listening socket from us (fd@N), bound to port 0: a port
    # found free, closed, then bound by HAProxy could be taken by another test between.
    listener = socket.create_server(("127.0.0.1", 0))
    front = listener.getsockname()[1]
    servers = "\n".join(
        f"  server s{i} 127.0.0.1:{b.port} send-proxy-v2 check check-send-proxy "
        "inter 100ms fall 1 rise 1"
        for i, b in enumerate(backends)
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 200\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n"
        "  timeout server 30s\n  retries 3\n  option redispatch\n"
        f"frontend fe\n  bind fd@{listener.fileno()}\n  default_backend be\n"
        f"backend be\n  balance roundrobin\n{servers}\n"
    )
    with listener:
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=[listener.fileno()],
        )
        try:
            yield front, backends
        finally:
            haproxy.terminate()
            haproxy.communicate(timeout=WAIT)
            for backend in backends:
                backend.close()


def hello(front: int) -> tuple[socket.socket, int, str]:
    """Connect through HAProxy; the backend's pid and the peer it saw."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            client = socket.create_connection(("127.0.0.1", front), timeout=WAIT)
        except OSError:
            pass
        else:
            try:
                with client.makefile("rb") as reader:
                    line = reader.readline().decode()
            except OSError:
                line = ""
            if line:
                pid, peer = line.split()
                return client, int(pid), peer
            client.close()
        assert time.monotonic() < deadline, "HAProxy never passed a connection through"
        time.sleep(0.05)


def test_through_haproxy(cluster: tuple[int, list[Backend]]) -> None:
    front, backends = cluster
    pids = {b.proc.pid: b for b in backends}
    seen: set[int] = set()
    deadline = time.monotonic() + WAIT
    while seen != set(pids):  # both backends healthy and in rotation
        client, pid, peer = hello(front)
        with client:
            assert peer == f"127.0.0.1:{client.getsockname()[1]}", "the handler sees the client"
        seen.add(pid)
        assert time.monotonic() < deadline, f"only {seen} of {set(pids)} ever served"

    # An exchange in flight on one backend survives SIGTERM to that backend. In flight
    # means the backend has it ("+"): bytes still inside HAProxy when the stop ends the
    # backend's input are not the backend's to answer.
    client, pid, _ = hello(front)
    with client, client.makefile("rb") as reader:
        client.sendall(b"in flight\n")
        assert reader.read(1) == b"+", "the backend has the request"
        pids[pid].proc.send_signal(signal.SIGTERM)
        assert reader.readline() == b"in flight\n", "the exchange in flight completes"
        assert reader.read() == b"", "then the draining backend closes the connection"
    assert pids[pid].proc.wait(WAIT) == 0
    # HAProxy moves every new client to the other backend.
    (survivor,) = set(pids) - {pid}
    for _ in range(5):
        client, served_by, _ = hello(front)
        with client:
            assert served_by == survivor
