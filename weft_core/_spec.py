"""ManagerSpec: the record a plugin's ``weft_managers`` hook returns for each manager.

With it, :class:`Conformance`: what the conformance suite needs to know to drive a
manager (``weft conformance NAME`` reads it, so a plugin passes with no flags).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._protocol import TaskManager

__all__ = ["Conformance", "HandlerKind", "ManagerSpec"]

HandlerKind = Literal["sync", "async"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Conformance:
    """How the conformance suite drives a manager; part of its :class:`ManagerSpec`.

    Everything is optional: the defaults fit a manager whose handlers get stdlib-like
    sockets (sync) or trio-style streams (async) and whose tasks are threads,
    greenlets or trio tasks. A ``ManagerTests`` subclass may still override each
    with a class attribute of the same name.

    - ``task_name``: called inside a task, returns the name the runtime gives the
      running task (the suite checks that a connection's task is named ``weft conn
      HOST:PORT``). None: the greenlet's, trio task's or thread's name.
    - ``names_tasks``: False if the runtime has no task names to set.
    - ``adapter_class``: how the suite's handlers talk over your connection object,
      as ``"module:Class"`` (imported only by the suite, so your plugin module never
      imports pytest) or the class; a subclass of ``weft_core.testing.SyncAdapter``
      or ``AsyncAdapter``. None: the default for the handler kind.
    - ``manager_options``: options the suite passes to every manager it makes.
    """

    task_name: Callable[[], str] | None = None
    names_tasks: bool = True
    adapter_class: str | type | None = None
    manager_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_name is not None and not callable(self.task_name):
            raise TypeError(f"Conformance task_name {self.task_name!r} is not callable")
        adapter = self.adapter_class
        if isinstance(adapter, str) and not _IMPORT_PATH.match(adapter):
            raise ValueError(
                f"Conformance adapter_class {adapter!r} is not an import path; "
                "write it as 'package.module:ClassName'"
            )
        if not isinstance(adapter, (str, type, type(None))):
            raise TypeError(
                f"Conformance adapter_class must be 'module:Class', a class or None, "
                f"not {adapter!r}"
            )
        object.__setattr__(self, "manager_options", dict(self.manager_options))

    def __hash__(self) -> int:
        return hash((self.task_name, self.names_tasks, self.adapter_class))

    def load_adapter_class(self) -> type | None:
        """The adapter class, imported if it was given as ``"module:Class"``."""
        adapter = self.adapter_class
        if not isinstance(adapter, str):
            return adapter
        import importlib

        module_name, _, qualname = adapter.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, type):
            raise TypeError(f"Conformance adapter_class {adapter!r} is {obj!r}, not a class")
        return obj


@dataclass(frozen=True)
class ManagerSpec:
    """One task manager a plugin provides.

    ``name`` is what users write in config (``manager = "gevent"``); it is
    normalised to lower case and must be a simple identifier. ``factory`` takes the
    manager's options as keyword arguments (``limit=`` and its own) and returns a
    :class:`~weft_core.TaskManager`. ``handler_kind`` says whether handlers run on
    it are plain functions (``"sync"``) or ``async def`` (``"async"``).
    ``preemptive_stop`` and ``supports_limit`` declare capabilities, and
    ``conformance`` how the conformance suite drives the manager; ``weft
    conformance NAME`` reads all three. ``prepare_process`` is what ``weft serve``
    runs before importing the handler (gevent: monkey-patching).
    """

    name: str
    factory: Callable[..., TaskManager]
    description: str
    handler_kind: HandlerKind = "sync"
    #: False if ``stop_task`` cannot interrupt a task that ignores its shutdown flag
    #: while it waits (threads: a thread cannot be killed). The conformance suite
    #: skips the tests of interruption for such managers, saying why.
    preemptive_stop: bool = True
    #: False if the manager does not take ``limit=`` (ManagerFullError at the limit);
    #: the suite skips the tests of the limit, saying why.
    supports_limit: bool = True
    #: What the conformance suite needs to drive the manager (see :class:`Conformance`).
    conformance: Conformance = field(default_factory=Conformance, compare=False)
    #: Called by ``weft serve`` in each process that serves (each worker under
    #: ``--workers``) before it imports the handler's module, with the manager's
    #: options as keyword arguments (it must accept the ones it does not use). For
    #: what has to come before the application's imports, such as gevent's
    #: monkey-patching. ``Server(...)`` never calls it: a program that makes its own
    #: Server prepares its own process. None: nothing to do.
    prepare_process: Callable[..., object] | None = field(default=None, compare=False)
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
        if not isinstance(self.conformance, Conformance):
            raise TypeError(
                f"manager {name!r}: conformance must be a weft_core.Conformance, "
                f"not {self.conformance!r}"
            )
        if not callable(self.factory):
            raise TypeError(f"manager {name!r}: factory {self.factory!r} is not callable")
        if self.prepare_process is not None and not callable(self.prepare_process):
            raise TypeError(
                f"manager {name!r}: prepare_process {self.prepare_process!r} is not callable"
            )

    def create(self, **options: Any) -> TaskManager:
        """Make a manager with ``options`` passed to the factory."""
        return self.factory(**options)
