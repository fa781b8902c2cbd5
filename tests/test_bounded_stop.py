"""`weft serve` stops within --graceful-timeout plus the stop's grace, however stuck.

Handlers that ignore their shutdown flag, end of input and interruption alike (and
on gevent and trio block the runtime's loop) make the stop leave them behind: the
process still exits by the bound, with status 4 (EXIT_TASKS_LEFT), saying how many
it left. On gevent, monkey-patched by weft serve, the first handler blocks the main
thread itself: the signal handler arms a last-resort exit (``_deadline``) that dumps
every thread's stack, the culprit's among them. The Server-level
promise, on every manager, is in the conformance suite (``StopTests``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _fault_support import WeftServe
from _serving import READY
from _stuck_handlers import runtime_sleep

from weft_core import Server, available_managers, current_task, shutdown_requested
from weft_core._cli import DEADLINE_MARGIN
from weft_core._engine import STOP_GRACE
from weft_core._exits import EXIT_TASKS_LEFT
from weft_core._registry import get_manager_spec
from weft_core.testing import WAIT, wait_until

MANAGERS = sorted(available_managers())
#: The managers whose loop a handler can spin through its cancellation.
ASYNC_LOOPS = [m for m in ("trio", "asyncio") if m in MANAGERS]
#: The CPUs this test process may run on, as it started.
CPUS = os.sched_getaffinity(0)

#: What a loaded 2-core machine may add to the promised bound: starting the stop
#: after the signal, and the interpreter's exit.
SLACK = 2.0
GRACEFUL = 2.0


@pytest.fixture(params=MANAGERS)
def manager(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def _terminated(
    proc: WeftServe, clients: list[socket.socket], count: int, all_said: bool = True
) -> tuple[int, float]:
    """Connect ``count`` clients to ``proc``, each handler saying ``+`` (only the first,
    with ``all_said`` False: on a loop the first blocks the rest), then SIGTERM: the
    exit status and the seconds from the signal to the exit. The process is killed
    at the end, whatever happened."""
    try:
        port = proc.port()
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
            if all_said:
                assert clients[-1].recv(1) == b"+", "the handler is running"
        if not all_said:
            assert clients[0].recv(1) == b"+", "the handler is running"
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.exit_code(timeout=GRACEFUL + STOP_GRACE + SLACK + WAIT)
        return code, time.monotonic() - began
    finally:
        proc.close()


@pytest.mark.timeout(60)
def test_weft_serve_exits_by_its_bound_with_ten_stuck_handlers(
    manager: str, tmp_path: Path, clients: list[socket.socket]
) -> None:
    """SIGTERM with 10 stuck handlers: exit 4 within --graceful-timeout + STOP_GRACE."""
    target = "_stuck_handlers:" + (
        "stuck_async" if get_manager_spec(manager).handler_kind == "async" else "stuck"
    )
    proc = WeftServe(
        target, "--manager", manager, "--bind", "127.0.0.1:0",
        "--graceful-timeout", f"{GRACEFUL:g}", cwd=tmp_path,
    )  # fmt: skip
    # Every handler runs on threads; on a loop the first blocks it, and the rest wait.
    code, took = _terminated(proc, clients, 10, all_said=False)
    assert code == EXIT_TASKS_LEFT, f"exit status {code}; stderr:\n{proc.stderr}"
    assert took < GRACEFUL + STOP_GRACE + SLACK, (
        f"weft serve took {took:.2f}s to exit (bound {GRACEFUL + STOP_GRACE:g}s plus slack)"
    )
    assert "are abandoned (exit status 4)" in proc.stderr
    assert "left behind" in proc.stderr
    if manager == "gevent":
        # weft serve monkey-patches: the handlers run in the main thread's hub, which
        # the first one blocks, so no stop can run; the last resort exits by the bound
        # and dumps every thread's stack, the culprit's with it.
        assert "a handler blocks the main thread" in proc.stderr
        assert "in stuck" in proc.stderr, "the culprit's stack names the handler"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ASYNC_LOOPS)
def test_a_handler_swallowing_its_cancellation_does_not_starve_the_stop(
    manager: str, tmp_path: Path, clients: list[socket.socket]
) -> None:
    """SIGTERM with 3 handlers that swallow their cancellation in a loop. Promise: the
    stop's own exit, status 4, before its last resort (the bound plus
    DEADLINE_MARGIN) would act. Seen on trio: the loop, spinning through its
    zero-timeout polls, took the GIL back from every waiter on the other CPU; the
    stop's thread waited 0.1-1.5 s for each take of it, exits came 4.5-5.5 s after
    the signal (bound 4), one in three by the last resort, some by faulthandler's
    backstop (status 1)."""
    proc = WeftServe(
        "_stuck_handlers:swallowing_async", "--manager", manager, "--bind", "127.0.0.1:0",
        "--graceful-timeout", f"{GRACEFUL:g}", cwd=tmp_path,
    )  # fmt: skip
    code, took = _terminated(proc, clients, 3)
    assert code == EXIT_TASKS_LEFT, f"exit status {code}; stderr:\n{proc.stderr}"
    assert "did not end within" not in proc.stderr, "the last resort had to act"
    assert "3 task(s) ignored it and are abandoned (exit status 4)" in proc.stderr
    assert took < GRACEFUL + STOP_GRACE + DEADLINE_MARGIN, (
        f"weft serve took {took:.2f}s to exit; its last resort acts at "
        f"{GRACEFUL + STOP_GRACE + DEADLINE_MARGIN:g}s"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("manager", "handler", "loop"),
    [
        ("threads", "starts_a_thread", None),
        ("asyncio", "awaits_to_thread", "asyncio"),
        ("asyncio", "awaits_to_thread", "uvloop"),
    ],
)
def test_a_thread_left_running_does_not_hold_the_exit_past_its_bound(
    manager: str, handler: str, loop: str | None, tmp_path: Path, clients: list[socket.socket]
) -> None:
    """A handler's thread that is not a daemon and never ends: one it started itself, or
    a call in asyncio's executor (``asyncio.to_thread``). Seen (the asyncio-app outside
    check): the stop ended within its bound, then Python's exit waited for the thread
    (``concurrent.futures`` joins its executors' threads at exit): ``weft serve`` exited
    11.75 s after SIGTERM (bound 4), with status 0, and a thread that never ends kept it
    for good. Now it exits by the bound, status 4, saying why."""
    if manager not in MANAGERS:
        pytest.skip(f"weft-{manager} is not installed")
    options = ("-o", f"loop={loop}") if loop else ()
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    proc = WeftServe(
        f"_stuck_handlers:{handler}", "--manager", manager, *options,
        "--bind", "127.0.0.1:0", "--graceful-timeout", f"{GRACEFUL:g}", cwd=tmp_path,
    )  # fmt: skip
    code, took = _terminated(proc, clients, 1)
    assert code == EXIT_TASKS_LEFT, f"exit status {code}; stderr:\n{proc.stderr}"
    assert took < GRACEFUL + STOP_GRACE + DEADLINE_MARGIN + SLACK, (
        f"weft serve took {took:.2f}s to exit (bound {GRACEFUL + STOP_GRACE:g}s plus slack)"
    )
    assert "the stop ended, but the process did not exit within its bound" in proc.stderr
    if manager == "asyncio":
        assert "1 call(s) still run in the asyncio loop's executor" in proc.stderr
        assert "did not close within" not in proc.stderr, "the runtime's close waited"


@contextlib.contextmanager
def _embedded(
    handler: Any, manager: str, clients: int, started: threading.Semaphore
) -> Iterator[tuple[Server, list[socket.socket]]]:
    """A running Server, and ``clients`` clients whose handlers each released ``started``.

    The clients are closed when the block ends (after its own cleanup: a gate set).
    """
    server = Server(handler, manager=manager, bind="127.0.0.1:0")
    server.run()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
            for _ in range(clients)]  # fmt: skip
    try:
        for _ in held:
            assert started.acquire(timeout=WAIT), "every client's handler started"
        yield server, held
    finally:
        for client in held:
            client.close()


def _swallowing(gate: threading.Event, started: threading.Semaphore) -> Any:
    """An async handler that swallows every cancellation in a loop until ``gate``."""

    async def swallowing(stream: Any) -> None:
        sleep = runtime_sleep()
        started.release()
        while not gate.is_set():
            try:
                await sleep(0.05)
            except BaseException:  # the point: a handler that will not stop
                pass

    return swallowing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ASYNC_LOOPS)
def test_server_stop_keeps_its_bound_with_tasks_spinning_through_their_cancellation(
    manager: str,
) -> None:
    """An embedded Server; 3 handlers swallow their cancellation in a loop; stop(0.5),
    three times. Promise: each stop returns within 0.5 s plus STOP_GRACE (and a
    second for a loaded machine), and the threads get their CPUs back.
    Seen on trio before the stop put its threads on one CPU: 2.90-3.26 s where the
    bound was 2.5, the stopping thread waiting 0.1-1.5 s for each take of the GIL."""
    for _ in range(3):
        gate, started = threading.Event(), threading.Semaphore(0)
        with _embedded(_swallowing(gate, started), manager, 3, started) as (server, _):
            try:
                began = time.monotonic()
                clean = server.stop(0.5)
                took = time.monotonic() - began
            finally:
                gate.set()  # the loops end, and the runtime can close
        manager_ = server.task_manager
        wait_until(lambda m=manager_: not m.all_tasks(), what="the swallowing tasks to end")
        manager_.runtime.close()
        assert clean is False and server.stats()["left_behind"] == 3
        assert took < 0.5 + STOP_GRACE + 1.0, (
            f"stop(0.5) took {took:.2f}s with 3 tasks spinning through their cancellation "
            f"(bound {0.5 + STOP_GRACE:g}s)"
        )
        assert os.sched_getaffinity(0) == CPUS, "an embedder's threads get their CPUs back"


def _registers_a_blocking_callback(
    manager: str, kind: str, gate: threading.Event, started: threading.Semaphore
) -> Any:
    """A handler that registers a ``kind`` callback blocking until ``gate``, then idles."""

    def register() -> None:
        task = current_task()
        assert task is not None
        (task.on_shutdown if kind == "shutdown" else task.on_interrupt)(lambda: gate.wait(WAIT))
        started.release()

    if get_manager_spec(manager).handler_kind == "async":

        async def handler_async(stream: Any) -> None:
            register()
            sleep = runtime_sleep()
            while not gate.is_set():
                await sleep(0.05)

        return handler_async

    def handler(conn: Any) -> None:
        register()
        while not gate.is_set() and conn.recv(1):  # ends once the stop shuts the socket
            pass

    return handler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["shutdown", "interrupt"])
def test_server_stop_keeps_its_bound_when_task_callbacks_block(manager: str, kind: str) -> None:
    """An embedded Server; 4 handlers each register an on_shutdown or on_interrupt
    callback that blocks (a put() on a full queue); stop(0.5). Promise: stop returns
    within 0.5 s plus STOP_GRACE (and a second for a loaded machine), and every client sees
    its connection end. Seen: the callbacks ran one after another in the stopping
    thread: 4 blocking 3 s made stop(1) take 12-13 s, and on threads a subscriber's
    put() on a full queue in its on_shutdown callback held stop(1) for ever."""
    gate, started = threading.Event(), threading.Semaphore(0)
    handler = _registers_a_blocking_callback(manager, kind, gate, started)
    with _embedded(handler, manager, 4, started) as (server, clients):
        try:
            began = time.monotonic()
            server.stop(0.5)
            took = time.monotonic() - began
            ended = all(client.recv(1) == b"" for client in clients)
        finally:
            gate.set()
    server.wait(WAIT)
    assert took < 0.5 + STOP_GRACE + 1.0, (
        f"stop(0.5) took {took:.2f}s with 4 blocking {kind} callbacks (bound "
        f"{0.5 + STOP_GRACE:g}s): the callbacks must not hold the stop"
    )
    assert ended, "every client sees its connection end"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", [m for m in ("threads", "gevent") if m in MANAGERS])
def test_a_shutdown_callback_that_blocks_costs_only_its_own_connection(manager: str) -> None:
    """Ten subscribers parked on the runtime's own primitive, woken by their shutdown
    callback, and three whose callback blocks (its subscriber stalled, a put() on its
    full inbox: managers.md's example). stop(6): the ten end within a second a blocked
    callback, not at the graceful timeout. On gevent, phase 2 ran every callback as
    one batch in the hub, and the ten behind a blocked one waited the whole 6 s (the
    long-poll probe)."""
    runtime: list[Any] = []

    def handler(conn: Any) -> None:
        task = current_task()
        assert task is not None
        parked = runtime[0].slots(1)
        parked.acquire()
        if conn.recv(1) == b"S":  # stalled: its callback waits on what never frees
            task.on_shutdown(lambda: parked.acquire(timeout=WAIT))
            conn.sendall(b"+")
            conn.recv(1)  # until the stop ends its input
            return
        task.on_shutdown(parked.release)
        conn.sendall(b"+")
        parked.acquire()  # parked until its callback frees it

    server = Server(handler, manager=manager, bind="127.0.0.1:0")
    runtime.append(server.task_manager.runtime)
    server.run()
    kinds = [b"S"] * 3 + [b"H"] * 10
    clients = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) for _ in kinds]
    try:
        for client, kind in zip(clients, kinds, strict=True):
            client.sendall(kind)
            assert client.recv(1) == b"+"
        stopping = threading.Thread(target=server.stop, args=(6,))
        began = time.monotonic()
        stopping.start()
        ended = []
        for client in clients[3:]:
            assert client.recv(1) == b""
            ended.append(time.monotonic() - began)
        stopping.join(WAIT + 6)
    finally:
        for client in clients:
            client.close()
    assert max(ended) < 3 * 1.0 + 1.0, f"the ten ended after {max(ended):.2f}s (stop(6))"


@pytest.mark.timeout(60)
def test_a_second_sigterm_quits_at_once_with_the_main_thread_stuck(
    tmp_path: Path, clients: list[socket.socket]
) -> None:
    """gevent, patched: the first SIGTERM cannot start a stop; the next one still quits."""
    proc = WeftServe(
        "_stuck_handlers:stuck", "--manager", "gevent", "--bind", "127.0.0.1:0",
        "--graceful-timeout", "30", cwd=tmp_path,
    )  # fmt: skip
    try:
        clients.append(socket.create_connection(("127.0.0.1", proc.port()), timeout=WAIT))
        assert clients[0].recv(1) == b"+", "a stuck handler is running"
        began = time.monotonic()
        code = None
        while code is None and time.monotonic() - began < 10:
            proc.signal(signal.SIGTERM)  # two arriving at once count as one: repeat
            try:
                code = proc.exit_code(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.close()
    assert code == -signal.SIGTERM, f"exit status {code}; stderr:\n{proc.stderr}"


def _server_sides(peers: set[Any]) -> list[int]:
    """This process's descriptors of sockets connected to one of ``peers``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.getpeername() in peers:
                    found.append(int(name))
        except OSError:  # closed meanwhile, or not connected
            continue
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ASYNC_LOOPS)
def test_a_stop_closes_connections_whose_task_never_started_behind_a_blocked_loop(
    manager: str,
) -> None:
    """The first handler blocks the loop (a plain wait); five more clients were
    accepted with it and their tasks never start. Promise: once stop() returns, no
    descriptor of those five is open, the blocked one's aside. Seen on trio: all six
    stayed open until the loop was free, and "weft close failed" (RuntimeError: must
    be called from async context) was logged."""
    gate, first = threading.Event(), threading.Event()

    async def handler(stream: Any) -> None:
        if not first.is_set():
            first.set()
            gate.wait(WAIT)  # blocks the loop
        await stream.send_all(b"served")

    server = Server(handler, manager=manager, bind="127.0.0.1:0")
    server.run()
    clients = [socket.socket() for _ in range(6)]
    try:
        for client in clients:  # all at once: accepted in one batch, before any task runs
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", server.port))
        assert first.wait(WAIT), "the first handler runs"
        # The rest of the batch is taken in that turn, or never; nothing tells which
        # while the loop is blocked (connections() asks the loop). A client still in
        # the backlog only makes the test weaker, never fail: its reset leaves no
        # descriptor here.
        time.sleep(0.3)
        assert server.stop(0.5) is False
        open_ = _server_sides({client.getsockname() for client in clients})
        assert len(open_) <= 1, (
            f"{len(open_)} of 6 connections' descriptors are still open after stop(), "
            "where only the blocked task's may be"
        )
    finally:
        gate.set()
        for client in clients:
            client.close()


def _parked_or_computing(conn: Any) -> None:
    """Parked until the stop (the documented wake-up), or, sent ``compute``, busy in
    Python until its shutdown is asked for: a CPU-bound handler that honours it."""
    state = current_task()
    assert state is not None
    if conn.recv(16) == b"compute":
        while not shutdown_requested():
            sum(range(1000))
        return
    woken = threading.Event()
    state.on_shutdown(woken.set)
    conn.sendall(b"parked\n")
    woken.wait()


@pytest.mark.serial
@pytest.mark.timeout(120)
def test_a_stop_keeps_its_bound_beside_cpu_bound_handler_threads() -> None:
    """2,000 connections parked on threads and eight handlers computing in Python, then
    stop(2). The stopping thread makes a system call per connection (its input ended,
    its socket shut down) and, after each, waited for the GIL behind the computing
    threads, up to the 5 ms switch interval each time (the convoy; the long-poll
    probe saw stop(3) take 9-20 s beside thousands of busy threads); and
    ``threading.Thread.start()`` in the stop waited, unbounded, for a new thread's
    first turn at the GIL."""
    parked, computing = 2000, 8
    server = Server(_parked_or_computing, manager="threads", max_connections=4000, backlog=4096)
    server.run()
    clients: list[socket.socket] = []
    try:
        for _ in range(parked):
            client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
            client.sendall(b"park")
            clients.append(client)
        for client in clients:
            assert client.recv(16) == b"parked\n"
        for _ in range(computing):
            client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
            client.sendall(b"compute")
            clients.append(client)
        wait_until(lambda: server.stats()["active"] == parked + computing, what="every handler")
        began = time.monotonic()
        server.stop(2)
        took = time.monotonic() - began
    finally:
        server.stop(0)
        for client in clients:
            client.close()
    assert took <= 2 + STOP_GRACE, f"stop(2) took {took:.2f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("late", [signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2])
def test_a_control_signal_in_the_last_moments_does_not_kill_a_clean_exit(
    late: int, workers: str, tmp_path: Path
) -> None:
    """SIGTERM, then the signal every 2 ms until the process has exited (logrotate's
    USR1 meeting a stop, a reload meeting a retire). Seen (the soak check): once the
    serving's handlers were gone, the signal's default action killed the process:
    exit -10 for USR1 in 20 of 20 rounds, -1 for HUP, -12 for USR2, where the stop had
    ended cleanly (a supervisor's too, 12 of 12); systemd marks such a unit failed. Now
    the exit is 0. And a HUP pending with the TERM was acted on first (Python runs
    pending handlers in signal number order): one process became a supervisor and
    served on, its TERM unread (3 runs in 8); the stop now wins."""
    proc = WeftServe(
        "_stuck_handlers:starts_nothing", "--manager", "threads", "--bind", "127.0.0.1:0",
        "--workers", workers, cwd=tmp_path,
    )  # fmt: skip
    try:
        proc.port()
        if workers != "1":
            # The workers' stops are the last moments this test is about; a supervisor
            # says "listening" before its workers are up.
            proc.served.wait_for(READY, count=int(workers))
        proc.signal(signal.SIGTERM)
        while proc.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.proc.pid, late)
            time.sleep(0.002)
        code = proc.exit_code()
    finally:
        proc.close()
    assert code == 0, f"exit status {code}; stderr:\n{proc.stderr}"


