"""Write a task or handler body once, run it in any runtime.

A body is a generator that yields operations (:class:`Recv`, :class:`Send`,
:class:`Sleep`) and receives their results; an adapter drives it either as a plain
function (sync runtimes) or as a coroutine (async ones). This is how the
conformance suite holds one copy of every behaviour for every manager.

A manager author whose connection object is neither socket-like (``recv`` /
``sendall``) nor a trio-style stream (``receive_some`` / ``send_all``) supplies an
adapter of their own: subclass :class:`SyncAdapter` or :class:`AsyncAdapter` and
override ``recv`` and ``send``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from .._protocol import Runtime

__all__ = [
    "Adapter",
    "AsyncAdapter",
    "Body",
    "Recv",
    "Send",
    "Sleep",
    "SyncAdapter",
    "default_adapter",
]


@dataclass(frozen=True)
class Recv:
    """Receive up to ``n`` bytes from the connection (b"" at end of input)."""

    n: int = 65536


@dataclass(frozen=True)
class Send:
    """Send all of ``data`` on the connection."""

    data: bytes


@dataclass(frozen=True)
class Sleep:
    """Pause the task in its runtime (a checkpoint where the runtime can interrupt it)."""

    seconds: float


Op = Recv | Send | Sleep
Body = Generator[Op, Any, Any]


class SyncAdapter:
    """Drives bodies in a sync runtime; connections are socket-like."""

    kind = "sync"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def recv(self, conn: Any, n: int) -> bytes:
        """Receive up to ``n`` bytes."""
        data: bytes = conn.recv(n)
        return data

    def send(self, conn: Any, data: bytes) -> None:
        """Send all of ``data``."""
        conn.sendall(data)

    def sleep(self, seconds: float) -> None:
        """Sleep in the runtime."""
        self.runtime.sleep(seconds)

    def _do(self, conn: Any, op: Op) -> Any:
        if isinstance(op, Recv):
            return self.recv(conn, op.n)
        if isinstance(op, Send):
            return self.send(conn, op.data)
        return self.sleep(op.seconds)

    def drive(self, body: Body, conn: Any = None) -> Any:
        """Run ``body`` to the end, feeding each operation's result (or exception) back."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = body.throw(error) if error is not None else body.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = self._do(conn, op)
            except Exception as exc:
                error = exc
            except BaseException:
                _end(body)
                raise

    def handler(self, make_body: Callable[..., Body]) -> Callable[..., Any]:
        """A handler ``f(conn, *args)`` running ``make_body(*args)`` on ``conn``."""

        def handler(conn: Any, *args: Any) -> Any:
            return self.drive(make_body(*args), conn)

        handler.__name__ = handler.__qualname__ = getattr(make_body, "__name__", "handler")
        return handler

    def task(self, make_body: Callable[[], Body]) -> Callable[[], Any]:
        """A thunk for ``add_task`` running ``make_body()``."""

        def thunk() -> Any:
            return self.drive(make_body())

        thunk.__name__ = getattr(make_body, "__name__", "task")
        return thunk


class AsyncAdapter(SyncAdapter):
    """Drives bodies in an async runtime; connections are trio-style streams."""

    kind = "async"

    async def recv(self, conn: Any, n: int) -> bytes:  # type: ignore[override]
        """Receive up to ``n`` bytes."""
        data: bytes = await conn.receive_some(n)
        return data

    async def send(self, conn: Any, data: bytes) -> None:  # type: ignore[override]
        """Send all of ``data``."""
        await conn.send_all(data)

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        """Sleep in the runtime."""
        await self.runtime.sleep(seconds)  # type: ignore[misc]

    async def adrive(self, body: Body, conn: Any = None) -> Any:
        """Run ``body`` to the end, awaiting each operation."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = body.throw(error) if error is not None else body.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = await self._do(conn, op)
            except Exception as exc:
                error = exc
            except BaseException:
                _end(body)
                raise

    def handler(self, make_body: Callable[..., Body]) -> Callable[..., Any]:
        """An ``async def`` handler running ``make_body(*args)`` on ``conn``."""

        async def handler(conn: Any, *args: Any) -> Any:
            return await self.adrive(make_body(*args), conn)

        handler.__name__ = handler.__qualname__ = getattr(make_body, "__name__", "handler")
        return handler

    def task(self, make_body: Callable[[], Body]) -> Callable[[], Any]:
        """An async thunk for ``add_task`` running ``make_body()``."""

        async def thunk() -> Any:
            return await self.adrive(make_body())

        thunk.__name__ = getattr(make_body, "__name__", "task")
        return thunk


Adapter = SyncAdapter


def _end(body: Body) -> None:
    """End ``body`` where a kill or cancel (a BaseException) goes through its driver.

    The body is not fed it (it could not catch it), but its ``finally`` blocks run
    now, as the runtime unwinds the task, before the manager counts the task ended:
    left to the generator's collection, they ran once the exception that referenced
    the driver's frame was freed, after the manager's own ``finally``, and a sound
    manager's ``stop_task`` was seen returning before the task's cleanup.
    """
    with contextlib.suppress(Exception):
        body.close()


def default_adapter(runtime: Runtime) -> SyncAdapter:
    """Socket-like connections for sync runtimes, trio-style streams for async ones."""
    return AsyncAdapter(runtime) if runtime.kind == "async" else SyncAdapter(runtime)
