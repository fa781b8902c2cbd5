"""ManagerTestBase: the fixtures and capabilities every conformance test uses.

A manager author subclasses :class:`~weft_core.testing.ManagerTests` and sets
``manager_name``; the capabilities below say which optional behaviour the manager
has, and tests of behaviour it lacks skip with the reason. Each capability, and
how to drive the manager, is read from the plugin's ``ManagerSpec`` (its
``preemptive_stop``, ``supports_limit`` and ``conformance``) unless the subclass
sets the class attribute of the same name.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from .._protocol import TaskManager
from .._registry import create_manager, get_manager_spec
from .._server import Server
from .._spec import ManagerSpec
from ._adapters import Body, Sleep, SyncAdapter, default_adapter
from ._bodies import gated
from ._support import add_task_from_a_thread

#: How long the first test gives ``add_task`` to return while its task waits.
PROBE_WAIT = 1.5

__all__ = ["ManagerTestBase"]


class ManagerTestBase:
    """Fixtures and capabilities; see :class:`~weft_core.testing.ManagerTests`."""

    #: The name the manager is registered under (required).
    manager_name: ClassVar[str]
    #: Options passed to the manager's factory. None: the spec's
    #: ``conformance.manager_options``.
    manager_options: ClassVar[dict[str, Any] | None] = None
    #: The manager can interrupt a task that ignores its shutdown flag while it
    #: waits in the runtime (gevent kills, trio cancels; threads cannot). None: as
    #: the plugin declares in its ManagerSpec.
    preemptive_stop: ClassVar[bool | None] = None
    #: The manager honours ``limit=`` by raising ManagerFullError. None: as the
    #: ManagerSpec declares.
    supports_limit: ClassVar[bool | None] = None
    #: An adapter class for connection objects that are neither socket-like nor
    #: trio-style streams. None: the spec's ``conformance.adapter_class``, else the
    #: default for the manager's handler kind.
    adapter_class: ClassVar[type[SyncAdapter] | None] = None

    def _name(self) -> str:
        name = getattr(self, "manager_name", None)
        if not isinstance(name, str) or not name:
            pytest.fail(
                f"{type(self).__name__} must set manager_name = '<name>' (the name your plugin "
                "registers in weft_managers()) to run the weft conformance suite",
                pytrace=False,
            )
        return name

    def spec(self) -> ManagerSpec:
        """The ManagerSpec the plugin registered for the manager under test."""
        return get_manager_spec(self._name())

    def can_preempt(self) -> bool:
        """The preemptive_stop capability, from the class or else the plugin's spec."""
        if self.preemptive_stop is not None:
            return self.preemptive_stop
        return self.spec().preemptive_stop

    def can_limit(self) -> bool:
        """The supports_limit capability, from the class or else the plugin's spec."""
        if self.supports_limit is not None:
            return self.supports_limit
        return self.spec().supports_limit

    def options(self) -> dict[str, Any]:
        """The options every manager under test is made with."""
        if self.manager_options is not None:
            return dict(self.manager_options)
        return dict(self.spec().conformance.manager_options)

    def make_adapter(self, runtime: Any) -> SyncAdapter:
        """The adapter for ``runtime``: the class's, the spec's, or the kind's default."""
        cls = self.adapter_class
        if cls is None:
            declared = self.spec().conformance.load_adapter_class()
            if declared is not None and not issubclass(declared, SyncAdapter):
                pytest.fail(
                    f"the ManagerSpec of {self._name()!r} declares adapter_class {declared!r}, "
                    "which is not a subclass of weft_core.testing.SyncAdapter or AsyncAdapter",
                    pytrace=False,
                )
            cls = declared
        if cls is None:
            return default_adapter(runtime)
        return cls(runtime)

    def new_manager(self, **options: Any) -> TaskManager:
        """A fresh manager of the kind under test."""
        return create_manager(self._name(), **{**self.options(), **options})

    #: Why every test fails at once, if the first one found ``add_task`` running its
    #: task in the caller's thread ("" once it returned as it should).
    _runs_in_caller: ClassVar[str | None] = None

    @pytest.fixture(autouse=True)
    def _add_task_must_return(self) -> Iterator[None]:
        """Fail every test at once if ``add_task`` runs its task in the caller's thread.

        Probed before the first test: such a manager would hang test after test,
        each until its timeout. After each test, a collection: a socket the test
        leaked in a cycle warns (``ResourceWarning``) in this test's teardown, not in
        whichever later test the collector happens to run in.
        """
        cls = type(self)
        if cls._runs_in_caller is None:
            cls._runs_in_caller = self._probe_add_task()
        if cls._runs_in_caller:
            pytest.fail(cls._runs_in_caller, pytrace=False)
        yield
        gc.collect()

    def _probe_add_task(self) -> str:
        manager = self.new_manager()
        adapter = self.make_adapter(manager.runtime)
        gate = threading.Event()
        caller, _ = add_task_from_a_thread(manager, adapter.task(gated(gate)), PROBE_WAIT)
        stuck = caller.is_alive()
        gate.set()
        caller.join(PROBE_WAIT)
        if stuck:
            manager.runtime.close()
            return (
                f"{self._name()}: add_task did not return within {PROBE_WAIT:g}s while the"
                " task it was given waited: it must start the task and return, not run the"
                " thunk in the caller's thread (every test would hang until its timeout; fix"
                " that first)"
            )
        # From inside one of its own tasks, as the acceptor adds every connection: an
        # add_task that waits on its own loop there (a blocking portal, a future the
        # loop should fill) never returns, and the loop with it.
        added, inner = threading.Event(), threading.Event()

        def adder() -> Body:
            manager.add_task(adapter.task(gated(inner)))
            added.set()
            yield Sleep(0)

        manager.add_task(adapter.task(adder))
        if not added.wait(PROBE_WAIT):
            # Its loop is stuck for good: close it in a thread nobody waits for.
            threading.Thread(target=manager.runtime.close, daemon=True).start()
            return (
                f"{self._name()}: add_task called from inside one of its own tasks (as the"
                " acceptor calls it for every connection) did not return within"
                f" {PROBE_WAIT:g}s: there it must start the task without waiting on its own"
                " loop (no blocking portal, no future the loop would have to fill)"
            )
        inner.set()
        manager.runtime.close()
        return ""

    @pytest.fixture
    def manager(self) -> Iterator[TaskManager]:
        """A manager made for one test and closed after it."""
        manager = self.new_manager()
        yield manager
        manager.runtime.close()

    @pytest.fixture
    def limited_manager(self) -> Iterator[TaskManager]:
        """A manager with ``limit=2``."""
        if not self.can_limit():
            pytest.skip(f"{self._name()} declares supports_limit=False: it takes no limit=")
        manager = self.new_manager(limit=2)
        yield manager
        manager.runtime.close()

    @pytest.fixture
    def adapter(self, manager: TaskManager) -> SyncAdapter:
        """Runs bodies in the manager's runtime."""
        return self.make_adapter(manager.runtime)

    @pytest.fixture
    def handler_kind(self) -> str:
        """``sync`` or ``async``, as the plugin registered it."""
        return self.spec().handler_kind

    @pytest.fixture
    def make_server(self) -> Iterator[Callable[..., Server]]:
        """``make_server(body, **kw)``: a running Server whose handler runs ``body``.

        Every server made is stopped (with a short timeout) after the test.
        """
        servers: list[Server] = []

        def make(
            body: Callable[..., Body] | None = None,
            *,
            handler: Any = None,
            start: bool = True,
            **kw: Any,
        ) -> Server:
            if handler is None:
                assert body is not None
                probe = self.new_manager()
                adapter = self.make_adapter(probe.runtime)
                probe.runtime.close()
                handler = adapter.handler(body)
            server = Server(
                handler,
                manager=self._name(),
                manager_options=self.options() or None,
                **kw,
            )
            servers.append(server)
            if start:
                server.run()
            return server

        yield make
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop(timeout=1)

    @pytest.fixture
    def errors_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> Callable[[], list[logging.LogRecord]]:
        """A function returning the ERROR records logged so far, weft's and a manager's own.

        Any logger: a manager may report a task's failure on a logger of its own.
        """
        caplog.set_level(logging.INFO, logger="weft")
        return lambda: [r for r in caplog.records if r.levelno >= logging.ERROR]
