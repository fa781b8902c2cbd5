"""Registers the ``threads`` manager with weft (entry point ``weft: threads``)."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import ManagerSpec, hookimpl

from ._manager import ThreadManager


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``threads`` manager."""
    yield ManagerSpec(
        name="threads",
        factory=ThreadManager,
        description="a thread per connection (the default manager)",
        handler_kind="sync",
        preemptive_stop=False,  # a thread cannot be killed
    )
