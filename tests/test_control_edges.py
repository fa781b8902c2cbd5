"""Live control and the stop at their edges, as an outside check tried to break them.

Each test names the promise (where it is made) and breaks it the way a user would:
a stop's bound against a ``submit()``ted call deaf to cancellation, a second Ctrl-C
during a stop, a signal handler calling live control while its thread is inside
it, a pause that cannot end its acceptor at once because the loop is busy, a
handler's pauses racing a plain thread's resume, a pause while a client waits for
a slot, two ``close_connection`` calls on one connection. Real sockets on loopback,
bounded waits; a scenario whose failure would hang the calling thread runs in a
child process with a timeout.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _every_manager import greeter

from weft_core import Server, available_managers
from weft_core._engine import STOP_GRACE

REPO = Path(__file__).resolve().parent.parent
#: Generous bound for anything that should happen "at once".
WAIT = 5.0
#: How long past a stop's own bound (timeout + STOP_GRACE) a slow CI machine may take.
SLACK = 1.5
#: Managers whose loop a handler can block (one thread runs every task).
LOOP_MANAGERS = ("asyncio", "gevent", "trio")
ALL_MANAGERS = ("asyncio", "gevent", "threads", "trio")


def _need(manager: str) -> None:
    if manager not in available_managers():
        pytest.skip(f"the {manager} manager is not installed")


def _async(manager: str) -> bool:
    return manager in ("asyncio", "trio")


def _connect(port: int | str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(port)), timeout=WAIT)


def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def _run_child(script: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run ``script`` in a fresh interpreter; None if it did not end within ``timeout``."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None


# -- the stop's bound --------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("manager", ["asyncio", "trio"])
def test_stop_is_bounded_when_a_submitted_call_ignores_cancellation(manager: str) -> None:
    """stop(timeout) returns by timeout + STOP_GRACE though a submit()ted call never ends.

    Promised: Server.stop ("within timeout plus STOP_GRACE seconds however many
    tasks are stuck"). A submitted call is no connection's: the stop cancels it
    with the runtime's close, and a call deaf to that held the close, and the stop,
    for as long as it ran.
    """
    _need(manager)
    release = threading.Event()

    if manager == "trio":
        import trio

        async def stubborn() -> None:
            with trio.CancelScope(shield=True):
                while not release.is_set():
                    await trio.sleep(0.02)

        async def idle(stream: Any) -> None:
            await stream.receive_some(1)
    else:

        async def stubborn() -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(0.02)
                except asyncio.CancelledError:
                    pass  # deaf to the stop

        async def idle(stream: Any) -> None:
            await stream.receive_some(1)

    server = Server(idle, manager=manager)
    server.run()
    server.submit(stubborn)
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(server.stop(timeout=0.5)))
    began = time.monotonic()
    stopper.start()
    stopper.join(0.5 + STOP_GRACE + SLACK)
    took = time.monotonic() - began
    release.set()  # the stubborn call ends: nothing is left running after the test
    stopper.join(WAIT)
    assert result and took < 0.5 + STOP_GRACE + SLACK, (
        f"stop(timeout=0.5) must return within timeout + STOP_GRACE; it took {took:.1f}s"
    )
    assert server.stopped


@pytest.mark.timeout(30)
def test_a_stop_cut_short_by_keyboardinterrupt_does_not_hang_the_next_stop() -> None:
    """A KeyboardInterrupt while stop() waits: the stop goes on, and the next stop() returns.

    Promised: Server.stop ("Called while another stop is under way, it waits for
    that one and returns its result"), serve_forever ("Ctrl-C stops gracefully").
    A second Ctrl-C during a graceful stop raised out of it and left the server
    half stopped: every later stop() (``with``'s ``__exit__`` among them) waited
    forever. Now the stop carries on in a thread with its graceful phase cut short.
    """
    script = """
        import asyncio, faulthandler, os, signal, socket, threading, time
        from weft_core import Server

        faulthandler.dump_traceback_later(15, exit=True)  # a hang says where it is
        # Ctrl-C raises here whatever the parent (a pytest worker) left to inherit: an
        # ignored or blocked SIGINT crosses exec, and Python then installs no handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

        async def deaf(stream):
            await stream.read(1)
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    pass  # ignores the stop, even its phase 3

        server = Server(deaf, manager="asyncio")
        server.run()
        client = socket.create_connection(("127.0.0.1", server.port))
        client.send(b"x")
        time.sleep(0.2)
        main = threading.main_thread().ident
        threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
        try:
            server.stop()  # graceful, unbounded: waits for the deaf handler
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        done = []
        began = time.monotonic()
        t = threading.Thread(target=lambda: done.append(server.stop(timeout=0.5)), daemon=True)
        t.start()
        t.join(0.5 + 2.0 + 1.5)
        print("second stop returned" if done else "second stop hung", flush=True)
        print("stopped" if server.stopped else "not stopped", flush=True)
        os._exit(0)
    """
    child = _run_child(script, timeout=20)
    assert child is not None, "the child process did not finish"
    assert "interrupted" in child.stdout, child.stdout + child.stderr
    assert "second stop returned" in child.stdout and "not stopped" not in child.stdout, (
        "a stop() after one cut short by KeyboardInterrupt must return within its "
        f"bound, the server stopped; output: {child.stdout!r}"
    )


# -- live control --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_live_control_from_a_signal_handler_does_not_deadlock() -> None:
    """resume_accepting() in a signal handler while the main thread is in pause_accepting().

    Promised: live control "from any thread" (DESIGN section 2). A signal handler
    runs in the main thread between bytecodes; when that thread held the engine's
    control lock (waiting for a busy loop to end the acceptor), a handler calling
    resume_accepting() waited for the lock its own thread held: for good.
    """
    script = """
        import os, signal, socket, threading, time
        from weft_core import Server

        async def busy(stream):
            await stream.read(1)
            time.sleep(1.0)  # keeps the loop busy: the pause waits for the acceptor

        server = Server(busy, manager="asyncio")
        server.run()
        signal.signal(signal.SIGUSR1, lambda *_: server.resume_accepting())
        client = socket.create_connection(("127.0.0.1", server.port))
        client.send(b"x")
        time.sleep(0.1)
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
        server.pause_accepting()
        print("pause returned", flush=True)
        probe = socket.create_connection(("127.0.0.1", server.port))
        print("accepting" if not server.paused else "paused", flush=True)
        server.stop(timeout=1)
        print("stopped", flush=True)
    """
    child = _run_child(script, timeout=10)
    assert child is not None and "stopped" in child.stdout, (
        "resume_accepting() from a SIGUSR1 handler, arriving while the main thread is in "
        "pause_accepting(), must not deadlock the process"
    )
    assert "accepting" in child.stdout, (
        f"the resume, called after the pause began, must win: {child.stdout!r}"
    )


def _blocking_handler(manager: str) -> Any:
    """Answers each byte; ``b`` first blocks the whole loop for 2.5 s (> INTERRUPT_GRACE)."""
    if _async(manager):

        async def blocking(stream: Any) -> None:
            data = await stream.receive_some(1)
            if data == b"b":
                time.sleep(2.5)  # a handler that blocks its loop
            await stream.send_all(data)

        return blocking

    def blocking_sync(conn: Any) -> None:
        data = conn.recv(1)
        if data == b"b":
            time.sleep(2.5)  # unpatched: blocks the hub
        conn.sendall(data)

    return blocking_sync


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", LOOP_MANAGERS)
def test_pause_then_resume_while_the_loop_is_busy_keeps_the_listener(manager: str) -> None:
    """A pause that cannot end its acceptor in time, then a resume: the listener stays open.

    Promised: resume_accepting ("clients waiting in the backlog are served").
    With the loop blocked past INTERRUPT_GRACE, the pause returned with the old
    acceptor alive; once the loop ran again, that acceptor's way out saw the
    server no longer paused and closed the listener its successor accepts on: the
    server stopped itself ("the listening socket is unusable").
    """
    _need(manager)
    server = Server(_blocking_handler(manager), manager=manager)
    server.run()
    try:
        with _connect(server.port) as blocker:
            blocker.send(b"b")
            time.sleep(0.1)  # the handler now blocks the loop
            server.pause_accepting()
            server.resume_accepting()
            assert blocker.recv(1) == b"b", "the blocking handler finished"
        for _ in range(3):  # served after the old acceptor's way out, too
            with _connect(server.port) as late:
                late.send(b"y")
                assert late.recv(1) == b"y", "a client after the resume must be served"
            time.sleep(0.1)
        assert server.error is None and not server.stopped, server.error
    finally:
        server.stop(timeout=1)


def _toggling_handler(manager: str, holder: list[Server]) -> Any:
    """Pauses, resumes and pauses the server, then answers ``k`` and waits for the end."""
    if _async(manager):

        async def toggles(stream: Any) -> None:
            await stream.receive_some(1)
            server = holder[0]
            server.pause_accepting()
            server.resume_accepting()
            server.pause_accepting()
            await stream.send_all(b"k")
            while await stream.receive_some(100):
                pass

        return toggles

    def toggles_sync(conn: Any) -> None:
        conn.recv(1)
        server = holder[0]
        server.pause_accepting()
        server.resume_accepting()
        server.pause_accepting()
        conn.sendall(b"k")
        while conn.recv(100):
            pass

    return toggles_sync


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ALL_MANAGERS)
def test_a_resume_after_a_handlers_pause_is_not_overtaken(manager: str) -> None:
    """A plain thread's resume, called after a handler's pauses returned, wins.

    Promised: pause_accepting ("a resume called after it happens after it").
    Calls from inside a task were queued to a thread while a plain thread's call
    ran at once beside that queue: a resume called last could run before the
    handler's queued pause, and the server ended paused (13-30 rounds in 100).
    """
    _need(manager)
    holder: list[Server] = []
    server = Server(_toggling_handler(manager, holder), manager=manager)
    holder.append(server)
    server.run()
    try:
        for round_ in range(1, 41):
            with _connect(server.port) as client:
                client.send(b"p")
                assert client.recv(1) == b"k"
                server.resume_accepting()  # after every call the handler made
                assert not server.paused, f"round {round_}: the server ended paused"
    finally:
        server.stop(timeout=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", ALL_MANAGERS)
def test_a_pause_does_not_drop_a_client_waiting_for_a_slot(manager: str) -> None:
    """A client accepted and waiting for a slot (full_wait) is served after a pause.

    Promised: full_wait ("seconds to wait for a free slot before refusing"),
    pause_accepting (clients wait, none lost; docs/reliability.md row 24). The pause
    interrupted the acceptor holding that client, whose way out closed it unserved
    and uncounted, though a slot came free within full_wait.
    """
    _need(manager)
    server = Server(greeter(manager), manager=manager, max_connections=1, full_wait=3.0)
    server.run()
    try:
        first = _connect(server.port)
        assert first.recv(1) == b"+"
        with _connect(server.port) as second:
            time.sleep(0.3)  # the acceptor took it and waits (full_wait) for the slot
            server.pause_accepting()
            first.close()  # the slot comes free well within full_wait
            got = second.recv(1)
            server.resume_accepting()
        stats = server.stats()
        assert got == b"+", (
            f"the client waiting for a slot must be served once one frees (got {got!r}; "
            f"accepted={stats['accepted']}, refused={stats['refused']})"
        )
    finally:
        server.stop(timeout=1)


@pytest.mark.timeout(30)
def test_close_connection_twice_at_once_returns_to_both_callers() -> None:
    """Two close_connection() calls on one connection: both get True as it ends in phase 2.

    Promised: close_connection ("True if it ended before phase 3", from any
    thread; ``weft ctl close`` is the same call). The second call's event replaced
    the first's: the first caller waited out its timeout and returned False.
    """

    async def slow_end(stream: Any) -> None:
        while await stream.receive_some(100):
            pass
        await asyncio.sleep(0.3)  # finishing its reply takes a moment after end of input

    server = Server(slow_end, manager="asyncio")
    server.run()
    results: dict[str, tuple[bool, float]] = {}

    def close(name: str, task_id: Any) -> None:
        began = time.monotonic()
        ended = server.close_connection(task_id, timeout=2.0)
        results[name] = (ended, time.monotonic() - began)

    try:
        with _connect(server.port):
            _until(server.connections, "the connection is open")
            [info] = server.connections()
            first = threading.Thread(target=close, args=("first", info.task_id))
            second = threading.Thread(target=close, args=("second", info.task_id))
            first.start()
            time.sleep(0.05)
            second.start()
            second.join(WAIT)
            first.join(1.5)
            answered = dict(results)
            first.join(2.0 + STOP_GRACE + SLACK)
    finally:
        server.stop(timeout=1)
    assert answered.get("second", (False,))[0] is True, f"the second call: {answered}"
    assert answered.get("first", (False,))[0] is True, (
        f"both callers must get True once the connection ended in phase 2: {answered}"
    )


def _loop_blocker(manager: str, seconds: float) -> Any:
    """``b`` blocks the whole loop for ``seconds``, then ends; anything else is held open."""
    if _async(manager):

        async def handler(stream: Any) -> None:
            data = await stream.receive_some(1)
            if data == b"b":
                time.sleep(seconds)  # a handler that blocks its loop
                return
            await stream.send_all(b"+")
            while await stream.receive_some(100):
                pass

        return handler

    def handler_sync(conn: Any) -> None:
        data = conn.recv(1)
        if data == b"b":
            time.sleep(seconds)  # unpatched: blocks the hub
            return
        conn.sendall(b"+")
        while conn.recv(100):
            pass

    return handler_sync


@pytest.mark.timeout(40)
@pytest.mark.parametrize("manager", LOOP_MANAGERS)
def test_a_limit_change_while_the_loop_is_blocked_returns_and_applies_later(manager: str) -> None:
    """``max_connections = n`` from a plain thread returns though a handler blocks the loop.

    Promised: max_connections is settable "from any thread"; a caller (``weft ctl
    limit``, an operator's script) must not hang on a stuck handler. Before, the
    setter waited for the loop with no bound, and every pause, resume or limit
    change queued behind it waited too. The change applies once the loop runs.
    """
    from weft_core._engine import LOOP_ANSWER

    _need(manager)
    block = LOOP_ANSWER + SLACK + 1.0  # outlasts the setter's bound with room to tell
    server = Server(
        _loop_blocker(manager, block), manager=manager, max_connections=10, on_full="refuse"
    )
    server.run()
    try:
        with _connect(server.port) as blocker:
            blocker.send(b"b")
            time.sleep(0.2)  # the handler now blocks the loop
            began = time.monotonic()
            server.max_connections = 1
            took = time.monotonic() - began
            assert took < LOOP_ANSWER + SLACK, f"the setter waited {took:.1f} s on a blocked loop"
            blocker.settimeout(block + WAIT)
            assert blocker.recv(1) == b"", "the blocking handler ended"
        _until(lambda: server.stats()["active"] == 0, "the blocking connection is counted closed")
        with _connect(server.port) as holder:
            holder.send(b"h")
            assert holder.recv(1) == b"+"
            with _connect(server.port) as refused:
                refused.send(b"h")
                try:
                    got = refused.recv(1)
                except ConnectionResetError:
                    got = b""
                assert got == b"", "over the new limit of 1: refused"
        assert server.stats()["refused"] >= 1
    finally:
        server.stop(timeout=1)


def _deaf_handler(manager: str, gate: threading.Event) -> Any:
    """Says ``+``, then ignores the end of its input and the stop until ``gate`` is set."""
    if manager == "trio":
        import trio

        async def deaf(stream: Any) -> None:
            await stream.send_all(b"+")
            while not gate.is_set():
                await trio.sleep(0.02)

        return deaf

    def deaf_sync(conn: Any) -> None:
        conn.sendall(b"+")
        while not gate.is_set():
            time.sleep(0.02)

    return deaf_sync


@pytest.mark.timeout(30)
@pytest.mark.parametrize("manager", ["threads", "trio"])
def test_a_bounded_stop_during_an_unbounded_one_brings_its_end_forward(manager: str) -> None:
    """stop(0.2) while stop() (no timeout) waits: both return by 0.2 s plus STOP_GRACE.

    Promised: stop(timeout) returns "within timeout plus STOP_GRACE"; a quick stop
    asked during a graceful one (weft serve's SIGQUIT after SIGTERM) must be quick.
    Before, the second call waited for the first, with no bound at all.
    """
    _need(manager)
    gate = threading.Event()
    server = Server(_deaf_handler(manager, gate), manager=manager)
    server.run()
    try:
        with _connect(server.port) as client:
            assert client.recv(1) == b"+"
            first: list[bool] = []
            waiting = threading.Thread(target=lambda: first.append(server.stop()), daemon=True)
            waiting.start()
            _until(lambda: server._stopping, "the unbounded stop is under way")
            began = time.monotonic()
            second = server.stop(timeout=0.2)
            took = time.monotonic() - began
            waiting.join(WAIT)
        assert took < 0.2 + STOP_GRACE + SLACK, f"stop(0.2) took {took:.1f}s"
        assert second is False and first == [False], (second, first)
    finally:
        gate.set()
        server.stop(timeout=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ALL_MANAGERS)
def test_a_resume_racing_a_drain_drains(manager: str) -> None:
    """``resume_accepting()`` while ``stop_accepting()`` (a worker's retire, ``weft ctl
    drain``) closes the listeners: the resume's new acceptor meets a closed listener.
    Seen (the soak check, 1-5 % of rounds, and twice in 580 retirements under weft
    serve): its EBADF was taken for a broken listener, the server stopped itself, the
    idle client was cut and the worker exited 1. Made certain here: the drain runs
    between the resume's checks and its new acceptor. Now the server drains."""
    _need(manager)
    from weft_core import create_manager

    instance = create_manager(manager)
    add_task = instance.add_task
    armed: list[bool] = []
    drained: list[bool] = []

    def add_task_after_a_drain(thunk: Any) -> Any:
        if armed and not drained and getattr(thunk, "__name__", "").startswith("weft acceptor"):
            drained.append(True)
            drain = threading.Thread(target=server.stop_accepting)
            drain.start()
            drain.join(10)
        return add_task(thunk)

    async def echo_async(stream: Any) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    instance.add_task = add_task_after_a_drain  # type: ignore[method-assign]
    handler = echo_async if _async(manager) else echo
    server = Server(handler, manager=instance, bind="127.0.0.1:0")
    server.run()
    try:
        with _connect(server.port) as client:
            client.sendall(b"a")
            assert client.recv(1) == b"a"
            server.pause_accepting()
            armed.append(True)
            server.resume_accepting()
            assert drained, "the resume started no acceptor"
            _until(lambda: len(instance.all_tasks()) == 1, "the late acceptor ended")
            assert server.error is None, server.error
            client.sendall(b"b")
            assert client.recv(1) == b"b", "the idle client was cut"
    finally:
        server.stop(2)
        instance.runtime.close()
