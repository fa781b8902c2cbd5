"""``Server.submit()`` and the long-poll example at the edges an outside audit found.

Each test names the promise it holds weft to (README "Long-poll", docs/managers.md
"Replying later", docs/api.md ``submit``, ``examples/longpoll.py``) and failed
before its fix (the long-poll audit's findings 2 to 9). Real sockets on loopback and
real managers; what could hang the test process (a deadlock in a signal handler)
runs in a child process, and every wait is bounded.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _every_manager import MANAGERS, is_async
from test_submit_edges import (
    EXAMPLE,
    EXAMPLE_MANAGERS,
    Example,
    _of_kind,
    _parked_call,
    _read_to_eof,
    _subscribe,
)
from test_submit_edges import gate as gate  # a fixture, used by name
from test_submit_edges import run_example as run_example  # a fixture, used by name

from weft_core import HandlerKindError, Server, ServerError

#: Bound on any single wait.
WAIT = 10.0
#: How long a handler waits on its Future before giving up (the old freeze's length).
HANDLER_WAIT = 4.0
#: What a stop may take past timeout + STOP_GRACE on a loaded 2-core machine.
STOP_BOUND = 0.5 + 2.0 + 2.5
EVENTED = [p for p in MANAGERS if p.id != "threads"]


def _quiet(manager: str) -> Callable[..., Any]:
    """A handler of the manager's kind that returns at once."""
    if is_async(manager):

        async def nothing_async(stream: Any) -> None:
            return None

        return nothing_async

    def nothing(conn: Any) -> None:
        return None

    return nothing


# -- finding 2: waiting on a submit Future in the loop's own thread ---------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), EVENTED)
def test_a_handler_waiting_on_its_submit_future_does_not_freeze_the_loop(
    manager: str, options: dict[str, Any]
) -> None:
    """A handler calls ``server.submit(fn).result()``: gevent answers, trio/asyncio refuse at once.

    Promised: docs/managers.md "Replying later" (submit "from any thread"; on gevent
    "blocking-style code cooperates"). The handler runs in the loop's thread, the
    one that must run ``fn``: ``result()`` blocked that thread, so the call never
    ran and every connection froze until the wait's timeout (for good without one).
    Now gevent waits on the hub and gets the answer; trio and asyncio raise
    RuntimeError at once, saying to await ``fn`` instead.
    """
    holder: list[Server] = []

    def answer() -> bytes:
        return b"answer"

    if is_async(manager):

        async def handler_async(stream: Any) -> None:
            try:
                reply = holder[0].submit(_of_kind(manager, answer)).result(HANDLER_WAIT)
            except RuntimeError as exc:
                reply = b"RuntimeError: " + str(exc).encode()
            await stream.send_all(reply)

        handler: Any = handler_async
    else:

        def handler_sync(conn: Any) -> None:
            conn.sendall(holder[0].submit(answer).result(HANDLER_WAIT))

        handler = handler_sync
    server = Server(handler, manager=manager, manager_options=options, port=0)
    holder.append(server)
    server.run()
    try:
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
            reply = _read_to_eof(client, WAIT)
        took = time.monotonic() - began
        if is_async(manager):
            assert reply.startswith(b"RuntimeError: ") and b"await fn(*args)" in reply, reply
        else:
            assert reply == b"answer", f"the handler's Future gave {reply!r}"
        assert took < HANDLER_WAIT / 2, f"the loop was held {took:.1f}s by the handler's wait"
    finally:
        server.stop(timeout=1)


# -- finding 3: submit() from a signal handler ------------------------------------------

