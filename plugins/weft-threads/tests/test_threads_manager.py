"""threads-specific behaviour; the shared contract is in weft_core's conformance suite."""

from __future__ import annotations

import socket
import threading

import pytest

from weft_core import ManagerFullError, Server, available_managers, shutdown_requested
from weft_threads import ThreadManager

WAIT = 10.0


def test_registered_as_the_default_manager() -> None:
    spec = available_managers()["threads"]
    assert spec.handler_kind == "sync" and spec.preemptive_stop is False
    assert spec.distribution == "weft-threads"


def test_threads_are_named_after_the_task() -> None:
    manager = ThreadManager()
    names: list[str] = []
    done = threading.Event()

    def thunk() -> None:
        names.append(threading.current_thread().name)
        done.set()

    thunk.__name__ = "weft conn 127.0.0.1:4242"
    manager.add_task(thunk)
    assert done.wait(WAIT)
    assert names == ["weft conn 127.0.0.1:4242"]


def test_stack_size_applies_to_new_threads_only() -> None:
    previous = threading.stack_size()
    manager = ThreadManager(stack_size=512 * 1024)
    done = threading.Event()
    manager.add_task(done.set)
    assert done.wait(WAIT)
    assert threading.stack_size() == previous


def test_limit_is_settable() -> None:
    manager = ThreadManager(limit=1)
    gate = threading.Event()
    manager.add_task(gate.wait)
    with pytest.raises(ManagerFullError, match="limit=1"):
        manager.add_task(gate.wait)
    manager.limit = 2
    manager.add_task(gate.wait)
    gate.set()


def test_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        ThreadManager(limit=0)


@pytest.mark.timeout(30)
def test_stop_wakes_a_thread_blocked_in_recv() -> None:
    """A thread cannot be killed: stop() shuts the socket down so recv() returns."""
    entered = threading.Event()

    def handler(conn: socket.socket) -> None:
        entered.set()
        while not shutdown_requested():
            if not conn.recv(1):
                return

    server = Server(handler, manager="threads")
    server.run()
    with socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT) as client:
        assert entered.wait(WAIT)
        assert server.stop(timeout=WAIT) is True
        assert client.recv(1) == b""
