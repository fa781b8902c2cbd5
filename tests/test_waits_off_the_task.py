"""A thread given a copy of a task's context is not inside the task: it may block.

``wait()`` and ``stop()`` refuse to block, or return at once, inside one of weft's
tasks, which they would hold up. They told that from the context variable of the
current task, which ``asyncio.to_thread``, ``trio.to_thread.run_sync`` and a
``copy_context().run`` thread copy: the very call the refusal advises
(``await asyncio.to_thread(server.wait)``) raised the same ``RuntimeError``, and
``close_connection()`` from such a thread returned False at once instead of its
answer (an outside check of the API under misuse). The same check found ``run()``
from a coroutine raising what ``on_start`` raised while its port still listened:
the stop it began there went on in a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from typing import Any

import gevent
import pytest
import trio
from _every_manager import MANAGERS, aecho, echo, is_async

from weft_core import Server, current_connection
from weft_core.testing import WAIT, wait_until


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_close_connection_from_a_thread_with_the_tasks_context_waits_for_its_answer(
    manager: str, options: dict[str, Any]
) -> None:
    """One handler closes another connection through the threads its runtime offers;
    the other handler ends at phase 2, so the answer is True, not a False at once."""
    answers: list[bool] = []
    ids: list[Any] = []

    def closes_the_other(server: Server) -> bool:
        return server.close_connection(ids[0], timeout=WAIT)

    def sync(conn: Any) -> None:
        if conn.recv(10) == b"other":
            ids.append(current_connection().task_id)
            while conn.recv(10):  # ends when its input is ended
                pass
            return
        context = contextvars.copy_context()  # as a handler passes its own on
        helper = threading.Thread(
            target=lambda: answers.append(context.run(closes_the_other, server))
        )
        helper.start()
        nap = gevent.sleep if manager == "gevent" else time.sleep  # never block the hub
        while helper.is_alive():
            nap(0.01)
        conn.sendall(b"done")

    async def async_(stream: Any) -> None:
        if await stream.receive_some(10) == b"other":
            ids.append(current_connection().task_id)
            while await stream.receive_some(10):
                pass
            return
        if manager == "trio":
            answers.append(await trio.to_thread.run_sync(closes_the_other, server))
        else:
            answers.append(await asyncio.to_thread(closes_the_other, server))
        await stream.send_all(b"done")

    server = Server(
        async_ if is_async(manager) else sync, manager=manager, manager_options=options
    )
    with server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as other:
            other.sendall(b"other")
            wait_until(lambda: bool(ids), what="the other connection's id")
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as closer:
                closer.sendall(b"close it")
                assert closer.recv(10) == b"done"
            assert other.recv(10) == b""
        assert answers == [True]
        server.stop(timeout=WAIT)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), [m for m in MANAGERS if is_async(m.values[0])])
def test_the_advised_wait_from_a_coroutine_waits(manager: str, options: dict[str, Any]) -> None:
    """The refusal's own advice, taken in a handler: it waits for the stop, and says
    whether it was clean, where it raised the refusal again."""
    results: list[Any] = []
    waiting = threading.Event()

    def waits() -> None:  # says it here: the handler itself is cancelled at the stop
        waiting.set()
        try:
            results.append(server.wait())
        except RuntimeError as exc:
            results.append(exc)

    async def handler(stream: Any) -> None:
        await stream.receive_some(10)
        if manager == "trio":
            await trio.to_thread.run_sync(waits)
        else:
            await asyncio.to_thread(waits)

    server = Server(handler, manager=manager, manager_options=options)
    server.run()
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
        client.sendall(b"x")
        assert waiting.wait(WAIT)
        server.stop(timeout=0.5)
    wait_until(lambda: bool(results), what="the wait to return")
    assert results in ([True], [False]), results


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("manager", "options"), [m for m in MANAGERS if m.values[0] in ("threads", "gevent", "trio")]
)
def test_on_start_raising_under_a_coroutine_leaves_nothing_listening(
    manager: str, options: dict[str, Any]
) -> None:
    """docs/api.md: what ``on_start`` raises, ``run()`` raises, with nothing left
    listening. From a coroutine, where ``stop()`` returns at once, the stop went on
    in a thread and ``run()`` raised while the port still took clients: a server
    bound again to it at once failed (asyncio, uvloop, and a few ms on the rest).
    Its runtime's loop is not the coroutine's here, so the stop is waited for."""

    def on_start(server: Server) -> None:
        raise ValueError("on_start failed")

    handler = aecho if is_async(manager) else echo

    async def main() -> int:
        server = Server(handler, manager=manager, manager_options=options, on_start=on_start)
        with pytest.raises(ValueError, match="on_start failed"):
            server.run()
        port = server.port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        again = Server(handler, manager=manager, manager_options=options, port=port)
        again.run()  # the port is free: no BindError
        await asyncio.to_thread(again.stop, WAIT)
        return port

    asyncio.run(main())
