"""Tests of what is specific to the asyncio manager.

The generic behaviour is weft_core's conformance suite (test_conformance.py); these
cover the asyncio side: serving inside an application's running loop (and stopping
from it without blocking it), uvloop, cancellation at phase 3, a handler awaiting
``asyncio.sleep`` while others are served, and the stream's asyncio and trio
methods. Real sockets on loopback; waits on events with timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import weft_core
from weft_asyncio import AsyncioManager, AsyncioRuntime, AsyncioStream
from weft_core import ConfigError, Server, TaskManager, current_connection, shutdown_requested

pytestmark = pytest.mark.timeout(30)

#: Generous upper bound for anything that should happen "at once".
WAIT = 5.0


def connect(server: Server) -> socket.socket:
    """A blocking client connected to ``server``, with a timeout."""
    sock = socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def echo(stream: AsyncioStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()


@pytest.fixture
def manager() -> Iterator[AsyncioManager]:
    m = AsyncioManager()
    yield m
    m.runtime.close()


# -- registration and options ---------------------------------------------------------


def test_registered_as_asyncio_with_async_handlers() -> None:
    """The plugin provides ``asyncio``, an async manager, made by name with options."""
    spec = weft_core.available_managers()["asyncio"]
    assert spec.handler_kind == "async"
    assert spec.distribution == "weft-asyncio"
    m = weft_core.create_manager("asyncio", limit=2)
    assert isinstance(m, AsyncioManager)
    assert isinstance(m, TaskManager)
    assert isinstance(m.runtime, AsyncioRuntime)
    weft_core.check_runtime(m.runtime)
    assert m.limit == 2


def test_unknown_loop_names_the_choices() -> None:
    """loop= other than asyncio or uvloop fails naming both."""
    with pytest.raises(ConfigError, match="'asyncio', 'uvloop'"):
        weft_core.create_manager("asyncio", loop="tokio")


def test_uvloop_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """loop="uvloop" without uvloop installed names the extra that brings it."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'weft-asyncio\[uvloop\]'"):
        weft_core.create_manager("asyncio", loop="uvloop")


def test_no_thread_until_the_first_task() -> None:
    """The loop thread starts lazily, at the first add_task, and close() ends it."""
    before = threading.active_count()
    m = AsyncioManager()
    assert threading.active_count() == before
    ran = threading.Event()

    async def task() -> None:
        ran.set()

    m.add_task(task)
    assert ran.wait(WAIT)
    assert m.loop is not None
    m.runtime.close()
    assert threading.active_count() == before
    assert m.loop is None


# -- uvloop ---------------------------------------------------------------------------


def test_uvloop_serves_on_a_uvloop_loop() -> None:
    """With loop="uvloop", handlers run on uvloop's loop and are served like any other."""
    pytest.importorskip("uvloop")
    seen: list[str] = []

    async def handler(stream: AsyncioStream) -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)
        await echo(stream)

    options = {"loop": "uvloop"}
    with (
        Server(handler, manager="asyncio", manager_options=options) as server,
        connect(server) as client,
    ):
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
    assert seen and seen[0].startswith("uvloop"), seen


# -- the application's own loop -----------------------------------------------------


