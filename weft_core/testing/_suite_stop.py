"""Conformance tests of the stop's promises at their edges (docs/writing-a-manager.md, the stop's phases).

``stop(timeout)`` returns within the timeout plus one short, documented grace
(``weft_core._engine.STOP_GRACE``) however many tasks are stuck, and says what it
left behind; ``stop()`` and ``stop_accepting()`` may be called from anywhere: a
handler (sync or async), a hook, other threads, two threads at once.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .. import _registry
from .._engine import STOP_GRACE
from .._server import Server
from ..hookspecs import hookimpl
from ._adapters import Body, Recv, Send
from ._base import ManagerTestBase
from ._bodies import echo, stubborn
from ._support import WAIT, connect, recv_exactly, recv_until_closed, wait_until

__all__ = ["StopTests"]

MakeServer = Callable[..., Server]

#: What a loaded CI machine may add to a promised bound before it counts as broken:
#: the bound itself (timeout plus STOP_GRACE) is the promise under test.
SLACK = 1.5


def _blocking_handler(kind: str, entered: threading.Semaphore, gate: threading.Event) -> Any:
    """A handler stuck in a call no manager can interrupt (a plain, non-runtime wait).

    On threads it holds its thread; on an event loop (a gevent hub, trio) it blocks
    the whole loop: the worst a handler can do to a stop.
    """
    if kind == "async":

        async def stuck_async(stream: Any) -> None:
            entered.release()
            gate.wait(60)

        return stuck_async

    def stuck(conn: Any) -> None:
        entered.release()
        gate.wait(60)

    return stuck


def _calls_stop(holder: list[Server], done: threading.Event, how: str) -> Body:
    """Ask for a stop (or stop_accepting) from inside the handler, then report it returned."""
    yield Recv()
    server = holder[0]
    if how == "stop":
        server.stop(timeout=WAIT)
    else:
        server.stop_accepting()
    done.set()
    yield Send(b"returned")


def _timed_stop(server: Server, timeout: float) -> tuple[bool, float]:
    """``server.stop(timeout)``'s result, and how long it took."""
    began = time.monotonic()
    clean = server.stop(timeout=timeout)
    return clean, time.monotonic() - began


