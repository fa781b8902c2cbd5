"""What is specific to the pool: the queue, the fixed workers, the acceptor's worker.

The TaskManager protocol itself is covered by weft's conformance suite
(test_conformance.py). Tests wait on events with timeouts, never on sleeps.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from weft_core import ConfigError, ManagerFullError, Server, create_manager, shutdown_requested
from weft_pool import PoolManager

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0


@pytest.fixture
def pool() -> Iterator[PoolManager]:
    manager = PoolManager(workers=2, limit=4)
    yield manager
    manager.runtime.close()


def blocker(
    gate: threading.Event, started: threading.Event, log: list[str], name: str
) -> Callable[[], None]:
    def task() -> None:
        log.append(name)
        started.set()
        gate.wait(WAIT)

    return task


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_workers_below_two_are_refused_naming_the_acceptor() -> None:
    with pytest.raises(ConfigError, match="acceptor holds one worker per listener"):
        create_manager("pool", workers=1)
    with pytest.raises(ConfigError, match="workers must be an integer"):
        create_manager("pool", workers="8")


def test_a_flood_waits_in_the_queue_in_order(pool: PoolManager) -> None:
    gate, log = threading.Event(), list[str]()
    started = [threading.Event() for _ in range(4)]
    ids = [pool.add_task(blocker(gate, started[i], log, str(i))) for i in range(4)]
    assert started[0].wait(WAIT) and started[1].wait(WAIT)
    assert not started[2].is_set() and not started[3].is_set(), "only `workers` tasks run"
    assert set(pool.all_tasks()) == set(ids), "queued tasks are held too"
    assert pool.queued() == ids[2:]
    with pytest.raises(ManagerFullError):
        pool.add_task(lambda: None)  # limit=4 counts queued and running
    gate.set()
    assert started[3].wait(WAIT)
    assert log[2:] == ["2", "3"], "queued tasks run in the order they came"


def test_stop_task_interrupts_a_queued_task_by_dropping_it(pool: PoolManager) -> None:
    gate, log = threading.Event(), list[str]()
    running = [threading.Event(), threading.Event()]
    for i in range(2):
        pool.add_task(blocker(gate, running[i], log, str(i)))
    assert running[0].wait(WAIT) and running[1].wait(WAIT)
    queued = pool.add_task(lambda: log.append("queued"))
    assert pool.stop_task(queued, timeout=0) is False, "no worker freed in time: interrupted"
    assert queued not in pool.all_tasks()
    after = threading.Event()
    pool.add_task(after.set)
    gate.set()
    assert after.wait(WAIT)
    assert "queued" not in log, "an interrupted queued task never runs"


def test_stop_task_runs_a_queued_task_next_with_its_flag_set(pool: PoolManager) -> None:
    gates = [threading.Event(), threading.Event()]
    running = [threading.Event(), threading.Event()]
    log: list[str] = []
    for i in range(2):
        pool.add_task(blocker(gates[i], running[i], log, str(i)))
    assert running[0].wait(WAIT) and running[1].wait(WAIT)
    pool.add_task(lambda: log.append("first in line"))
    last = pool.add_task(lambda: log.append(f"stopped, flag {shutdown_requested()}"))
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(pool.stop_task(last, WAIT)))
    stopper.start()
    wait_until(lambda: pool.queued()[:1] == [last])  # stop_task moved it to the front
    gates[0].set()  # one worker frees: the stopped task runs before the one ahead of it
    stopper.join(WAIT)
    assert result == [True], "it ended on its own once flagged: True"
    assert log[2] == "stopped, flag True"
    gates[1].set()


def test_workers_retire_when_the_runtime_closes() -> None:
    manager = PoolManager(workers=3)
    seen: list[threading.Thread] = []
    done = threading.Event()

    def record() -> None:
        seen.append(threading.current_thread())
        done.set()

    manager.add_task(record)
    assert done.wait(WAIT)
    manager.runtime.close()
    seen[0].join(WAIT)
    assert not seen[0].is_alive(), "an idle worker ends once the runtime is closed"
    done.clear()
    manager.add_task(record)  # an idle runtime reopens
    assert done.wait(WAIT)
    assert seen[1] is not seen[0]
    manager.runtime.close()


def greet_then_echo(conn: socket.socket) -> None:
    conn.sendall(b"+")
    while data := conn.recv(65536):
        conn.sendall(data)


def test_server_connections_beyond_the_workers_wait_instead_of_being_refused() -> None:
    # workers=3: the acceptor holds one, so two connections are served at once.
    with Server(greet_then_echo, manager="pool", manager_options={"workers": 3}) as server:
        clients = [socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT)]
        clients.append(socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT))
        for client in clients:
            assert client.recv(1) == b"+"
        with socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT) as third:
            # Counted as accepted just before its task is added: both are waited for.
            wait_until(lambda: server.stats()["accepted"] == 3)
            wait_until(lambda: len(server.task_manager.all_tasks()) == 4)  # acceptor, 2, queued
            readable, _, _ = select.select([third], [], [], 0)
            assert readable == [], "accepted and queued: not served yet"
            clients.pop().close()
            assert third.recv(1) == b"+", "served once a worker frees"
        for client in clients:
            client.close()
        assert server.stats()["refused"] == 0


@pytest.fixture
def shared() -> Iterator[tuple[PoolManager, Server, socket.socket]]:
    """Two workers, taken by a first server's acceptor and its one client."""
    pool = PoolManager(workers=2)
    first = Server(greet_then_echo, manager=pool)
    first.run()
    client = socket.create_connection(("127.0.0.1", int(first.port)), timeout=WAIT)
    try:
        assert client.recv(1) == b"+"
        yield pool, first, client
    finally:
        client.close()
        first.stop(timeout=WAIT)
        pool.runtime.close()


