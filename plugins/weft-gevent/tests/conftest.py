"""Fixtures shared by the gevent plugin's tests."""

from __future__ import annotations

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
    assert not m._hubs.owns_thread, "the hub thread outlived runtime.close()"
