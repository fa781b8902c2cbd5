"""Registers the ``gevent`` manager with weft (entry point ``weft: gevent``)."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl

from ._manager import GeventManager
from ._serve import prepare_process


def _task_name() -> str:
    """The running task's name: its greenlet's (a task greenlet has ``name``, as gevent's own)."""
    import gevent

    return str(getattr(gevent.getcurrent(), "name", ""))


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``gevent`` manager."""
    yield ManagerSpec(
        name="gevent",
        factory=GeventManager,
        description="a greenlet per connection",
        handler_kind="sync",
        conformance=Conformance(task_name=_task_name),
        prepare_process=prepare_process,
    )
