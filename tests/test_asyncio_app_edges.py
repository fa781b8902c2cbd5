"""weft-asyncio inside an application's own loop, at its edges.

An asyncio application (its own ``asyncio.Runner``, on asyncio's loop or uvloop's)
adds a weft server to its loop: ``Server(handler, manager="asyncio").run()`` from a
coroutine, as docs/managers.md "Running in the application's loop" shows, and
writes handlers against the stream as docs/managers.md describes it: "the reading
side of asyncio.StreamReader and the writing side of asyncio.StreamWriter in one
object", "a handler written for asyncio.start_server works with reader and writer
both being the stream", and trio's SocketStream methods.

Each test failed before its fix (an outside check's findings): its docstring says
what broke. Real sockets on 127.0.0.1, clients as blocking sockets in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from _asyncio_app import (
    LOOPS,
    WAIT,
    recv_all,
    reset,
    run_app,
    serving,
    until,
)

from weft_core import Server, ServerError
from weft_core.testing._support import connect, recv_exactly

TCP_CLOSE = 7


async def aecho(stream: Any) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()


def _collect(errors: list[BaseException]) -> Any:
    def exception_handler(server: Any, conn: Any, exc: BaseException) -> None:
        errors.append(exc)

    return exception_handler


# -- 1. closing: StreamWriter.close()/wait_closed() flush what was written ---------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["close_wait_closed", "handler_returns"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reply_written_before_closing_reaches_a_slow_reader_whole(
    loop_name: str, ending: str
) -> None:
    """A reply queued with write() then close()/wait_closed() (or the handler's return)
    reaches a client that reads it steadily, only slowly, byte for byte.

    StreamWriter.wait_closed() is documented by asyncio as "ensuring that all data has
    been flushed", and transport.close() flushes asynchronously; docs/managers.md
    gives the stream StreamWriter's close/wait_closed. The client below reads
    ~650 KB/s for 4 s (never stalling), then as fast as it can until EOF.
    """
    payload = bytes(range(256)) * (12 * 4096)  # 12 MiB
    ended: list[float] = []

    async def handler(stream: Any) -> None:
        stream.write(payload)
        if ending == "close_wait_closed":
            stream.close()
            await stream.wait_closed()
        ended.append(time.monotonic())

    def slow_client(port: int) -> tuple[int, float]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.settimeout(30)
            sock.connect(("127.0.0.1", port))
            got = 0
            began = time.monotonic()
            while True:
                slow = time.monotonic() - began < 4.0
                chunk = sock.recv(32768 if slow else 1 << 20)
                if not chunk:
                    break
                got += len(chunk)
                if slow:
                    time.sleep(0.05)  # the client's pace: ~650 KB/s
            return got, time.monotonic() - began

    async def main() -> tuple[int, float]:
        async with serving(handler) as server:
            return await asyncio.to_thread(slow_client, int(server.port))

    got, took = run_app(loop_name, main)
    assert got == len(payload), (
        f"the client got {got} of {len(payload)} bytes, then a clean EOF after {took:.1f}s: "
        "the rest of the reply was thrown away while the client was still reading it"
    )


# -- 2. reading: a reset is a ConnectionResetError, as StreamReader raises ----------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["readexactly", "readuntil", "readline"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_reset_mid_read_raises_connection_reset(loop_name: str, method: str) -> None:
    """A client that sends half a message and crashes (RST) makes the pending read raise
    ConnectionResetError, as StreamReader's readexactly/readuntil/readline do, and as
    the stream's own docstring says ("A reset connection raises ConnectionResetError
    from the next read"): not a clean end of input, and not IncompleteReadError
    (which a handler treats as the peer closing normally, and which the server then
    logs at ERROR as the handler's fault instead of "ended by the peer").
    """
    outcome: list[Any] = []
    started = threading.Event()

    async def handler(stream: Any) -> None:
        started.set()
        try:
            if method == "readexactly":
                result = await stream.readexactly(100)
            elif method == "readuntil":
                result = await stream.readuntil(b"\n")
            else:
                result = await stream.readline()
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(result)

    def client(port: int) -> None:
        sock = connect(port)
        assert started.wait(WAIT)
        sock.sendall(b"DELETE /important/resour")  # half a line, then the client dies
        reset(sock)

    async def main() -> dict[str, Any]:
        async with serving(handler) as server:
            await asyncio.to_thread(client, int(server.port))
            await until(lambda: bool(outcome), "the handler's read to end")
        return server.stats()

    stats = run_app(loop_name, main)
    assert isinstance(outcome[0], ConnectionResetError), (
        f"{method}() after a RST gave {outcome[0]!r} (stats: peer_errors="
        f"{stats['peer_errors']}, handler_errors={stats['handler_errors']}); StreamReader "
        "raises ConnectionResetError"
    )


# -- 3. cancellation: a read cancelled early must not close the connection ---------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", ["asyncio"])  # uvloop makes its transport only by an await
def test_a_read_cancelled_at_its_first_await_keeps_the_connection(loop_name: str) -> None:
    """A first read under a deadline that has already passed (``asyncio.timeout(0)``, a
    poll for data) raises TimeoutError and leaves the connection as it was: the
    handler then greets and echoes a line. Cancelling a StreamReader read never
    closes anything.
    """
    errors: list[BaseException] = []

    async def handler(stream: Any) -> None:
        try:
            async with asyncio.timeout(0):  # a deadline already past: just a poll
                await stream.read(100)
        except TimeoutError:
            pass
        stream.write(b"ready\n")
        await stream.drain()
        line = await stream.readline()
        stream.write(b"echo " + line)
        await stream.drain()

    def client(port: int) -> tuple[bytes, bytes]:
        with connect(port) as sock:
            first = recv_exactly(sock, 6)
            try:
                sock.sendall(b"hi\n")
                second = recv_exactly(sock, 8)
            except OSError as exc:
                second = repr(exc).encode()
            return first, second

    async def main() -> tuple[bytes, bytes]:
        async with serving(handler, exception_handler=_collect(errors)) as server:
            return await asyncio.to_thread(client, int(server.port))

    got = run_app(loop_name, main)
    assert got == (b"ready\n", b"echo hi\n") and not errors, (
        f"the client got {got!r}; the handler raised {errors!r}"
    )


# -- 5. get_extra_info('peername') once the peer has gone ------------------------------------


# -- 6. on_stop of a stop started on the application's loop -----------------------------------


# -- 7. run() again right after stop() on the loop ---------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_run_while_a_stop_is_under_way_does_not_claim_it_is_running(loop_name: str) -> None:
    """On the loop, stop() only starts the stop (documented) and ``server.running`` is
    then False. A run() called then must either work or say that a stop is still
    under way (and how to wait for it), not that the server "is already running;
    stop() it first", which the caller just did and which ``running`` denies.
    """

    async def main() -> tuple[bool, str]:
        server = Server(aecho, manager="asyncio")
        server.run()
        server.stop(timeout=1)
        running = server.running
        try:
            server.run()
            outcome = "ran"
        except ServerError as exc:
            outcome = str(exc)
        assert await asyncio.to_thread(server.wait, WAIT)
        if outcome == "ran":
            await asyncio.to_thread(server.stop, 1)
        return running, outcome

    running, outcome = run_app(loop_name, main)
    assert running is False
    assert outcome == "ran" or "already running" not in outcome, (
        f"server.running was False, and run() said: {outcome}"
    )


# -- 8. StreamWriter's methods before the first read ---------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_write_eof_works_before_any_read(loop_name: str) -> None:
    """A handler written for asyncio.start_server that answers at once and half-closes
    (``writer.write(reply); writer.write_eof()``), then reads what the client still
    sends. StreamWriter.write_eof() works at any time; docs/managers.md says such a
    handler runs with the stream as both reader and writer. On uvloop, whose
    transport is made only by an await, it raised RuntimeError until 2026-12-05.
    """
    errors: list[BaseException] = []
    rest: list[bytes] = []

    async def handler(stream: Any) -> None:
        stream.write(b"bye")
        stream.write_eof()
        rest.append(await stream.read())

    def client(port: int) -> bytes:
        with connect(port) as sock:
            got = recv_all(sock)  # until the server's half-close
            try:
                sock.sendall(b"more")
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return got

    async def main() -> bytes:
        async with serving(handler, exception_handler=_collect(errors)) as server:
            got = await asyncio.to_thread(client, int(server.port))
            await until(lambda: bool(rest or errors), "the handler to end")
            return got

    got = run_app(loop_name, main)
    assert got == b"bye" and rest == [b"more"] and not errors, (
        f"client got {got!r}, handler read {rest!r}, handler raised {errors!r}"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_drain_after_close_before_any_read_raises_connection_reset(loop_name: str) -> None:
    """write() then drain() after close(): StreamWriter's drain raises
    ConnectionResetError ("Connection lost"), and so does this stream once a read has
    made its transport; before any read it must be the same error, which a handler
    catches as the peer's (``except ConnectionError``), not an OSError(EBADF).
    """
    seen: list[Any] = []

    async def handler(stream: Any) -> None:
        stream.close()
        stream.write(b"late")
        try:
            await stream.drain()
        except BaseException as exc:
            seen.append(exc)
        else:
            seen.append(None)

    def client(port: int) -> bytes:
        with connect(port) as sock:
            return recv_all(sock)

    async def main() -> None:
        async with serving(handler) as server:
            await asyncio.to_thread(client, int(server.port))
            await until(lambda: bool(seen), "the handler to end")

    run_app(loop_name, main)
    assert isinstance(seen[0], ConnectionResetError), f"drain() after close() gave {seen[0]!r}"


# -- 9. back-pressure: every task waiting in drain() is woken --------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_two_tasks_draining_at_once_are_both_woken(loop_name: str) -> None:
    """Two producer tasks write to one stream and each awaits drain() (a broadcast to a
    subscriber, a multiplexed protocol). StreamWriter wakes every waiting drain() when
    the peer catches up (Python 3.11's FlowControlMixin keeps a deque of waiters). Here
    the client reads nothing until both producers wait in drain(), then reads
    everything: both must finish and the handler's END must arrive.
    """
    both_waiting = threading.Event()
    chunks = 64  # per producer, 64 KiB each: 4 MiB apiece

    async def handler(stream: Any) -> None:
        await stream.readexactly(2)  # the transport exists before the producers start
        # A small send buffer, and producers taking turns: the socket fills while both
        # still have chunks to write (with the kernel's buffers grown to megabytes, one
        # producer could otherwise write all of its chunks before the other began).
        stream.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        waiting = 0

        async def producer(tag: bytes) -> None:
            nonlocal waiting
            for _ in range(chunks):
                await asyncio.sleep(0)
                stream.write(tag * 65536)
                waiting += 1
                if waiting == 2:
                    both_waiting.set()
                try:
                    await stream.drain()
                finally:
                    waiting -= 1

        async with asyncio.TaskGroup() as tg:
            tg.create_task(producer(b"a"))
            tg.create_task(producer(b"b"))
        stream.write(b"END")
        await stream.drain()

    def client(port: int) -> tuple[int, bytes]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"go")
            assert both_waiting.wait(10), "the producers never both waited in drain()"
            total, tail = 0, b""
            try:
                while chunk := sock.recv(1 << 20):
                    total += len(chunk)
                    tail = (tail + chunk)[-3:]
                    if tail == b"END":
                        break
            except TimeoutError:
                return total, b"(nothing more for 10 s)"
            return total, tail

    async def main() -> tuple[int, bytes]:
        async with serving(handler) as server:
            return await asyncio.to_thread(client, int(server.port))

    total, tail = run_app(loop_name, main)
    expected = 2 * chunks * 65536 + 3
    assert (total, tail) == (expected, b"END"), (
        f"the client got {total} of {expected} bytes, then {tail!r}: a producer's drain() "
        "was never woken"
    )


# -- 11. ``with Server(...)`` inside a coroutine ---------------------------------------------


# -- 10. who the client was, after it reset -------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_peername_is_answered_after_the_peer_reset(loop_name: str) -> None:
    """``get_extra_info("peername")`` gives the client's address even once it has reset.

    A handler that logs who it served asked after the client had gone: the stream
    called ``getpeername()`` on the socket (its transport not yet made), which raises
    ENOTCONN once the peer reset, and the handler failed with an ERROR logged.
    ``current_connection().peer`` had the address all along.
    """
    gone = threading.Event()
    seen: list[Any] = []
    errors: list[BaseException] = []

    async def handler(stream: Any) -> None:
        assert await asyncio.to_thread(gone.wait, WAIT)
        seen.append(stream.get_extra_info("peername"))

    async def main() -> None:
        async with serving(handler, exception_handler=_collect(errors)) as server:
            client = connect(int(server.port))
            address = client.getsockname()
            reset(client)
            gone.set()
            await until(lambda: bool(seen or errors), "the handler to ask")
            assert not errors, errors
            assert tuple(seen[0])[:2] == address, (seen, address)

    run_app(loop_name, main)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_wait_with_no_end_on_the_loop_is_refused_not_a_freeze(loop_name: str) -> None:
    """Seen (the asyncio-app outside check): ``serve_forever()`` called on the
    application's loop froze it for good (the docs said not to; stop() there already
    returned at once). It and ``wait()`` with no timeout now raise, saying what to do;
    ``wait(0)`` still answers."""

    async def main() -> list[str]:
        server = Server(aecho, manager="asyncio")
        server.run()
        said = []
        for call in (server.serve_forever, server.wait):
            try:
                call()
            except RuntimeError as exc:
                said.append(str(exc))
        assert server.wait(0) is False
        server.stop(1)
        assert await asyncio.to_thread(server.wait, WAIT)
        return said

    said = run_app(loop_name, main)
    assert len(said) == 2, said
    assert all("on a running asyncio loop" in s and "asyncio.to_thread" in s for s in said)


def test_serve_forever_inside_a_handler_is_refused() -> None:
    """Inside one of weft's tasks the wait would never end either: its own task is part
    of what must stop."""
    said: list[str] = []

    def handler(conn: Any, holder: list[Server]) -> None:
        try:
            holder[0].serve_forever()
        except RuntimeError as exc:
            said.append(str(exc))
        conn.sendall(b"+")

    holder: list[Server] = []
    server = Server(handler, args=(holder,), manager="threads")
    holder.append(server)
    server.run()
    try:
        with connect(server.port) as client:
            assert recv_exactly(client, 1) == b"+"
    finally:
        server.stop(1)
    assert said and "inside one of weft's tasks" in said[0], said


# -- 12. the application's loop ends while the server runs ---------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_loop_that_ends_first_leaves_a_server_that_says_it_stopped(
    loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that ends while weft serves on it cancels its tasks, connections and the
    acceptor included (documented). The server then counted as running, with no error,
    though it listened no more: new clients were refused while ``running`` said True,
    and nothing in the log said why. Now the server stops on that error and says so."""
    started = threading.Event()

    async def handler(stream: Any) -> None:
        started.set()
        await stream.read()

    async def main() -> tuple[Server, socket.socket]:
        server = Server(handler, manager="asyncio")
        server.run()
        client = await asyncio.to_thread(connect, server.port)
        assert await asyncio.to_thread(started.wait, WAIT)
        return server, client  # the loop ends with the server running

    server, client = run_app(loop_name, main)
    try:
        assert server.wait(WAIT), "the server did not stop once its loop had ended"
        assert not server.running
        assert server.error is not None
        assert "ended without weft asking it to" in str(server.error)
        assert "event loop" in str(server.error)
        assert any("ended without weft asking it to" in r.getMessage() for r in caplog.records)
        with pytest.raises(OSError):
            connect(server.port).close()
        assert server.stop(1) is True  # nothing of it is left to stop
    finally:
        client.close()
