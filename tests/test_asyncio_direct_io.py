"""The asyncio stream's direct I/O at its edges: the first read and the writes before any transport.

A connection that never waits has no transport (``_stream.py``); these tests, from an
outside check, cross the boundary every way a handler can: bytes pipelined or split
across it, many writes before a drain, close with bytes pending, resets on either
side of it, cancellation, stops and timeouts in each state, two tasks at once. Each
plays a real client against a weft asyncio server on asyncio's loop and uvloop's, on
the manager's own loop thread and on an application's running loop.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import logging
import socket
import sys
import threading
import time

import pytest
from _asyncio_app import MODES, WAIT, Records, reset, served, until

from weft_core.testing._support import fd_count, recv_exactly, recv_until_closed, wait_until

MIB = 1 << 20


def connect(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(server.port)))
    return sock


def pattern(n: int) -> bytes:
    """``n`` bytes whose order shows: a counter, 4 bytes at a time (big-endian).

    Made in C (``array``): a Python loop took seconds for 32 MiB on a loaded machine,
    inside a handler a test gave 5 s to write it.
    """
    words = array.array("I", range((n + 3) // 4))
    assert words.itemsize == 4
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()[:n]


# -- order and loss of bytes ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_pipelined_lines_in_one_packet_then_more(mode: str) -> None:
    """Lines pipelined in one packet, read with readline across the boundary, more later."""

    async def handler(stream) -> None:
        while line := await stream.readline():
            stream.write(b"<" + line)
            await stream.drain()

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(b"a\nb\nc\nd")
        assert recv_exactly(client, 9) == b"<a\n<b\n<c\n"
        for piece in (b"\n", b"e", b"\nf\n"):
            client.sendall(piece)
            time.sleep(0.02)
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == b"<d\n<e\n<f\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_more_than_the_scratch_buffer_before_the_first_read(mode: str) -> None:
    """300 KiB + FIN sent before the handler's first read: read(-1) gets all, in order."""
    sent = threading.Event()
    data = pattern(300 * 1024 + 7)

    async def handler(stream) -> None:
        await until(sent.is_set, "sent")
        await asyncio.sleep(0.1)
        got = await stream.read()
        stream.write(b"%d %s" % (len(got), hashlib.sha256(got).hexdigest().encode()))
        await stream.drain()

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        sent.set()
        reply = recv_until_closed(client)
    assert reply == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["readexactly", "readuntil", "read_n"])
@pytest.mark.parametrize("mode", MODES)
def test_one_message_across_the_boundary(mode: str, how: str) -> None:
    """10 bytes at once, 200 KiB later: one message read across direct read and transport."""
    body = bytes(range(97, 123)) * (200 * 1024 // 26)
    first, rest = body[:10] + b"", body[10:] + b"$"
    total = len(first) + len(rest)

    async def handler(stream) -> None:
        if how == "readexactly":
            got = await stream.readexactly(total)
        elif how == "readuntil":
            chunks = []
            while True:
                try:
                    chunks.append(await stream.readuntil(b"$"))
                    break
                except asyncio.LimitOverrunError as exc:
                    chunks.append(await stream.readexactly(exc.consumed))
            got = b"".join(chunks)
        else:
            chunks = []
            n = 0
            while n < total:
                chunk = await stream.read(4096)
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            got = b"".join(chunks)
        stream.write(hashlib.sha256(got).hexdigest().encode())
        await stream.drain()

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(first)
        time.sleep(0.1)
        client.sendall(rest)
        reply = recv_until_closed(client)
    assert reply == hashlib.sha256(first + rest).hexdigest().encode()


def _read_all_then_answer(client: socket.socket, size: int) -> tuple[bytes, bytes]:
    """Read ``size`` bytes, then what follows (b"" at the server's EOF); answer "thanks"
    and half-close, then read until the server closes. What was read, and what followed."""
    got = _slow_read(client, size + 1, 0.0)
    tail = client.recv(10)
    client.sendall(b"thanks")
    client.shutdown(socket.SHUT_WR)
    recv_until_closed(client)
    return got, tail


def _slow_read(client: socket.socket, total: int, pause: float = 0.002) -> bytes:
    chunks = []
    n = 0
    while n < total:
        chunk = client.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
        time.sleep(pause)
    return b"".join(chunks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["return", "close", "close_wait_closed", "aclose"])
@pytest.mark.parametrize("mode", MODES)
def test_many_writes_then_close_without_drain_reach_a_slow_reader(mode: str, ending: str) -> None:
    """write() 8 x 512 KiB with no drain, then close: a slow reader gets every byte in order."""
    data = pattern(4 * MIB)

    async def handler(stream) -> None:
        for i in range(8):
            stream.write(data[i * 512 * 1024 : (i + 1) * 512 * 1024])
        if ending == "close":
            stream.close()
        elif ending == "close_wait_closed":
            stream.close()
            await stream.wait_closed()
        elif ending == "aclose":
            await stream.aclose()

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        got = _slow_read(client, len(data) + 1)
    assert len(got) == len(data)
    assert got == data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_writelines_then_drain_then_more(mode: str) -> None:
    data = pattern(3 * MIB)
    parts = [data[i : i + 300_001] for i in range(0, len(data), 300_001)]

    async def handler(stream) -> None:
        stream.writelines(parts[:3])
        stream.write(parts[3])
        await stream.drain()
        stream.writelines(iter(parts[4:]))
        await stream.drain()

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        got = _slow_read(client, len(data) + 1, 0.001)
    assert got == data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["own-asyncio", "app-asyncio"])
