"""Handler bodies shared by the suites (and weft's own fault tests).

Written once as generators of :class:`~weft_core.testing.Recv`,
:class:`~weft_core.testing.Send` and :class:`~weft_core.testing.Sleep`; an adapter
turns each into a handler of the manager's kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._tasks import shutdown_requested
from ._adapters import Body, Recv, Send, Sleep
from ._support import WAIT

#: Task bodies poll their gate this often (in the runtime, so they stay interruptible).
POLL = 0.005
#: The longest a gated task waits for its gate: a test that failed before opening it
#: leaves no task (and no thread of a manager's) running on for the rest of the run.
GATE_LIMIT = 3 * WAIT


def echo(greeting: bytes = b"") -> Body:
    """Send ``greeting``, then echo until end of input (or an idle timeout's error)."""
    if greeting:
        yield Send(greeting)
    while True:
        data = yield Recv()
        if not data:
            return
        yield Send(data)


def stubborn() -> Body:
    """Ignore the shutdown flag and end of input: write a byte every 20 ms forever."""
    yield Send(b"<")
    while True:
        yield Sleep(0.02)
        yield Send(b".")


def gated(
    gate: threading.Event,
    started: threading.Event | None = None,
    honour_shutdown: bool = True,
    seen: list[Any] | None = None,
) -> Callable[[], Body]:
    """A task body that runs until ``gate`` is set (or, if it honours it, shutdown)."""

    def gated() -> Body:
        if started is not None:
            started.set()
        until = time.monotonic() + GATE_LIMIT
        while not gate.is_set() and time.monotonic() < until:
            if honour_shutdown and shutdown_requested():
                if seen is not None:
                    seen.append("shutdown")
                return
            yield Sleep(POLL)

    return gated


def to_its_end(
    inner: Callable[[], Body], outcome: list[str], setup: Callable[[], object] | None = None
) -> Callable[[], Body]:
    """``inner`` as a body that records how it ended in ``outcome``.

    ``"finished"`` if it ran to its own end, ``"ended early"`` if something ended it
    (a cancel, a kill, the manager's crash). ``setup`` runs first, inside the task.
    """

    def body() -> Body:
        if setup is not None:
            setup()
        try:
            yield from inner()
            outcome.append("finished")
        finally:
            if not outcome:
                outcome.append("ended early")

    return body


def swallowing(adapter: Any, gate: threading.Event, started: threading.Event) -> Callable[[], Any]:
    """A thunk (not a body) that swallows whatever interrupts it, until ``gate``.

    A runtime's kill or cancel raises a BaseException that a body cannot catch (the
    adapter lets it through), so this is written against the runtime's ``sleep``
    itself. A cancelled sleep raises at once: a plain ``time.sleep`` paces the loop.
    """
    sleep = adapter.runtime.sleep
    if adapter.kind == "async":

        async def swallowing_async() -> None:
            started.set()
            until = time.monotonic() + GATE_LIMIT
            while not gate.is_set() and time.monotonic() < until:
                try:
                    await sleep(POLL)
                except BaseException:  # the point: a task that will not stop
                    time.sleep(POLL)

        return swallowing_async

    def swallowing() -> None:
        started.set()
        until = time.monotonic() + GATE_LIMIT
        while not gate.is_set() and time.monotonic() < until:
            try:
                sleep(POLL)
            except BaseException:  # the point: a task that will not stop
                time.sleep(POLL)

    return swallowing
