"""Registers the ``gevent`` manager with weft (entry point ``weft: gevent``)."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import ManagerSpec, hookimpl

from ._manager import GeventManager


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``gevent`` manager."""
    yield ManagerSpec(
        name="gevent",
        factory=GeventManager,
        description="a greenlet per connection",
        handler_kind="sync",
    )
