"""weft-prometheus at its edges: a drain in between, an address taken or the server's own.

From an outside check (probe-prom): each test failed before its fix. Real processes,
real sockets, real scrapes.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from _prom_support import HANDLERS, READY, WAIT, WEFT, Served, environment, free_port

from weft_core import available_managers

#: A process with two servers in turn: A drains (stop_accepting) while B starts.
DRAIN_THEN_START = r"""
import socket, sys, time, urllib.request
from weft_core import Server

metrics, manager = sys.argv[1], sys.argv[2]

def handle(conn):
    conn.recv(1)

def scraped():
    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
            return reply.status
    except OSError as exc:
        return repr(exc)

a = Server(handle, manager=manager)
a.run()
print("a", scraped(), flush=True)
held = socket.create_connection(("127.0.0.1", a.port))
a.stop_accepting()  # A drains: the endpoint lets go of its address, as for a hand-over
deadline = time.monotonic() + 10
while scraped() == 200 and time.monotonic() < deadline:
    time.sleep(0.05)
print("draining", scraped(), flush=True)
b = Server(handle, manager=manager)
b.run()
print("b", scraped(), flush=True)
held.close()
a.stop(5)
print("only b", scraped(), flush=True)
b.stop(5)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_server_started_after_a_drain_is_scraped(manager: str) -> None:
    """README: the endpoint listens while a server of the process runs. Once every
    server had stopped accepting, the endpoint let go for good: a server started
    afterwards in the same process (an in-process blue/green switch) had no metrics
    until every server had stopped."""
    if manager not in available_managers():
        pytest.skip(f"weft-{manager} is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", DRAIN_THEN_START, metrics, manager],
        env=environment(metrics), capture_output=True, text=True, timeout=45,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "a 200" and lines[1].startswith("draining URLError"), done.stdout
    assert lines[2:] == ["b 200", "only b 200"], done.stdout


def serve_workers(metrics: str, bind: str, *extra: str) -> Served:
    return Served(
        [*WEFT, "serve", HANDLERS["threads"], "--workers", "2", "--bind", bind,
         "--graceful-timeout", "2", *extra],
        environment(metrics),
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_workers_say_once_that_another_process_holds_the_address() -> None:
    """README: an address that cannot be bound is an error line. Under --workers a
    worker that found it taken waited, silently and for ever, for a process handing
    over; now it says so after HANDOVER_WAIT, and serves on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        metrics = f"127.0.0.1:{held.getsockname()[1]}"
        with serve_workers(metrics, "127.0.0.1:0") as served:
            served.wait_for(READY, count=2)
            said = served.wait_for(
                r"\[ERROR\] weft_prometheus: weft-prometheus: cannot serve metrics on "
                + metrics.replace(".", r"\.")
                + r" \(WEFT_PROMETHEUS_ADDRESS\): Address already in use for 5s",
                count=2,
                timeout=WAIT,
            )
            assert len(said) == 2, served.text  # one line per worker, not one per try
            assert served.stop() == 0, served.text


@pytest.mark.timeout(60)
def test_metrics_on_the_servers_own_port_never_take_its_clients() -> None:
    """The metrics address set to the server's own, under --workers --reuse-port:
    each worker's endpoint joined the server's SO_REUSEPORT group and answered 24 of
    40 of the server's clients with HTTP, silently. Now it is refused in one line
    per worker, and every client reaches the server."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with serve_workers(address, address, "--reuse-port") as served:
        served.wait_for(READY, count=2)
        served.wait_for(
            r"cannot serve metrics on .*: the server itself listens on 127\.0\.0\.1:\d+",
            count=2,
        )
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                first = client.recv(100)
            pid = first.split(b"\n", 1)[0]  # the server's handler answers with its pid
            assert pid.isdigit(), f"answered by something else: {first!r}"
        assert served.stop() == 0, served.text


#: Two servers started at once by two greenlets of one patched hub, in weft serve's
#: order: the plugins load (their lock an OS lock) before gevent patches.
TWO_STARTS_IN_ONE_HUB = r"""
import sys
from weft_core import available_managers
available_managers()  # as weft serve: the plugins load, then the manager patches
from gevent import monkey
monkey.patch_all()
import gevent, urllib.request
from weft_core import Server

metrics = sys.argv[1]

def handle(conn):
    conn.recv(1)

servers = [Server(handle, manager="gevent") for _ in range(2)]
starts = [gevent.spawn(server.run) for server in servers]
gevent.joinall(starts, timeout=10)
print("started", sum(start.successful() for start in starts), flush=True)
with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
    print("scraped", reply.status, flush=True)
stops = [gevent.spawn(server.stop, 5) for server in servers]
gevent.joinall(stops, timeout=15)
print("stopped", sum(stop.successful() for stop in stops), flush=True)
"""


@pytest.mark.timeout(60)
def test_two_servers_starting_at_once_in_one_patched_hub() -> None:
    """The hooks' lock is an OS lock under weft serve's patching (made before it).
    The first server's start held it while binding the endpoint and starting its
    thread, both of which switch greenlets: the second server's start then waited
    on the lock, the whole hub with it, and the process hung."""
    if "gevent" not in available_managers():
        pytest.skip("weft-gevent is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", TWO_STARTS_IN_ONE_HUB, metrics],
        env=environment(metrics), capture_output=True, text=True, timeout=45,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["started 2", "scraped 200", "stopped 2"], done.stdout


@pytest.mark.timeout(60)
def test_the_endpoint_says_where_it_serves_a_port_of_zero_included() -> None:
    """An outside check (probe-prom F9): WEFT_PROMETHEUS_ADDRESS=127.0.0.1:0 served
    the metrics on a port the kernel chose and said nowhere which; no address was
    logged at all. Each process that serves them now says where."""
    import urllib.request

    with Served(
        [*WEFT, "serve", HANDLERS["threads"], "--bind", "127.0.0.1:0"], environment("127.0.0.1:0")
    ) as served:
        (said,) = served.wait_for(
            r"\[INFO\] weft_prometheus: weft-prometheus: serving metrics on "
            r"http://127\.0\.0\.1:(\d+)/metrics"
        )
        port = int(said.group(1))
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert b"weft_connections_opened_total" in reply.read()
        assert served.stop() == 0, served.text
