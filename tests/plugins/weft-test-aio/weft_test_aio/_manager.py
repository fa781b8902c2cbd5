"""AioManager and AioRuntime: weft on an asyncio loop, from the public contract only.

The loop runs in a daemon thread the manager starts on first use and stops in
``runtime.close()``; every task is an ``asyncio.Task`` on it, and a stop that runs
out of time cancels the task. The runtime does its I/O with the loop's ``sock_*``
functions; TLS runs over a memory BIO, so every byte still goes through them.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from weft_core import (
    AsyncRuntime,
    HandlerKind,
    TaskState,
    TaskTable,
    run_async_task,
)

__all__ = ["AioManager", "AioRuntime"]

T = TypeVar("T")

#: How long stop_task waits for a cancelled task to end.
CANCEL_GRACE = 2.0
#: What one read asks the kernel for.
CHUNK = 65536


class _Record:
    """A task as the manager holds it: its state and, once spawned, its asyncio.Task."""

    __slots__ = ("state", "task")

    def __init__(self, state: TaskState) -> None:
        self.state = state
        self.task: asyncio.Task[None] | None = None


class AioManager:
    """A task per thunk on one asyncio loop, run in a daemon thread of its own."""

    def __init__(self, *, limit: int | None = None) -> None:
        self._table: TaskTable[_Record] = TaskTable(limit, "aio manager")
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.runtime = AioRuntime(self)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    # -- the loop thread ---------------------------------------------------------------

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started if need be. Holds ``_lock``."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()
            thread = threading.Thread(
                target=self._run_loop, args=(loop, started), name="weft-aio loop", daemon=True
            )
            thread.start()
            started.wait()
            self._loop, self._thread = loop, thread
        return self._loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()
        # Stopped by close(): cancel what is left and let it end, then release the loop.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def close_loop(self) -> None:
        """Stop the loop thread, cancelling tasks still in it; the next add_task restarts it."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is None or thread is None:
                return
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join()

    def in_loop(self) -> bool:
        """True in the loop's own thread."""
        return self._thread is threading.current_thread()

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the loop's thread (here if no loop runs); False after ``timeout``."""
        if self.in_loop():
            fn()
            return True
        ran = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                ran.set()

        with self._lock:
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(call)
        if loop is None:
            fn()
            return True
        return ran.wait(timeout)

    # -- the protocol ------------------------------------------------------------------

    def add_task(self, thunk: Callable[[], Awaitable[object]]) -> Hashable:
        """Run ``thunk()`` as an asyncio task named after it, in the caller's context."""
        task_id = self._table.reserve()
        record = _Record(TaskState(task_id, getattr(thunk, "__name__", "") or f"aio {task_id}"))
        self._table.put(task_id, record)
        context = contextvars.copy_context()
        with self._lock:
            loop = self._start_loop()
            if self.in_loop():
                self._spawn(record, thunk, context)
            else:
                loop.call_soon_threadsafe(self._spawn, record, thunk, context)
        return task_id

    def _spawn(
        self,
        record: _Record,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context,
    ) -> None:
        state = record.state
        if state.interrupted:  # stopped before it started: it never runs
            self._table.pop(state.id)
            state.set_done()
            return
        loop = asyncio.get_running_loop()
        record.task = loop.create_task(self._run(state, thunk), name=state.name, context=context)

    async def _run(self, state: TaskState, thunk: Callable[[], Awaitable[object]]) -> None:
        try:
            await run_async_task(state, thunk)  # sets state.done as it ends
        except asyncio.CancelledError:
            pass  # stop_task cancelled it
        finally:
            self._table.pop(state.id)

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (it goes on running); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Flag the task, wait up to ``timeout``, then cancel it; return once it ended."""
        record = self._table.get(task_id)
        if record is None:
            return True
        state = record.state
        state.request_shutdown()
        if self.in_loop():
            # A task of this loop cannot be waited for from inside it.
            if timeout is not None and timeout <= 0:
                state.interrupt()
                self._cancel(record)
            return state.done.is_set()
        if state.done.wait(timeout):
            self._table.pop(task_id)  # gone from all_tasks once stop_task returns
            return True
        state.interrupt()
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._cancel, record)
        if state.done.wait(CANCEL_GRACE):
            self._table.pop(task_id)
        # Else it runs on, past its cancel: listed until it ends (_run forgets it then).
        return False

    @staticmethod
    def _cancel(record: _Record) -> None:
        if record.task is not None:
            record.task.cancel()  # else _spawn sees the task interrupted and never runs it

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks held now."""
        return self._table.ids()