class StopTests(ManagerTestBase):
    """The stop is bounded, and callable from anywhere."""

    @pytest.fixture
    def gate(self) -> Iterator[threading.Event]:
        """Released after the test, so stuck handlers end and their runtime can close."""
        event = threading.Event()
        yield event
        event.set()

    def _bound(self, timeout: float) -> float:
        return timeout + STOP_GRACE + SLACK

    # -- bounded by its timeout -----------------------------------------------------------

    def test_stop_is_bounded_with_many_stubborn_handlers(self, make_server: MakeServer) -> None:
        """Rule: stop(timeout) returns within timeout + STOP_GRACE however many handlers ignore shutdown.

        Ten handlers ignore their shutdown flag and end of input; each is interrupted
        at the same moment (not one grace after another), so the stop takes the
        timeout plus at most one grace, and nothing is left behind.
        """
        server = make_server(stubborn, max_connections=None)
        clients = [connect(server.port) for _ in range(10)]
        try:
            for client in clients:
                assert recv_exactly(client, 1) == b"<", "every stubborn handler is running"
            clean, took = _timed_stop(server, 0.1)
            assert clean is False, "stop() returns False when it had to interrupt tasks"
            assert took < self._bound(0.1), (
                f"rule 'stop(timeout) returns within the timeout plus one grace': took "
                f"{took:.2f}s for 10 stubborn handlers (bound {self._bound(0.1):.1f}s); "
                "interrupt every task at once, then wait for all against one deadline"
            )
            for client in clients:
                recv_until_closed(client)
        finally:
            for client in clients:
                client.close()
        assert server.stats()["active"] == 0, "no connection is left open after the stop"
        assert server.stats()["left_behind"] == 0, "a task blocked in the runtime is interrupted"

    def test_stop_is_bounded_when_handlers_block_the_runtime(
        self, make_server: MakeServer, handler_kind: str, gate: threading.Event
    ) -> None:
        """Rule: stop(timeout) returns within timeout + STOP_GRACE even when handlers block.

        Six handlers wait on something no manager can interrupt (on an event loop, the
        first blocks the loop itself). The stop returns by its bound anyway, returns
        False, counts what it left behind, and the stuck handlers' clients see their
        connections shut down.
        """
        entered = threading.Semaphore(0)
        server = make_server(handler=_blocking_handler(handler_kind, entered, gate))
        clients = [connect(server.port) for _ in range(6)]
        try:
            assert entered.acquire(timeout=WAIT), "a blocking handler started"
            clean, took = _timed_stop(server, 0.1)
            assert clean is False, "stop() returns False when tasks had to be interrupted"
            assert took < self._bound(0.1), (
                f"rule 'stop(timeout) returns within the timeout plus one grace however many "
                f"tasks are stuck': took {took:.2f}s (bound {self._bound(0.1):.1f}s); never "
                "wait on the runtime's loop without a deadline during a stop"
            )
            left = server.stats()["left_behind"]
            assert left >= 1, f"stats()['left_behind'] counts the stuck tasks, got {left}"
            assert server.stopped and server.wait(0), "the server counts as stopped"
            # Still stuck (the gate is shut), yet their clients are not held: phase 3
            # shut the sockets down from the stopping thread.
            readable, _, _ = select.select(clients, [], [], WAIT)
            assert readable, "a stuck handler's client sees its connection shut down"
            assert all(recv_until_closed(c) == b"" for c in readable), (
                "phase 3 shuts a left-behind task's socket down: its client sees end of input"
            )
        finally:
            gate.set()
            for client in clients:
                client.close()
        # The loop is free again: its tasks end, and the runtime can be closed.
        manager = server.task_manager
        wait_until(lambda: not manager.all_tasks(), what="the released tasks to end")
        manager.runtime.close()

    # -- callable from anywhere -------------------------------------------------------

    @pytest.mark.parametrize("how", ["stop", "stop_accepting"])
    def test_stop_from_inside_a_handler(self, make_server: MakeServer, how: str) -> None:
        """Rule: stop() and stop_accepting() may be called from inside a handler, and return.

        The handler is not waited for by itself; the server ends stopped, wait() is
        True, and a later stop() from outside returns at once.
        """
        holder: list[Server] = []
        done = threading.Event()
        server = make_server(lambda: _calls_stop(holder, done, how))
        holder.append(server)
        with connect(server.port) as client:
            client.sendall(b"go")
            assert done.wait(WAIT), (
                f"rule 'stop() callable from a handler': {how}() called in a handler did "
                "not return (it must not wait for its own task, nor block the runtime's loop)"
            )
            assert recv_until_closed(client) == b"returned", "the handler went on after it"
        assert server.wait(WAIT), f"the server ends stopped after {how}() from a handler"
        began = time.monotonic()
        assert server.stop(timeout=WAIT) is True, "a later stop() of a stopped server is True"
        assert time.monotonic() - began < SLACK, "a later stop() returns at once"

    def test_stop_from_a_hook(self, make_server: MakeServer) -> None:
        """Rule: stop() may be called from a hook the acceptor runs (connection refused)."""
        holder: list[Server] = []
        called = threading.Event()

        class StopOnRefusal:
            @hookimpl
            def weft_connection_refused(self, server: Server, peer: str, reason: str) -> None:
                if server is holder[0]:
                    server.stop(timeout=WAIT)
                    called.set()

        name = _registry.register(StopOnRefusal(), name="weft-conformance-stop-hook")
        try:
            server = make_server(echo, args=(b"+",), max_connections=1)
            holder.append(server)
            with connect(server.port) as first:
                assert recv_exactly(first, 1) == b"+", "the first client is served"
                with connect(server.port) as second:
                    assert called.wait(WAIT), "stop() called from a hook returned"
                    recv_until_closed(second)
                assert server.wait(WAIT), "the server ends stopped after stop() from a hook"
        finally:
            _registry.unregister(name=name)

    def test_stop_from_two_threads_at_once(self, make_server: MakeServer) -> None:
        """Rule: stop() from two threads at once: both return the same result; stopped."""
        server = make_server(stubborn)
        with connect(server.port) as client:
            assert recv_exactly(client, 1) == b"<", "the stubborn handler is running"
            results: list[bool] = []
            barrier = threading.Barrier(2)

            def stop() -> None:
                barrier.wait(WAIT)
                results.append(server.stop(timeout=0.2))

            threads = [threading.Thread(target=stop) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(self._bound(0.2) + WAIT)
            assert results == [False, False], (
                f"both concurrent stop() calls return the stop's result, got {results}"
            )
        assert server.wait(0), "the server is stopped once both have returned"
