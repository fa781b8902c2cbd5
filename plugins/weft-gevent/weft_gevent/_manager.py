"""GeventManager: a greenlet per task, in one gevent hub.

Which hub, and how calls from other OS threads reach it, is explained in
:mod:`weft_gevent._hub`: the caller's hub when the application has monkey-patched,
otherwise a hub in a daemon thread the manager starts on first use.

``stop_task`` follows DESIGN's phases for one task: flag (phase 2: the shutdown
flag is set and the task's shutdown callbacks run), wait up to ``timeout``, then
interrupt (phase 3: its interrupt callbacks run and its greenlet is killed with
:class:`~weft_core.TaskShutdown`, which a greenlet blocked in I/O receives at once,
so that its ``finally`` clauses run), then wait at most ``INTERRUPT_GRACE``. It runs
in the hub's thread, whoever asks, because gevent's objects may only be touched
there. ``_Task.interrupt``, which the server's stop calls from its own thread on
every remaining task at once, only schedules the kill in the hub and returns.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Hashable
from typing import Any

import gevent
import gevent.event
import greenlet
from gevent import GreenletExit

from weft_core import TaskShutdown, TaskState, TaskTable, run_task

from ._hub import HubLink, HubOwner, real_get_ident
from ._runtime import GeventRuntime
from ._serve import as_flag, watch_blocking

__all__ = ["GeventManager"]

log = logging.getLogger("weft.gevent")

#: After killing a task's greenlet with TaskShutdown, how long stop_task waits for
#: it to end. Killing lands at once unless the task catches TaskShutdown (a
#: BaseException) and carries on; stop() must not hang on such a task forever.
#: The same grace as the threads manager's.
INTERRUPT_GRACE = 2.0


class _Task(TaskState):
    """One task: its state, what it runs, and (once spawned) its greenlet.

    A TaskState itself rather than a record holding one: an object less per task.
    """

    __slots__ = (
        "context",
        "ended",
        "entered",
        "finished",
        "greenlet",
        "held",
        "link",
        "manager",
        "thunk",
    )

    def __init__(
        self,
        task_id: Hashable,
        thunk: Callable[[], Any],
        link: HubLink,
        manager: GeventManager,
        held: bool,
    ) -> None:
        super().__init__(task_id)
        self.thunk = thunk
        self.context: contextvars.Context | None = contextvars.copy_context()
        self.link = link
        self.manager = manager
        self.greenlet: _TaskGreenlet | None = None
        #: Set by the greenlet as it starts; a greenlet stopped before that never runs.
        self.entered = False
        self.finished = False
        #: Made only when a stop waits for the task to end, in the hub's thread.
        self.ended: gevent.event.Event | None = None
        #: True while the task holds the hub by a count of its own: added from
        #: another thread, until its greenlet is made; then it is one of ``_here``.
        #: Set before the table lists it: a stop may find it at once.
        self.held = held

    def interrupt(self) -> bool:
        """Interrupt as TaskState does, and kill the greenlet with TaskShutdown; any thread.

        The kill is a callback of the hub's loop (thread-safe from other threads):
        gevent's objects may only be touched in the hub's thread.
        """
        if not super().interrupt():
            return False
        link = self.link
        if link.is_current():
            link.hub.loop.run_callback(_kill, self)
        else:
            link.call_soon(_kill, self)
        return True

    @property
    def name(self) -> str:
        """The thunk's ``__name__``, read when first asked for, then kept.

        A connection's name is its peer address formatted: made for every
        connection, it would be kept by each idle one and hardly ever read.
        """
        name: str = _NAME_SLOT.__get__(self, _Task)
        if not name:
            thunk = self.thunk
            name = ("" if thunk is _ended else getattr(thunk, "__name__", "")) or (
                f"weft task {self.id}"
            )
            _NAME_SLOT.__set__(self, name)
        return name

    @name.setter
    def name(self, value: str) -> None:
        _NAME_SLOT.__set__(self, value)


#: Where TaskState keeps ``name``, under the lazy property of _Task.
_NAME_SLOT: Any = TaskState.__dict__["name"]


class _TaskGreenlet(greenlet.greenlet):
    """A plain greenlet running one task, named after it.

    Not a ``gevent.Greenlet``: that one records its spawning stack and tree (about
    1 KiB and a stack walk per spawn) and calls its function through a compiled
    frame, whose C stack every idle greenlet keeps a copy of. A task needs none of
    its features: the manager does its own joining and killing.
    """

    __slots__ = ("task",)
    task: _Task

    def run(self) -> None:
        """What greenlet runs: the task (a method, so no bound method is kept per task)."""
        task = self.task
        if task.finished:
            return  # stopped before it ever ran
        task.entered = True
        try:
            run_task(task, task.thunk)
        except (GreenletExit, TaskShutdown):
            # Killed with gevent's default by someone else, or a kill that landed
            # while run_task was reporting an error (logging may yield): both end
            # the task as asked.
            pass
        except BaseException:
            # SystemExit and the like would be thrown at the hub and could end it;
            # a task's error must end only the task.
            log.exception("task %s (%s) raised", task.id, task.name)
        finally:
            task.manager._finish(task)

    @property
    def name(self) -> str:
        """The task's name (the thunk's ``__name__``), as ``gevent.Greenlet.name``."""
        return self.task.name


def _ended() -> None:
    """What a finished task's thunk is replaced with."""