def test_write_eof_after_a_direct_write_with_bytes_pending(mode: str) -> None:
    """write(4 MiB) (kernel takes part), write_eof(): the client gets 4 MiB, then EOF, then can answer."""
    data = pattern(4 * MIB)
    result: list[object] = []

    async def handler(stream) -> None:
        stream.write(data)
        stream.write_eof()
        await stream.drain()
        result.append(await stream.read())

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        got, tail = _read_all_then_answer(client, len(data))
    assert (len(got), tail) == (len(data), b"")
    assert got == data
    assert result == [b"thanks"]


# -- half-close and reset ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_half_close_before_the_first_read_still_gets_the_reply(mode: str) -> None:
    sent = threading.Event()

    async def handler(stream) -> None:
        await until(sent.is_set, "sent")
        await asyncio.sleep(0.05)
        got = await stream.read()
        again = await stream.read(10)
        stream.write(b"got " + got + b" then %r eof=%r" % (again, stream.at_eof()))
        await stream.drain()

    with served(mode, handler) as server, connect(server) as client:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        sent.set()
        assert recv_until_closed(client) == b"got hello then b'' eof=True"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_reset_while_bytes_are_pending_raises_from_drain(mode: str) -> None:
    """A reset with unsent bytes kept in the stream: drain raises a ConnectionError."""
    wrote = threading.Event()
    gone = threading.Event()
    seen: list[object] = []

    async def handler(stream) -> None:
        stream.write(pattern(8 * MIB))
        wrote.set()
        await until(gone.is_set, "gone")
        await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(stream.drain(), 3)
            stream.write(b"more")
            await asyncio.wait_for(stream.drain(), 3)
            seen.append("no error")
        except BaseException as exc:
            seen.append(exc)

    records = Records()
    weft_log = logging.getLogger("weft")
    weft_log.addHandler(records)
    try:
        with served(mode, handler) as server:
            client = connect(server, rcvbuf=65536)
            assert wrote.wait(WAIT)
            reset(client)
            gone.set()
            wait_until(lambda: seen, what="the handler's drain")
    finally:
        weft_log.removeHandler(records)
    assert isinstance(seen[0], ConnectionError), seen
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
    assert not [e for e in errors if "Traceback" in e or "Exception in" in e], errors


