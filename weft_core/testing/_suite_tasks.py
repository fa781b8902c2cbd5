"""Conformance tests of the TaskManager protocol (docs/writing-a-manager.md)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from .._errors import ManagerFullError, TaskShutdown
from .._protocol import TaskManager
from .._tasks import INTERRUPT_GRACE, current_task
from ._adapters import Body, Sleep, SyncAdapter
from ._base import ManagerTestBase
from ._bodies import POLL, gated, swallowing, to_its_end
from ._support import WAIT, add_task_from_a_thread, wait_until

__all__ = ["TaskManagerTests"]

_probe: contextvars.ContextVar[str] = contextvars.ContextVar(
    "weft_conformance_probe", default="unset"
)

#: What a loaded CI machine may add to a promised bound before it counts as broken.
SLACK = 1.5
#: How many threads call add_task at once in the concurrency tests.
THREADS = 16
#: How long runtime.close() may take to end the threads its manager started, once no
#: task is left (an idle thread's expiry is no bound: the threads manager's is 10 s).
CLOSE_BOUND = 2.0 + SLACK


def _stop_within_its_bound(
    manager: TaskManager, task_id: Hashable, timeout: float
) -> tuple[threading.Thread, list[Any], float]:
    """``stop_task(task_id, timeout)`` in a thread, waited for up to its promised bound.

    The thread (alive if stop_task has not returned), what it returned, and how long
    was waited: timeout + INTERRUPT_GRACE + SLACK at most.
    """
    result: list[Any] = []
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            result.append(manager.stop_task(task_id, timeout=timeout))
        except BaseException as exc:  # said below, not lost in the thread
            raised.append(exc)

    stopper = threading.Thread(target=stop, daemon=True)
    began = time.monotonic()
    stopper.start()
    stopper.join(timeout + INTERRUPT_GRACE + SLACK)
    if raised:
        raise AssertionError(
            f"stop_task({task_id!r}, timeout={timeout}) called from a thread of its own (as"
            f" the server's stop calls it) raised {raised[0]!r}: it must be callable from any"
            " thread (a runtime with a loop schedules its cancel there)"
        ) from raised[0]
    return stopper, result, time.monotonic() - began


class TaskManagerTests(ManagerTestBase):
    """The TaskManager protocol, in the words of docs/writing-a-manager.md."""

    def _wait_gone(self, manager: TaskManager, task_id: Hashable) -> None:
        wait_until(
            lambda: task_id not in manager.all_tasks(),
            what=f"task {task_id} to end and leave all_tasks (all_tasks must drop a task"
            " once it has ended; or the task never ended)",
        )

    def _bounded_past_its_interrupt(
        self,
        manager: TaskManager,
        task_id: Hashable,
        gate: threading.Event,
        why: str,
        still_runs: bool = False,
    ) -> None:
        """stop_task(id, 0.2) on a task that outlives its interrupt: False, by its bound.

        Then ``gate`` lets the task end, and it must leave ``all_tasks``. With
        ``still_runs`` (the task runs on until ``gate``, whatever the manager), it
        must still be listed when stop_task has given up on it.
        """
        timeout = 0.2
        stopper, result, took = _stop_within_its_bound(manager, task_id, timeout)
        try:
            assert not stopper.is_alive(), (
                f"stop_task(id, timeout={timeout}) must return within timeout + INTERRUPT_GRACE"
                f" ({INTERRUPT_GRACE:g}s) {why}: it still waits after {took:.1f}s (the"
                " interrupt must not block either: TaskState.interrupt() and the task's"
                " on_interrupt callbacks run, then stop_task waits at most the grace)"
            )
            assert result == [False], (
                f"stop_task returns False when the task had to be interrupted (got {result[0]!r})"
            )
            assert not still_runs or task_id in manager.all_tasks(), (
                "stop_task gave up on a task that still runs: all_tasks lists what the"
                " manager holds now, that task included, until it has ended"
            )
        finally:
            gate.set()
        stopper.join(WAIT)
        self._wait_gone(manager, task_id)

    def test_add_task_runs_the_thunk(self, manager: TaskManager, adapter: SyncAdapter) -> None:
        """add_task runs (or at least queues and later runs) the thunk."""
        ran = threading.Event()

        def body() -> Body:
            ran.set()
            yield from ()

        manager.add_task(adapter.task(body))
        assert ran.wait(WAIT), "add_task must run the thunk it was given"

    def test_current_task_is_not_set_in_the_caller(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """current_task() names a task only inside it: add_task's caller keeps None.

        A manager that made the task current in the calling thread (a context set
        before the copy, not inside the task) made the server take that thread for
        one of its tasks: ``stop()`` and ``submit()`` then took their in-task paths.
        """
        assert current_task() is None, (
            "current_task() names a task in the test's own thread, which runs none: an"
            " earlier add_task made its task current in its caller; it must be None outside"
            " a task (set it inside the task, in the context the task runs in)"
        )
        gate, started = threading.Event(), threading.Event()
        task_id = manager.add_task(adapter.task(gated(gate, started)))
        try:
            assert started.wait(WAIT), "add_task must run the thunk it was given"
            assert current_task() is None, (
                "current_task() must be None in add_task's caller, before and after: only"
                " inside the task does it name the task's TaskState"
            )
        finally:
            gate.set()
        self._wait_gone(manager, task_id)

    def test_add_task_returns_while_the_task_runs(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """add_task starts the task and returns: it never runs the thunk in the caller's thread."""
        started, gate = threading.Event(), threading.Event()
        caller, returned = add_task_from_a_thread(
            manager, adapter.task(gated(gate, started)), SLACK
        )
        try:
            assert not caller.is_alive(), (
                f"add_task must start the task and return at once, not run the thunk in the"
                f" caller's thread: it has not returned after {SLACK:g}s, while the task waits"
            )
            assert started.wait(WAIT), "add_task must run the thunk it was given"
        finally:
            gate.set()
        self._wait_gone(manager, returned[0])

    def _beside_a_ticker(
        self,
        manager: TaskManager,
        adapter: SyncAdapter,
        turn: float,
        body: Callable[[], Body],
        ticks: list[float],
    ) -> None:
        """Run ``body`` to its end as a task while another task ticks.

        Each of the ticker's turns appends the time to ``ticks``, then sleeps ``turn``.
        """
        ticking, stop_ticking = threading.Event(), threading.Event()

        def ticker() -> Body:
            until = time.monotonic() + WAIT
            while not stop_ticking.is_set() and time.monotonic() < until:
                ticks.append(time.monotonic())
                ticking.set()
                yield Sleep(turn)

        ticker_id = manager.add_task(adapter.task(ticker))
        try:
            assert ticking.wait(WAIT), "add_task must run the thunk it was given"
            self._wait_gone(manager, manager.add_task(adapter.task(body)))
        finally:
            stop_ticking.set()
        self._wait_gone(manager, ticker_id)

    def test_runtime_sleep_zero_lets_the_others_run(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """runtime.sleep(0) gives the other tasks their turn, as a checkpoint does.

        The acceptors of processes sharing one listener (``--workers``) take turns by
        it: one that never yields takes every client of a burst.
        """
        ticks: list[float] = []
        seen: list[int] = []

        def body() -> Body:
            before = len(ticks)
            for _ in range(100):
                yield Sleep(0)
            seen.append(len(ticks) - before)

        self._beside_a_ticker(manager, adapter, 0, body, ticks)
        assert seen, "add_task must run the thunk it was given"
        assert seen[0] >= 2, (
            f"another task ran {seen[0]} time(s) while one called runtime.sleep(0) 100 times:"
            " sleep(0) must let the other tasks run (a checkpoint: trio.sleep(0),"
            " asyncio.sleep(0), gevent.sleep(0)), not return at once"
        )

    def test_runtime_sleep_waits_as_long_as_asked(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """runtime.sleep(seconds), in a task, pauses it that long, and it alone.

        The engine's back-off uses it (the acceptor's, when descriptors run out): a
        sleep that spins would burn the CPU, and one that blocks the loop would stall
        every connection on it.
        """
        took: list[float] = []
        ticks: list[float] = []

        def body() -> Body:
            began = time.monotonic()
            yield Sleep(0.2)
            took.append(time.monotonic() - began)
            took.append(began)

        self._beside_a_ticker(manager, adapter, POLL, body, ticks)
        assert took, "add_task must run the thunk it was given"
        assert took[0] >= 0.19, (
            f"runtime.sleep(0.2) returned after {took[0]:.3f}s: it must pause the task as long"
            " as asked (the acceptor's back-off when descriptors run out would spin the CPU)"
        )
        # Within the sleep, well before its end: a sleep that blocks the loop lets the
        # others run only once it is over, before the sleeper resumes.
        began = took[1]
        during = [t for t in ticks if began < t < began + 0.15]
        assert len(during) >= 2, (
            f"another task ran {len(during)} time(s) while one was in runtime.sleep(0.2)"
            f" (it sleeps {POLL:g}s a turn): runtime.sleep must suspend only the task that"
            " calls it, not block the loop all the tasks share"
        )

    def test_ids_are_unique(self, manager: TaskManager, adapter: SyncAdapter) -> None:
        """Ids returned by add_task are hashable and unique for the manager's life."""
        done = threading.Event()
        ids = [manager.add_task(adapter.task(gated(done))) for _ in range(20)]
        done.set()
        for task_id in ids:
            self._wait_gone(manager, task_id)
        ids += [manager.add_task(adapter.task(gated(done))) for _ in range(20)]
        assert len(set(ids)) == len(ids), f"add_task must return unique ids, got {ids}"

    def _from_many_threads(self, call: Callable[[], None]) -> list[BaseException]:
        """``call()`` in THREADS threads released together; what they raised."""
        barrier = threading.Barrier(THREADS)
        raised: list[BaseException] = []

        def each() -> None:
            try:
                barrier.wait(WAIT)
                call()
            except BaseException as exc:  # reported by the test
                raised.append(exc)

        callers = [threading.Thread(target=each, daemon=True) for _ in range(THREADS)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(WAIT)
        assert not any(caller.is_alive() for caller in callers), (
            f"add_task called from {THREADS} threads at once has not returned in all of them"
            f" after {WAIT:g}s: it must not wait on another caller"
        )
        return raised

    def test_add_task_from_many_threads_at_once(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """add_task from many threads at once, the first calls racing the runtime's start.

        The server calls it from the run() caller, the loop's thread and others
        (``submit``): ids stay unique, and once the tasks have ended, closing the
        runtime leaves none of the threads it started (one loop, not one per racing
        first call).
        """
        before = set(threading.enumerate())
        gate = threading.Event()
        ids: list[Hashable] = []

        def call() -> None:
            for _ in range(10):
                ids.append(manager.add_task(adapter.task(gated(gate))))

        try:
            raised = self._from_many_threads(call)
        finally:
            gate.set()
        assert not raised, f"add_task raised from concurrent callers: {raised[0]!r}"
        assert len(ids) == 10 * THREADS and len(set(ids)) == len(ids), (
            f"add_task called from {THREADS} threads at once must return unique ids:"
            f" {len(set(ids))} distinct of {len(ids)}"
        )
        for task_id in ids:
            self._wait_gone(manager, task_id)
        manager.runtime.close()

        def started_here() -> list[str]:
            return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]

        wait_until(
            lambda: not started_here(),
            timeout=CLOSE_BOUND,
            what=f"runtime.close() to end the threads the manager started (still alive after"
            f" {CLOSE_BOUND:g}s: {started_here()}): with no task left, close() releases"
            " its loop and idle workers now, not when they expire",
        )

    def test_the_limit_holds_against_many_threads_at_once(
        self, limited_manager: TaskManager
    ) -> None:
        """limit=2, and 16 threads add a task at once: exactly 2 are taken."""
        adapter = self.make_adapter(limited_manager.runtime)
        gate = threading.Event()
        taken: list[Hashable] = []

        def call() -> None:
            try:
                taken.append(limited_manager.add_task(adapter.task(gated(gate))))
            except ManagerFullError:
                pass

        try:
            raised = self._from_many_threads(call)
            assert not raised, f"add_task raised other than ManagerFullError: {raised[0]!r}"
            assert len(taken) == 2, (
                f"limit=2, and {THREADS} threads called add_task at once: {len(taken)} tasks"
                " were taken; the limit must hold against concurrent callers"
            )
        finally:
            gate.set()
        for task_id in taken:
            self._wait_gone(limited_manager, task_id)

    def test_all_tasks_lists_held_tasks(self, manager: TaskManager, adapter: SyncAdapter) -> None:
        """all_tasks lists the ids of tasks the manager holds now, and drops ended ones."""
        gate = threading.Event()
        ids = {manager.add_task(adapter.task(gated(gate))) for _ in range(3)}
        assert ids <= set(manager.all_tasks()), "all_tasks must list every running task"
        gate.set()
        for task_id in ids:
            self._wait_gone(manager, task_id)

    def test_limit_raises_manager_full_error(self, limited_manager: TaskManager) -> None:
        """At its limit add_task raises ManagerFullError; a freed slot can be used again."""
        adapter = self.make_adapter(limited_manager.runtime)
        gate = threading.Event()
        first = [limited_manager.add_task(adapter.task(gated(gate))) for _ in range(2)]
        try:
            limited_manager.add_task(adapter.task(gated(gate)))
        except ManagerFullError:
            pass
        else:
            gate.set()
            pytest.fail(
                "at its limit add_task must raise ManagerFullError: limit=2, and a third task was accepted"
            )
        gate.set()
        for task_id in first:
            self._wait_gone(limited_manager, task_id)
        again = threading.Event()
        limited_manager.add_task(adapter.task(gated(again)))
        again.set()

    def test_remove_task_forgets(self, manager: TaskManager, adapter: SyncAdapter) -> None:
        """remove_task returns True if the task was there, False if it was not; the task runs on."""
        gate, started = threading.Event(), threading.Event()
        seen: list[Any] = []
        outcome: list[str] = []

        def watch() -> None:
            state = current_task()
            if state is not None:
                state.on_shutdown(lambda: seen.append("its shutdown callbacks"))
                state.on_interrupt(lambda: seen.append("its interrupt callbacks"))

        body = to_its_end(gated(gate, started, seen=seen), outcome, watch)
        task_id = manager.add_task(adapter.task(body))
        assert started.wait(WAIT), "add_task must run the thunk it was given"
        assert manager.remove_task(task_id) is True, (
            "remove_task must return True for a task the manager holds"
        )
        assert task_id not in manager.all_tasks(), (
            "remove_task must forget the task: all_tasks must no longer list it"
        )
        assert manager.remove_task(task_id) is False, (
            "remove_task must return False for a task it no longer holds"
        )
        gate.set()
        wait_until(lambda: outcome, what="the removed task to end once let go")
        assert outcome == ["finished"] and seen == [], (
            f"remove_task only forgets the task; it must go on to its own end, neither flagged,"
            f" interrupted nor cancelled: it saw {seen or outcome}"
        )

    def test_stop_task_sets_shutdown_flag(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """stop_task makes shutdown_requested() true inside the task and returns once it ended."""
        started, gate = threading.Event(), threading.Event()
        seen: list[Any] = []
        task_id = manager.add_task(adapter.task(gated(gate, started, seen=seen)))
        assert started.wait(WAIT), (
            "add_task must run the thunk it was given (the task did not start)"
        )
        stopped = manager.stop_task(task_id, timeout=WAIT)
        if stopped:
            assert seen == ["shutdown"], "stop_task must return only once the task has stopped"
        assert seen == ["shutdown"], (
            "stop_task must set the task's shutdown flag first (TaskState.request_shutdown()):"
            " the task ends as soon as shutdown_requested() is true, and it never saw it"
        )
        assert stopped is True, (
            "a task that honours shutdown_requested() ends before the timeout: stop_task"
            " returns True. It returned False, having to interrupt it: stop_task must set"
            " the task's shutdown flag (TaskState.request_shutdown()) before it waits"
        )
        assert task_id not in manager.all_tasks(), (
            "once stop_task has returned, the task has stopped: all_tasks must no longer list it (drop it from all_tasks before setting its done)"
        )
        gate.set()

    def test_stop_task_counts_its_timeout_from_the_call(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """stop_task(id, timeout) waits ``timeout`` from the call (None: without end).

        A task that has run longer than the timeout already, then takes a moment to
        end once asked, ends by itself: stop_task returns True, having interrupted
        nothing.
        """
        for timeout in (1.0, None):
            self._stop_one_slow_to_end(manager, adapter, timeout)

    def _stop_one_slow_to_end(
        self, manager: TaskManager, adapter: SyncAdapter, timeout: float | None
    ) -> None:
        started, asked = threading.Event(), threading.Event()
        ended: list[str] = []

        def slow_to_end() -> Body:
            task = current_task()
            assert task is not None, "current_task() inside a task names its TaskState"
            task.on_shutdown(asked.set)
            started.set()
            until = time.monotonic() + WAIT
            while not asked.is_set() and time.monotonic() < until:
                yield Sleep(POLL)
            yield Sleep(0.3)  # its own cleanup, after the shutdown request
            ended.append("by itself")

        task_id = manager.add_task(adapter.task(slow_to_end))
        assert started.wait(WAIT), "add_task must run the thunk it was given"
        time.sleep(1.2)  # the task has now run longer than the timeout
        stopped = manager.stop_task(task_id, timeout=timeout)
        assert stopped is True and ended == ["by itself"], (
            f"stop_task(id, timeout={timeout}) on a task that ends 0.3s after it is asked"
            f" returned {stopped!r} (the task: {ended or 'interrupted'}): the timeout"
            " counts from the call to stop_task, not from the task's start, and None"
            " waits for the task however long"
        )

    def test_stop_task_of_a_task_it_does_not_hold_is_true_at_once(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """stop_task of an id that ended, or was never the manager's, returns True at once.

        The server stops each acceptor and connection by id, and one may have ended
        on its own in the meantime: that one has stopped. Raising, waiting out the
        timeout, or False (an interrupt that never happened) are each wrong.
        """
        outcome: list[str] = []

        def brief() -> Body:
            yield Sleep(0)

        task_id = manager.add_task(adapter.task(to_its_end(brief, outcome)))
        wait_until(lambda: outcome, what="a task that returns at once to end")
        wait_until(lambda: task_id not in manager.all_tasks(), what="the ended task to be dropped")
        for gone, what in ((task_id, "a task that has ended"), (object(), "an id it never gave")):
            began = time.monotonic()
            try:
                stopped = manager.stop_task(gone, timeout=WAIT)
            except Exception as exc:
                raise AssertionError(
                    f"stop_task of {what} must return True, not raise {exc!r}"
                ) from exc
            took = time.monotonic() - began
            assert stopped is True, f"stop_task of {what} must return True (it has stopped)"
            assert took < WAIT / 4, (
                f"stop_task of {what} must return at once, not wait for its timeout"
                f" (it took {took:.1f}s)"
            )

    def test_stop_task_interrupts_after_timeout(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """A task ignoring its shutdown flag is interrupted once the timeout runs out."""
        if not self.can_preempt():
            pytest.skip(
                f"{self._name()} declares preemptive_stop=False: it cannot interrupt a task"
            )
        started, gate, cleaned = threading.Event(), threading.Event(), threading.Event()
        stubborn = gated(gate, started, honour_shutdown=False)

        def body() -> Body:
            try:
                yield from stubborn()
            finally:
                cleaned.set()

        task_id = manager.add_task(adapter.task(body))
        assert started.wait(WAIT), (
            "add_task must run the thunk it was given (the task did not start)"
        )
        try:
            assert manager.stop_task(task_id, timeout=0.1) is False, (
                "stop_task returns False when the task had to be interrupted"
            )
            assert cleaned.is_set(), (
                "the task, deaf to its flag, was still running when stop_task(timeout=0.1) "
                "returned: with preemptive_stop=True, interrupting must kill or cancel it "
                "(a TaskState subclass whose interrupt() schedules that, as the gevent and "
                "trio managers do), and stop_task must then wait, up to INTERRUPT_GRACE, "
                "for it and its cleanup to end"
            )
        finally:
            gate.set()

    def test_stop_task_interrupts_a_task_in_one_long_sleep(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """The interrupt reaches a task whose loop has nothing else to wake it.

        A task in one long ``runtime.sleep``, the loop asleep with it: an interrupt
        made from the stopping thread must wake the loop (``call_soon_threadsafe``,
        ``trio.from_thread``, the hub's async watcher), not only mark the task.
        """
        if not self.can_preempt():
            pytest.skip(
                f"{self._name()} declares preemptive_stop=False: it cannot interrupt a task"
            )
        started, cleaned = threading.Event(), threading.Event()

        def body() -> Body:
            started.set()
            try:
                yield Sleep(WAIT)
            finally:
                cleaned.set()

        task_id = manager.add_task(adapter.task(body))
        assert started.wait(WAIT), "add_task must run the thunk it was given"
        thread, result, waited = _stop_within_its_bound(manager, task_id, 0.1)
        assert not thread.is_alive() and cleaned.is_set(), (
            f"a task in one long runtime.sleep was still running {waited:.1f}s after"
            " stop_task(id, 0.1) was called from another thread: the interrupt must be"
            " made in the runtime's own thread, waking its loop (asyncio:"
            " loop.call_soon_threadsafe(task.cancel)), not only marked from the caller's"
        )
        assert result == [False], "stop_task returns False when the task had to be interrupted"

    def test_stop_task_times_out_into_an_interrupt(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """Past its timeout, stop_task interrupts the task and returns False, within a grace.

        Every manager, preemptive or not: the task ignores its shutdown flag and ends
        only when interrupted (its ``on_interrupt`` callback lets it go, as a
        connection shut down ends a handler's blocking read).
        """
        started, released, interrupted = threading.Event(), threading.Event(), threading.Event()
        calls: list[str] = []

        def body() -> Body:
            state = current_task()
            if state is None:  # said by the test: an assertion here would only be logged
                calls.append("no current_task()")
                started.set()
                return
            state.on_shutdown(lambda: calls.append("shutdown"))
            state.on_interrupt(lambda: calls.append("interrupt"))
            state.on_interrupt(interrupted.set)
            state.on_interrupt(released.set)
            started.set()
            while not released.is_set():  # deaf to shutdown_requested()
                yield Sleep(POLL)

        task_id = manager.add_task(adapter.task(body))
        assert started.wait(WAIT), (
            "add_task must run the thunk it was given (the task did not start)"
        )
        assert calls != ["no current_task()"], (
            "inside a task, current_task() must name its TaskState (it was None): make the"
            " state current in the context the task runs in (TaskState.make_current())"
        )
        timeout = 0.2
        stopper, result, took = _stop_within_its_bound(manager, task_id, timeout)
        released.set()
        assert not stopper.is_alive(), (
            f"stop_task(id, timeout={timeout}) must return within timeout + INTERRUPT_GRACE"
            f" ({INTERRUPT_GRACE:g}s) of a task that ignores its flag; it still waits after"
            f" {took:.1f}s (the interrupt must not block either: TaskState.interrupt() and"
            " the task's on_interrupt callbacks run, then stop_task waits at most the grace)"
        )
        assert interrupted.is_set(), (
            "once the timeout runs out, stop_task must interrupt the task"
            " (TaskState.interrupt(): its on_interrupt callbacks did not run)"
        )
        assert result == [False], (
            f"stop_task returns False when the task had to be interrupted (got {result[0]!r})"
        )
        self._wait_gone(manager, task_id)
        assert sorted(calls) == ["interrupt", "shutdown"], (
            f"each callback runs once (TaskState's on_shutdown and on_interrupt), got {calls}:"
            " a callback need not be idempotent"
        )

    def test_stop_task_is_bounded_when_the_task_outlives_its_interrupt(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """Past timeout + INTERRUPT_GRACE stop_task returns False, even with the task still running.

        Every manager: one that cannot preempt (threads) interrupts by callbacks
        alone, and a task deaf to them and to its flag (stuck in a computation) goes
        on; stop_task must not wait for it for ever, but return and leave it running.
        """
        started, gate = threading.Event(), threading.Event()
        task_id = manager.add_task(adapter.task(gated(gate, started, honour_shutdown=False)))
        assert started.wait(WAIT), (
            "add_task must run the thunk it was given (the task did not start)"
        )
        self._bounded_past_its_interrupt(
            manager,
            task_id,
            gate,
            "even if the task goes on after its interrupt (a manager that cannot preempt"
            " leaves it running)",
        )

    def test_stop_task_is_bounded_when_the_task_swallows_its_interrupt(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """Past timeout + INTERRUPT_GRACE stop_task returns False, the interrupt swallowed.

        A task that catches what interrupts it (TaskShutdown, trio's Cancelled,
        CancelledError) and goes on: on every manager, preemptive or not, stop_task
        returns by its bound and leaves it running, rather than wait for its end.
        """
        started, gate = threading.Event(), threading.Event()
        task_id = manager.add_task(swallowing(adapter, gate, started))
        assert started.wait(WAIT), "add_task must run the thunk it was given"
        self._bounded_past_its_interrupt(
            manager,
            task_id,
            gate,
            "even if the task swallows its interrupt and goes on (wait for the task's end at"
            " most that long)",
            still_runs=True,
        )

    def test_run_in_loop_runs_in_the_thread_of_the_tasks(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """runtime.run_in_loop(fn), called from another thread, runs fn in the loop's thread.

        Where the manager's tasks share one thread (a loop: a hub, trio, asyncio), fn
        must run there: a stop's batch sets flags and wakes tasks parked on the
        loop's own objects (an asyncio.Event), which only that thread may touch.
        Where each task has a thread of its own (threads), there is no loop and fn
        may run in the caller's.
        """
        gate = threading.Event()
        idents: list[int] = []
        started = [threading.Event(), threading.Event()]

        def recording(index: int) -> Callable[[], Body]:
            def body() -> Body:
                idents.append(threading.get_ident())
                started[index].set()
                until = time.monotonic() + WAIT
                while not gate.is_set() and time.monotonic() < until:
                    yield Sleep(POLL)

            return body

        ids = [manager.add_task(adapter.task(recording(i))) for i in range(2)]
        try:
            assert all(event.wait(WAIT) for event in started), "add_task must run its thunk"
            if idents[0] != idents[1]:
                pytest.skip("the tasks run in threads of their own: no loop thread")
            ran: list[int] = []
            took_it = manager.runtime.run_in_loop(lambda: ran.append(threading.get_ident()), WAIT)
            assert took_it and ran, f"run_in_loop must run fn within its timeout ({WAIT:g}s)"
            assert ran == [idents[0]], (
                "run_in_loop(fn) must run fn in the loop's thread, where the tasks run, not in"
                " the caller's: the stop's batch touches objects only the loop may"
            )
            # A task that blocks the loop (time.sleep, a lock): run_in_loop gives up
            # at its timeout, False, rather than wait for the loop for ever.
            blocking, unblock = threading.Event(), threading.Event()

            def blocks() -> Body:
                blocking.set()
                unblock.wait(WAIT)  # not a yield: the loop's thread is held
                yield from ()

            ids.append(manager.add_task(adapter.task(blocks)))
            try:
                assert blocking.wait(WAIT), "add_task must run its thunk"
                began = time.monotonic()
                answered = manager.runtime.run_in_loop(lambda: None, 0.2)
                took = time.monotonic() - began
            finally:
                unblock.set()
            assert answered is False and took < 0.2 + SLACK, (
                f"run_in_loop(fn, timeout=0.2) on a loop a task blocks returned {answered!r}"
                f" after {took:.2f}s: it must return False once the timeout has passed"
                " (the stop's bound depends on it)"
            )
        finally:
            gate.set()
        for task_id in ids:
            self._wait_gone(manager, task_id)

    def test_slots_released_from_another_thread_wake_a_waiter(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """slots(n): n are free, the next waits, a release from another thread wakes it.

        The server releases slots from other threads (a stop's helper, a lowered
        limit, ``submit``). A waiter woken only by its own loop's next event (an
        asyncio future resolved outside the loop's thread, without
        ``call_soon_threadsafe``) misses it: a client queued for a slot
        (``full_wait``) is then refused when a slot was free.
        """
        slots: Any = manager.runtime.slots(1)
        waiting, got = threading.Event(), threading.Event()
        outcome: list[bool] = []
        thunk: Callable[[], Any]
        if adapter.kind == "async":

            async def waiter_async() -> None:
                outcome.append(slots.acquire_nowait())
                outcome.append(slots.acquire_nowait())
                waiting.set()
                outcome.append(await slots.acquire_within(3 * WAIT))
                got.set()

            thunk = waiter_async
        else:

            def waiter() -> None:
                outcome.append(slots.acquire(blocking=False))
                outcome.append(slots.acquire(blocking=False))
                waiting.set()
                outcome.append(slots.acquire(timeout=3 * WAIT))
                got.set()

            thunk = waiter
        task_id = manager.add_task(thunk)
        assert waiting.wait(WAIT), "add_task must run its thunk"
        assert outcome == [True, False], (
            "slots(1): the first acquire takes the one slot, the second finds none"
        )
        # Let the task reach its wait: the case a release must wake (released first,
        # the wait would find the slot free, and the test would pass regardless).
        time.sleep(POLL * 5)
        slots.release()
        assert got.wait(WAIT), (
            f"a slot released from another thread did not wake the task waiting for it "
            f"within {WAIT:g}s (its own wait is {3 * WAIT:g}s): release() may come from any "
            "thread, so it must reach your loop the way a call from another thread does"
        )
        assert outcome[2] is True, "the woken waiter has the slot: acquire returns True"
        self._wait_gone(manager, task_id)

    def test_task_shutdown_is_swallowed(
        self,
        manager: TaskManager,
        adapter: SyncAdapter,
        errors_logged: Callable[[], list[logging.LogRecord]],
    ) -> None:
        """A task raising TaskShutdown ends quietly; the manager goes on."""

        def body() -> Body:
            yield Sleep(0)
            raise TaskShutdown

        task_id = manager.add_task(adapter.task(body))
        self._wait_gone(manager, task_id)
        assert errors_logged() == [], "TaskShutdown must end a task without an error report"
        ran = threading.Event()

        def after() -> Body:
            ran.set()
            yield from ()

        manager.add_task(adapter.task(after))
        assert ran.wait(WAIT), (
            "the manager must go on after a task raises TaskShutdown (the next task did not run)"
        )

    def test_failing_task_is_reported_and_removed(
        self,
        manager: TaskManager,
        adapter: SyncAdapter,
        errors_logged: Callable[[], list[logging.LogRecord]],
    ) -> None:
        """A task that raises is reported, removed, and the manager goes on: the others with it."""
        gate, started = threading.Event(), threading.Event()
        outcome: list[str] = []
        bystander = to_its_end(gated(gate, started), outcome)

        def body() -> Body:
            yield Sleep(0)
            raise ValueError("conformance: deliberate failure")

        bystander_id = manager.add_task(adapter.task(bystander))
        assert started.wait(WAIT), "add_task must run the thunk it was given"
        task_id = manager.add_task(adapter.task(body))
        self._wait_gone(manager, task_id)
        wait_until(
            lambda: errors_logged(),
            what="the failing task to be reported (logged at ERROR, with its exception, on"
            " any logger; run_task does it)",
        )
        try:
            assert not outcome and bystander_id in manager.all_tasks(), (
                f"a task's exception must not end the manager's other tasks: a task running"
                f" beside it {outcome[0] if outcome else 'left all_tasks'}"
            )
        finally:
            gate.set()
        wait_until(lambda: outcome, what="the task beside the failing one to end")
        assert outcome == ["finished"], "the task beside the failing one must run to its end"
        assert any(
            "deliberate failure" in (r.exc_text or "")
            or (r.exc_info and "deliberate failure" in str(r.exc_info[1]))
            for r in errors_logged()
        ), "the task's own exception must be reported"
        ran = threading.Event()

        def after() -> Body:
            ran.set()
            yield from ()

        manager.add_task(adapter.task(after))
        assert ran.wait(WAIT), "the manager must go on after a task fails"

    def test_contextvars_are_carried_into_tasks(
        self, manager: TaskManager, adapter: SyncAdapter
    ) -> None:
        """Each task sees the contextvars of its own add_task call, as they were at that call.

        Two calls with two values: a manager that gives every task the context its
        loop or worker started with (the first call's) sees the first twice.
        """
        seen: list[str] = []
        done = threading.Semaphore(0)

        def body() -> Body:
            seen.append(_probe.get())
            done.release()
            yield from ()

        for value in ("from-the-first-caller", "from-the-second-caller"):
            token = _probe.set(value)
            try:
                manager.add_task(adapter.task(body))
            finally:
                _probe.reset(token)
        assert done.acquire(timeout=WAIT) and done.acquire(timeout=WAIT), (
            "add_task must run the thunk it was given (a task did not start)"
        )
        assert sorted(seen) == ["from-the-first-caller", "from-the-second-caller"], (
            f"each task must see the contextvars of its own add_task call (a copy made at that"
            f" call), not those of a loop or worker started earlier: saw {seen}"
        )
