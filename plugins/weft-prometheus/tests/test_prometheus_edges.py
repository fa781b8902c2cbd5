"""weft-prometheus at its edges: a drain, an address taken or the server's own, a flood, churn.

From an outside check (probe-prom): each test failed before its fix. Real processes,
real sockets, real scrapes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from _prom_support import (
    HANDLERS,
    LISTENING,
    READY,
    WAIT,
    WEFT,
    Served,
    environment,
    free_port,
    host_port,
    scrape,
    total,
)

from weft_core import available_managers
from weft_prometheus._exporter import RENDER_INTERVAL

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


def test_workers_never_join_another_services_reuse_port_group() -> None:
    """Two --workers services given one metrics address, and the first service's own
    --reuse-port listener given as a third's metrics address: SO_REUSEPORT let each
    join the other's group (same user), so scrapes split between two services and
    19 of 40 clients of the server were answered with HTTP. A worker joins only a
    group its siblings claim: the others say so in one line each and serve on."""
    port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    first = serve_workers(metrics, f"127.0.0.1:{port}", "--reuse-port")
    with first:
        first.wait_for(READY, count=2)
        first.wait_for(r"serving metrics on http://", count=2)
        second = serve_workers(metrics, "127.0.0.1:0")
        third = serve_workers(f"127.0.0.1:{port}", "127.0.0.1:0")
        with second, third:
            for other in (second, third):
                other.wait_for(READY, count=2)
                other.wait_for(r"cannot serve metrics on .*: Address already in use", count=2)
            for _ in range(40):  # the first service's clients reach its handler
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                    first_line = client.recv(100).split(b"\n", 1)[0]
                assert first_line.isdigit(), f"answered by something else: {first_line!r}"
            for _ in range(8):  # every scrape is the first service's
                assert f"127.0.0.1:{port}" in str(scrape(metrics)), "another service answered"
            assert "serving metrics on" not in second.text + third.text
            assert second.stop() == 0 and third.stop() == 0
        assert first.stop() == 0, first.text


def test_metrics_on_the_servers_port_of_another_host_are_served() -> None:
    """The server on 127.0.0.1:P, the metrics on 127.0.0.2:P: two addresses that do
    not overlap, so the metrics are served, and the server's clients still reach its
    handler. The check compared the ports alone and refused it ("the server itself
    listens on 127.0.0.1:P"), serving no metrics."""
    port = free_port()
    with serve_workers(f"127.0.0.2:{port}", f"127.0.0.1:{port}") as served:
        served.wait_for(READY, count=2)
        served.wait_for(r"serving metrics on http://127\.0\.0\.2:\d+/", count=2)
        assert total(scrape(f"127.0.0.2:{port}"), "weft_connections_opened_total") == 0
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                assert client.recv(100).split(b"\n", 1)[0].isdigit(), "the server's handler"
        assert "cannot serve metrics" not in served.text, served.text
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


def _scraper(metrics: str, until: float, answered: list[int], failed: list[str]) -> None:
    """Scrape ``metrics`` back to back until ``until`` (monotonic), counting the answers."""
    request = f"GET /metrics HTTP/1.1\r\nHost: {metrics}\r\n\r\n".encode()
    while time.monotonic() < until:
        try:
            with socket.create_connection(host_port(metrics), timeout=WAIT) as sock:
                sock.sendall(request)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
            answered.append(1)
        except (OSError, AssertionError) as exc:
            failed.append(repr(exc))
            return


def _renders(sock: socket.socket) -> dict[str, int]:
    """What ``_prom_flood``'s handler reports: renderings so far, and in the hub's thread."""
    sock.sendall(b"renders\n")
    with sock.makefile("rb") as reader:  # closing it leaves the socket open
        report: dict[str, int] = json.loads(reader.readline())
    return report


def _echoes(client: socket.socket, until: float) -> int:
    """Echo 64 bytes back and forth until ``until``; how many were answered (all, or it raised)."""
    echoes = 0
    while time.monotonic() < until:
        client.sendall(b"e" * 64)
        got = b""
        while len(got) < 64:  # the socket's timeout (WAIT) fails the test
            got += client.recv(64 - len(got))
        echoes += 1
    return echoes


@pytest.mark.timeout(60)
def test_a_scrape_flood_leaves_a_patched_gevent_hub_serving() -> None:
    """probe-prom F5: under weft serve's gevent patching the endpoint's threads are
    greenlets of the hub that serves every connection, and every scrape rendered the
    metrics there: a flood of scrapes cut an echo client's round trips 235-fold. A
    rendering now answers the scrapes of the next RENDER_INTERVAL and runs in an OS
    thread of gevent's pool. Flooded from 4 threads for 2 s, the hub answers every
    echo, and renders at most once a second, never in its own thread."""
    if "gevent" not in available_managers():
        pytest.skip("weft-gevent is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    served = Served(
        [*WEFT, "serve", "_prom_flood:handle", "--manager", "gevent", "--bind", "127.0.0.1:0"],
        environment(metrics),
    )
    with served:
        address = host_port(served.wait_for(LISTENING)[0].group(1))
        with socket.create_connection(address, timeout=WAIT) as client:
            before = _renders(client)
            answered: list[int] = []
            failed: list[str] = []
            began = time.monotonic()
            flood = [
                threading.Thread(target=_scraper, args=(metrics, began + 2.0, answered, failed))
                for _ in range(4)
            ]
            for thread in flood:
                thread.start()
            echoes = _echoes(client, began + 2.0)
            for thread in flood:
                thread.join(WAIT)
            seconds = time.monotonic() - began
            after = _renders(client)
        assert served.stop() == 0, served.text
    assert not failed, failed[:3]
    renders = after["renders"] - before["renders"]
    assert len(answered) > 4 * renders, (len(answered), renders)  # the flood shared them
    assert renders <= seconds / RENDER_INTERVAL + 1, (renders, seconds)
    assert after["in_hub"] == 0, after
    assert echoes > 0
    assert "Traceback" not in served.text, served.text


#: Servers on ports the kernel chooses, run and stopped one after the other beside
#: a server that runs throughout; then two servers on one port (SO_REUSEPORT),
#: which share their labels, one stopping.
RUNS_ON_NEW_PORTS = r"""
import json, socket, sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from weft_core import Server

metrics = sys.argv[1]

def handle(conn):
    while data := conn.recv(100):
        conn.sendall(data)

def echo(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        client.sendall(b"x")
        client.recv(1)

def scrape():
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples]

def opened(samples):
    found = {}
    for s in samples:
        if s.name == "weft_connections_opened_total":
            found[s.labels["address"]] = found.get(s.labels["address"], 0) + s.value
    return found

def scrape_until(check):
    # A rendering answers the scrapes of the next second: wait for a fresh one.
    deadline = time.monotonic() + 10
    while not check(found := opened(scrape())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found

a = Server(handle, manager="threads")
a.run()
for _ in range(20):
    b = Server(handle, manager="threads")
    b.run()
    echo(b)
    b.stop(5)
    echo(a)
print(json.dumps(scrape_until(lambda found: found.get(a.addresses[0]) == 20)), flush=True)
with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
c, d = (Server(handle, manager="threads", port=port, reuse_port=True) for _ in range(2))
c.run()
d.run()
echo(c)
c.stop(5)
echo(a)
print(json.dumps(scrape_until(lambda found: found.get(a.addresses[0]) == 21)), flush=True)
print(json.dumps([a.addresses[0], d.addresses[0]]), flush=True)
d.stop(5)
a.stop(5)
"""


@pytest.mark.timeout(60)
def test_series_of_stopped_servers_are_removed() -> None:
    """probe-prom F6: the series of a stopped server stayed for the process's life,
    so servers run on ports the kernel chose grew the scrape by ~34 lines each (32
    addresses after 30 runs). A server's series now go when it stops, unless a
    running server shares its labels (two on one port with SO_REUSEPORT)."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", RUNS_ON_NEW_PORTS, metrics],
        env=environment(metrics), capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    after_runs, one_of_two_stopped, (a, shared) = map(json.loads, done.stdout.splitlines())
    assert after_runs == {a: 20}, after_runs  # only the running server's
    assert one_of_two_stopped == {a: 21, shared: 1}, one_of_two_stopped
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


#: Servers started and stopped from 4 threads at once while the main thread scrapes,
#: beside a server that runs throughout (so the endpoint stays open).
CHURN_WHILE_SCRAPED = r"""
import json, re, sys, threading, time, urllib.request
from weft_core import Server
from weft_prometheus import _hooks

metrics = sys.argv[1]
sys.setswitchinterval(1e-5)  # switch threads often: a race shows within the 2 s

def handle(conn):
    conn.recv(1)

def scrape():
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=3) as reply:
        return reply.read().decode()