# -- get_extra_info ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_get_extra_info_before_and_after_the_transport(mode: str) -> None:
    seen: dict[str, object] = {}

    async def handler(stream) -> None:
        seen["peer0"] = stream.get_extra_info("peername")
        seen["sock0"] = stream.get_extra_info("sockname")
        seen["missing0"] = stream.get_extra_info("nonesuch", "dflt")
        await stream.read(1)  # nothing there yet: makes the transport
        seen["peer1"] = stream.get_extra_info("peername")
        seen["sock1"] = stream.get_extra_info("sockname")
        seen["missing1"] = stream.get_extra_info("nonesuch", "dflt")
        stream.write(b"ok")
        await stream.drain()

    with served(mode, handler) as server, connect(server) as client:
        time.sleep(0.1)
        client.sendall(b"x")
        assert recv_until_closed(client) == b"ok"
        here = client.getsockname()
    assert seen["peer0"] == seen["peer1"] == here, seen
    assert seen["sock0"] == seen["sock1"] == ("127.0.0.1", int(server.port)), seen
    assert seen["missing0"] == seen["missing1"] == "dflt", seen


# -- cancellation, timeouts and stop ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("state", ["first_read", "drain_pending", "sleep_pending"])
@pytest.mark.parametrize("mode", MODES)
def test_stop_is_bounded_by_its_timeout(mode: str, state: str) -> None:
    """stop(timeout=1) returns within ~1 s, whatever the direct-I/O state of a connection."""
    ready = threading.Event()

    async def handler(stream) -> None:
        if state == "first_read":
            ready.set()
            await stream.read(10)
            await asyncio.sleep(100)
        elif state == "drain_pending":
            stream.write(pattern(16 * MIB))
            ready.set()
            await stream.drain()
            await asyncio.sleep(100)
        else:
            stream.write(pattern(16 * MIB))
            ready.set()
            await asyncio.sleep(100)

    with served(mode, handler) as server:
        client = connect(server, rcvbuf=65536)
        try:
            assert ready.wait(WAIT)
            time.sleep(0.1)
            t0 = time.monotonic()
            server.stop(timeout=1.0)
            took = time.monotonic() - t0
        finally:
            client.close()
    assert took < 1.0 + 1.5, f"stop(timeout=1.0) took {took:.2f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_drain_cancelled_by_wait_for_then_the_rest_in_order(mode: str) -> None:
    """wait_for(drain(), short) times out with bytes pending; writes go on; all arrive in order."""
    data = pattern(6 * MIB)
    go = threading.Event()
    timeouts: list[int] = []

    async def handler(stream) -> None:
        stream.write(data[: 2 * MIB])
        try:
            await asyncio.wait_for(stream.drain(), 0.0001)
        except TimeoutError:
            timeouts.append(1)
        stream.write(data[2 * MIB : 4 * MIB])
        try:
            await asyncio.wait_for(stream.drain(), 0.05)
        except TimeoutError:
            timeouts.append(2)
        go.set()
        stream.write(data[4 * MIB :])
        await stream.drain()

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        go.wait(WAIT)
        got = _slow_read(client, len(data) + 1, 0.0)
    assert len(got) == len(data)
    assert got == data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_on_a_first_read_without_transport(mode: str) -> None:
    """idle_timeout=0.5, the client silent: the read raises, the client sees the close in time."""
    seen: list[object] = []

    async def handler(stream) -> None:
        t0 = time.monotonic()
        try:
            await stream.read(10)
        except BaseException as exc:
            seen.append((type(exc).__name__, round(time.monotonic() - t0, 1)))
            raise

    with served(mode, handler, idle_timeout=0.5) as server, connect(server) as client:
        t0 = time.monotonic()
        assert recv_until_closed(client) == b""
        took = time.monotonic() - t0
    assert seen and seen[0][0] == "TimeoutError", seen
    assert took < 2.0, took


# -- two tasks ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_reader_and_a_writer_task_across_the_boundary(mode: str) -> None:
    """The writer streams 4 MiB while the reader echoes lines: nothing lost or reordered."""
    data = pattern(4 * MIB)

    async def handler(stream) -> None:
        async def writer() -> None:
            for i in range(0, len(data), 256 * 1024):
                stream.write(b"D" + data[i : i + 256 * 1024])
                await stream.drain()

        async def reader() -> list[bytes]:
            lines = []
            while line := await stream.readline():
                lines.append(line)
            return lines

        w = asyncio.ensure_future(writer())
        lines = await reader()
        await w
        stream.write(b"L" + b"".join(lines))
        await stream.drain()

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        for i in range(20):
            client.sendall(b"line %d\n" % i)
        client.shutdown(socket.SHUT_WR)
        got = _slow_read(client, 10 * MIB, 0.0)
    expected_lines = b"".join(b"line %d\n" % i for i in range(20))
    chunks = b"".join(b"D" + data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024))
    assert got == chunks + b"L" + expected_lines


