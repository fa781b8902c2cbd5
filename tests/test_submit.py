"""Server.submit beyond the conformance suite: batching on evented runtimes, the stop.

The suite (``weft_core.testing._suite_submit``) holds every manager to submit's
contract; these check what is weft's own: that a burst from one thread is batched
into few wake-ups of gevent's and trio's loops, and that calls the runtime never
started are cancelled when the server stops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from typing import Any

import pytest

from weft_core import Server, available_managers

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0

EVENTED = [name for name in ("gevent", "trio") if name in available_managers()]


def _handler(kind: str) -> Any:
    if kind == "trio":

        async def echo_async(stream: Any) -> None:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

        return echo_async

    def echo(conn: Any) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    return echo


def _noop(kind: str) -> Any:
    if kind == "trio":

        async def noop_async(n: int) -> int:
            return n

        return noop_async

    def noop(n: int) -> int:
        return n

    return noop


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Released after the test, so a handler blocking its loop ends."""
    event = threading.Event()
    yield event
    event.set()


@pytest.mark.parametrize("manager", EVENTED)
def test_a_burst_from_one_thread_wakes_the_loop_in_batches(manager: str) -> None:
    """Ten thousand submits from one thread all run, with far fewer loop wake-ups than calls."""
    server = Server(_handler(manager), manager=manager)
    server.run()
    # The drain each wake-up runs: the queue of gevent's runtime's hub, of trio's loop.
    if manager == "gevent":
        from weft_gevent import _runtime as module
    else:
        from weft_trio import _manager as module  # type: ignore[no-redef]
    queue_class: Any = module._Soon
    drain = queue_class.start
    wakeups = 0

    def counting_drain(self: Any) -> None:
        nonlocal wakeups
        wakeups += 1
        drain(self)

    queue_class.start = counting_drain
    try:
        fn = _noop(manager)
        futures = [server.submit(fn, n) for n in range(10_000)]
        assert [f.result(WAIT) for f in futures] == list(range(10_000))
        assert 1 <= wakeups < 2_000, f"{wakeups} loop wake-ups for 10,000 calls: not batched"
    finally:
        queue_class.start = drain
        assert server.stop(timeout=WAIT)


@pytest.mark.parametrize("manager", EVENTED)
def test_calls_never_started_are_cancelled_at_the_stop(
    manager: str, gate: threading.Event
) -> None:
    """A loop blocked by a handler never starts the submitted calls; the stop cancels them."""
    entered = threading.Event()
    if manager == "trio":

        async def blocker(stream: Any) -> None:
            entered.set()
            gate.wait(WAIT)  # blocks the whole trio loop

        handler: Any = blocker
    else:

        def blocker_sync(conn: Any) -> None:
            entered.set()
            gate.wait(WAIT)  # a plain wait: blocks the whole hub

        handler = blocker_sync
    import socket

    server = Server(handler, manager=manager)
    server.run()
    with socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT):
        assert entered.wait(WAIT)
        futures = [server.submit(_noop(manager), n) for n in range(5)]
        server.stop(timeout=0.1)
        for future in futures:
            with pytest.raises(CancelledError):
                future.result(WAIT)
    gate.set()
    with pytest.raises(Exception, match="running"):
        server.submit(_noop(manager), 1)
