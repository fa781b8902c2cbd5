"""The scrape endpoint on its own: real sockets, a stalled scraper, wrong requests, reuse."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from weft_prometheus import _exporter
from weft_prometheus._exporter import Exporter

WAIT = 10.0


@pytest.fixture
def exporter() -> Exporter:
    registry = CollectorRegistry()
    Counter("demo_things", "Things.", registry=registry).inc(3)
    served = Exporter(registry, "127.0.0.1", 0, reuse_port=False)
    served.open()
    yield served  # type: ignore[misc]
    served.close()


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_serves_the_registry(exporter: Exporter) -> None:
    assert exporter.port is not None
    status, body = get(exporter.port)
    assert status == 200
    samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    assert [s.value for s in samples if s.name == "demo_things_total"] == [3.0]
    assert get(exporter.port, "/")[0] == 200
    assert get(exporter.port, method="HEAD") == (200, b"")


def test_refuses_other_paths_and_methods(exporter: Exporter) -> None:
    assert exporter.port is not None
    assert get(exporter.port, "/nothing") == (404, b"404 Not Found\n")
    assert get(exporter.port, method="POST")[0] == 405


def test_a_stalled_scraper_holds_it_at_most_scrape_timeout(
    exporter: Exporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scraper that sends nothing is dropped after SCRAPE_TIMEOUT; the next is answered."""
    monkeypatch.setattr(_exporter, "SCRAPE_TIMEOUT", 0.5)
    assert exporter.port is not None
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=WAIT) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the headers
        started = time.monotonic()
        assert get(exporter.port)[0] == 200  # answered once the stalled one is dropped
        assert time.monotonic() - started < WAIT
        assert stalled.recv(100) == b""  # closed, unanswered


def test_an_oversized_request_is_refused(exporter: Exporter) -> None:
    assert exporter.port is not None
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=WAIT) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 10_000)
        assert client.recv(100).startswith(b"HTTP/1.1 431 ")


def test_close_ends_the_thread(exporter: Exporter) -> None:
    port = exporter.port
    assert port is not None
    exporter.close()
    assert exporter.port is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


def test_a_request_ended_by_bare_line_feeds_is_answered(exporter: Exporter) -> None:
    """``printf 'GET /metrics HTTP/1.0\\n\\n' | nc``: a request with LF line ends is answered."""
    assert exporter.port is not None
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=WAIT) as client:
        client.sendall(b"GET /metrics HTTP/1.0\n\n")
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and b"demo_things_total 3.0" in reply


def test_idle_connections_do_not_delay_a_scrape(exporter: Exporter) -> None:
    """Connections that send nothing (a port scan, a stalled client) hold no scrape up."""
    assert exporter.port is not None
    idle = [socket.create_connection(("127.0.0.1", exporter.port), timeout=WAIT) for _ in range(3)]
    try:
        started = time.monotonic()
        assert get(exporter.port)[0] == 200
        assert time.monotonic() - started < 2.0, "answered at once, not after the idle ones"
    finally:
        for sock in idle:
            sock.close()


def _things(port: int) -> float:
    """The value of demo_things_total in one scrape."""
    body = get(port)[1].decode()
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
    (value,) = [s.value for s in samples if s.name == "demo_things_total"]
    return value


def test_a_rendering_answers_the_scrapes_of_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outside check (probe-prom F5): every scrape rendered the registry afresh, so
    a flood of scrapes cost a rendering each. A rendering now answers the scrapes of
    the next RENDER_INTERVAL: a count changed in between shows from the first scrape
    after it, and not before."""
    monkeypatch.setattr(_exporter, "RENDER_INTERVAL", 2.0)
    registry = CollectorRegistry()
    things = Counter("demo_things", "Things.", registry=registry)
    things.inc(3)
    served = Exporter(registry, "127.0.0.1", 0, reuse_port=False)
    served.open()
    try:
        assert served.port is not None
        began = time.monotonic()  # the first rendering begins after this
        assert _things(served.port) == 3
        things.inc()
        assert _things(served.port) == 3, "rendered again within the interval"
        assert time.monotonic() - began < 2.0, "too slow to tell: two scrapes took 2 s"
        while (now := _things(served.port)) == 3:
            assert time.monotonic() - began < WAIT
            time.sleep(0.05)  # polling: the interval's end is the event waited for
        assert now == 4
        assert time.monotonic() - began >= 2.0, "rendered again before the interval ended"
    finally:
        served.close()
