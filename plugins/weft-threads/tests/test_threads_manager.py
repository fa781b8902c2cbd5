"""threads-specific behaviour; the shared contract is in weft_core's conformance suite."""

from __future__ import annotations

import contextvars
import functools
import gc
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable

import pytest

from weft_core import (
    ConfigError,
    ManagerFullError,
    Server,
    available_managers,
    create_manager,
    shutdown_requested,
)
from weft_core.testing import wait_until
from weft_threads import (
    DEFAULT_IDLE_EXPIRY,
    DEFAULT_IDLE_THREADS,
    IDLE_THREAD_NAME,
    ThreadManager,
)

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


# -- idle threads: reuse, isolation, expiry, the bound, close ------------------------------


def _run(manager: ThreadManager, thunk: Callable[[], object], name: str = "") -> None:
    """Run ``thunk`` as a task named ``name`` and wait for it to have returned."""
    finished = threading.Event()

    def task() -> None:
        try:
            thunk()
        finally:
            finished.set()

    task.__name__ = name or "weft test task"
    manager.add_task(task)
    assert finished.wait(WAIT), "the task ran"


def _parked(manager: ThreadManager, n: int) -> None:
    wait_until(lambda: manager.idle() == n, what=f"{n} idle thread(s)")


def test_sequential_connections_are_served_by_the_same_thread() -> None:
    """A thread whose connection ended serves the next one instead of exiting."""
    manager = ThreadManager()
    threads: list[threading.Thread] = []

    def handler(conn: socket.socket) -> None:
        threads.append(threading.current_thread())
        conn.sendall(conn.recv(16))

    server = Server(handler, manager=manager)
    server.run()
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT) as c:
                c.sendall(b"ping")
                assert c.recv(16) == b"ping"
            _parked(manager, 1)  # the acceptor holds a thread of its own, not idle
        assert threads[0] is threads[1], "the second connection reused the first's thread"
    finally:
        assert server.stop(timeout=WAIT) is True
        manager.close()


