"""The conformance suite's adapters end a body as its task is killed or cancelled.

The suite writes each task once, as a body (a generator of operations) that an
adapter drives in the manager's runtime; a body's ``finally`` is how the suite sees
that a task ended (``cleaned``, ``outcome``). A kill or cancel goes through the
driver, not into the body. Left to the generator's collection, the body's
``finally`` ran only once the exception, which keeps the driver's frame (and so the
body) alive through its traceback, was freed: after the manager's own ``finally``
had counted the task ended, and an asyncio task keeps that exception for as long as
it lives. A fresh-clone CI run saw ``weft conformance`` blame a sound manager
("the task, deaf to its flag, was still running when stop_task returned"). Real
cancellation in real runtimes here: an asyncio task cancelled, a greenlet killed.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from weft_core.testing import AsyncAdapter, Sleep, SyncAdapter


def recording(cleaned: list[str]) -> Any:
    """A body that sleeps long, and says in its ``finally`` that it ended."""
    try:
        yield Sleep(30)
    finally:
        cleaned.append("ended")


@pytest.mark.timeout(20)
def test_a_cancelled_asyncio_task_has_ended_its_body_when_the_cancel_reaches_its_caller() -> None:
    cleaned: list[str] = []
    adapter = AsyncAdapter(SimpleNamespace(sleep=asyncio.sleep))

    async def main() -> list[str]:
        task = asyncio.ensure_future(adapter.adrive(recording(cleaned)))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return list(cleaned)  # the task, which keeps its exception, is still held here
        raise AssertionError("the task was not cancelled")

    assert asyncio.run(main()) == ["ended"]


@pytest.mark.timeout(20)
def test_a_killed_greenlet_has_ended_its_body_when_the_kill_returns() -> None:
    gevent = pytest.importorskip("gevent")
    cleaned: list[str] = []
    adapter = SyncAdapter(SimpleNamespace(sleep=gevent.sleep))
    greenlet = gevent.spawn(adapter.drive, recording(cleaned))
    gevent.sleep(0.05)
    greenlet.kill(block=True, timeout=5)
    assert greenlet.dead
    assert cleaned == ["ended"]