a = Server(handle, manager="threads")
a.run()
until = time.monotonic() + 2.0
runs = [0] * 4

def churn(i):
    while time.monotonic() < until:
        server = Server(handle, manager="threads")
        server.run()
        server.stop(2)
        runs[i] += 1

raised = []

def ask():
    # As the endpoint's thread does before each accept, but back to back: a race
    # with the hooks shows within the 2 s (uncaught there, it ends that thread).
    while time.monotonic() < until:
        try:
            _hooks._process.retired()
        except RuntimeError as exc:
            raised.append(repr(exc))

threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
threads.append(threading.Thread(target=ask))
for thread in threads:
    thread.start()
scrapes, failed = 0, []
while time.monotonic() < until:
    try:
        scrape()
        scrapes += 1
    except OSError as exc:
        failed.append(repr(exc))
for thread in threads:
    thread.join(10)
# A rendering answers the scrapes of the next second: wait for a fresh one.
deadline = time.monotonic() + 10
while (found := sorted(set(re.findall(r'address="([^"]*)"', scrape())))) != a.addresses:
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps({"runs": runs, "scrapes": scrapes, "failed": failed[:3],
                  "raised": raised[:3], "addresses": found, "a": a.addresses}), flush=True)
a.stop(5)
"""


@pytest.mark.timeout(60)
def test_servers_started_and_stopped_from_four_threads_while_scraped() -> None:
    """probe-prom, not run there (exp18): the endpoint's thread copies the set of
    running servers while hooks in other threads add and discard servers; a copy
    racing them raises "Set changed size during iteration", which, uncaught, ends
    the endpoint's thread (its socket left open: scrapes hang). The copy is now
    made under the hooks' lock. 4 threads start and stop servers for 2 s while the
    main thread scrapes and a fifth asks what the endpoint's thread asks, back to
    back (a plain copy raised 12 to 55 times in 2 s): nothing raises, every scrape
    is answered, and only the running server's series remain."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-c", CHURN_WHILE_SCRAPED, metrics],
        env=environment(metrics), capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert all(runs > 0 for runs in report["runs"]), report
    assert report["raised"] == [], report
    assert report["scrapes"] > 0 and report["failed"] == [], report
    assert report["addresses"] == report["a"], report
    assert "Exception in thread" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