def test_serves_inside_the_applications_running_loop() -> None:
    """run() from a coroutine serves on that loop, beside the application's own tasks.

    The handler uses an asyncio.Queue of the application's loop (a stand-in for a
    database pool), which only works on that loop; the application's ticker keeps
    ticking while connections are served; stop() from the loop returns at once
    without blocking it, and the stop completes.
    """

    async def app() -> None:
        loop = asyncio.get_running_loop()
        pool: asyncio.Queue[str] = asyncio.Queue()
        pool.put_nowait("connection-from-the-pool")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        async def handler(stream: AsyncioStream) -> None:
            assert asyncio.get_running_loop() is loop, "served on the application's loop"
            item = await pool.get()  # would fail on any other loop
            try:
                line = await stream.readline()
                stream.write(item.encode() + b" " + line)
                await stream.drain()
                await stream.read()  # until the client ends, or the stop ends the input
            finally:
                pool.put_nowait(item)

        tick_task = asyncio.create_task(ticker())
        server = Server(handler, manager="asyncio")
        server.run()  # returns at once: the acceptor is a task of this loop
        assert server.task_manager.loop is loop  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), WAIT) == (
            b"connection-from-the-pool hello\n"
        )
        before = ticks
        await asyncio.sleep(0.05)
        assert ticks > before, "the application's own task must keep running"
        began = time.monotonic()
        assert server.stop(timeout=WAIT) is False  # started in a thread; must not block
        assert time.monotonic() - began < 0.5, "stop() on the loop must not block it"
        assert await asyncio.wait_for(reader.read(), WAIT) == b"", "the stop ends the connection"
        assert await asyncio.to_thread(server.wait, WAIT), "the stop must complete"
        assert server.stopped and server.socket is None
        assert server.stats()["left_behind"] == 0
        writer.close()
        tick_task.cancel()

    asyncio.run(app())


def test_stop_accepting_on_the_applications_loop_does_not_block() -> None:
    """stop_accepting() from the serving loop closes the listener without blocking the loop."""

    async def app() -> None:
        server = Server(echo, manager="asyncio")
        server.run()
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        began = time.monotonic()
        server.stop_accepting()
        assert time.monotonic() - began < 0.5
        writer.write(b"still served")
        assert await asyncio.wait_for(reader.readexactly(12), WAIT) == b"still served"
        writer.close()
        assert await asyncio.to_thread(server.wait, WAIT)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(app())


def test_stop_task_on_the_loop_says_to_await_astop_task() -> None:
    """stop_task() on the manager's loop would deadlock: it raises; astop_task works there."""

    async def app() -> None:
        manager = AsyncioManager()
        started = asyncio.Event()

        async def waits() -> None:
            started.set()
            while not shutdown_requested():
                await asyncio.sleep(0.01)

        task_id = manager.add_task(waits)
        await asyncio.wait_for(started.wait(), WAIT)
        with pytest.raises(RuntimeError, match="astop_task"):
            manager.stop_task(task_id)
        assert await manager.astop_task(task_id, timeout=WAIT) is True
        assert manager.all_tasks() == []
        manager.runtime.close()

    asyncio.run(app())