def _kill(task: _Task) -> None:
    # A loop callback, in the hub: gevent's own way to kill a greenlet (throwing from
    # another greenlet would return control to the hub, not to the thrower).
    if task.finished:
        return
    if not task.entered:
        # Never switched to: ending it here is enough, and quiet; when its queued
        # start comes, the greenlet sees it finished and returns at once.
        task.manager._finish(task)
        return
    glet = task.greenlet
    if glet is not None and not glet.dead:
        glet.throw(TaskShutdown)


class GeventManager:
    """A greenlet per task, with an optional ``limit`` on how many run at once.

    Handlers are plain functions and receive a gevent socket
    (:class:`~weft_gevent.GeventSocket`); blocking gevent calls in them yield to
    the other connections. Without monkey-patching, the tasks run in a hub thread
    of the manager's own, so stdlib blocking calls in a handler stall every
    connection: use gevent's modules there, or monkey-patch the application
    (``weft serve`` does, unless ``patch=False``).

    ``max_blocking_time``: log the stack of a greenlet that blocks the hub longer than
    this many seconds (None: as the process set it; weft serve sets 1 s).
    """

    def __init__(
        self,
        *,
        limit: int | None = None,
        patch: bool = True,
        max_blocking_time: float | bool | None = None,
    ) -> None:
        # patch is weft serve's (prepare_process): taken here so that one set of
        # options fits both; a manager made from Python never patches.
        as_flag(patch, "patch")
        if max_blocking_time is not None and max_blocking_time is not False:
            watch_blocking(float(max_blocking_time))
        self._table: TaskTable[_Task] = TaskTable(limit, "gevent manager")
        self._hubs = HubOwner()
        #: Tasks added in the hub's own thread and not yet ended: together they hold
        #: the hub once (while this is not zero), so that a connection's task takes
        #: no lock to keep its hub. Read and written only in the hub's thread.
        self._here = 0
        self._runtime = GeventRuntime(self._hubs)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    @property
    def runtime(self) -> GeventRuntime:
        """Gevent's sockets, semaphore and sleep, in this manager's hub."""
        return self._runtime

    def __repr__(self) -> str:
        return f"<GeventManager limit={self.limit} tasks={len(self._table)} {self._hubs!r}>"

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        """Spawn ``thunk`` in a greenlet named after it; returns its id.

        In the hub's own thread (the acceptor adding a connection) the greenlet is
        spawned at once; from another thread it is queued to the hub.
        """
        hubs = self._hubs
        link = hubs.link
        if link is not None and real_get_ident() == link.hub.thread_ident:
            # In the hub's thread (the acceptor): whoever calls is a task or call the
            # hub already counts, so the hub cannot go meanwhile. The new task joins
            # the count of tasks here, which holds the hub once for all of them.
            task = self._table.add(_Task, thunk, link, self, False)
            if self._here or hubs.hold(link):
                self._here += 1
                self._spawn(task)
                return task.id
            self._table.pop(task.id)  # an application's hub that close() forgot
        link = hubs.acquire()  # counts the task until its greenlet ends
        try:
            task = self._table.add(_Task, thunk, link, self, True)
        except BaseException:
            hubs.release()
            raise
        if link.is_current():
            self._spawn(task)
        else:
            link.call_soon(self._spawn, task)
        return task.id

    def _spawn(self, task: _Task) -> _TaskGreenlet | None:
        # In the hub's thread. Idempotent: stop_task may get here before the queued
        # call from add_task does.
        if task.greenlet is None and not task.finished:
            try:
                hub = task.link.hub
                glet = _TaskGreenlet(parent=hub)
                glet.task = task
                # The add_task caller's contextvars, without a Context.run frame.
                glet.gr_context = task.context
                # The task sets itself as current in that context: the greenlet holds
                # it from here on, so the task must not (task -> context -> task).
                task.context = None
                task.greenlet = glet
                hub.loop.run_callback(glet.switch)
                if task.held:
                    # Added from another thread, it held the hub by itself: it joins
                    # the tasks here, whose count keeps the hub (its own hold becomes
                    # theirs if it is the first).
                    task.held = False
                    if self._here:
                        self._hubs.release()
                    self._here += 1
            except Exception:
                log.exception("could not spawn task %s (%s)", task.id, task.name)
                self._finish(task)
        return task.greenlet

    def _finish(self, task: _Task) -> None:
        if task.finished:
            return
        task.finished = True
        # task -> greenlet -> task and task -> thunk -> (connection ->) task: leave no
        # cycle for the garbage collector.
        task.greenlet = None
        task.thunk = _ended
        self._table.pop(task.id)
        task.set_done()
        if task.ended is not None:
            task.ended.set()
        if task.held:
            self._hubs.release()
        else:
            self._here -= 1
            if not self._here:
                self._hubs.release()

    def _wait_ended(self, task: _Task, timeout: float | None) -> bool:
        """Wait cooperatively, in the hub's thread, for the task to end; True if it did."""
        if task.finished:
            return True
        if timeout is not None and timeout <= 0:
            return False
        if task.ended is None:
            task.ended = gevent.event.Event()
        return bool(task.ended.wait(timeout))

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (it goes on running); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Flag the task (phase 2), wait up to ``timeout``, then kill it (phase 3).

        Returns True if it ended before it had to be interrupted. Callable from the
        hub's thread (waits cooperatively) or any other (waits on a real lock).
        Bounded once ``timeout`` is given: after the kill it waits at most
        ``INTERRUPT_GRACE``, and from another thread at most ``timeout`` plus twice
        that for a hub that never answers.
        """
        task = self._table.get(task_id)
        if task is None or task.finished:
            return True
        link = task.link
        if link.is_current():
            return self._stop_here(task, timeout)
        if not self._hubs.hold(link):
            return True  # the hub has gone, so every task in it has ended
        try:
            # Cap the wait in case the hub never gets to it (a greenlet that never
            # yields stalls the whole hub, and nothing can interrupt it).
            cap = None if timeout is None else timeout + 2 * INTERRUPT_GRACE
            finished, ended_in_time = link.run(self._stop_here, task, timeout, timeout=cap)
        finally:
            self._hubs.release()
        if not finished:
            log.warning(
                "task %s (%s): the gevent hub did not stop it within %.1fs; "
                "is a greenlet running without ever yielding?",
                task_id,
                task.name,
                cap,
            )
            return False
        return ended_in_time

    def _stop_here(self, task: _Task, timeout: float | None) -> bool:
        # In the hub's thread, in a greenlet that may wait.
        glet = self._spawn(task)
        task.request_shutdown()
        if glet is None or task.finished:
            return True
        if glet is greenlet.getcurrent():
            return False  # a task stopping itself: it is flagged, it cannot wait for itself
        if self._wait_ended(task, timeout):
            return True
        task.interrupt()  # kills the greenlet, from the loop, soon
        if not self._wait_ended(task, INTERRUPT_GRACE):
            log.debug(
                "task %s (%s) is still running %.1fs after it was killed with TaskShutdown; "
                "it caught the exception and carried on, so it is left to finish on its own",
                task.id,
                task.name,
                INTERRUPT_GRACE,
            )
        return False

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks running (or about to start) now."""
        return self._table.ids()
