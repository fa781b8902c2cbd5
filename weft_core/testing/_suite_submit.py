"""Conformance tests of ``Server.submit`` and parked connections (docs/managers.md, Server.submit).

A parked handler waits for something other than its client, here a semaphore of
its own runtime (``runtime.slots(0)``: a ``threading.Semaphore``, a gevent one, a
``trio.Semaphore``), holding no thread on an evented manager. ``submit(fn, *args)``
from a foreign thread runs ``fn`` in the runtime, where it fills the handler's
mailbox and releases the semaphore; the caller's contextvars travel with it. The
handler registers a shutdown callback (``current_task().on_shutdown``) that puts
an end marker after whatever is queued, so ``stop()`` wakes it in phase 2 and it
sends everything queued before it ends: nothing is lost.
"""

from __future__ import annotations

import collections
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from .._errors import HandlerKindError, ServerError
from .._protocol import Slots
from .._server import Server
from .._tasks import current_task
from ._adapters import SyncAdapter
from ._base import ManagerTestBase
from ._support import WAIT, connect, recv_exactly, recv_until_closed

__all__ = ["SubmitTests"]

MakeServer = Callable[..., Server]

_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "weft_conformance_submitter", default="unset"
)

#: Each message a test delivers: fixed length, so a client reads exactly one.
MESSAGE = b"msg%02d;"


class Mailbox:
    """One parked connection's queue, and the runtime-native semaphore that wakes it.

    ``put`` and ``close`` run in the runtime (a submitted function, or the stop's
    batch of shutdown callbacks), where the semaphore may be released.
    """

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.messages: collections.deque[bytes | None] = collections.deque()

    def put(self, message: bytes | None) -> None:
        """Queue ``message`` (None: the end) and wake the handler."""
        self.messages.append(message)
        self.slots.release()

    def close(self) -> None:
        """Queue the end, after everything queued so far (the shutdown callback)."""
        self.put(None)


def _parked_handler(
    kind: str, adapter: SyncAdapter, server: list[Server], boxes: list[Mailbox]
) -> Any:
    """A handler that greets, then parks on its mailbox and sends what arrives, until the end.

    It talks to its client through the manager's adapter (``adapter.send``), as every
    suite handler does, and waits on its runtime's own semaphore.
    """

    def park() -> Mailbox:
        box = Mailbox(server[0].task_manager.runtime.slots(0))
        state = current_task()
        if state is not None:
            state.on_shutdown(box.close)
        boxes.append(box)
        return box

    if kind == "async":
        sender: Any = adapter  # an AsyncAdapter: its send is awaited

        async def parked_async(stream: Any) -> None:
            box = park()
            await sender.send(stream, b"+")
            while await box.slots.acquire_within(WAIT):  # type: ignore[attr-defined]
                message = box.messages.popleft()
                if message is None:
                    return
                await sender.send(stream, message)

        return parked_async

    def parked(conn: Any) -> None:
        box = park()
        adapter.send(conn, b"+")
        while box.slots.acquire(timeout=WAIT):  # type: ignore[attr-defined]
            message = box.messages.popleft()
            if message is None:
                return
            adapter.send(conn, message)

    return parked


def _deliver(kind: str) -> Callable[..., Any]:
    """``deliver(box, message)`` of the manager's kind: fills the box, returns the caller's var."""
    if kind == "async":

        async def deliver_async(box: Mailbox, message: bytes) -> str:
            box.put(message)
            return _caller.get()

        return deliver_async

    def deliver(box: Mailbox, message: bytes) -> str:
        box.put(message)
        return _caller.get()

    return deliver


def _double(kind: str) -> Callable[..., Any]:
    """``f(x)`` of the manager's kind returning ``(2 * x, the caller's contextvar)``; raises for x < 0."""
    if kind == "async":

        async def double_async(x: int) -> tuple[int, str]:
            if x < 0:
                raise ValueError(f"negative: {x}")
            return 2 * x, _caller.get()

        return double_async

    def double(x: int) -> tuple[int, str]:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return 2 * x, _caller.get()

    return double