# -- descriptors --------------------------------------------------------------------------------


def _endings_handler():
    async def handler(stream) -> None:
        first = await stream.read(100)
        kind = first[:1]
        if kind == b"a":  # answer at once
            stream.write(b"ok")
            await stream.drain()
        elif kind == b"b":  # big write, no drain, return
            stream.write(b"x" * (1 << 20))
        elif kind == b"c":  # close without transport
            stream.close()
            await stream.wait_closed()
        elif kind == b"d":  # second read makes the transport
            await stream.read(100)
            stream.write(b"ok")
        elif kind == b"e":  # write_eof directly
            stream.write(b"bye")
            stream.write_eof()
        elif kind == b"f":  # big write then close
            stream.write(b"x" * (1 << 20))
            stream.close()

    return handler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["own-asyncio", "own-uvloop"])
def test_no_descriptor_left_after_short_connections_ending_every_way(mode: str) -> None:
    with served(mode, _endings_handler()) as server:

        def one(kind: bytes, ending: str) -> None:
            c = connect(server)
            try:
                c.sendall(kind)
                if ending == "reset":
                    reset(c)
                    return
                if ending == "half":
                    c.shutdown(socket.SHUT_WR)
                if kind == b"d" and ending == "read":
                    time.sleep(0.005)
                    c.sendall(b"z")
                    c.shutdown(socket.SHUT_WR)
                c.settimeout(WAIT)
                try:
                    recv_until_closed(c)
                except OSError:
                    pass
            finally:
                c.close()

        for kind in b"abcdef":
            one(bytes([kind]), "read")  # warm-up
        time.sleep(0.3)
        before = fd_count()
        for _ in range(25):
            for kind in b"abcdef":
                for ending in ("read", "reset", "half"):
                    one(bytes([kind]), ending)
        wait_until(lambda: fd_count() <= before + 2, timeout=8, what="descriptors back")
        assert fd_count() <= before + 2, (before, fd_count())


# -- stats and access log -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_stats_and_access_log_count_a_connection_that_never_had_a_transport(mode: str) -> None:
    records = Records()
    access = logging.getLogger("weft.access")
    access.addHandler(records)
    level = access.level
    access.setLevel(logging.INFO)
    sent = threading.Event()

    async def handler(stream) -> None:
        await until(sent.is_set, "sent")
        await asyncio.sleep(0.1)
        got = await stream.read(100)
        stream.write(got * 10)

    try:
        with served(mode, handler, access_log=True) as server, connect(server) as client:
            client.sendall(b"12345")
            sent.set()
            assert recv_until_closed(client) == b"12345" * 10
            assert records.seen.wait(WAIT)
            wait_until(lambda: server.stats().get("bytes_in"), what="stats")
            stats = server.stats()
    finally:
        access.removeHandler(records)
        access.setLevel(level)
    record = records.records[0]
    assert (record.bytes_in, record.bytes_out, record.how) == (5, 50, "closed"), (
        record.getMessage()
    )
    assert (stats["bytes_in"], stats["bytes_out"]) == (5, 50), stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write_first", [False, True], ids=["eof_only", "write_then_eof"])
