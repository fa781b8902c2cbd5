"""A runtime a stop left running with stuck tasks is closed once they have ended.

A stop that leaves tasks behind cannot close a runtime made from a manager's name:
closing would wait for them (trio joins its loop thread). Left at that, its loop
thread and descriptors stayed for the life of the process, one set per server made
afresh after such a stop (a leak check's finding: +2 to +5 descriptors and a thread
per cycle on gevent, trio, asyncio and uvloop). They are closed once the stuck tasks
end, unless the same server runs again on them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import gevent
import pytest
import trio
from _every_manager import MANAGERS

from weft_core import Server
from weft_core.testing import WAIT, wait_until

#: How long the stuck handlers outlive the stop's bound at least.
STUCK = 0.5


def _stubborn(manager: str, gate: threading.Event, stuck: list[bool]) -> Any:
    """A handler that outlives its interruption until ``gate`` is set.

    Each says so in ``stuck`` once it has its client's bytes: one still reading as
    the stop comes ends with its socket (threads), and is not left behind.
    """
    if manager == "threads":

        def blocks(conn: Any) -> None:
            conn.recv(10)
            stuck.append(True)
            gate.wait(WAIT)

        return blocks
    if manager == "gevent":

        def swallows_kills(conn: Any) -> None:
            conn.recv(10)
            stuck.append(True)
            while not gate.is_set():
                try:
                    gevent.sleep(0.02)
                except BaseException:  # deaf to its kill, on purpose
                    pass

        return swallows_kills
    if manager == "trio":

        async def shields(stream: Any) -> None:
            await stream.receive_some(10)
            stuck.append(True)
            with trio.CancelScope(shield=True):
                while not gate.is_set():
                    await trio.sleep(0.02)

        return shields

    async def swallows_cancels(stream: Any) -> None:
        await stream.receive_some(10)
        stuck.append(True)
        while not gate.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass

    return swallows_cancels


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _leave_behind(server: Server, stuck: list[bool], clients: list[socket.socket]) -> None:
    """Two clients (added to ``clients``, the caller's to close) whose handlers the
    stop leaves behind; the stop returns False."""
    for _ in range(2):
        clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=WAIT))
        clients[-1].sendall(b"go")
    wait_until(lambda: len(stuck) == 2, what="both handlers to be stuck")
    assert server.stop(timeout=0) is False
    assert server.stats()["left_behind"] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_the_runtime_is_closed_once_the_tasks_left_behind_end(
    manager: str, options: dict[str, Any]
) -> None:
    gate = threading.Event()
    with Server(_stubborn(manager, gate, []), manager=manager, manager_options=options):
        pass  # what a loop library keeps for the process once used (uvloop: two)
    threads_before = set(threading.enumerate())
    stuck: list[bool] = []
    server = Server(_stubborn(manager, gate, stuck), manager=manager, manager_options=options)
    fds_before = _open_fds()
    server.run()
    clients: list[socket.socket] = []
    try:
        _leave_behind(server, stuck, clients)
        time.sleep(STUCK)  # what the check is about: after the stop, while they run
        assert server.task_manager.all_tasks(), "the stuck tasks were to outlive the stop"
    finally:
        gate.set()
        for client in clients:
            client.close()
    wait_until(lambda: not server.task_manager.all_tasks(), what="the stuck tasks to end")
    wait_until(
        lambda: _open_fds() <= fds_before and set(threading.enumerate()) <= threads_before,
        what="the runtime's loop thread and descriptors to go",
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_server_run_again_keeps_its_runtime_when_the_old_tasks_end(
    manager: str, options: dict[str, Any]
) -> None:
    """The same server run again uses the same manager: the old tasks ending must not
    close the runtime it serves on."""
    gate = threading.Event()
    stuck: list[bool] = []
    server = Server(_stubborn(manager, gate, stuck), manager=manager, manager_options=options)
    server.run()
    clients: list[socket.socket] = []
    try:
        _leave_behind(server, stuck, clients)
        server.run()
        gate.set()
        wait_until(lambda: server.stats()["active"] == 0, what="nothing to run")
        time.sleep(2.0)  # past the slowest look at the old tasks (a second apart)
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
            client.sendall(b"go")  # served by a handler that returns at once (gate set)
            assert client.recv(10) == b""
        assert server.running
    finally:
        gate.set()
        for client in clients:
            client.close()
        assert server.stop(timeout=WAIT)
