"""GeventSocket's own read wait: what gevent's recv does, kept through every way out.

``recv`` and ``recv_into`` park the greenlet on the read watcher directly (not via
gevent's Waiter), so each way a wait can end is checked here: data, end of input,
another greenlet closing the socket, a second reader, a timeout, a kill, a stray
switch. Every test runs in a real hub thread of a GeventManager, on a socketpair.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent import monkey
from gevent.exceptions import ConcurrentObjectUseError

from weft_core.testing import wait_until
from weft_gevent import GeventManager, GeventSocket

WAIT = 5.0

pytestmark = [
    pytest.mark.skipif(
        monkey.is_module_patched("socket"), reason="these tests run the unpatched (own hub) mode"
    ),
    pytest.mark.timeout(30),
]


class Pair:
    """A GeventSocket made in the hub (``sock``) and its stdlib peer (``peer``)."""

    def __init__(self) -> None:
        a, self.peer = socket.socketpair()
        self.sock = GeventSocket(a.family, a.type, a.proto, fileno=a.detach())

    def parked(self) -> bool:
        """True while a greenlet waits on the read watcher."""
        watcher = self.sock._read_event  # type: ignore[attr-defined]
        return watcher is not None and watcher.callback is not None

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def run_reader(
    manager: GeventManager, read: Callable[[Pair], Any]
) -> tuple[Pair, dict[str, Any], threading.Event, Any]:
    """Start a task that makes a Pair and calls ``read(pair)``; wait until it is parked."""
    box: dict[str, Any] = {}
    made = threading.Event()
    ended = threading.Event()

    def task() -> None:
        pair = Pair()
        box["pair"] = pair
        box["greenlet"] = gevent.getcurrent()
        made.set()
        try:
            box["result"] = read(pair)
        except BaseException as exc:
            box["error"] = exc
            raise
        finally:
            ended.set()

    task_id = manager.add_task(task)
    assert made.wait(WAIT)
    pair: Pair = box["pair"]
    wait_until(pair.parked, WAIT, "the reader to park")
    return pair, box, ended, task_id


def in_hub(manager: GeventManager, fn: Callable[[], object]) -> None:
    """Run ``fn`` in a task of the manager's hub and wait for it to end."""
    task_id = manager.add_task(fn)
    assert manager.stop_task(task_id, timeout=WAIT) is True


def test_recv_waits_for_data_then_returns_it(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv(10))
    pair.peer.sendall(b"hello")
    assert ended.wait(WAIT)
    assert box["result"] == b"hello"
    assert not pair.parked(), "the read watcher is left started"
    pair.close()


def test_recv_into_waits_for_data_then_fills_the_buffer(manager: GeventManager) -> None:
    buf = bytearray(10)
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv_into(buf))
    pair.peer.sendall(b"abc")
    assert ended.wait(WAIT)
    assert box["result"] == 3 and bytes(buf[:3]) == b"abc"
    pair.close()


def test_makefile_reader_waits_for_a_line(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.makefile("rb").readline())
    pair.peer.sendall(b"one line\nrest")
    assert ended.wait(WAIT)
    assert box["result"] == b"one line\n"
    pair.close()


def test_recv_returns_eof_when_the_peer_closes(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv(10))
    pair.peer.close()
    assert ended.wait(WAIT)
    assert box["result"] == b""
    pair.sock.close()


def test_close_by_another_greenlet_wakes_the_reader_with_ebadf(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv(10))
    in_hub(manager, pair.sock.close)
    assert ended.wait(WAIT)
    assert isinstance(box.get("error"), OSError) and box["error"].errno == errno.EBADF
    pair.peer.close()


def test_a_second_reader_is_refused(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv(10))
    second: dict[str, BaseException] = {}

    def read_too() -> None:
        try:
            pair.sock.recv(10)
        except ConcurrentObjectUseError as exc:
            second["error"] = exc

    in_hub(manager, read_too)
    assert "already used by another greenlet" in str(second.get("error"))
    pair.peer.sendall(b"x")  # the first reader is undisturbed
    assert ended.wait(WAIT) and box["result"] == b"x"
    pair.close()


