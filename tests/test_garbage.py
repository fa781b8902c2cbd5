"""A served connection leaves no reference cycles behind, on every installed manager.

Objects in a cycle are freed only by the garbage collector, and a collection that
runs every few dozen connections, or a full one over the whole heap, costs a busy
server its throughput and its latency tail. So everything weft and the manager
keep per connection and per task must be freed by reference counting the moment
the connection ends. With the collector off, a collection afterwards finds the
cycles that would have been left.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from weft_core import Server, available_managers
from weft_core.testing._suite_addresses import echo_once
from weft_core.testing._support import connect, wait_until

SPECS = available_managers()
CONNECTIONS = 50


def reply(conn: Any) -> None:
    conn.sendall(conn.recv(16))


async def reply_async(stream: Any) -> None:
    await stream.send_all(await stream.receive_some(16))


@pytest.fixture(params=sorted(SPECS))
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    name: str = request.param
    handler = reply_async if SPECS[name].handler_kind == "async" else reply
    server = Server(handler, address="127.0.0.1", port=0, manager=name)
    server.run()
    yield server
    server.stop(timeout=5)


def exchange(port: int) -> None:
    with connect(port) as client:
        echo_once(client)


@pytest.mark.timeout(60)
def test_connections_leave_no_reference_cycles(server: Server) -> None:
    exchange(server.port)  # first-use allocations (loops, hubs, caches) happen here
    wait_until(lambda: server.stats()["active"] == 0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(CONNECTIONS):
            exchange(server.port)
        wait_until(lambda: server.stats()["active"] == 0)
        left = gc.collect()
    finally:
        gc.enable()
    # Fewer than one object per connection: an unrelated stray cycle is tolerated,
    # a cycle made by every connection (several objects each) is not.
    assert left < CONNECTIONS, (
        f"{left} objects were left in reference cycles by {CONNECTIONS} connections"
    )
