"""What a plugin's hook or the application's callback raises ends nothing but itself.

Found by an outside check of the Python API under misuse, on every manager. Each
case failed before its fix: hooks and callbacks were guarded against ``Exception``,
``SystemExit`` and ``KeyboardInterrupt`` only, so any other ``BaseException`` (a
library's own, another runtime's cancellation, ``GeneratorExit``, a group) went on:

- a ``weft_connection_refused`` hook raising one killed the acceptor: the server
  stopped itself; a ``weft_connection_closed`` one lost the connection's slot for
  good; a ``weft_connection_opened`` one reset every client unserved;
- an ``on_stop`` raising one escaped ``stop()``, and no plugin heard of the stop;
- a task's ``on_interrupt`` callback raising one kept that task from being
  interrupted, and the stop left it behind;
- a stop during ``on_start`` made ``weft_server_started`` run after
  ``weft_server_stopped`` (weft-prometheus then opened its endpoint for good);
- ``server.port = 0`` while running made ``server.port`` say 0 while it listened.
"""

from __future__ import annotations

import asyncio
import builtins
import socket
import threading
from collections.abc import Callable
from typing import Any

import gevent
import pytest
import trio
from _every_manager import MANAGERS, aecho, echo
from _every_manager import serve as serve  # the fixture
from test_hooks import register

from weft_core import Server, current_task, hookimpl
from weft_core.testing import WAIT, wait_until

__all__ = ["register"]  # the fixture, shared with test_hooks


class Abort(BaseException):
    """A library's own BaseException: neither Exception nor SystemExit."""


RAISED: dict[str, Callable[[], BaseException]] = {
    "custom": lambda: Abort("a library's own"),
    "asyncio-CancelledError": lambda: asyncio.CancelledError("not this runtime's"),
}


def _echoes(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"hi")
        return client.recv(10) == b"hi"


class _Raises:
    """A plugin whose one hook raises ``make()`` each time it runs, until disarmed."""

    def __init__(self, make: Callable[[], BaseException]) -> None:
        self.make = make
        self.armed = True
        self.calls = 0

    def _raise(self) -> None:
        self.calls += 1
        if self.armed:
            raise self.make()


class _Opened(_Raises):
    @hookimpl
    def weft_connection_opened(self, server: Server, connection: Any) -> None:
        self._raise()


class _Closed(_Raises):
    @hookimpl
    def weft_connection_closed(
        self,
        server: Server,
        connection: Any,
        duration: float,
        bytes_in: Any,
        bytes_out: Any,
        how: str,
    ) -> None:
        self._raise()


class _Refused(_Raises):
    @hookimpl
    def weft_connection_refused(self, server: Server, peer: str, reason: str) -> None:
        self._raise()


HOOKS: dict[str, type[_Raises]] = {"opened": _Opened, "closed": _Closed, "refused": _Refused}