def test_a_queued_acceptor_closes_its_listener_once_a_worker_frees(
    shared: tuple[PoolManager, Server, socket.socket],
) -> None:
    pool, _, client = shared
    second = Server(greet_then_echo, manager=pool)
    second.run()  # listening, but its acceptor waits in the queue
    listener = second.socket
    assert len(pool.queued()) == 1
    stopper = threading.Thread(target=second.stop, args=(WAIT,))
    stopper.start()
    wait_until(lambda: not second.running)
    client.close()  # the first server's connection ends: its worker frees
    stopper.join(WAIT)
    assert second.stopped
    assert listener.fileno() == -1, "the flagged acceptor ran and closed its listener"


def test_a_dropped_acceptor_leaves_no_listener_open(
    shared: tuple[PoolManager, Server, socket.socket],
) -> None:
    pool, _, _ = shared
    second = Server(greet_then_echo, manager=pool)
    second.run()
    listener = second.socket
    try:
        # No worker frees: after ACCEPTOR_STOP_TIMEOUT (5 s) the acceptor is dropped.
        assert second.stop(timeout=WAIT) is True
        assert listener.fileno() == -1, "stop() closes every listener"
    finally:
        listener.close()  # idempotent; here so that the failure leaks nothing


@pytest.mark.timeout(30)
def test_a_pool_whose_workers_all_accept_says_why_nobody_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers, two listeners: both workers are acceptors and no client is served.
    It was silent (the config check's H1); the pool now says why, once."""
    import logging

    from weft_core.testing import WAIT, wait_until

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"hi\n")

    caplog.set_level(logging.WARNING, logger="weft.pool")
    server = Server(
        handle, manager="pool", manager_options={"workers": 2},
        bind=["127.0.0.1:0", "127.0.0.1:0"],
    )  # fmt: skip
    server.run()
    try:
        port = int(server.addresses[0].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            wait_until(
                lambda: any("workers have been busy" in r.getMessage() for r in caplog.records),
                what="the pool's warning",
            )
    finally:
        server.stop(timeout=2)
    (record,) = [r for r in caplog.records if r.name == "weft.pool"]
    assert "the listeners plus one" in record.getMessage()