async def _until(predicate: Any) -> None:
    """Wait (on the loop, bounded by WAIT) until ``predicate()`` is true."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


def _controlling() -> bool:
    return any(t.name == "weft control" for t in threading.enumerate())


def test_live_control_on_the_applications_loop_does_not_block() -> None:
    """pause_accepting, resume_accepting and close_connection from the serving loop.

    Each returns at once (waiting there would freeze the loop that serves the
    connections, and stop_task raises on it); the pause takes effect, a client
    that connects meanwhile waits in the backlog, the resume called after the
    pause happens after it and serves that client, and close_connection ends its
    connection.
    """

    async def app() -> None:
        server = Server(echo, manager="asyncio")
        server.run()
        began = time.monotonic()
        server.pause_accepting()
        server.resume_accepting()
        server.pause_accepting()
        assert time.monotonic() - began < 0.5, "the loop must not be blocked"
        await _until(lambda: server.paused and not _controlling())
        await asyncio.sleep(0.05)  # the acceptor's cancellation lands
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"x")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(1), 0.3)  # waits in the backlog
        server.resume_accepting()
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
        (snapshot,) = server.connections()
        began = time.monotonic()
        assert server.close_connection(snapshot.task_id, timeout=WAIT) is False
        assert time.monotonic() - began < 0.5, "the loop must not be blocked"
        assert await asyncio.wait_for(reader.read(), WAIT) == b"", "its input was ended"
        writer.close()
        server.stop(timeout=WAIT)
        assert await asyncio.to_thread(server.wait, WAIT)

    asyncio.run(app())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_listener_leaves_nothing_on_the_applications_loop(loop_name: str) -> None:
    """After churn, a pause and a stop, the loop watches nothing of the closed listener.

    The listener keeps its reader callback between accepts (as start_server's does);
    a callback left behind would break the application's next socket that gets the
    same descriptor number (asyncio's add_reader fails on a stale registration). The
    test puts a new socket on exactly that number and waits on it with the loop.
    """
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Any = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop

    async def app() -> None:
        loop = asyncio.get_running_loop()
        server = Server(echo, manager="asyncio")
        server.run()
        listener_fd = server.socket.fileno()  # type: ignore[union-attr]
        for _ in range(20):  # connections one after another: the acceptor waits between
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"y")
            assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"y"
            writer.close()
        await asyncio.to_thread(server.pause_accepting)
        await asyncio.to_thread(server.resume_accepting)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"z")
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"z"
        writer.close()
        server.stop(timeout=WAIT)
        assert await asyncio.to_thread(server.wait, WAIT)
        await asyncio.sleep(0.01)  # the acceptor's way out has run
        reused, b = socket.socketpair()  # the application's next socket, same number
        if reused.fileno() != listener_fd:
            os.dup2(reused.fileno(), listener_fd)
            reused.close()
            reused = socket.socket(fileno=listener_fd)
        try:
            reused.setblocking(False)
            b.sendall(b"!")
            assert await asyncio.wait_for(loop.sock_recv(reused, 1), WAIT) == b"!"
        finally:
            reused.close()
            b.close()

    loop = new_loop()
    try:
        loop.run_until_complete(app())
    finally:
        loop.close()


# -- cancellation and concurrency ------------------------------------------------------


def test_phase_3_cancels_a_handler_that_ignores_the_stop(caplog: pytest.LogCaptureFixture) -> None:
    """A handler deaf to its flag and its input is cancelled once the timeout runs out.

    It sees CancelledError (its finally runs), the manager swallows it as it swallows
    TaskShutdown (nothing logged as an error), and the stop returns within the bound.
    """
    cancelled = threading.Event()
    entered = threading.Event()

    async def deaf(stream: AsyncioStream) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = Server(deaf, manager="asyncio")
    server.run()
    with connect(server):
        assert entered.wait(WAIT)
        began = time.monotonic()
        with caplog.at_level(logging.ERROR):
            assert server.stop(timeout=0.2) is False
        assert time.monotonic() - began < 0.2 + 2.0
    assert cancelled.is_set(), "the handler must see CancelledError"
    assert server.stats()["left_behind"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


def test_a_sleeping_handler_does_not_hold_up_others() -> None:
    """A handler awaiting asyncio.sleep leaves the loop free: other clients are served."""
    sleeping = threading.Event()

    async def handler(stream: AsyncioStream) -> None:
        first = await stream.readexactly(1)
        if first == b"s":
            sleeping.set()
            await asyncio.sleep(3600)
        stream.write(first)
        await echo(stream)

    with Server(handler, manager="asyncio") as server, connect(server) as sleeper:
        sleeper.sendall(b"s")
        assert sleeping.wait(WAIT)
        for _ in range(3):
            with connect(server) as other:
                other.sendall(b"e-ok")
                assert recv_exactly(other, 4) == b"e-ok"
        server.stop(timeout=0.1)


# -- the stream ------------------------------------------------------------------------


def test_stream_reads_as_an_asyncio_stream_reader() -> None:
    """readline, readuntil, readexactly, read(n), read() and at_eof behave as StreamReader's."""
    results: dict[str, Any] = {}
    done = threading.Event()

    async def handler(stream: AsyncioStream) -> None:
        try:
            results["line"] = await stream.readline()
            results["until"] = await stream.readuntil(b";")
            results["exactly"] = await stream.readexactly(3)
            results["rest"] = await stream.read()
            results["eof"] = stream.at_eof()
            try:
                await stream.readexactly(1)
            except asyncio.IncompleteReadError as exc:
                results["incomplete"] = exc.partial
        finally:
            done.set()

    with Server(handler, manager="asyncio") as server, connect(server) as client:
        client.sendall(b"line one\nab;xyzthe rest")
        client.shutdown(socket.SHUT_WR)
        assert done.wait(WAIT)
    assert results == {
        "line": b"line one\n",
        "until": b"ab;",
        "exactly": b"xyz",
        "rest": b"the rest",
        "eof": True,
        "incomplete": b"",
    }


def test_a_handler_written_for_trio_runs_unchanged() -> None:
    """receive_some, send_all, send_eof and aclose as on trio's SocketStream; current_connection works."""
    peers: list[Any] = []

    async def trio_style(stream: Any) -> None:
        peers.append(current_connection().peer)
        data = await stream.receive_some(1024)
        await stream.send_all(data.upper())
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await stream.aclose()

    with Server(trio_style, manager="asyncio") as server, connect(server) as client:
        client.sendall(b"shout")
        assert recv_exactly(client, 5) == b"SHOUT"
        assert client.recv(10) == b"", "send_eof must half-close"
        client.shutdown(socket.SHUT_WR)
    assert peers and peers[0][0] == "127.0.0.1"


def test_writes_before_the_first_read_go_out_first() -> None:
    """A greeting written before any await is sent, in order, ahead of later writes."""

    async def greeter(stream: AsyncioStream, greeting: bytes) -> None:
        stream.write(greeting)
        stream.write(b"-")
        await stream.drain()
        await echo(stream)

    with Server(greeter, args=(b"hi",), manager="asyncio") as server, connect(server) as client:
        assert recv_exactly(client, 3) == b"hi-"
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bytes_written_around_the_transports_making_keep_their_order(loop: str) -> None:
    """Written, drained (which makes the transport), written again: the client reads them in order.

    On asyncio's own loops the stream makes its transport without waiting a turn of
    the loop for ``connection_made``; what was written before must still go out
    ahead of what is written right after, before the loop's turn comes.
    """

    async def two_parts(stream: AsyncioStream) -> None:
        stream.write(b"first;")
        await stream.drain()
        stream.write(b"second")
        await stream.aclose()

    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = Server(two_parts, manager="asyncio", manager_options={"loop": loop})
    with server, connect(server) as client:
        assert recv_exactly(client, 12) == b"first;second"
        assert client.recv(1) == b""


def test_a_reply_written_without_any_await_is_sent() -> None:
    """write() then return, with no await at all: the bytes still reach the client."""

    async def bye(stream: AsyncioStream) -> None:
        stream.write(b"bye")
        stream.close()

    with Server(bye, manager="asyncio") as server, connect(server) as client:
        assert recv_exactly(client, 3) == b"bye"
        assert client.recv(1) == b""


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_nodelay_false_is_kept(loop_name: str) -> None:
    """The transport turns TCP_NODELAY on; nodelay=False must still leave it off.

    The stream knows the value from the socket (``AsyncioSocket.nodelay``, set by
    ``setsockopt`` or inherited from the listener) rather than asking the kernel per
    connection: the server's nodelay=False, and a handler's own ``setsockopt`` before
    its first read, both survive the transport's making, on either loop.
    """
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    seen: list[int] = []

    async def handler(stream: AsyncioStream) -> None:
        await stream.read(1)
        seen.append(int(stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    async def turns_it_off(stream: AsyncioStream) -> None:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        await handler(stream)

    options = {"loop": loop_name}
    for serve, nodelay in ((handler, False), (handler, True), (turns_it_off, True)):
        server = Server(serve, manager="asyncio", manager_options=options, nodelay=nodelay)
        with server, connect(server) as client:
            client.sendall(b"x")
            client.recv(1)  # b"" once the handler returned
    assert seen == [0, 1, 0]


def test_an_accepted_socket_keeps_its_family_type_and_nodelay() -> None:
    """``AsyncioSocket`` answers ``family`` and ``type`` as enums, as a socket does.

    It keeps them in slots, read once, where ``socket.socket`` builds an enum member
    per read; and ``nodelay`` follows ``setsockopt``.
    """
    from weft_asyncio import AsyncioSocket

    with AsyncioSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert isinstance(sock.family, socket.AddressFamily)
        assert isinstance(sock.type, socket.SocketKind)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert sock.nodelay is True
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        assert sock.nodelay is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    left, right = socket.socketpair()
    with right, AsyncioSocket(fileno=left.detach()) as sock:  # family and type from the kernel
        assert (sock.family, sock.type) == (socket.AF_UNIX, socket.SOCK_STREAM)


def test_data_received_feeds_the_stream_as_buffer_updated_does() -> None:
    """A loop that calls ``data_received`` (no buffered protocols) is read in order.

    Larger than the stream's receive buffer, too: reading pauses past its limit and
    resumes as the handler reads.
    """
    from weft_asyncio import AsyncioSocket

    big = bytes(range(256)) * 800  # 204,800 bytes: three times the scratch buffer

    async def main() -> bytes:
        left, right = socket.socketpair()
        with right:
            stream = AsyncioStream(AsyncioSocket(fileno=left.detach()))
            await stream._connect()  # the transport is made (drain no longer makes it)
            stream.data_received(b"head:")
            stream.data_received(big)
            got = await stream.readexactly(5 + len(big))
            await stream.aclose()
            return got

    assert asyncio.run(main()) == b"head:" + big


def test_idle_timeout_ends_a_silent_connection() -> None:
    """With idle_timeout, a read waiting that long raises TimeoutError and the connection closes."""
    with Server(echo, manager="asyncio", idle_timeout=0.2) as server:
        with connect(server) as client:
            client.sendall(b"a")
            assert recv_exactly(client, 1) == b"a"
            assert client.recv(1) == b"", "the server must close the idle connection"
        assert server.stats()["idle_timeouts"] == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("how", ["stop", "close_connection"])
def test_interrupting_a_blocked_send_logs_nothing(
    caplog: pytest.LogCaptureFixture, loop: str, how: str
) -> None:
    """A handler blocked in send_all() to a client that stopped reading, interrupted
    by the stop or close_connection: its drain's future was later failed by the lost
    connection with nobody left to read it, and asyncio logged 'Future exception was
    never retrieved' at ERROR, with a traceback, once per connection (long-poll
    probe F2)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    streams: list[AsyncioStream] = []
    big = b"x" * 65536

    async def flood(stream: AsyncioStream) -> None:
        streams.append(stream)
        while True:
            await stream.send_all(big)

    server = Server(flood, manager="asyncio", manager_options={"loop": loop})
    server.run()
    clients = []
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(3):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", server.port))  # never read
                clients.append(client)
            deadline = time.monotonic() + WAIT
            # Each handler waits in drain(): its transport's buffer is full (paused).
            while not (len(streams) == 3 and all(s._paused for s in streams)):
                assert time.monotonic() < deadline, "the handlers never blocked in send_all"
                time.sleep(0.01)
            if how == "stop":
                server.stop(0.2)
            else:
                for info in server.connections():
                    server.close_connection(info.task_id, 0.2)
                server.stop(1)
            streams.clear()
            gc.collect()  # asyncio says "never retrieved" as the future is freed
    finally:
        for client in clients:
            client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_call_left_in_the_executor_does_not_hold_the_stop(
    caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """A handler awaiting ``asyncio.to_thread`` when the stop cancels it: the call goes
    on in its thread. Seen (the asyncio-app outside check): the loop's end waited for
    asyncio's default executor with no bound, so the runtime's close timed out (2 s,
    "a call given to submit()?", which the app never made) and the stop ran that much
    past its own. Now the executor is let go at once, the close says what still runs
    in it, and the stop keeps its time."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    release = threading.Event()

    async def handler(stream: AsyncioStream) -> None:
        await stream.send_all(b"+")
        await asyncio.to_thread(release.wait, 30)

    server = Server(handler, manager="asyncio", manager_options={"loop": loop})
    server.run()
    try:
        with caplog.at_level(logging.WARNING), connect(server) as client:
            assert recv_exactly(client, 1) == b"+"
            began = time.monotonic()
            assert server.stop(0.2) is False  # interrupted: it was awaiting the call
            took = time.monotonic() - began
    finally:
        release.set()
    assert took < 0.2 + 1.7, f"stop(0.2) took {took:.2f}s"
    assert "1 call(s) still run in the asyncio loop's executor" in caplog.text
    assert "did not close within" not in caplog.text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_reads_nothing_is_cut_with_a_reset(loop: str) -> None:
    """The handler writes more than the kernels hold and returns; the client reads
    nothing. The close sends for as long as the client takes bytes, then cuts it.
    Seen (the asyncio-app outside check): the cut reached the client as the bytes
    its kernel held and an ordinary end (FIN), so it could not tell the reply was cut
    short. Now it is a reset."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")

    async def handler(stream: AsyncioStream) -> None:
        stream.write(b"x" * 20_000_000)

    server = Server(handler, manager="asyncio", manager_options={"loop": loop})
    server.run()
    try:
        with connect(server) as client:
            deadline = time.monotonic() + 15
            while server.stats()["accepted"] == 0 or server.stats()["active"]:
                assert time.monotonic() < deadline, "the connection was never cut"
                time.sleep(0.05)
            client.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                while client.recv(1 << 20):
                    pass
    finally:
        server.stop(1)


def _logged(handler: Any) -> Any:
    """A plain decorator, as a logging or metrics one is written: not itself async."""
    import functools

    @functools.wraps(handler)
    def wrapper(*args: Any) -> Any:
        return handler(*args)

    return wrapper


@_logged
async def _decorated_echo(stream: AsyncioStream) -> None:
    stream.write(await stream.readline())
    await stream.drain()


async def _async_generator(stream: AsyncioStream) -> Any:
    yield b""


def test_an_async_def_behind_a_plain_decorator_is_served() -> None:
    """Seen (the asyncio-app outside check): refused as "a plain function ... write it
    as `async def _decorated_echo(stream)`", which it was. asyncio.start_server takes
    it; so does the manager now (the decorator marked with functools.wraps)."""
    server = Server(_decorated_echo, manager="asyncio")
    server.run()
    try:
        with connect(server) as client:
            client.sendall(b"hi\n")
            assert recv_exactly(client, 3) == b"hi\n"
    finally:
        server.stop(1)


def test_handlers_no_manager_runs_are_refused_saying_what_they_are() -> None:
    """An async generator function was called "a plain function"; a lambda was told to
    be written as `async def <lambda>(stream)`."""
    with pytest.raises(weft_core.HandlerKindError, match="is an async generator function"):
        Server(_async_generator, manager="asyncio")
    with pytest.raises(weft_core.HandlerKindError, match=r"a lambda cannot be one"):
        Server(lambda stream: _decorated_echo(stream), manager="asyncio")


# -- the edges a reviewer found ------------------------------------------------------------


def test_a_task_raising_system_exit_ends_only_itself(manager: AsyncioManager) -> None:
    """asyncio raises a task's SystemExit out of run_forever(): the loop thread ended,
    and every other task was destroyed pending, its id held for good."""
    started = threading.Event()

    async def sleeper() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def exiter() -> None:
        raise SystemExit(3)

    sleeper_id = manager.add_task(sleeper)
    assert started.wait(WAIT)
    exiter_id = manager.add_task(exiter)
    deadline = time.monotonic() + WAIT
    while exiter_id in manager.all_tasks() and time.monotonic() < deadline:
        time.sleep(0.01)  # polls the table, bounded: no event says the task has gone
    assert exiter_id not in manager.all_tasks()
    began = time.monotonic()
    assert manager.stop_task(sleeper_id, 0.1) is False  # cancelled: the loop still runs
    assert time.monotonic() - began < 1.0 + WAIT / 5
    assert manager.all_tasks() == []


def test_an_exception_handler_calling_sys_exit_leaves_the_others_served() -> None:
    """The engine caught only Exception around exception_handler: on asyncio a
    sys.exit() there ended the loop, every other client and new ones unserved."""

    async def handler(stream: AsyncioStream) -> None:
        data = await stream.read(100)
        if data == b"fail\n":
            raise ValueError("asked to")
        stream.write(data)
        await stream.drain()
        while data := await stream.read(100):
            stream.write(data)
            await stream.drain()

    def exits(server: Server, conn: object, exc: BaseException) -> None:
        sys.exit(2)

    server = Server(handler, manager="asyncio", exception_handler=exits)
    server.run()
    try:
        with connect(server) as bystander:
            bystander.sendall(b"hi")
            assert recv_exactly(bystander, 2) == b"hi"
            with connect(server) as failing:
                failing.sendall(b"fail\n")
                assert failing.recv(10) == b""
            bystander.sendall(b"again")
            assert recv_exactly(bystander, 5) == b"again"
            with connect(server) as newcomer:
                newcomer.sendall(b"x")
                assert recv_exactly(newcomer, 1) == b"x"
        assert server.stats()["handler_errors"] == 1
    finally:
        assert server.stop(timeout=WAIT)


def test_slots_pass_on_a_wake_up_whose_waiter_was_cancelled() -> None:
    """release() chose a waiter that was then cancelled: the free slot stayed
    unclaimed while the next waiter slept to its deadline (for ever, with None)."""
    from weft_asyncio._runtime import AsyncioSlots

    async def main() -> tuple[bool, float]:
        slots = AsyncioSlots(1)
        assert slots.acquire_nowait()
        first = asyncio.create_task(slots.acquire_within(None))
        second = asyncio.create_task(slots.acquire_within(None))
        await asyncio.sleep(0)  # both wait now
        slots.release()  # chooses the first ...
        first.cancel()  # ... which leaves before it runs
        began = asyncio.get_running_loop().time()
        got = await asyncio.wait_for(second, WAIT)
        return got, asyncio.get_running_loop().time() - began

    got, took = asyncio.run(main())
    assert got is True
    assert took < WAIT / 5


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_listener_closed_from_another_thread_keeps_its_number_until_its_loop_lets_go(
    loop_name: str,
) -> None:
    """A stop's fallback closes the listener from its own thread while the loop is
    blocked: the loop still watches the descriptor, so its number must not go to the
    next socket opened (the stale watch would take that one's events). No client is
    accepted from the close on; the number is let go on the loop."""
    from weft_asyncio._runtime import AsyncioListener

    if loop_name == "uvloop":
        loop: asyncio.AbstractEventLoop = pytest.importorskip("uvloop").new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    plain = socket.create_server(("127.0.0.1", 0))
    port = plain.getsockname()[1]
    listener = AsyncioListener(plain)
    number = listener.fileno()
    blocked, unblock = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        unblock.wait(WAIT)

    try:
        accepting = asyncio.run_coroutine_threadsafe(listener.accept(), loop)
        watching = asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop)
        watching.result(WAIT)  # the accept waits, its reader registered, by now
        loop.call_soon_threadsafe(block)
        assert blocked.wait(WAIT)
        listener.close()  # this thread, the loop blocked
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        os.fstat(number)  # still held: by a stand-in, not by the next socket opened
        with socket.socket() as newcomer:
            assert newcomer.fileno() != number
        unblock.set()
        loop.call_soon_threadsafe(accepting.cancel)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                os.fstat(number)
            except OSError:
                break
            time.sleep(0.01)  # polls, bounded: the loop lets go at its next turns
        else:
            pytest.fail("the stand-in was never closed on the loop")
    finally:
        unblock.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def _held_with_close_queued(
    manager: AsyncioManager,
) -> tuple[asyncio.AbstractEventLoop, threading.Event, threading.Thread]:
    """Hold the manager's loop in one callback while close() queues its stop.

    Returns the loop, the gate that lets it go, and close()'s thread. What the
    test queues next comes after the stop in the loop's queue: the loop is known
    to be inside the holding callback, so the first thing queued is close()'s.
    """
    manager.add_task(lambda: asyncio.sleep(0))  # starts the loop thread
    loop = manager.loop
    assert loop is not None
    for _ in range(3):  # the tasks' first steps run: the loop's queue is empty after
        assert manager.runtime.run_in_loop(lambda: None, WAIT)
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait(WAIT)

    loop.call_soon_threadsafe(hold)
    assert holding.wait(WAIT)
    closer = threading.Thread(target=manager.runtime.close)
    closer.start()
    deadline = time.monotonic() + WAIT
    while not loop._ready and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)  # polls the queue, bounded: no event says close() queued
    assert loop._ready, "close() queued nothing"  # type: ignore[attr-defined]
    return loop, gate, closer


def _boom() -> None:
    raise SystemExit(3)


def test_a_system_exit_in_the_turn_that_close_stops_the_loop_loses_no_stop() -> None:
    """The loop runs on after a SystemExit: one in the very turn close()'s stop ran
    undid that stop (run_forever resets it), and close() waited CLOSE_WAIT, blamed
    a task, and left the loop thread running for good."""
    manager = AsyncioManager()
    loop, gate, closer = _held_with_close_queued(manager)
    loop.call_soon_threadsafe(_boom)
    began = time.monotonic()
    gate.set()
    closer.join(WAIT + 6)
    assert time.monotonic() - began < WAIT / 2
    assert not loop.is_running()


@pytest.mark.parametrize("pending", [False, True], ids=["nothing_left", "a_task_left"])
def test_a_system_exit_in_the_turn_after_close_stops_still_ends_everything(
    pending: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A SystemExit queued in the turn of close()'s stop came out of the close's own
    run_until_complete: the thread took it for a crash (CRITICAL), left what was
    left pending, never awaited shutdown_asyncgens() (an unraisable warning when
    collected, which failed a CI run) and closed the loop under them."""
    manager = AsyncioManager()
    closed = threading.Event()
    kept: list[AsyncIterator[int]] = []  # so only shutdown_asyncgens() closes it

    async def generator() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(3600)
            yield 2
        finally:
            closed.set()

    async def holds_a_generator() -> None:
        stream = generator()
        kept.append(stream)
        await stream.__anext__()
        if pending:
            await stream.__anext__()  # cancelled here at close: its finally runs then

    manager.add_task(holds_a_generator)
    loop, gate, closer = _held_with_close_queued(manager)
    # A callback of the stop's turn that queues the SystemExit: it runs in the next
    # turn, the first of close()'s own.
    loop.call_soon_threadsafe(loop.call_soon, _boom)
    with caplog.at_level(logging.ERROR, logger="weft.asyncio"):
        gate.set()
        closer.join(WAIT + 6)
        assert not closer.is_alive()  # close() joined the loop thread, which closed it
        gc.collect()  # an unstarted shutdown_asyncgens() is reported when collected
    assert loop.is_closed()
    assert closed.is_set(), "the async generator was not closed"
    levels = [r.levelno for r in caplog.records if r.name == "weft.asyncio"]
    assert logging.CRITICAL not in levels, caplog.text
    [said] = [r.getMessage() for r in caplog.records if "SystemExit" in r.getMessage()]
    assert "its close goes on" in said


def test_uvloop_asked_for_on_an_applications_plain_asyncio_loop_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The application's running loop serves, whatever ``loop`` says: asked for uvloop
    on a plain asyncio loop, the user was not told they did not get it."""
    pytest.importorskip("uvloop")

    async def app() -> None:
        server = Server(echo, manager="asyncio", manager_options={"loop": "uvloop"})
        server.run()
        server.stop_accepting()
        assert await asyncio.to_thread(server.wait, WAIT)

    with caplog.at_level(logging.WARNING, logger="weft.asyncio"):
        asyncio.run(app())
    [warning] = [r.getMessage() for r in caplog.records if "uvloop" in r.getMessage()]
    assert "the application's running loop" in warning
    assert "uvloop.run(main())" in warning
