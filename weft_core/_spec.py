"""ManagerSpec: the record a plugin's ``weft_managers`` hook returns for each manager."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._protocol import TaskManager

__all__ = ["HandlerKind", "ManagerSpec"]

HandlerKind = Literal["sync", "async"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class ManagerSpec:
    """One task manager a plugin provides.

    ``name`` is what users write in config (``manager = "gevent"``); it is
    normalised to lower case and must be a simple identifier. ``factory`` takes the
    manager's options as keyword arguments (``limit=`` and its own) and returns a
    :class:`~weft_core.TaskManager`. ``handler_kind`` says whether handlers run on
    it are plain functions (``"sync"``) or ``async def`` (``"async"``); with
    ``preemptive_stop`` it declares a capability the conformance suite reads.
    """

    name: str
    factory: Callable[..., TaskManager]
    description: str
    handler_kind: HandlerKind = "sync"
    #: False if ``stop_task`` cannot interrupt a task that ignores its shutdown flag
    #: while it waits (threads: a thread cannot be killed). The conformance suite
    #: skips the tests of interruption for such managers, saying why.
    preemptive_stop: bool = True
    #: Filled in by the registry: the distribution that registered the manager.
    distribution: str | None = field(default=None, compare=False)
    version: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        name = self.name.strip().lower()
        if not _NAME.match(name):
            raise ValueError(
                f"invalid manager name {self.name!r}: use lower-case letters, digits, '-' or '_',"
                " starting with a letter"
            )
        object.__setattr__(self, "name", name)
        if self.handler_kind not in ("sync", "async"):
            raise ValueError(
                f"manager {name!r}: handler_kind must be 'sync' or 'async', "
                f"not {self.handler_kind!r}"
            )
        if not callable(self.factory):
            raise TypeError(f"manager {name!r}: factory {self.factory!r} is not callable")

    def create(self, **options: Any) -> TaskManager:
        """Make a manager with ``options`` passed to the factory."""
        return self.factory(**options)