class SubmitTests(ManagerTestBase):
    """submit() from any thread, reaching parked handlers; stop() wakes them."""

    def _parked_server(
        self, make_server: MakeServer, handler_kind: str, **kw: Any
    ) -> tuple[Server, list[Mailbox]]:
        holder: list[Server] = []
        boxes: list[Mailbox] = []
        probe = self.new_manager()
        adapter = self.make_adapter(probe.runtime)
        probe.runtime.close()
        server = make_server(
            handler=_parked_handler(handler_kind, adapter, holder, boxes), start=False, **kw
        )
        holder.append(server)
        server.run()
        return server, boxes

    def test_submit_returns_the_result_with_the_callers_contextvars(
        self, make_server: MakeServer, handler_kind: str
    ) -> None:
        """Rule: submit(fn, *args) runs fn in the runtime; its Future has the result; contextvars travel."""
        server, _ = self._parked_server(make_server, handler_kind)
        fn = _double(handler_kind)
        results: list[Any] = []

        def from_a_foreign_thread(name: str) -> None:
            _caller.set(name)
            results.append(server.submit(fn, 21).result(WAIT))

        threads = [
            threading.Thread(target=from_a_foreign_thread, args=(f"t{i}",)) for i in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert sorted(results) == [(42, "t0"), (42, "t1"), (42, "t2")], (
            "rule 'submit() returns fn's result, run with the calling thread's contextvars'"
        )

    def test_submit_from_a_foreign_thread_never_waits_for_fn(
        self, make_server: MakeServer, handler_kind: str
    ) -> None:
        """Rule: submit() returns its Future at once; fn runs in the runtime, later.

        A runtime whose ``spawn_soon`` ran the thunk in the calling thread made every
        caller wait for fn (docs/writing-a-manager.md: from a foreign thread, never wait).
        """
        server, _ = self._parked_server(make_server, handler_kind)
        release = threading.Event()
        sleep: Any = server.task_manager.runtime.sleep
        fn: Callable[[], Any]
        if handler_kind == "async":

            async def waits_async() -> str:
                until = time.monotonic() + WAIT
                while not release.is_set() and time.monotonic() < until:
                    await sleep(0.005)
                return "done"

            fn = waits_async
        else:

            def waits() -> str:
                release.wait(WAIT)
                return "done"

            fn = waits
        began = time.monotonic()
        try:
            future = server.submit(fn)
            took = time.monotonic() - began
        finally:
            release.set()
        assert took < 1.0, (
            f"submit() waited {took:.2f}s for fn to finish: it must return its Future at once"
            " and run fn in the runtime (a spawn_soon or add_task that runs the thunk in the"
            " caller's thread never does)"
        )
        assert future.result(WAIT) == "done", "submit()'s Future has fn's result"

    def test_submit_hands_fns_exception_to_the_future(
        self, make_server: MakeServer, handler_kind: str
    ) -> None:
        """Rule: an exception fn raises is the Future's exception, and the server goes on."""
        server, _ = self._parked_server(make_server, handler_kind)
        future = server.submit(_double(handler_kind), -1)
        with pytest.raises(ValueError, match="negative"):
            future.result(WAIT)
        assert server.submit(_double(handler_kind), 1).result(WAIT)[0] == 2, (
            "rule 'a failed submit breaks nothing': the next one works"
        )

    def test_submit_refuses_clearly(self, make_server: MakeServer, handler_kind: str) -> None:
        """Rule: submit() fails clearly when the server is not running, or fn is of the wrong kind."""
        server, _ = self._parked_server(make_server, handler_kind)
        if handler_kind == "async":

            def wrong(x: int) -> int:
                return x
        else:

            async def wrong(x: int) -> int:  # type: ignore[misc]
                return x

        with pytest.raises(HandlerKindError, match="submit"):
            server.submit(wrong, 1)
        server.stop(timeout=WAIT)
        try:
            server.submit(_double(handler_kind), 1)
        except ServerError as exc:
            assert "running" in str(exc), f"the refusal says the server is not running: {exc}"
        else:
            pytest.fail(
                "submit() on a stopped server must raise ServerError ('not running'); it went"
                " through (a current_task() still set in this thread after add_task or a"
                " stop makes the server take the caller for one of its tasks)"
            )

    def test_submit_from_a_thread_reaches_parked_handlers(
        self, make_server: MakeServer, handler_kind: str
    ) -> None:
        """Rule: a publisher thread's submit() reaches every parked handler, in order, nothing lost."""
        server, boxes = self._parked_server(make_server, handler_kind)
        clients = [connect(server.port) for _ in range(10)]
        try:
            for client in clients:
                assert recv_exactly(client, 1) == b"+", "each handler is parked"
            deliver = _deliver(handler_kind)
            futures: list[Future[Any]] = []
            failed: list[BaseException] = []

            def publish() -> None:
                _caller.set("publisher")
                try:
                    for n in range(3):
                        # Calls are not ordered among themselves (trio shuffles new
                        # tasks, threads run side by side): a round waits for the last.
                        batch = [server.submit(deliver, box, MESSAGE % n) for box in boxes]
                        futures.extend(batch)
                        for future in batch:
                            future.result(WAIT)
                except BaseException as exc:  # reported below, by what it means
                    failed.append(exc)

            publisher = threading.Thread(target=publish)
            publisher.start()
            publisher.join(2 * WAIT)
            assert not publisher.is_alive(), (
                f"the publisher's submit() calls still run after {2 * WAIT:g}s: submit()"
                " from a thread must not wait for the runtime"
            )
            never = [f for f in futures if not f.done()]
            assert not never, (
                f"{len(never)} of {len(futures)} calls submitted from a thread never ran"
                f" within {WAIT:g}s: the runtime's spawn_soon (or its wake-up) lost them"
            )
            assert not failed, f"submit() from a thread raised: {failed[0]!r}"
            assert {f.result(WAIT) for f in futures} == {"publisher"}, (
                "rule 'submit carries the publisher's contextvars into the runtime'"
            )
            expected = b"".join(MESSAGE % n for n in range(3))
            for client in clients:
                assert recv_exactly(client, len(expected)) == expected, (
                    "rule 'every parked subscriber receives every message, in order'"
                )
        finally:
            for client in clients:
                client.close()

    def test_stop_wakes_parked_handlers_with_nothing_lost(
        self, make_server: MakeServer, handler_kind: str
    ) -> None:
        """Rule: stop() wakes parked handlers in phase 2; what was queued for them is still sent."""
        server, boxes = self._parked_server(make_server, handler_kind)
        clients = [connect(server.port) for _ in range(5)]
        try:
            for client in clients:
                assert recv_exactly(client, 1) == b"+", "each handler is parked"
            deliver = _deliver(handler_kind)
            for future in [server.submit(deliver, box, MESSAGE % 7) for box in boxes]:
                future.result(WAIT)
            assert server.stop(timeout=WAIT) is True, (
                "rule 'stop() wakes parked handlers in phase 2': they end before any "
                "interruption (stop() returns True)"
            )
            for client in clients:
                assert recv_until_closed(client) == MESSAGE % 7, (
                    "rule 'nothing queued for a parked handler is lost at stop()'"
                )
        finally:
            for client in clients:
                client.close()
