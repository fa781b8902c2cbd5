"""Odd handlers, one outcome on every manager (a differential check's findings).

The same odd handler was run on each manager and the outcomes compared; each test
here failed before its fix on the managers its docstring names:

- with ``stream=True``, a handler that detached its file and closed it left the
  connection open (threads, gevent): the file held the socket, and nothing closed
  the socket once the file let go of it, until the garbage collector did.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any

import pytest
from _every_manager import MANAGERS, is_async
from _every_manager import serve as serve  # the fixture

from weft_core import Server, detach
from weft_core.testing import WAIT, wait_until

#: The managers whose handlers may take a stream (``stream=True``): the sync ones.
STREAM_MANAGERS = ["threads", "gevent"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _read_to_eof(client: socket.socket) -> bytes:
    got = b""
    while data := client.recv(4096):
        got += data
    return got


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", STREAM_MANAGERS)
def test_a_detached_stream_closed_by_its_handler_closes_the_connection(manager: str) -> None:
    """docs/api.md: after ``detach(conn)`` the connection is the caller's to close;
    closing the detached file is closing it: the client sees the end at once, and
    the server keeps no descriptor of it."""

    def handler(f: Any) -> None:
        detach(f)
        f.write(b"hello\n")
        f.close()

    with Server(handler, manager=manager, stream=True) as server:
        before = _open_fds()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
                assert _read_to_eof(client) == b"hello\n"  # a timeout here: left open
        wait_until(lambda: server.stats()["active"] == 0, what="the handlers to return")
        wait_until(lambda: _open_fds() <= before, what="the server to keep no descriptor")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", STREAM_MANAGERS)
def test_a_detached_stream_stays_open_until_its_owner_closes_it(manager: str) -> None:
    """The other side: a detached file kept past the handler's return is still the
    connection, usable from elsewhere, and closing it later ends the connection."""
    kept: queue.Queue[Any] = queue.Queue()

    def handler(f: Any) -> None:
        detach(f)
        kept.put(f)

    with (
        Server(handler, manager=manager, stream=True) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client,
    ):
        f = kept.get(timeout=WAIT)
        wait_until(lambda: server.stats()["active"] == 0, what="the handler to return")
        done = threading.Event()

        def later() -> None:  # another thread, well after the handler returned
            f.write(b"later\n")
            f.flush()
            f.close()
            done.set()

        threading.Thread(target=later).start()
        assert done.wait(WAIT)
        assert _read_to_eof(client) == b"later\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_write_after_the_handlers_own_close_is_its_error(
    serve: Any, manager: str, options: dict[str, Any]
) -> None:
    """docs/hooks.md: ``weft_handler_error`` is "not for the peer going away"; a peer
    still connected did not go away. The handler's own bug is counted as its error
    (``handler_errors``, ``exception_handler``), never in ``peer_errors``."""
    seen: list[BaseException] = []

    def sync(conn: Any) -> None:
        conn.recv(10)
        conn.close()
        conn.sendall(b"after close")

    async def async_(stream: Any) -> None:
        await stream.receive_some(10)
        await stream.aclose()
        await stream.send_all(b"after close")

    server = serve(
        manager, options, sync, async_, exception_handler=lambda s, c, exc: seen.append(exc)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
        client.sendall(b"x")
        assert _read_to_eof(client) == b""
    wait_until(lambda: server.stats()["active"] == 0, what="the handler to end")
    stats = server.stats()
    assert (stats["handler_errors"], stats["peer_errors"]) == (1, 0), (stats, seen)
    assert len(seen) == 1 and not isinstance(seen[0], ConnectionError), seen


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # "never awaited" fails the test
@pytest.mark.parametrize(("manager", "options"), [m for m in MANAGERS if is_async(m.values[0])])
def test_an_async_handler_returning_an_unawaited_coroutine_is_its_error(
    serve: Any, manager: str, options: dict[str, Any]
) -> None:
    """The mistake is said (a TypeError naming the handler and the missing await),
    counted in ``handler_errors``, and the coroutine closed: no warning."""
    seen: list[BaseException] = []

    async def forgot_await(stream: Any) -> Any:
        await stream.receive_some(10)
        return stream.send_all(b"never sent")

    server = serve(
        manager, options, None, forgot_await, exception_handler=lambda s, c, e: seen.append(e)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
        client.sendall(b"x")
        assert _read_to_eof(client) == b""
    wait_until(lambda: server.stats()["handler_errors"] == 1, what="the mistake counted")
    assert isinstance(seen[0], TypeError) and "forgot_await" in str(seen[0]), seen
    assert "missing await" in str(seen[0])
