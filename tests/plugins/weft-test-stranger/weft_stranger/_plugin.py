"""Registers the ``stranger`` manager (and its flawed twins) with weft."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl


def _task_name() -> str:
    return threading.current_thread().name


def _factory(flaw):
    def make(**options):
        from ._manager import FuturesManager

        return FuturesManager(flaw=flaw, **options)

    return make


FLAWED = [
    "stop-returns-early",
    "never-forgets",
    "stop-blocks",
    "stop-raises",
    "stop-wrong-type",
    "never-interrupts",
    "add-returns-none",
    "add-raises",
    "close-blocks",
    "no-flag",
    "interrupt-blocks",
    "leaks-threads",
    "lies-true",
    "remove-noop",
    "all-tasks-empty",
]


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    yield ManagerSpec(
        name="stranger",
        factory=_factory(None),
        description="tasks on a concurrent.futures thread pool (an outsider's manager)",
        handler_kind="sync",
        preemptive_stop=False,
        conformance=Conformance(task_name=_task_name),
    )
    for flaw in FLAWED:
        yield ManagerSpec(
            name=f"stranger-{flaw}",
            factory=_factory(flaw),
            description=f"the stranger manager with the flaw {flaw}",
            handler_kind="sync",
            preemptive_stop=False,
            conformance=Conformance(task_name=_task_name),
        )