class AioSlots:
    """Connection slots: taken in the loop, released from the loop or any thread."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free; True if taken."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            return False

    async def acquire_within(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a slot; True if taken."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._free > 0:
                    self._free -= 1
                    return True
                if deadline is not None and loop.time() >= deadline:
                    return False
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def release(self) -> None:
        """Free one slot and wake one waiter; safe from any thread."""
        with self._lock:
            self._free += 1
            waiter = self._waiters.popleft() if self._waiters else None
        if waiter is not None:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AioSocket:
    """An accepted socket: what the server calls on it, with an awaitable ``recv``."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def family(self) -> int:
        """The address family."""
        return self.sock.family

    async def recv(self, n: int) -> bytes:
        """Receive up to ``n`` bytes, waiting in the loop."""
        return await asyncio.get_running_loop().sock_recv(self.sock, n)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """As the socket's."""
        self.sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        """As the socket's."""
        return self.sock.getsockopt(level, option)

    def getsockname(self) -> Any:
        """As the socket's."""
        return self.sock.getsockname()

    def fileno(self) -> int:
        """As the socket's."""
        return self.sock.fileno()

    def shutdown(self, how: int) -> None:
        """As the socket's; the stop calls it from its own thread, which wakes the loop's reader."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class AioListener(AioSocket):
    """The listening socket, with an awaitable ``accept``."""

    __slots__ = ()

    async def accept(self) -> tuple[AioSocket, Any]:
        """Wait in the loop for a connection; returns it and the peer's address.

        Waits for the listener to be readable, then accepts in this task: cancelled
        (a pause, a stop), it can only be cancelled while waiting, never holding a
        connection. ``loop.sock_accept`` accepts in a loop callback, and one that runs
        just after the cancellation drops the connection it accepted.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                pass
            else:
                conn.setblocking(False)
                return AioSocket(conn), address
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.sock.fileno(), _wake, readable)
            try:
                await readable
            finally:
                loop.remove_reader(self.sock.fileno())


class AioStream:
    """What a handler receives: ``await read(n)``, ``await write(data)``, and ``socket``."""

    def __init__(self, sock: AioSocket, idle_timeout: float | None) -> None:
        self.socket = sock.sock
        self.idle_timeout = idle_timeout

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes (b"" at end of input); TimeoutError after ``idle_timeout``."""
        loop = asyncio.get_running_loop()
        if self.idle_timeout is None:
            return await loop.sock_recv(self.socket, n)
        try:
            async with asyncio.timeout(self.idle_timeout):
                return await loop.sock_recv(self.socket, n)
        except TimeoutError:
            raise TimeoutError(
                f"no data from the peer for {self.idle_timeout}s (idle_timeout)"
            ) from None

    async def write(self, data: bytes) -> None:
        """Send all of ``data``."""
        await asyncio.get_running_loop().sock_sendall(self.socket, data)

    def close(self) -> None:
        """Close the socket."""
        self.socket.close()


class AioTLSStream:
    """TLS over an AioStream through memory BIOs: the same read/write, plus TLS details."""

    def __init__(self, stream: AioStream, context: ssl.SSLContext) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self._stream.write(data)

    async def _fill(self) -> None:
        data = await self._stream.read()
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """Handshake as the server."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if self._incoming.eof:
                    raise ConnectionResetError(
                        "the peer closed during the TLS handshake"
                    ) from None
                await self._fill()
        await self._flush()

    async def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` decrypted bytes (b"" at end of input)."""
        while True:
            try:
                return self._tls.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if self._incoming.eof:
                    return b""
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        """Encrypt and send all of ``data``."""
        self._tls.write(data)
        await self._flush()

    def version(self) -> str | None:
        """The TLS version negotiated."""
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The cipher negotiated."""
        return self._tls.cipher()

    def getpeercert(self) -> Any:
        """The client's certificate, if it sent one."""
        return self._tls.getpeercert()

    def close(self) -> None:
        """Close the socket."""
        self._stream.close()


class AioRuntime(AsyncRuntime):
    """asyncio's ``sock_*`` functions in one AioManager's loop."""

    kind: HandlerKind = "async"
    conn_is_stream = True
    #: Handshake failures are ssl.SSLError or ConnectionResetError: OSErrors already.
    tls_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, manager: AioManager) -> None:
        self._manager = manager

    def adopt_listener(self, sock: socket.socket) -> AioListener:
        """The listening socket, non-blocking, with an awaitable accept()."""
        sock.setblocking(False)
        return AioListener(sock)

    def wake_listener(self, listener: Any) -> None:
        """Nothing to do: stop_task cancels the acceptor."""

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the loop's thread and wait for it, up to ``timeout``."""
        return self._manager.run_in_loop(fn, timeout)

    def slots(self, n: int) -> AioSlots:
        """``n`` connection slots."""
        return AioSlots(n)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)

    def wrap_connection(self, sock: AioSocket, idle_timeout: float | None = None) -> AioStream:
        """The stream a handler receives."""
        return AioStream(sock, idle_timeout)

    def wrap_tls(self, stream: AioStream, context: ssl.SSLContext) -> AioTLSStream:
        """A server-side TLS stream over ``stream``, not yet handshaken."""
        return AioTLSStream(stream, context)

    async def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``, raising TimeoutError after ``seconds``."""
        async with asyncio.timeout(seconds):
            return await fn()

    async def aclose(self, conn: AioStream | AioTLSStream) -> None:
        """Close the stream."""
        conn.close()

    def close(self) -> None:
        """Stop the loop thread (cancelling what is left); the next add_task restarts it."""
        self._manager.close_loop()
