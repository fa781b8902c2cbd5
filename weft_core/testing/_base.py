"""ManagerTestBase: the fixtures and capabilities every conformance test uses.

A manager author subclasses :class:`~weft_core.testing.ManagerTests` and sets
``manager_name``; the capabilities below say which optional behaviour the manager
has, and tests of behaviour it lacks skip with the reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from .._protocol import TaskManager
from .._registry import create_manager, get_manager_spec
from .._server import Server
from ._adapters import Body, SyncAdapter, default_adapter

__all__ = ["ManagerTestBase"]


class ManagerTestBase:
    """Fixtures and capabilities; see :class:`~weft_core.testing.ManagerTests`."""

    #: The name the manager is registered under (required).
    manager_name: ClassVar[str]
    #: Options passed to the manager's factory.
    manager_options: ClassVar[dict[str, Any]] = {}
    #: The manager can interrupt a task that ignores its shutdown flag while it
    #: waits in the runtime (gevent kills, trio cancels; threads cannot). None: as
    #: the plugin declares in its ManagerSpec.
    preemptive_stop: ClassVar[bool | None] = None
    #: The manager honours ``limit=`` by raising ManagerFullError.
    supports_limit: ClassVar[bool] = True
    #: An adapter class for connection objects that are neither socket-like nor
    #: trio-style streams; None picks the default for the manager's handler kind.
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

    def can_preempt(self) -> bool:
        """The preemptive_stop capability, from the class or else the plugin's spec."""
        if self.preemptive_stop is not None:
            return self.preemptive_stop
        return get_manager_spec(self._name()).preemptive_stop

    def new_manager(self, **options: Any) -> TaskManager:
        """A fresh manager of the kind under test."""
        return create_manager(self._name(), **{**self.manager_options, **options})

    @pytest.fixture
    def manager(self) -> Iterator[TaskManager]:
        """A manager made for one test and closed after it."""
        manager = self.new_manager()
        yield manager
        manager.runtime.close()

    @pytest.fixture
    def limited_manager(self) -> Iterator[TaskManager]:
        """A manager with ``limit=2``."""
        if not self.supports_limit:
            pytest.skip(f"{self._name()} declares supports_limit = False")
        manager = self.new_manager(limit=2)
        yield manager
        manager.runtime.close()

    @pytest.fixture
    def adapter(self, manager: TaskManager) -> SyncAdapter:
        """Runs bodies in the manager's runtime."""
        if self.adapter_class is not None:
            return self.adapter_class(manager.runtime)
        return default_adapter(manager.runtime)

    @pytest.fixture
    def handler_kind(self) -> str:
        """``sync`` or ``async``, as the plugin registered it."""
        return get_manager_spec(self._name()).handler_kind

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
                adapter = (self.adapter_class or type(default_adapter(probe.runtime)))(
                    probe.runtime
                )
                probe.runtime.close()
                handler = adapter.handler(body)
            server = Server(
                handler,
                manager=self._name(),
                manager_options=dict(self.manager_options) or None,
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
        """A function returning the ERROR records logged by weft so far."""
        caplog.set_level(logging.INFO, logger="weft")
        return lambda: [
            r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("weft")
        ]