@pytest.mark.parametrize("mode", MODES)
def test_write_eof_after_the_client_reset_is_not_a_raw_oserror(
    mode: str, write_first: bool
) -> None:
    """The first read took the request, the client then reset; write_eof() must not raise ENOTCONN.

    asyncio's StreamWriter.write_eof() on a reset connection returns quietly (its
    transport is closing); the stream on uvloop suppresses the OSError; the stream on
    asyncio's loop makes a transport on the dead socket and its shutdown() raises
    ``OSError: [Errno 107] Transport endpoint is not connected``.
    """
    sent = threading.Event()
    got = threading.Event()
    gone = threading.Event()
    seen: list[object] = []

    async def handler(stream) -> None:
        await until(sent.is_set, "sent")
        await asyncio.sleep(0.05)  # the request is in the socket: the first read takes it directly
        assert await stream.read(10) == b"req"
        got.set()
        await until(gone.is_set, "gone")
        await asyncio.sleep(0.1)
        try:
            if write_first:
                stream.write(b"bye")
            stream.write_eof()
            seen.append("ok")
        except BaseException as exc:
            seen.append(exc)

    with served(mode, handler) as server:
        client = connect(server)
        client.sendall(b"req")
        sent.set()
        assert got.wait(WAIT)
        reset(client)
        gone.set()
        wait_until(lambda: seen, what="the handler's write_eof")
    assert seen[0] == "ok" or isinstance(seen[0], ConnectionResetError), repr(seen[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_many_small_writes_before_drain_do_not_block_the_loop(mode: str) -> None:
    """12,000 write()s of 1 KiB then drain(), as a handler writing rows does (SO_SNDBUF 64 KiB).

    StreamWriter.write() appends to the transport's buffer (amortised O(1): about
    10 ms for these). While the stream has no transport, each write() copies all
    that is pending into a new bytes object (``_pending = (_pending or b"") +
    bytes(data)``), O(n**2): the loop, and every other connection on it, is blocked
    for seconds. The handler gives up after 1 s and says how far it got.
    """
    row = b"r" * 1023 + b"\n"
    rows = 12_000
    took: list[tuple[float, int]] = []

    async def handler(stream) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        t0 = time.monotonic()
        written = 0
        while written < rows and time.monotonic() - t0 < 1.0:
            for _ in range(100):
                stream.write(row)
            written += 100
        took.append((time.monotonic() - t0, written))

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        wait_until(lambda: took, timeout=20, what="the handler's writes")
        got = _slow_read(client, rows * len(row) + 1, 0.0)
    seconds, written = took[0]
    assert len(got) == written * len(row)
    assert written == rows, f"{written} of {rows} write() calls of 1 KiB in {seconds:.1f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_close_sends_what_is_pending_without_waiting_for_the_handler_to_return(mode: str) -> None:
    """write(4 MiB); close(); then the handler goes on with other work.

    StreamWriter.close() (and this stream's, once its transport exists) sends what is
    queued and then closes; docs/managers.md: "Closing (the handler's return, close()
    and wait_closed(), aclose()) sends what is queued for as long as the client reads
    it". Before the transport exists, close() with bytes pending does nothing: the
    client gets only what the kernel took at once, and the rest only when the handler
    returns; is_closing() says False after close().
    """
    data = pattern(16 * MIB)
    done = threading.Event()
    closing: list[bool] = []

    async def handler(stream) -> None:
        # The kernel takes little at once.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        stream.write(data)
        stream.close()
        closing.append(stream.is_closing())
        await until(done.is_set, "done", 10)  # the handler's own bookkeeping, after its reply

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        client.settimeout(3.0)
        chunks: list[bytes] = []
        try:
            while chunk := client.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        done.set()
    got = b"".join(chunks)
    assert (len(got), closing) == (len(data), [True])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_on_a_drain_whose_bytes_wait_without_a_transport(mode: str) -> None:
    seen: list[object] = []

    async def handler(stream) -> None:
        stream.write(pattern(16 * MIB))
        t0 = time.monotonic()
        try:
            await stream.drain()
            seen.append("drained")
        except BaseException as exc:
            seen.append((type(exc).__name__, round(time.monotonic() - t0, 1)))
            raise

    with (
        served(mode, handler, idle_timeout=0.5) as server,
        connect(server, rcvbuf=65536) as client,
    ):
        wait_until(lambda: seen, what="the drain's end")
        client.close()
    assert seen[0][0] == "TimeoutError" and seen[0][1] < 1.5, seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_send_eof_after_a_direct_write_with_bytes_pending(mode: str) -> None:
    data = pattern(8 * MIB)
    result: list[object] = []

    async def handler(stream) -> None:
        stream.write(data)
        await stream.send_eof()
        result.append(await stream.read())

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        got, tail = _read_all_then_answer(client, len(data))
    assert (len(got), tail) == (len(data), b"")
    assert got == data
    assert result == [b"thanks"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("state", ["first_read", "pending"])
@pytest.mark.parametrize("mode", MODES)
def test_close_connection_is_bounded_without_a_transport(mode: str, state: str) -> None:
    ready = threading.Event()

    async def handler(stream) -> None:
        if state == "pending":
            stream.write(pattern(16 * MIB))
        ready.set()
        await stream.read(10)
        await asyncio.sleep(100)

    with served(mode, handler) as server:
        client = connect(server, rcvbuf=65536)
        try:
            assert ready.wait(WAIT)
            time.sleep(0.1)
            (conn,) = server.connections()
            t0 = time.monotonic()
            server.close_connection(conn.task_id, timeout=0.5)
            took = time.monotonic() - t0
            wait_until(lambda: not server.connections(), what="the connection gone")
        finally:
            client.close()
    assert took < 0.5 + 2.0 + 1.0, took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_stop_bounded_while_closing_sends_pending_bytes_to_a_slow_reader(mode: str) -> None:
    """The handler wrote 32 MiB and returned; the client reads a little every 0.3 s."""
    returned = threading.Event()

    async def handler(stream) -> None:
        stream.write(pattern(32 * MIB))
        returned.set()

    with served(mode, handler) as server:
        client = connect(server, rcvbuf=65536)
        stop_reading = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop_reading.is_set() and client.recv(4096):
                    time.sleep(0.3)

        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        try:
            assert returned.wait(WAIT)
            time.sleep(0.2)
            t0 = time.monotonic()
            server.stop(timeout=1.0)
            took = time.monotonic() - t0
        finally:
            stop_reading.set()
            reader.join(5)
            client.close()
    assert took < 1.0 + 2.0 + 1.0, f"stop(timeout=1.0) took {took:.2f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["read", "readline", "readexactly"])
@pytest.mark.parametrize("mode", MODES)
def test_a_reset_right_after_the_first_read_is_a_connection_reset(mode: str, how: str) -> None:
    """docs/managers.md: a client's reset raises ConnectionResetError from any read."""
    got = threading.Event()
    gone = threading.Event()
    seen: list[object] = []

    async def handler(stream) -> None:
        assert await stream.read(3) == b"par"
        got.set()
        await until(gone.is_set, "gone")
        await asyncio.sleep(0.1)
        try:
            if how == "read":
                seen.append(await stream.read(10))
            elif how == "readline":
                seen.append(await stream.readline())
            elif how == "readexactly":
                seen.append(await stream.readexactly(10))
        except BaseException as exc:
            seen.append(exc)

    records = Records()
    log = logging.getLogger("weft")
    log.addHandler(records)
    try:
        with served(mode, handler) as server:
            client = connect(server)
            client.sendall(b"par")
            assert got.wait(WAIT)
            reset(client)
            gone.set()
            wait_until(lambda: seen, what="the handler's read")
    finally:
        log.removeHandler(records)
    assert isinstance(seen[0], ConnectionResetError), repr(seen[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_write_after_a_reset_once_the_transport_exists_is_a_connection_reset(mode: str) -> None:
    """write(); drain() after the client reset: ConnectionResetError, with a transport as without.

    Without a transport (the first read took the request) the same handler gets
    ConnectionResetError from drain(). Once the first read had to wait (the request
    came a moment later, so the stream made its transport), on uvloop write()
    itself raises ``RuntimeError: unable to perform operation on <TCPTransport
    closed=True ...>; the handler is closed``: the stream's write() hands the bytes
    to uvloop's closed transport (AsyncioStream.write, no check of ``_lost``).
    """
    ready = threading.Event()
    got = threading.Event()
    gone = threading.Event()
    seen: list[object] = []

    async def handler(stream) -> None:
        ready.set()
        assert await stream.read(3) == b"par"  # waits: the transport is made
        got.set()
        await until(gone.is_set, "gone")
        await asyncio.sleep(0.2)
        try:
            stream.write(b"x" * 100)
            await stream.drain()
            stream.write(b"x" * 100)
            await stream.drain()
            seen.append("drained")
        except BaseException as exc:
            seen.append(exc)

    with served(mode, handler) as server:
        client = connect(server)
        assert ready.wait(WAIT)
        time.sleep(0.2)
        client.sendall(b"par")
        assert got.wait(WAIT)
        reset(client)
        gone.set()
        wait_until(lambda: seen, what="the handler's write")
    assert isinstance(seen[0], ConnectionResetError), repr(seen[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_write_eof_while_another_task_waits_on_the_first_read(mode: str) -> None:
    """A reader task waits on the first read (uvloop: making the transport); the handler
    writes a greeting and write_eof()s; the client gets it then EOF, and its answer is read."""
    got: list[object] = []
    ready = threading.Event()

    async def handler(stream) -> None:
        reader = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0)
        stream.write(b"hello ")
        stream.write(b"world")
        stream.write_eof()
        ready.set()
        try:
            got.append(await asyncio.wait_for(reader, 5))
        except BaseException as exc:
            got.append(exc)

    with served(mode, handler) as server, connect(server) as client:
        assert ready.wait(WAIT)
        greeting = recv_until_closed(client)
        client.sendall(b"answer")
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: got, what="the reader")
    assert (greeting, got) == (b"hello world", [b"answer"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["send_eof", "drain_write_eof"])
@pytest.mark.parametrize("mode", ["own-uvloop", "app-uvloop"])
def test_write_eof_refused_on_uvloop_then_the_advised_way_delivers_all(
    mode: str, then: str
) -> None:
    """uvloop, 8 MiB pending: write_eof() raises RuntimeError as documented; what it advises
    (``await send_eof()`` or ``await drain()`` first) then delivers every byte, then EOF.

    The client reads only once write_eof() was tried: reading meanwhile (on a loaded
    host, with the handler slow to get there) it could empty the kernel's buffers,
    which then took the whole rest at once, and nothing was left to refuse for."""
    data = pattern(8 * MIB)
    seen: list[object] = []
    tried = threading.Event()

    async def handler(stream) -> None:
        stream.write(data)
        try:
            stream.write_eof()
            seen.append("no error")
        except RuntimeError:
            seen.append("refused")
        tried.set()
        if then == "send_eof":
            await stream.send_eof()
        else:
            await stream.drain()
            stream.write_eof()
        seen.append(await stream.read())

    with served(mode, handler) as server, connect(server, rcvbuf=65536) as client:
        assert tried.wait(WAIT)
        got, tail = _read_all_then_answer(client, len(data))
    assert (len(got), tail, seen) == (len(data), b"", ["refused", b"thanks"])
    assert got == data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_handler_returning_with_bytes_pending_after_a_reset_ends_quietly(mode: str) -> None:
    """8 MiB pending, the client resets, the handler returns: no error logged, nothing left open."""
    wrote = threading.Event()
    gone = threading.Event()
    records = Records()
    log = logging.getLogger("weft")
    log.addHandler(records)
    level = log.level
    log.setLevel(logging.DEBUG)

    async def handler(stream) -> None:
        stream.write(pattern(8 * MIB))
        wrote.set()
        await until(gone.is_set, "gone")
        await asyncio.sleep(0.1)

    try:
        with served(mode, handler, access_log=True) as server:
            before = fd_count()
            for _ in range(5):
                wrote.clear()
                gone.clear()
                client = connect(server, rcvbuf=65536)
                assert wrote.wait(WAIT)
                reset(client)
                gone.set()
                wait_until(lambda: not server.connections(), what="the connection's end")
            wait_until(lambda: fd_count() <= before + 2, timeout=5, what="descriptors back")
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    bad = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert not bad, bad[:3]
    hows = {getattr(r, "how", None) for r in records.records if r.name == "weft.access"}
    assert hows <= {"closed", "error"}, hows
