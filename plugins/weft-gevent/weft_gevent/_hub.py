"""Where the gevent manager's hub lives, and how other OS threads reach it.

Where the hub lives
-------------------
``Server.run()`` must return once the socket listens, and the caller's own plain
blocking code (a test's stdlib client sockets, a REPL, the rest of a program) must
go on working while the server serves. A gevent hub only runs while the thread that
owns it blocks *cooperatively*, so the right home depends on the application:

- **Monkey-patched** (``gevent.monkey.is_module_patched("socket")``): every blocking
  call of the caller already yields to its thread's hub, so tasks run as greenlets
  in *the calling thread's hub*. Nothing is started; nothing is owned.
- **Not patched**: the caller's blocking calls would freeze a hub in its thread, so
  the manager starts a hub of its own in a dedicated daemon OS thread, lazily, on
  first use, and stops it again in :meth:`HubOwner.close` once no task is left
  (the hub and its loop are destroyed, so no descriptor stays open). The thread is
  started with the *original* ``threading``/``_thread`` functions so that it is a
  real thread even if the application patches later.

Either way the manager holds a :class:`HubLink`: the hub, and whether the caller is
in its thread, decided by comparing *real* thread idents (``_thread.get_ident`` as
gevent saved it before any patching; a patched ``get_ident`` names greenlets).

Calls across threads
--------------------
Inside the hub's thread everything is direct: ``add_task`` spawns at once (the
acceptor adds each connection without any cross-thread hop) and waits are
cooperative (greenlet joins). From any other thread, work is marshalled with
``hub.loop.run_callback_threadsafe`` into a fresh greenlet of the hub, and the caller
waits for its answer on a real ``_thread`` lock, never on a gevent primitive bound to
another hub. The hub itself is never blocked.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import gevent
import gevent.monkey
from gevent.hub import Hub, Waiter

from ._serve import monitoring, start_monitor

__all__ = ["HubLink", "HubOwner", "real_get_ident", "real_lock", "report_blocked_hub"]

log = logging.getLogger("weft.gevent")

T = TypeVar("T")

#: The OS thread's ident, even under monkey-patching (where ``threading.get_ident``
#: names the current greenlet). gevent's hubs record theirs the same way.
real_get_ident: Callable[[], int] = gevent.monkey.get_original("_thread", "get_ident")

#: A real OS-level lock, even under monkey-patching: waits across threads use it.
real_lock: Callable[[], Any] = gevent.monkey.get_original("_thread", "allocate_lock")

_start_new_thread: Callable[..., int] = gevent.monkey.get_original("_thread", "start_new_thread")

#: Name of the OS thread that runs an owned hub (seen in py-spy, faulthandler, ps -L).
HUB_THREAD_NAME = "weft-gevent-hub"
#: How often a thread waiting with no timeout for a hub to run its call looks whether
#: the hub has ended.
ALIVE_CHECK = 0.1


class _Reply(Generic[T]):
    """A one-shot answer from the hub's thread to a waiting OS thread."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = real_lock()
        self._done.acquire()
        self._value: T | None = None
        self._error: BaseException | None = None

    def fill(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        """Run ``fn(*args)`` (in a greenlet of the hub) and hand over its outcome."""
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the waiting thread, raised there
            self._error = exc
        finally:
            self._done.release()

    def wait(self, timeout: float | None = None) -> tuple[bool, T | None]:
        """Block this OS thread until filled; ``(filled, value)``; re-raise an error."""
        if not self._done.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            return False, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True, self._value


def _spawn_filler(reply: _Reply[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # Runs as a loop callback in the hub greenlet, which must not block: give the
    # work a greenlet of its own so that it may wait cooperatively.
    gevent.spawn_raw(reply.fill, fn, args)


class HubLink:
    """A gevent hub, and the way into it from any OS thread."""

    __slots__ = ("hub",)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def __repr__(self) -> str:
        return f"<HubLink thread={self.hub.thread_ident:#x} {self.hub!r}>"

    def is_current(self) -> bool:
        """True if the caller runs in the hub's OS thread (in any of its greenlets)."""
        return real_get_ident() == self.hub.thread_ident

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` as a callback of the hub's loop; callable from any thread.

        The callback runs in the hub greenlet and must not block.
        """
        self.hub.loop.run_callback_threadsafe(fn, *args)

    def run(
        self, fn: Callable[..., T], *args: Any, timeout: float | None = None
    ) -> tuple[bool, T]:
        """Run ``fn(*args)`` in the hub's thread, where it may block cooperatively.

        In the hub's thread it is a plain call; from another thread it runs in a new
        greenlet of the hub while this thread waits up to ``timeout`` seconds on a
        real lock, or with no timeout for as long as the hub lives: a hub ended
        before it ran ``fn`` (a runtime closed meanwhile) never will, and a wait
        with no end kept the caller's thread, and that hub's loop, for good.
        Returns ``(finished, result)``: ``finished`` is False only when the wait
        timed out or the hub ended first (``result`` is then None). ``fn``'s
        exceptions are raised in the caller.
        """
        if self.is_current():
            return True, fn(*args)
        reply: _Reply[T] = _Reply()
        try:
            self.call_soon(_spawn_filler, reply, fn, args)
        except (AttributeError, ValueError):  # its loop is gone already: it ended first
            return False, None  # type: ignore[return-value]
        if timeout is not None:
            return reply.wait(timeout)  # type: ignore[return-value]
        while True:
            finished, value = reply.wait(ALIVE_CHECK)
            if finished:
                return True, value  # type: ignore[return-value]
            if self.hub.loop is None or self.hub.dead:
                return False, None  # type: ignore[return-value]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run` with no timeout, for a result the caller needs.

        A hub that ended first (it crashed: its callers hold it) is an error, not None.
        """
        finished, value = self.run(fn, *args)
        if not finished:
            raise RuntimeError(f"weft-gevent: the hub ended before it ran {fn.__name__}")
        return value


class _HubThread:
    """A gevent hub running in a daemon OS thread of its own, until :meth:`stop`."""

    def __init__(self) -> None:
        self._ready = real_lock()
        self._ready.acquire()
        self._exited = real_lock()
        self._exited.acquire()
        self._stopping = False
        self._error: BaseException | None = None
        self._wakeup: Any = None
        self.link: HubLink | None = None
        self._thread: threading.Thread | None = None
        if gevent.monkey.is_module_patched("threading"):
            # threading.Thread would make a greenlet; the saved original makes a thread.
            _start_new_thread(self._main, ())
        else:
            self._thread = threading.Thread(target=self._main, name=HUB_THREAD_NAME, daemon=True)
            self._thread.start()
        self._ready.acquire()
        if self._error is not None:
            raise RuntimeError(f"weft-gevent: could not start a gevent hub: {self._error}") from (
                self._error
            )

    def _main(self) -> None:
        try:
            hub = gevent.get_hub()
            # An async watcher is the one thing that keeps the loop alive while no
            # task runs, and the one wake-up another thread may send. It is started
            # before anyone can call stop(): libev drops a send to a stopped watcher.
            wakeup = hub.loop.async_()
            waiter: Waiter[Any] = Waiter(hub)
            wakeup.start(waiter.switch, None)
        except BaseException as exc:
            self._error = exc
            self._ready.release()
            self._exited.release()
            return
        self._wakeup = wakeup
        self.link = HubLink(hub)
        self._ready.release()
        try:
            while not self._stopping:
                try:
                    waiter.get()  # the loop runs (and serves the tasks) until stop()
                except BaseException:
                    # A "system error" a greenlet raised is thrown at the hub's parent,
                    # which is us: report it and keep serving the other tasks.
                    log.exception("error thrown into the weft-gevent hub thread")
        finally:
            wakeup.stop()
            wakeup.close()
            # Kills the hub's threadpool and resolver, and closes the loop's own
            # descriptors (epoll, eventfd): nothing of the hub outlives close().
            hub.destroy(destroy_loop=True)
            _let_go(hub)
            self._exited.release()

    def stop(self) -> None:
        """Stop the loop, destroy the hub, and return once the thread has ended."""
        self._stopping = True
        self._wakeup.send()  # ev_async_send: safe from any thread
        self._exited.acquire()
        if self._thread is not None:
            self._thread.join()


class HubOwner:
    """Finds or starts the hub that one manager's tasks run in; stops one it started.

    ``users`` counts what needs the hub to stay: the tasks' live greenlets and calls
    from other threads still under way. :meth:`close` stops an owned hub only when
    that count is zero; the next use starts a new one.
    """

    def __init__(self) -> None:
        self._lock = real_lock()
        self._link: HubLink | None = None
        self._thread: _HubThread | None = None
        self._users = 0
        #: A close that found users: the last release stops the hub thread then.
        self._close_pending = False

    def __repr__(self) -> str:
        where = "none" if self._link is None else ("own thread" if self._thread else "caller's")
        return f"<HubOwner hub={where} users={self._users}>"

    @property
    def link(self) -> HubLink | None:
        """The hub in use now, if any (none before the first task, or after close)."""
        return self._link

    @property
    def owns_thread(self) -> bool:
        """True while a hub thread started by this owner is running."""
        return self._thread is not None

    def _ensure(self) -> HubLink:
        # Called with self._lock held.
        if self._link is None:
            if gevent.monkey.is_module_patched("socket"):
                self._link = HubLink(gevent.get_hub())
            else:
                self._thread = _HubThread()
                self._link = self._thread.link
            assert self._link is not None
            if monitoring():  # the application's hub may have run before monitoring began
                self._link.call_soon(start_monitor, self._link.hub)
        assert self._link is not None
        return self._link

    def acquire(self) -> HubLink:
        """The hub, found or started now; counted as in use until :meth:`release`."""
        with self._lock:
            link = self._link or self._ensure()
            self._users += 1
            self._close_pending = False  # in use again: a close waits for the next one
            return link

    def hold(self, link: HubLink) -> bool:
        """Count ``link`` as in use if it is still the current hub; False if it is gone."""
        with self._lock:
            if self._link is not link:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """Undo one :meth:`acquire` or successful :meth:`hold`.

        The last one after a :meth:`close` that found users stops the hub thread,
        from a thread of its own (this may be the hub's, which cannot wait for
        itself to end): a task still on its way out at the close, or a submitted
        call that outlived the server, no longer leaves the thread running for good.
        """
        with self._lock:
            self._users -= 1
            if self._users or not self._close_pending:
                return
            self._close_pending = False
            thread, self._thread, self._link = self._thread, None, None
        if thread is not None:
            # A Thread, not a bare _thread one: join() asks for the current thread,
            # which lists a bare one as a dummy thread for good. Never patched here:
            # a hub thread of the owner's own exists only in an unpatched process.
            threading.Thread(target=thread.stop, name="weft-gevent hub stop", daemon=True).start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the hub's thread (starting the hub if needed)."""
        link = self.acquire()
        try:
            return link.call(fn, *args)
        finally:
            self.release()

    def run_within(
        self, fn: Callable[..., object], timeout: float | None
    ) -> tuple[bool, HubLink | None]:
        """Run ``fn()`` in the hub's thread if a hub is in use; ``(ran, link)``.

        ``ran`` is False if the hub did not run it within ``timeout``. With no hub
        in use, ``fn()`` runs here (there is nothing in a hub for it to touch).
        """
        with self._lock:
            link = self._link
            if link is not None:
                self._users += 1
        if link is None:
            fn()
            return True, None
        try:
            return link.run(fn, timeout=timeout)[0], link
        finally:
            self.release()

    def close(self) -> bool:
        """Stop the hub thread if this owner started one and nothing uses it.

        Returns False (and stops nothing) while tasks or calls are under way. A
        hub that belongs to the application (monkey-patched mode) is only forgotten.
        """
        with self._lock:
            if self._users:
                log.debug(
                    "weft-gevent hub left running: %d tasks or calls use it; the last to "
                    "end stops it",
                    self._users,
                )
                self._close_pending = self._thread is not None
                return False
            if self._link is not None and self._thread is not None and self._link.is_current():
                return False  # the hub's own thread cannot wait for itself to end
            thread, self._thread, self._link = self._thread, None, None
        if thread is not None:
            thread.stop()
        return True


def report_blocked_hub(link: HubLink, waited: float | None) -> None:
    """Log, at ERROR, that the hub did not answer, with the stack its thread runs now.

    A hub that does not run a callback for ``waited`` seconds is not switching: one
    greenlet is running without ever yielding (``time.sleep``, a blocking socket or
    driver that is not gevent's, a long computation). That greenlet is what the hub's
    OS thread is executing, so the thread's current stack names the culprit.
    """
    frame = sys._current_frames().get(link.hub.thread_ident)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(not found)\n"
    log.error(
        "the gevent hub has not answered for %ss: a greenlet is blocking it without "
        "yielding (a blocking call that is not gevent's? monkey-patch, or use gevent's "
        "modules); the hub's thread is at:\n%s",
        waited,
        stack.rstrip("\n"),
    )


def _let_go(hub: Any) -> None:
    """Let a destroyed hub's greenlet finish, so that the garbage collector can free it.

    ``Hub.destroy()`` leaves the hub greenlet parked mid-way through throwing its
    ``LoopExit`` at this thread; its frames keep the hub, its loop's objects and this
    thread's ``Thread`` alive in greenlet's own state, out of the collector's reach
    (gevent issue 1601): about 7 KiB leaked at every embedded ``run()`` and ``stop()``
    (the soak check: 30 hubs alive after 30 cycles). Switched to once more, the
    greenlet ends, and all of it goes.
    """
    try:
        hub.switch()
    except BaseException:  # whatever it ends with is nobody's to hear: it is gone
        pass