def test_a_timeout_set_on_the_socket_still_applies(manager: GeventManager) -> None:
    def read(p: Pair) -> bytes:
        p.sock.settimeout(0.05)
        return p.sock.recv(10)

    pair, box, ended, _ = run_reader(manager, read)
    assert ended.wait(WAIT)
    assert isinstance(box.get("error"), TimeoutError)
    pair.close()


def test_a_non_blocking_socket_raises_blocking_io_error_at_once(manager: GeventManager) -> None:
    result: dict[str, BaseException] = {}

    def read() -> None:
        pair = Pair()
        pair.sock.setblocking(False)
        try:
            pair.sock.recv(10)
        except BlockingIOError as exc:
            result["error"] = exc
        finally:
            pair.close()

    in_hub(manager, read)
    assert isinstance(result.get("error"), BlockingIOError)


def test_a_stray_switch_does_not_end_the_wait(manager: GeventManager) -> None:
    pair, box, ended, _ = run_reader(manager, lambda p: p.sock.recv(10))
    # A wake-up nobody should send, from the hub as a watcher's would come.
    in_hub(manager, lambda: gevent.get_hub().loop.run_callback(box["greenlet"].switch))
    wait_until(pair.parked, WAIT, "the reader back in its wait")  # not returned
    assert not ended.is_set()
    pair.peer.sendall(b"data")
    assert ended.wait(WAIT) and box["result"] == b"data"
    pair.close()


def test_a_killed_reader_stops_its_watcher_and_the_socket_reads_again(
    manager: GeventManager,
) -> None:
    pair, _, ended, task_id = run_reader(manager, lambda p: p.sock.recv(10))
    assert manager.stop_task(task_id, timeout=0) is False  # killed in its wait
    assert ended.is_set()
    assert not pair.parked(), "the killed reader left its watcher started"
    pair.peer.sendall(b"again")
    got: list[bytes] = []
    in_hub(manager, lambda: got.append(pair.sock.recv(10)))
    assert got == [b"again"]
    pair.close()


@pytest.mark.timeout(30)
def test_a_call_into_a_hub_that_ends_first_does_not_wait_for_good() -> None:
    """A socket closed from another thread asks the hub to close it. A hub ended
    first (its runtime closed by a stop, behind a flood of calls) never runs the
    call: the thread waited for good, a 'weft stop acceptors' thread stuck with the
    old hub's epoll and eventfd (an outside check). It is told instead, and closes
    the socket itself. A real hub cannot be made to end with a call queued on
    demand (it may run it on its way out), so a stand-in takes the call and never
    runs it, then ends."""
    from types import SimpleNamespace

    from weft_gevent._hub import HubLink

    queued: list[object] = []
    hub: Any = SimpleNamespace(
        thread_ident=-1,  # no thread of this process
        dead=False,
        loop=SimpleNamespace(run_callback_threadsafe=lambda *call: queued.append(call)),
    )
    threading.Timer(0.3, lambda: setattr(hub, "dead", True)).start()
    began = time.monotonic()
    ran: list[bool] = []
    assert HubLink(hub).run(ran.append, True) == (False, None)
    assert queued and ran == [] and time.monotonic() - began < 5


def test_a_hub_whose_loop_is_gone_ran_nothing_and_says_so() -> None:
    """A hub destroyed between a caller's look and its call (``loop`` None, or a
    destroyed loop's ValueError): ``run`` says it ended first, so a socket closed
    from another thread closes itself, as before ``run`` took the wait over from a
    method of its own that caught this; and ``call``, for a result the caller needs,
    raises rather than return None (``adopt_listener`` returned None as a socket)."""
    from types import SimpleNamespace

    from weft_gevent._hub import HubLink

    def destroyed(*_call: object) -> None:
        raise ValueError("operation on destroyed loop")

    for loop in (None, SimpleNamespace(run_callback_threadsafe=destroyed)):
        hub: Any = SimpleNamespace(thread_ident=-1, dead=True, loop=loop)
        ran: list[bool] = []
        assert HubLink(hub).run(ran.append, True) == (False, None)
        assert HubLink(hub).run(ran.append, True, timeout=1.0) == (False, None)
        with pytest.raises(RuntimeError, match="the hub ended before it ran"):
            HubLink(hub).call(ran.append, True)
        assert ran == []
