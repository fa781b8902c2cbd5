"""The asyncio manager's connection at its edges, on its own loop and an application's.

``stream.socket`` before the first stream I/O (non-blocking, a plain socket that
asyncio's own APIs take, after ``detach()`` too), TCP_NODELAY set by the handler
before the transport exists, two tasks making the transport at once (uvloop), the
byte counts of a connection its handler closed, each on asyncio's loop and uvloop's,
on the manager's own loop thread and on an application's running loop. From an
outside check of 2026-12-05's changes (the descriptor made non-blocking with the
transport, TCP_NODELAY tracked rather than read back); each failed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import tempfile
import threading
import time

import pytest
from _asyncio_app import MODES, WAIT, Records, loop_factory, served, serving

from weft_core import Server
from weft_core.testing._support import fd_count, recv_exactly, recv_until_closed, wait_until

BIG = b"x" * (16 << 20)


def connect(server: Server, rcvbuf: int | None = None) -> socket.socket:
    """A blocking client of ``server``, with a timeout; ``rcvbuf`` is set before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(server.port)))
    return sock


def _first_one_blocks(how: str):
    """A handler: the first connection sends 16 MiB through stream.socket before any
    stream I/O; every later one answers b"ok" at once."""
    order: list[int] = []
    started = threading.Event()

    async def handler(stream) -> None:
        n = len(order)
        order.append(n)
        if n == 0:
            started.set()
            sock = stream.socket
            try:
                if how == "sock_sendall":
                    await asyncio.get_running_loop().sock_sendall(sock, BIG)
                elif how == "sock_sendfile":
                    with tempfile.TemporaryFile() as file:
                        file.write(BIG)
                        file.seek(0)
                        await asyncio.get_running_loop().sock_sendfile(sock, file)
                else:
                    sock.send(BIG)  # a non-blocking socket takes what fits, at once
            except OSError:
                pass
            return
        stream.write(b"ok")
        await stream.drain()

    return handler, started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sock_sendall", "sock_sendfile", "send"])
