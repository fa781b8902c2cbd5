"""Handler bodies for the fault tests, written once and run on every manager.

Each body is a generator of :mod:`weft_core.testing` operations (Recv, Send, Sleep),
as in the conformance suite; :func:`handler` turns one into a plain or an
``async def`` handler for a given manager. ``weft serve`` finds the same handlers by
name: ``_fault_handlers:slow_reply_trio`` is :func:`slow_reply` for trio (the module
``__getattr__`` below builds it on first use).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from weft_core import create_manager
from weft_core.testing import Body, Recv, Send, Sleep, SyncAdapter, default_adapter
from weft_core.testing._bodies import echo, stubborn

#: slow_reply answers in this many chunks, this far apart: a 2-second exchange.
CHUNKS = 20
PAUSE = 0.1


@functools.cache
def adapter_for(manager: str) -> SyncAdapter:
    """The adapter that drives bodies in ``manager``'s runtime (as the conformance suite does)."""
    probe = create_manager(manager)
    try:
        return type(default_adapter(probe.runtime))(probe.runtime)
    finally:
        probe.runtime.close()


def handler(body: Callable[..., Body], manager: str) -> Callable[..., Any]:
    """``body`` as a handler of the kind ``manager`` runs."""
    return adapter_for(manager).handler(body)


def __getattr__(name: str) -> Callable[..., Any]:
    """``<body>_<manager>``: the body as that manager's handler, for ``weft serve``."""
    body_name, _, manager = name.rpartition("_")
    body = BODIES.get(body_name)
    if body is None or not manager:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return handler(body, manager)


# -- bodies -----------------------------------------------------------------------------


def read_line() -> Body:
    """Receive up to and including a newline; what came, or b"" at end of input."""
    request = b""
    while not request.endswith(b"\n"):
        data = yield Recv()
        if not data:
            return b""
        request += data
    return request


def reply_chunk(request: bytes, i: int) -> bytes:
    """The ``i``-th chunk of slow_reply's answer to ``request``."""
    return b"[%s %02d]" % (request.strip(), i) * 40


def expected_reply(request: bytes) -> bytes:
    """slow_reply's whole answer to ``request``, byte for byte."""
    return b"".join(reply_chunk(request, i) for i in range(CHUNKS))


def slow_reply() -> Body:
    """Read one line, then answer it in CHUNKS chunks PAUSE apart (about 2 s)."""
    request = yield from read_line()
    if not request:
        return
    for i in range(CHUNKS):
        yield Send(reply_chunk(request, i))
        yield Sleep(PAUSE)


def big_reply(size: int = 4 << 20) -> Body:
    """Read a line, then write ``size`` bytes in 64 KiB pieces (a reply a peer can cut short)."""
    request = yield from read_line()
    if not request:
        return
    piece = b"x" * 65536
    for _ in range(size // len(piece)):
        yield Send(piece)


class Gauge:
    """Handlers running at once, and the most seen (thread-safe: tasks of any runtime)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def counted_echo(gauge: Gauge) -> Body:
    """echo(b"+"), counted in ``gauge`` while it runs."""
    gauge.enter()
    try:
        yield from echo(b"+")
    finally:
        gauge.leave()


class Misbehaviour:
    """Cycles through three handler misbehaviours, one per connection.

    - ``"raise"``: sends b"r", then raises :class:`Boom`;
    - ``"open"``: sends b"o" and returns without ever closing the connection;
    - ``"return"``: returns at once, having done nothing.
    """

    KINDS = ("raise", "open", "return")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0

    def next_kind(self) -> str:
        with self.lock:
            kind = self.KINDS[self.n % len(self.KINDS)]
            self.n += 1
        return kind


class Boom(Exception):
    """The error a misbehaving handler raises on purpose."""


def misbehave(plan: Misbehaviour) -> Body:
    """One of plan's misbehaviours (see :class:`Misbehaviour`)."""
    kind = plan.next_kind()
    if kind == "raise":
        yield Send(b"r")
        raise Boom("fault test: a handler that raises")
    if kind == "open":
        yield Send(b"o")


BODIES: dict[str, Callable[..., Body]] = {
    "echo": echo,
    "slow_reply": slow_reply,
    "stubborn": stubborn,
    "big_reply": big_reply,
}