_SIGNAL_CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    from weft_core import Server
    manager, loop = sys.argv[1], sys.argv[2]
    options = {"loop": loop} if loop != "-" else {}
    if manager in ("trio", "asyncio"):
        async def handler(stream): return None
        async def fn(n): return n
    else:
        def handler(conn): return None
        def fn(n): return n
    server = Server(handler, manager=manager, manager_options=options, port=0)
    server.run()
    from_signal = []
    def on_alarm(signum, frame):
        from_signal.append(server.submit(fn, -1))
        signal.setitimer(signal.ITIMER_REAL, 0.0007)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0007)
    faulthandler.dump_traceback_later(8, exit=True)  # a deadlock: its stack, then exit 1
    began, futures = time.monotonic(), []
    while time.monotonic() - began < 1.5:
        futures.append(server.submit(fn, len(futures)))
        if len(futures) % 500 == 0:
            futures[-1].result(5)
    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()
    for future in futures + from_signal:
        future.result(5)
    print("ok", len(futures), len(from_signal), flush=True)
    server.stop(2)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_submit_from_a_signal_handler_inside_submit_does_not_deadlock(
    manager: str, options: dict[str, Any]
) -> None:
    """A SIGALRM handler submits while the main thread is itself inside submit(): no deadlock.

    Promised: docs/managers.md (submit "from any thread", "from a signal handler
    too"), as docs/reliability.md row 26 promises for pause/resume/limit. A plain
    ``threading.Lock`` in Submitter.submit (and in gevent's, trio's and asyncio's
    queues of calls) was taken again by the handler in the thread that held it:
    every manager deadlocked within seconds.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_CHILD, manager, options.get("loop", "-")],
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert proc.stdout.startswith("ok"), (
        f"the child deadlocked or failed (status {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    assert int(proc.stdout.split()[2]) > 0, "no submit was made from the signal handler"


# -- finding 4: a submitted call left running at the stop --------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_submitted_call_left_running_makes_the_stop_unclean(
    manager: str, options: dict[str, Any], gate: threading.Event
) -> None:
    """stop(0.5) with a submitted call that blocks: False, counted in left_behind.

    Promised: docs/api.md ``stop()`` ("Returns True if nothing had to be
    interrupted"), docs/managers.md (a task still running 2 s later is left
    behind, counted, ``stop()`` returns False), README (``weft serve`` exits 4 when
    the stop had to leave tasks running). The stop returned True and counted
    nothing while the call (and on trio and asyncio the runtime's thread) went on.
    """
    server = Server(_quiet(manager), manager=manager, manager_options=options, port=0)
    server.run()
    entered = threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(30)

    server.submit(_of_kind(manager, block))
    assert entered.wait(WAIT), "the submitted call did not start"
    began = time.monotonic()
    clean = server.stop(timeout=0.5)
    took = time.monotonic() - began
    gate.set()
    assert clean is False, "stop() said nothing was left running"
    assert server.stats()["left_behind"] == 1, server.stats()["left_behind"]
    assert took < STOP_BOUND, f"stop(0.5) took {took:.1f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "options"), EVENTED)
def test_a_parked_submitted_call_is_ended_by_the_stop_not_left_behind(
    manager: str, options: dict[str, Any], gate: threading.Event
) -> None:
    """A submitted call parked cooperatively is ended by the runtime's close: stop() is clean.

    Promised: weft_core/_submit.py ("Closing the runtime cancels what it can").
    trio and asyncio cancel such a call; gevent's greenlet was left in a destroyed
    hub, its ``finally`` never run, so counting left calls would have made every
    gevent stop with a parked call look stuck.
    """
    server = Server(_quiet(manager), manager=manager, manager_options=options, port=0)
    server.run()
    started = threading.Event()
    future = server.submit(_parked_call(manager, started, gate))
    assert started.wait(WAIT), "the submitted call did not start"
    began = time.monotonic()
    assert server.stop(timeout=1) is True
    assert time.monotonic() - began < 1.5 + 1.0
    assert server.stats()["left_behind"] == 0
    with pytest.raises(ServerError):
        future.result(WAIT)


# -- finding 7: threads' limit and submit -------------------------------------------------


@pytest.mark.timeout(30)
def test_threads_submit_does_not_count_against_the_managers_limit(
    gate: threading.Event,
) -> None:
    """threads, ``limit=3``: the acceptor and two parked subscribers fill it; submit still runs.

    Promised: docs/writing-a-manager.md on ``spawn_soon`` ("no id, no limit"),
    docs/managers.md (``limit`` bounds the manager's tasks; submit is not one on the
    other managers). On threads each call was a task of the manager: the parked
    subscribers filled the limit and submit() raised "threads manager is full", so
    nothing could ever wake them.
    """
    parked = threading.Semaphore(0)

    def subscriber(conn: Any) -> None:
        parked.release()
        gate.wait(WAIT)

    server = Server(subscriber, manager="threads", manager_options={"limit": 3}, port=0)
    server.run()
    clients = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) for _ in (1, 2)]
    try:
        for _ in clients:
            assert parked.acquire(timeout=WAIT), "a subscriber did not park"
        assert server.submit(lambda: "woken").result(WAIT) == "woken"
    finally:
        gate.set()
        for client in clients:
            client.close()
        server.stop(timeout=1)


# -- finding 8: what submit() accepts ------------------------------------------------------


def _generator() -> Iterator[int]:
    yield 1


async def _async_generator() -> Any:
    yield 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fn", "said"),
    [
        (42, "not callable"),
        (_generator, "is a generator function"),
        (_async_generator, "is an async generator function"),
    ],
    ids=["not-callable", "generator", "async-generator"],
)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_submit_refuses_what_the_handler_check_refuses(
    manager: str, options: dict[str, Any], fn: Any, said: str
) -> None:
    """submit(42), submit(a generator function), submit(an async generator function): refused, named.

    Promised: docs/api.md (generator and async generator functions "are refused on
    every manager") and Server.submit's "HandlerKindError for a function of the
    wrong kind". gevent and threads took all three (a Future holding a TypeError, a
    generator nobody ran, an async generator on a sync manager); trio and asyncio
    called 42 and an async generator function "a plain function".
    """
    server = Server(_quiet(manager), manager=manager, manager_options=options, port=0)
    server.run()
    try:
        with pytest.raises(HandlerKindError, match=said):
            server.submit(fn)
    finally:
        server.stop(timeout=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("manager", "options"), [p for p in MANAGERS if p.id in ("threads", "gevent")]
)
def test_a_plain_function_returning_a_coroutine_fails_its_future_saying_so(
    manager: str, options: dict[str, Any]
) -> None:
    """On a sync manager, a plain function returning a coroutine: its Future's TypeError says so.

    Promised: docs/api.md, for handlers: "a plain function that returns a coroutine
    ... is a handler error ..., saying so". submit() gave the unawaited coroutine
    as the result, and Python warned "never awaited" later, far from the cause.
    """

    async def later() -> int:
        return 1

    server = Server(_quiet(manager), manager=manager, manager_options=options, port=0)
    server.run()
    try:
        with pytest.raises(TypeError, match="returned coroutine"):
            server.submit(lambda: later()).result(WAIT)
    finally:
        server.stop(timeout=1)


# -- finding 9: examples/longpoll.py -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", EXAMPLE_MANAGERS)
def test_example_a_last_pub_line_without_a_newline_is_published_on_every_manager(
    manager: str, run_example: Callable[..., Example]
) -> None:
    """``PUB text`` then the end of input, no newline: published, ``OK 1``, on every manager.

    Promised: the example's protocol is the same on gevent, trio and asyncio. gevent
    published such a line (its ``readline`` returns it); trio and asyncio dropped it
    without a word.
    """
    ex = run_example(manager)
    sub = _subscribe(ex.port)
    try:
        with socket.create_connection(("127.0.0.1", ex.port), timeout=WAIT) as pub:
            pub.sendall(b"PUB tail-no-newline")
            pub.shutdown(socket.SHUT_WR)
            assert _read_to_eof(pub, WAIT) == b"OK 1\n"
        got = b""
        while not got.endswith(b"\n"):
            chunk = sub.recv(100)
            assert chunk, got
            got += chunk
        assert got == b"tail-no-newline\n"
    finally:
        sub.close()


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.timeout(60)
def test_example_address_in_use_is_one_line_exit_1() -> None:
    """The README's fixed port already taken: one line naming the address, exit 1, no traceback.

    Promised: docs' "errors that teach; no traceback reaches a CLI user for their
    own mistake" (STYLE 4). A 20-line traceback ended in the BindError.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _run_example("--port", str(taken.getsockname()[1]))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Address already in use" in lines[0], proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tick", ["0", "-1", "nan"])
def test_example_a_tick_of_zero_or_less_is_refused(tick: str) -> None:
    """``--tick 0`` / ``-1`` / ``nan``: one line, exit 2, before anything binds.

    ``--tick -1`` published in a busy loop (about 5,000 ticks a second) and
    ``--tick 0`` silently published nothing.
    """
    proc = _run_example("--port", "0", "--tick", tick)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "--tick must be" in lines[0], proc.stderr