@pytest.mark.parametrize("mode", MODES)
def test_stream_socket_before_first_io_does_not_block_the_loop(mode: str, how: str) -> None:
    """Sending through ``stream.socket`` before any stream I/O must not freeze the loop.

    The descriptor is made non-blocking with the transport; a handler taking
    ``stream.socket`` first gets it non-blocking all the same. When it did not, a
    ``loop.sock_sendall`` (documented for non-blocking sockets) or a plain ``send``
    to a client slow to read blocked the whole loop: every other connection waited.
    """
    if how == "sock_sendfile" and mode.endswith("uvloop"):
        pytest.skip("uvloop has no sock_sendfile of its own")
    handler, started = _first_one_blocks(how)
    with served(mode, handler) as server:
        slow = connect(server, rcvbuf=4096)  # reads nothing
        try:
            assert started.wait(WAIT)
            other = connect(server)
            other.settimeout(3.0)
            t0 = time.monotonic()
            try:
                got = recv_exactly(other, 2)
            except TimeoutError:
                got = b"<nothing within 3 s: the loop is blocked>"
            other.close()
            assert got == b"ok", (got, time.monotonic() - t0)
        finally:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            slow.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_stream_socket_is_non_blocking_in_the_handler(mode: str) -> None:
    """``stream.socket`` as a handler first sees it is non-blocking (timeout 0.0), as it was."""
    seen: list[tuple[float | None, bool]] = []
    done = threading.Event()

    async def handler(stream) -> None:
        seen.append((stream.socket.gettimeout(), stream.socket.getblocking()))
        done.set()

    with served(mode, handler) as server, connect(server) as client:
        assert done.wait(WAIT)
        client.recv(1)
    assert seen == [(0.0, False)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_nodelay_off_given_as_bytes_is_kept(mode: str) -> None:
    """``setsockopt(IPPROTO_TCP, TCP_NODELAY, <bytes>)`` before the first read is kept.

    ``stream.setsockopt`` takes ``int | bytes`` (as ``socket.setsockopt`` does). A
    handler turning TCP_NODELAY off with a packed int must find it off after its first
    read. ``AsyncioSocket.setsockopt`` recorded ``bool(value)``, and any 4-byte buffer
    is truthy, so the stream thought it on and did not restore it after the
    transport (uvloop's) turned it on.
    """
    seen: list[int] = []

    async def handler(stream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, struct.pack("i", 0))
        seen.append(int(stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        await stream.read(1)
        seen.append(int(stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(b"x")
        client.recv(1)
    assert seen == [0, 0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_first_read_and_write_in_two_tasks_leave_the_stop_bounded(loop_name: str) -> None:
    """A full-duplex handler whose reader and writer start together stops cleanly.

    ``asyncio.gather(stream.readexactly(5), stream.send_all(b"hi"))`` as the handler's
    first I/O: on uvloop both calls reached ``_connect`` while its ``await
    loop.connect_accepted_socket`` ran, and two transports were made on one socket.
    The second was never closed: ``server.stop(2)`` of an idle server took 4 s more,
    logged "the asyncio runtime did not close within 4.0s", and left the manager's
    loop thread alive. A second caller now waits for the first one's transport.
    """
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")

    async def handler(stream) -> None:
        got, _ = await asyncio.gather(stream.readexactly(5), stream.send_all(b"hi"))
        stream.write(b"|" + got)
        await stream.drain()

    before = {t.ident for t in threading.enumerate()}
    server = Server(handler, manager="asyncio", manager_options={"loop": loop_name})
    server.run()
    try:
        with connect(server) as client:
            client.sendall(b"hello")
            assert recv_exactly(client, 8) == b"hi|hello"
            assert client.recv(1) == b""  # the handler returned; the stream closed
    finally:
        t0 = time.monotonic()
        stopped = server.stop(timeout=2)
        took = time.monotonic() - t0
    left = [
        t.name for t in threading.enumerate() if t.ident not in before and t.name == "weft-asyncio"
    ]
    assert (stopped, took < 2.0, left) == (True, True, []), took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_first_read_and_write_in_two_tasks_on_the_applications_loop(loop_name: str) -> None:
    """The same handler on an application's own loop: the application's run must end.

    On uvloop a second transport, never closed, kept ``asyncio.Runner``'s close
    from returning after the server stopped and ``main()`` returned.
    """
    ran = threading.Event()
    ended = threading.Event()

    async def handler(stream) -> None:
        got, _ = await asyncio.gather(stream.readexactly(5), stream.send_all(b"hi"))
        stream.write(b"|" + got)
        await stream.drain()

    def client(server: Server) -> bytes:
        with connect(server) as c:
            c.sendall(b"hello")
            got = recv_exactly(c, 8)
            c.recv(1)
            return got

    async def main() -> None:
        async with serving(handler) as server:
            assert await asyncio.to_thread(client, server) == b"hi|hello"
        ran.set()

    def app() -> None:

        try:
            with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
                runner.run(main())
        finally:
            ended.set()

    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    thread = threading.Thread(target=app, daemon=True)
    t0 = time.monotonic()
    thread.start()
    assert ran.wait(20), "main() did not finish"
    finished = ended.wait(5)
    assert finished, f"the application's loop had not ended {time.monotonic() - t0:.1f}s on"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["before_io", "after_io"])
@pytest.mark.parametrize("mode", MODES)
def test_a_handler_that_closes_its_stream_still_gets_byte_counts(mode: str, when: str) -> None:
    """``stream.close()`` + ``await wait_closed()`` (StreamWriter's way) keeps the counts.

    hooks.md: ``bytes_in``/``bytes_out`` (and the access log's in=/out=) are None only
    "where the kernel cannot tell (Unix sockets, other systems, Linux before 4.1)".
    On a TCP connection whose handler closed the stream itself, the socket was
    already closed when the server read ``TCP_INFO``, and the access log said
    ``in=- out=-``: the stream now keeps the counts as its socket closes.
    """
    access = Records()
    logger = logging.getLogger("weft.access")
    logger.addHandler(access)
    level = logger.level
    logger.setLevel(logging.INFO)
    arrived = threading.Event()

    async def handler(stream) -> None:
        if when == "after_io":
            await stream.readexactly(2)
            stream.write(b"abcde")
        else:
            while not arrived.is_set():  # the client's 2 bytes are in the kernel's queue
                await asyncio.sleep(0.01)
        stream.close()
        await stream.wait_closed()

    try:
        with served(mode, handler, access_log=True) as server, connect(server) as client:
            client.sendall(b"12")
            time.sleep(0.2)  # let the bytes reach the server's socket (loopback)
            arrived.set()
            try:
                while client.recv(100):
                    pass
            except ConnectionResetError:
                pass
            assert access.seen.wait(WAIT)
    finally:
        logger.removeHandler(access)
        logger.setLevel(level)
    record = access.records[0]
    assert (record.bytes_in, record.how) == (2, "closed"), record.getMessage()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["sock_sendall", "sock_recv_into"])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_loop_sock_calls_on_stream_socket_in_a_debug_loop(loop_name: str, call: str) -> None:
    """An application loop in debug mode (``asyncio.run(main(), debug=True)``) accepts
    ``loop.sock_sendall(stream.socket, ...)`` before any stream I/O, as it did.

    asyncio's ``sock_*`` methods check in debug mode that the socket is non-blocking:
    ``stream.socket`` is, even before the transport that makes the descriptor so
    (else: ``ValueError: the socket must be non-blocking``).
    """
    errors: list[str] = []

    async def handler(stream) -> None:
        loop = asyncio.get_running_loop()
        try:
            if call == "sock_sendall":
                await loop.sock_sendall(stream.socket, b"hi")
            else:
                buf = bytearray(2)
                n = await loop.sock_recv_into(stream.socket, buf)
                await loop.sock_sendall(stream.socket, bytes(buf[:n]))
        except Exception as exc:
            errors.append(repr(exc))

    def client(server: Server) -> bytes:
        with connect(server) as c:
            c.sendall(b"hi")
            try:
                return recv_exactly(c, 2)
            except OSError as exc:
                return repr(exc).encode()

    async def main() -> bytes:
        async with serving(handler) as server:
            return await asyncio.to_thread(client, server)

    with asyncio.Runner(loop_factory=loop_factory(loop_name), debug=True) as runner:
        got = runner.run(main())
    assert (got, errors) == (b"hi", [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_detached_socket_handed_to_asyncio_streams_works(mode: str) -> None:
    """After ``detach(stream)`` the socket is the handler's (hooks.md "detached"): handing
    it to asyncio's own ``open_connection(sock=...)`` must give a working stream.

    ``stream.socket``'s ``recv`` was a coroutine function (the server's PROXY header
    read awaits it); asyncio's selector transport called ``sock.recv(n)``, got a
    coroutine, and failed: "can't extend bytearray with coroutine". The socket is a
    plain one once the stream is made.
    """
    from weft_core import detach

    errors: list[str] = []

    async def handler(stream) -> None:
        detach(stream)
        try:
            reader, writer = await asyncio.open_connection(sock=stream.socket)
            line = await reader.readline()
            writer.write(b"echo:" + line)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except Exception as exc:
            errors.append(repr(exc))
            stream.socket.close()

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(b"hi\n")
        try:
            got = recv_exactly(client, 8)
        except OSError as exc:
            got = repr(exc).encode()
    assert (got, errors) == (b"echo:hi\n", [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spins", [1, 2])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_first_read_cancelled_early_can_be_retried(loop_name: str, spins: int) -> None:
    """A first read cancelled within a loop turn or two (a ``wait_for`` that timed out,
    a task group cancelled) leaves a stream that a second read still serves.

    On uvloop the transport is still being made then, by
    ``loop.connect_accepted_socket``; uvloop closes the new transport if that
    coroutine is cancelled. Until 2026-12-05 the first read awaited it, so the
    client saw the connection closed at once, with no reply; the stream now drives
    the making by the loop's callbacks, outside the reading task.
    """
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")

    async def handler(stream) -> None:
        first = asyncio.create_task(stream.readexactly(5))
        for _ in range(spins):
            await asyncio.sleep(0)
        first.cancel()
        try:
            await first
        except asyncio.CancelledError:
            pass
        got = await stream.readexactly(5)
        stream.write(b"|" + got)
        await stream.drain()

    server = Server(handler, manager="asyncio", manager_options={"loop": loop_name})
    server.run()
    try:
        with connect(server) as client:
            client.settimeout(3.0)
            time.sleep(0.05)
            client.sendall(b"hello")
            try:
                got = recv_exactly(client, 6)
            except TimeoutError:
                got = b"<no reply within 3 s>"
            assert got == b"|hello"
    finally:
        server.stop(timeout=0.5)


# -- the transport closed while uvloop still makes it ---------------------------------------


def _closes_while_making(how: str, ended: threading.Event):
    """A handler: a first read started (uvloop begins making the transport), then closed.

    ``close``: ``stream.close()`` in the same turn, the read cancelled; ``aclose``:
    ``await stream.aclose()`` cancelled at once; ``reply``: a reply written before the
    transport exists, then ``close()``. Each must close the connection (the reply out
    first), whatever turn uvloop's making is at, while the handler goes on: it
    returns only once the client saw the end (``ended``), or after ``WAIT``.
    """

    async def handler(stream) -> None:
        first = asyncio.create_task(stream.read(5))
        await asyncio.sleep(0)
        if how == "reply":
            stream.write(b"bye")
        if how == "aclose":
            closing = asyncio.create_task(stream.aclose())
            await asyncio.sleep(0)
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
        else:
            stream.close()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await first
        deadline = time.monotonic() + WAIT
        while not ended.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    return handler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "aclose", "reply"])
@pytest.mark.parametrize("mode", MODES)
def test_a_stream_closed_while_its_transport_is_made_closes_and_leaves_nothing_open(
    mode: str, how: str
) -> None:
    """Closing while uvloop makes the transport: the client sees the end, nothing stays open.

    The descriptor is uvloop's from the moment its making begins: closing the socket
    then would leave uvloop's new transport reading a closed (or reused) descriptor,
    and an open connection nobody closes until the handler returns. The stream
    closes the transport as it is made instead. Ten connections each, the client
    reading to the end while the handler still runs; the server's descriptors come
    back to what they were.
    """
    ended = threading.Event()
    with served(mode, _closes_while_making(how, ended)) as server:
        with connect(server) as client:  # the first one: the loop's own descriptors made
            assert recv_until_closed(client) == (b"bye" if how == "reply" else b"")
        ended.set()
        wait_until(lambda: server.stats()["active"] == 0, what="the first connection to end")
        before = fd_count()
        for _ in range(10):
            ended.clear()
            with connect(server) as client:
                client.sendall(b"hello")
                got = recv_until_closed(client)  # within WAIT, or the test fails
            ended.set()
            assert got == (b"bye" if how == "reply" else b""), got
            wait_until(lambda: server.stats()["active"] == 0, what="the connection to end")
        wait_until(lambda: fd_count() <= before, what=f"descriptors back to {before}")
        assert server.stats()["handler_errors"] == 0


# -- the first read and the writes before any transport go to the socket itself ---------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_never_stops_sending_does_not_starve_the_others(mode: str) -> None:
    """The stream's first read goes to the socket itself, not through the loop; a client
    that sends without pause must not keep its handler from ever yielding: another
    client is echoed at once while the first one floods."""
    stop = threading.Event()

    async def handler(stream) -> None:
        first = await stream.read(5)
        if first != b"flood":
            stream.write(first)
            await stream.drain()
            return
        while not stop.is_set() and await stream.read(1 << 16):
            pass

    def flood(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"flood")
            chunk = b"x" * (1 << 16)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.sendall(chunk)

    with served(mode, handler) as server:
        flooder = threading.Thread(target=flood, args=(int(server.port),))
        flooder.start()
        try:
            wait_until(lambda: server.stats()["active"] == 1, what="the flood to be served")
            time.sleep(0.2)  # the flood under way
            began = time.monotonic()
            with connect(server) as client:
                client.sendall(b"hello")
                assert recv_exactly(client, 5) == b"hello"
            took = time.monotonic() - began
        finally:
            stop.set()
            flooder.join(WAIT)
    assert took < 2.0, f"a client waited {took:.2f}s behind a flooding one"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_client_reset_before_the_first_read_is_a_connection_reset(mode: str) -> None:
    """The first read, from the socket itself, of a client that sent a few bytes and
    reset: ``ConnectionResetError`` (a peer error, as the transport's read gives),
    never its bytes as a whole request."""
    outcome: list[object] = []
    ready = threading.Event()

    async def handler(stream) -> None:
        await asyncio.to_thread(ready.wait, WAIT)  # the reset is in before the first read
        try:
            outcome.append(await stream.readexactly(10))
        except BaseException as exc:
            outcome.append(exc)
            raise

    with served(mode, handler) as server:
        sock = connect(server)
        sock.sendall(b"half")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_until(lambda: server.stats()["active"] == 1, what="the connection to be served")
        time.sleep(0.1)  # the RST is in
        ready.set()
        wait_until(lambda: outcome, what="the handler's read to end")
        wait_until(lambda: server.stats()["active"] == 0, what="the connection to end")
        stats = server.stats()
    assert isinstance(outcome[0], ConnectionResetError), outcome
    assert (stats["peer_errors"], stats["handler_errors"]) == (1, 0), stats


# -- what a handler written for start_server relies on, on the path with no transport -------
# (the asyncio-app outside check: a connection whose request came with it, answered by
# writes straight to the socket, never makes a transport)


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("mode", MODES)
def test_is_closing_turns_true_once_the_peer_is_gone(mode: str, how: str) -> None:
    """A broadcast that drops its dead clients by ``is_closing()``, as written for
    start_server. Seen: with the request sent with the connection, is_closing() stayed
    False after the client's FIN or reset, even once drain() had raised: the loop
    wrote on into the void until the server stopped (start_server ends it in 0.06 s)."""
    ended = threading.Event()
    writes: list[int] = []

    async def handler(stream) -> None:
        await stream.readline()
        n = 0
        deadline = time.monotonic() + WAIT
        while not stream.is_closing() and time.monotonic() < deadline:
            stream.write(b"tick\n")
            n += 1
            with contextlib.suppress(ConnectionError):
                await stream.drain()
            await asyncio.sleep(0.02)
        writes.append(n)
        ended.set()

    with served(mode, handler) as server:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        client.sendall(b"subscribe\n")
        assert client.recv(5) == b"tick\n"
        began = time.monotonic()
        if how == "rst":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert ended.wait(WAIT), "is_closing() never turned True"
        assert time.monotonic() - began < 2.0, f"it took {time.monotonic() - began:.2f}s"


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_drain_raises_connection_reset_error(mode: str) -> None:
    """As StreamWriter.drain and the docs say, whatever the system call said. Seen:
    the first failing drain() to a client that had closed raised BrokenPipeError on
    that path, which ``except ConnectionResetError`` around a drain misses."""
    raised: list[BaseException] = []
    done = threading.Event()

    async def handler(stream) -> None:
        await stream.readline()
        try:
            for _ in range(200):
                stream.write(b"x" * 1024)
                await stream.drain()
                await asyncio.sleep(0.01)
        except Exception as exc:
            raised.append(exc)
        done.set()

    with served(mode, handler) as server:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        client.sendall(b"go\n")
        assert client.recv(1)
        client.close()
        assert done.wait(WAIT)
    assert len(raised) == 1 and type(raised[0]) is ConnectionResetError, raised


@pytest.mark.parametrize("mode", MODES)
def test_write_after_write_eof_raises_and_a_read_after_close_is_the_end(mode: str) -> None:
    """StreamWriter raises on a write after write_eof(): so does the stream, on uvloop
    too, where it was dropped unsaid (and is_closing() said True after the half-close).
    A read after the handler's own close() and wait_closed() returns b"", as
    StreamReader's, where it raised ConnectionResetError."""
    seen: dict[str, object] = {}
    done = threading.Event()

    async def handler(stream) -> None:
        try:
            await stream.readline()
            stream.write(b"reply\n")
            stream.write_eof()
            seen["closing after eof"] = stream.is_closing()
            try:
                stream.write(b"more")
            except RuntimeError as exc:
                seen["write after eof"] = str(exc)
            stream.close()
            await stream.wait_closed()
            seen["read after close"] = await stream.read(10)
        finally:
            done.set()

    with served(mode, handler) as server:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        with client:
            client.sendall(b"q\n")
            assert recv_until_closed(client) == b"reply\n"
            assert done.wait(WAIT)
    assert seen == {
        "closing after eof": False,
        "write after eof": "Cannot call write() after write_eof()",
        "read after close": b"",
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_send_all_to_a_peer_that_does_not_read_holds_a_chunk_not_the_write(mode: str) -> None:
    """``send_all(16 MiB)`` to a client that reads nothing: the transport held all of it
    (twice under TLS), per stalled client, where threads and gevent hold nothing beyond
    the handler's bytes (the peer check's MED-2). It takes SEND_CHUNK at a time now."""
    from weft_asyncio._stream import SEND_CHUNK

    seen: list[tuple[object, asyncio.AbstractEventLoop]] = []

    async def handler(stream) -> None:
        seen.append((stream, asyncio.get_running_loop()))
        await stream.send_all(BIG)

    def unsent() -> int:
        stream, loop = seen[0]

        async def probe() -> int:
            transport = stream._transport  # type: ignore[attr-defined]
            return 0 if transport is None else transport.get_write_buffer_size()

        return asyncio.run_coroutine_threadsafe(probe(), loop).result(WAIT)

    with served(mode, handler) as server, connect(server, rcvbuf=4096):
        wait_until(lambda: seen and unsent() > 0, what="the write waiting in the transport")
        held = unsent()
        assert held <= 2 * SEND_CHUNK, f"{held} bytes of 16 MiB held for a peer that reads none"