@pytest.mark.skipif(len(CPUS) < 2, reason="one CPU: no convoy to pin against")
def test_a_stop_interrupts_on_one_cpu_with_short_switches_and_undoes_both() -> None:
    """What keeps a stop's bound among threads trading the GIL, seen from inside it.

    The whole stop runs with the GIL's switch interval at ``STOP_SWITCH_INTERVAL``
    (the stopping thread waited up to 5 ms behind each of thousands of busy threads
    for its turn: ``stop(3)`` took 9-20 s), and its interrupting part with every
    thread on one CPU (a loop polling with a zero timeout won the GIL back from a
    waiter woken on another CPU: a stop bounded at 2.5 s took 2.9-3.3 s). Both are
    undone after. The stops those faults slowed passed on machines where the convoy
    does not form (an outside check reverted each and the timed tests held), so
    this looks at the two settings themselves, from a task's callbacks."""
    from weft_core._osthreads import STOP_SWITCH_INTERVAL

    seen: dict[str, Any] = {}
    started, interrupted = threading.Event(), threading.Event()

    def at_interrupt() -> None:
        tasks = [int(tid) for tid in os.listdir("/proc/self/task")]
        seen["cpus"] = {tid: frozenset(os.sched_getaffinity(tid)) for tid in tasks}
        seen["switch at interrupt"] = sys.getswitchinterval()
        interrupted.set()

    def deaf(conn: socket.socket) -> None:
        task = current_task()
        assert task is not None
        task.on_shutdown(lambda: seen.setdefault("switch at shutdown", sys.getswitchinterval()))
        task.on_interrupt(at_interrupt)
        started.set()
        interrupted.wait(WAIT)  # deaf to the shutdown: only the interrupt ends it

    switch_before = sys.getswitchinterval()
    server = Server(deaf, manager="threads")
    server.run()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT):
            assert started.wait(WAIT)
            assert server.stop(timeout=0.2) is False  # it had to interrupt
    finally:
        server.stop(timeout=0)
    assert seen["switch at shutdown"] == pytest.approx(STOP_SWITCH_INTERVAL, abs=1e-6)
    assert seen["switch at interrupt"] == pytest.approx(STOP_SWITCH_INTERVAL, abs=1e-6)
    pinned = set(seen["cpus"].values())
    assert len(pinned) == 1 and len(next(iter(pinned))) == 1, seen["cpus"]
    # Put back: it stayed at 0.2 ms for the process's life after any stop (the
    # undo compared with 0.0002, which Python reads back as 0.00019999999999999998).
    assert sys.getswitchinterval() == switch_before
    assert os.sched_getaffinity(0) == CPUS


def test_a_stop_step_keeps_its_bound_while_its_thread_waits_for_a_first_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Thread.start()`` waits, with no bound, for the new thread's first turn at
    the GIL: among thousands of busy handler threads that took 15 s of a stop bounded
    at 5. A stop's step that needs a thread (``call_within``) must still give up on
    time. The timed test of that scene passed with the fix reverted (an outside check
    of the tests: its 2,000 threads did not make the wait long here), so the start is
    held here on purpose."""
    from weft_core._engine import call_within

    release, ran = threading.Event(), threading.Event()
    real_start = threading.Thread.start

    def first_turn_never_comes(self: threading.Thread) -> None:
        release.wait(WAIT)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", first_turn_never_comes)
    began = time.monotonic()
    try:
        assert call_within(ran.set, 0.2, "weft test: a stop's step") is False
        took = time.monotonic() - began
    finally:
        release.set()
    assert took < 0.2 + 1.0, f"call_within(wait=0.2) returned after {took:.2f}s"
    assert ran.wait(WAIT), "the step runs once its thread has started"