def _raiser(make: Callable[[], BaseException]) -> Callable[[], None]:
    def callback() -> None:
        raise make()

    return callback


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raised", sorted(RAISED))
@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_connection_hook_raising_any_base_exception_ends_nothing(
    serve: Any,
    register: Callable[[object], str],
    manager: str,
    options: dict[str, Any],
    hook: str,
    raised: str,
) -> None:
    """docs/hooks.md: a hook that raises never stops the server; the server, and
    every other plugin, goes on. With one slot, a slot lost is every later client."""
    plugin = HOOKS[hook](RAISED[raised])
    register(plugin)
    server = serve(manager, options, echo, aecho, max_connections=1)
    if hook == "refused":  # a refusal: a client while the slot is held
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as held:
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as refused:
                refused.settimeout(WAIT)
                try:
                    refused.recv(1)
                except ConnectionResetError:
                    pass
            wait_until(lambda: plugin.calls >= 1, what="the refused hook to run")
    for _ in range(3):  # the slot comes back each time, with the hook still raising
        wait_until(lambda: server.stats()["active"] == 0, what="the slot to come back")
        assert _echoes(server.port)
    assert server.running and server.error is None
    plugin.armed = False
    wait_until(lambda: server.stats()["active"] == 0, what="every connection to end")
    assert server.stop(timeout=WAIT)
    assert server.stats()["left_behind"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raised", ["custom", "asyncio-CancelledError", "GeneratorExit", "group"])
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_an_on_stop_raising_any_base_exception_is_logged_and_the_plugins_are_told(
    register: Callable[[object], str],
    manager: str,
    options: dict[str, Any],
    raised: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/api.md: what ``on_stop`` raises is logged; the stop still ends, and
    ``weft_server_stopped`` runs after it."""
    if raised == "group" and not hasattr(builtins, "BaseExceptionGroup"):
        pytest.skip("BaseExceptionGroup is Python 3.11's")
    make = {
        **RAISED,
        "GeneratorExit": lambda: GeneratorExit("its own"),
        "group": lambda: builtins.BaseExceptionGroup("several", [Abort("one"), ValueError("two")]),
    }[raised]
    told: list[dict[str, Any]] = []

    class Told:
        @hookimpl
        def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
            told.append(stats)

    register(Told())

    def on_stop(server: Server) -> None:
        raise make()

    handler = aecho if manager in ("trio", "asyncio") else echo
    server = Server(handler, manager=manager, manager_options=options, on_stop=on_stop)
    server.run()
    assert server.stop(timeout=WAIT)
    assert len(told) == 1
    assert "on_stop callback" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raised", sorted(RAISED))
@pytest.mark.parametrize(("manager", "options"), [m for m in MANAGERS if m.values[0] != "threads"])
def test_an_on_interrupt_callback_raising_does_not_keep_its_task_from_being_interrupted(
    serve: Any, manager: str, options: dict[str, Any], raised: str
) -> None:
    """docs/api.md: phase 3 interrupts what is left (gevent kills, trio and asyncio
    cancel); a task's own ``on_interrupt`` callback raising must not cancel that."""
    ready = threading.Event()
    callback = _raiser(RAISED[raised])

    def deaf(conn: Any) -> None:  # gevent: deaf to its flag and to the end of its input
        current_task().on_interrupt(callback)  # type: ignore[union-attr]
        ready.set()
        gevent.sleep(3600)

    async def adeaf(stream: Any) -> None:
        current_task().on_interrupt(callback)  # type: ignore[union-attr]
        ready.set()
        if manager == "trio":
            await trio.sleep_forever()
        await asyncio.sleep(3600)

    server = serve(manager, options, deaf, adeaf)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT):
        assert ready.wait(WAIT)
        assert server.stop(timeout=0.2) is False  # interrupted, not left behind
    assert server.stats()["left_behind"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_stop_during_on_start_is_the_runs_only_hook(
    register: Callable[[object], str], manager: str, options: dict[str, Any]
) -> None:
    """docs/hooks.md: ``weft_server_started`` is not called once the server was
    stopped before ``run()`` returns; never after ``weft_server_stopped``."""
    order: list[str] = []

    class Order:
        @hookimpl
        def weft_server_started(self, server: Server, addresses: list[str]) -> None:
            order.append("started")

        @hookimpl
        def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
            order.append("stopped")

    register(Order())
    stopper: list[threading.Thread] = []

    def on_start(server: Server) -> None:
        stopper.append(threading.Thread(target=server.stop, args=(WAIT,)))
        stopper[0].start()
        stopper[0].join(WAIT)  # the stop ends while on_start still runs

    handler = aecho if manager in ("trio", "asyncio") else echo
    server = Server(handler, manager=manager, manager_options=options, on_start=on_start)
    server.run()
    assert server.wait(WAIT)
    assert order == ["stopped"]


@pytest.mark.timeout(30)
def test_the_port_set_while_running_takes_effect_at_the_next_run() -> None:
    """DESIGN.md: changing the port takes effect at the next ``run()``; until then
    ``server.port`` is the port it listens on."""
    with Server(echo, port=0) as server:
        bound = server.port
        server.port = 0
        assert server.port == bound and _echoes(server.port)