def test_contextvars_do_not_leak_into_the_next_task_on_a_thread() -> None:
    """Each task runs in its own caller's context, even on a reused thread."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    manager = ThreadManager()
    seen: list[tuple[threading.Thread, str]] = []

    def first() -> None:
        var.set("set by the first task")
        seen.append((threading.current_thread(), var.get()))

    def second() -> None:
        seen.append((threading.current_thread(), var.get()))

    def from_a_caller_that_set_it() -> None:
        var.set("set by the caller")
        _run(manager, second)

    _run(manager, first)
    _parked(manager, 1)
    _run(manager, second)
    _parked(manager, 1)
    contextvars.copy_context().run(from_a_caller_that_set_it)
    manager.close()
    assert seen[0][0] is seen[1][0] is seen[2][0], "one thread ran the three tasks"
    assert [value for _, value in seen] == [
        "set by the first task",
        "unset",
        "set by the caller",
    ]


def test_a_reused_thread_takes_each_task_name() -> None:
    """The thread is named after the task it runs, and says it is idle in between."""
    manager = ThreadManager()
    seen: list[tuple[threading.Thread, str]] = []

    def record() -> None:
        seen.append((threading.current_thread(), threading.current_thread().name))

    _run(manager, record, "weft conn 127.0.0.1:1111")
    _parked(manager, 1)
    assert seen[0][0].name == IDLE_THREAD_NAME
    _run(manager, record, "weft conn 127.0.0.1:2222")
    manager.close()
    assert seen[0][0] is seen[1][0]
    assert [name for _, name in seen] == ["weft conn 127.0.0.1:1111", "weft conn 127.0.0.1:2222"]


@pytest.mark.timeout(30)
def test_an_idle_thread_exits_after_idle_expiry() -> None:
    """An idle thread no task comes for exits once idle_expiry has passed, not before."""
    expiry = 0.3
    manager = ThreadManager(idle_expiry=expiry)
    ran: list[tuple[threading.Thread, float]] = []
    _run(manager, lambda: ran.append((threading.current_thread(), time.monotonic())))
    thread, ended = ran[0]
    thread.join(WAIT)
    assert not thread.is_alive(), "the idle thread exited"
    assert time.monotonic() - ended >= expiry, "it waited idle_expiry for a task first"
    assert manager.idle() == 0


def test_a_burst_leaves_at_most_idle_threads_idle() -> None:
    """Past a burst, idle_threads threads stay idle and the rest exit."""
    manager = ThreadManager(idle_threads=3, idle_expiry=60)
    gate = threading.Event()
    threads: list[threading.Thread] = []
    started = threading.Semaphore(0)
    burst = 10

    def task() -> None:
        threads.append(threading.current_thread())
        started.release()
        gate.wait(WAIT)

    for _ in range(burst):
        manager.add_task(task)
    for _ in range(burst):
        assert started.acquire(timeout=WAIT)
    assert len(set(threads)) == burst, "no task waited for another: each got a thread"
    gate.set()
    wait_until(lambda: not manager.all_tasks(), what="the burst to end")
    wait_until(
        lambda: sum(t.is_alive() for t in threads) == 3 == manager.idle(),
        what="3 idle threads and no other left",
    )
    manager.close()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "close() ended the idle threads"


def test_close_ends_idle_threads_and_add_task_works_after() -> None:
    """close() ends idle threads at once (not after idle_expiry); later tasks still run."""
    manager = ThreadManager(idle_expiry=600)
    ran: list[threading.Thread] = []
    _run(manager, lambda: ran.append(threading.current_thread()))
    _parked(manager, 1)
    manager.close()
    ran[0].join(WAIT)
    assert not ran[0].is_alive(), "close() ended the idle thread"
    assert manager.idle() == 0
    _run(manager, lambda: ran.append(threading.current_thread()))
    _parked(manager, 1)  # kept idle again after close
    manager.runtime.close()  # what the server calls, on a manager it made by name
    ran[1].join(WAIT)
    assert not ran[1].is_alive(), "closing the runtime ends the idle threads"


def test_a_server_that_made_its_manager_ends_its_idle_threads_when_it_stops() -> None:
    """A server given the manager by name leaves no idle thread behind once stopped."""
    threads: list[threading.Thread] = []
    served = threading.Event()

    def handler(conn: socket.socket) -> None:
        threads.append(threading.current_thread())
        conn.sendall(b"hi")
        served.set()

    server = Server(handler, manager="threads", manager_options={"idle_expiry": 600})
    server.run()
    with socket.create_connection(("127.0.0.1", int(server.port)), timeout=WAIT) as client:
        assert client.recv(2) == b"hi"
    assert served.wait(WAIT)
    assert server.stop(timeout=WAIT) is True
    threads[0].join(WAIT)
    assert not threads[0].is_alive(), "the connection's thread is gone after stop()"


def test_idle_threads_0_starts_a_thread_per_task() -> None:
    """idle_threads=0: a new thread for every task, which exits when its task ends."""
    manager = ThreadManager(idle_threads=0)
    ran: list[threading.Thread] = []
    for _ in range(2):
        _run(manager, lambda: ran.append(threading.current_thread()))
        ran[-1].join(WAIT)
        assert not ran[-1].is_alive(), "the thread exited with its task"
    assert ran[0] is not ran[1]
    assert manager.idle() == 0


def test_options_through_create_manager() -> None:
    """idle_threads and idle_expiry are manager options (``-o idle_threads=0``)."""
    manager = create_manager("threads", idle_threads=0, idle_expiry=0.5)
    assert isinstance(manager, ThreadManager)
    assert (manager.idle_threads, manager.idle_expiry) == (0, 0.5)
    default = ThreadManager()
    assert (default.idle_threads, default.idle_expiry) == (
        DEFAULT_IDLE_THREADS,
        DEFAULT_IDLE_EXPIRY,
    )
    with pytest.raises(ConfigError, match="idle_threads must be 0 or more"):
        create_manager("threads", idle_threads=-1)
    with pytest.raises(ConfigError, match="idle_threads must be an integer"):
        create_manager("threads", idle_threads="many")
    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="idle_expiry must be a positive number"):
            create_manager("threads", idle_expiry=bad)


@pytest.mark.timeout(60)
def test_no_task_is_lost_when_a_hand_off_meets_an_expiry() -> None:
    """With a tiny idle_expiry, idle threads time out as tasks are handed to them: all run."""
    manager = ThreadManager(idle_threads=2, idle_expiry=0.0005)
    submitters, per_submitter = 4, 150
    threads: set[threading.Thread] = set()
    failures: list[str] = []

    def submit(n: int) -> None:
        for i in range(per_submitter):
            done = threading.Event()

            def task(done: threading.Event = done) -> None:
                threads.add(threading.current_thread())
                done.set()

            manager.add_task(task)
            if not done.wait(WAIT):
                failures.append(f"submitter {n}: task {i} never ran")
                return
            # Vary the gap so that hand-offs land before, at and after the expiry.
            time.sleep((i % 5) * 0.0002)

    workers = [threading.Thread(target=submit, args=(n,)) for n in range(submitters)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT * 3)
    assert failures == []
    wait_until(lambda: not manager.all_tasks(), what="every task to be forgotten")
    manager.close()
    assert len(threads) < submitters * per_submitter, "threads were reused"


def test_an_idle_thread_holds_nothing_of_its_last_task() -> None:
    """An idle thread keeps neither the last thunk (a connection) nor its context alive."""
    manager = ThreadManager(idle_expiry=600)

    class Thunk:
        __name__ = "weft test thunk"

        def __init__(self) -> None:
            self.ran = threading.Event()

        def __call__(self) -> None:
            self.ran.set()

    thunk = Thunk()
    ran = thunk.ran
    ref = weakref.ref(thunk)
    manager.add_task(thunk)
    del thunk
    assert ran.wait(WAIT)
    _parked(manager, 1)
    gc.collect()
    assert ref() is None, "the idle thread let go of the thunk"
    manager.close()


CHILD = """
import os, threading, sys
from weft_threads import ThreadManager
manager = ThreadManager(idle_expiry=600)
ran = threading.Event()
manager.add_task(ran.set)
assert ran.wait(10)
while manager.idle() != 1:
    threading.Event().wait(0.01)
pid = os.fork()
if pid == 0:
    ran.clear()
    manager.add_task(ran.set)
    os._exit(0 if ran.wait(10) and manager.idle() <= 1 else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_hand_tasks_to_its_parents_idle_threads() -> None:
    """After fork, the parent's idle threads are gone: the child starts its own."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_most_recently_idled_thread_is_reused_first() -> None:
    """LIFO: the newest idle thread (warm stack) takes the next task; older ones expire."""
    manager = ThreadManager(idle_expiry=600)
    gates = {"older": threading.Event(), "newer": threading.Event()}
    started = threading.Semaphore(0)
    threads: dict[str, threading.Thread] = {}

    def hold(which: str) -> None:
        threads[which] = threading.current_thread()
        started.release()
        gates[which].wait(WAIT)

    for which in gates:
        manager.add_task(functools.partial(hold, which))
    for _ in gates:
        assert started.acquire(timeout=WAIT)
    gates["older"].set()
    _parked(manager, 1)
    gates["newer"].set()
    _parked(manager, 2)
    ran: list[threading.Thread] = []
    _run(manager, lambda: ran.append(threading.current_thread()))
    manager.close()
    assert ran[0] is threads["newer"] is not threads["older"]
