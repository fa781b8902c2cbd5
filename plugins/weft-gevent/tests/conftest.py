"""Fixtures shared by the gevent plugin's tests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from weft_gevent import GeventManager


@pytest.fixture
def manager() -> Iterator[GeventManager]:
    """A fresh manager; afterwards, its tasks stopped and its hub thread gone."""
    m = GeventManager()
    yield m
    for task_id in m.all_tasks():
        m.stop_task(task_id, timeout=0)
    m.runtime.close()
    # In time: a task's end takes it from the table a moment before it lets go of the
    # hub, and a close() between the two stops the hub once it does, in its own thread.
    deadline = time.monotonic() + 10
    while m._hubs.owns_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not m._hubs.owns_thread, "the hub thread outlived runtime.close()"
