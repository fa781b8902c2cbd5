"""TaskState on its own: the done flag made on demand, the shutdown flags, the callbacks.

Managers build on these (tests/test_conformance.py runs them through every manager);
here the edge cases of each are pinned down with real threads.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

import pytest

from weft_core import (
    ManagerFullError,
    TaskState,
    TaskTable,
    current_task,
    run_task,
    shutdown_requested,
)
from weft_core._tasks import _current_task


@pytest.fixture(autouse=True)
def _no_task_left_current() -> Iterator[None]:
    """run_task() without a context makes its task current here: undo it after each test.

    Otherwise the test thread looks like a weft task to later tests, and a
    ``Server.stop()`` there would not wait (it cannot, from inside a task).
    """
    token = _current_task.set(None)
    yield
    _current_task.reset(token)


WAIT = 10.0


def test_done_before_anyone_looked() -> None:
    state = TaskState(1, "t")
    state.set_done()
    assert state.done.is_set()
    assert state.done.wait(0)


def test_set_done_wakes_a_thread_already_waiting() -> None:
    state = TaskState(1, "t")
    waiting = threading.Event()
    woke: list[bool] = []

    def waiter() -> None:
        done = state.done
        waiting.set()
        woke.append(done.wait(WAIT))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(WAIT)
    state.set_done()
    thread.join(WAIT)
    assert woke == [True]


@pytest.mark.timeout(60)
def test_set_done_racing_the_first_waiter_never_loses_the_wake_up() -> None:
    """The flag and the lazily made event are written and read in opposite orders."""

    def wait_for(state: TaskState, result: list[bool]) -> None:
        result.append(state.done.wait(WAIT))

    for _ in range(300):
        state = TaskState(1, "t")
        result: list[bool] = []
        thread = threading.Thread(target=wait_for, args=(state, result))
        thread.start()
        state.set_done()
        thread.join(WAIT)
        assert result == [True]


def test_done_set_directly_still_works() -> None:
    state = TaskState(1, "t")
    state.done.set()
    assert state.done.is_set()


def test_run_task_marks_done_and_makes_the_state_current() -> None:
    state = TaskState(7, "t")
    seen: list[object] = []

    def thunk() -> None:
        seen.append(current_task())
        seen.append(shutdown_requested())

    run_task(state, thunk)
    assert seen == [state, False]
    assert state.done.is_set()


def test_callbacks_run_once_and_late_ones_at_once() -> None:
    state = TaskState(1, "t")
    calls: list[str] = []
    state.on_shutdown(lambda: calls.append("shutdown"))
    state.on_interrupt(lambda: calls.append("interrupt"))
    state.interrupt()
    state.interrupt()
    state.request_shutdown()
    assert calls == ["shutdown", "interrupt"]
    state.on_shutdown(lambda: calls.append("late shutdown"))
    state.on_interrupt(lambda: calls.append("late interrupt"))
    assert calls == ["shutdown", "interrupt", "late shutdown", "late interrupt"]
    assert state.requested and state.interrupted


class _Callable:
    """A thunk that is an object with a Python ``__call__`` (as the server's connections are)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[TaskState | None] = []
        self.fail = fail

    def __call__(self) -> None:
        self.calls.append(current_task())
        if self.fail:
            raise ValueError("boom")


def test_run_task_calls_an_object_thunk_once_as_the_task() -> None:
    state = TaskState(1, "t")
    thunk = _Callable()
    run_task(state, thunk)
    assert thunk.calls == [state]
    assert state.done.is_set()


def test_run_task_reports_what_an_object_thunk_raises(caplog: pytest.LogCaptureFixture) -> None:
    state = TaskState(7, "obj")
    run_task(state, _Callable(fail=True))
    assert state.done.is_set()
    assert "task 7 (obj) raised" in caplog.text and "ValueError: boom" in caplog.text


def test_run_task_calls_builtin_and_bound_method_thunks() -> None:
    got: list[int] = []
    run_task(TaskState(1), functools.partial(got.append, 1))
    run_task(TaskState(2), got.clear)
    run_task(TaskState(3), functools.partial(got.append, 3))
    assert got == [3]


# -- TaskTable ------------------------------------------------------------------------


def test_task_table_add_reserves_and_stores_in_one_step() -> None:
    table: TaskTable[TaskState] = TaskTable(2, "my manager")
    first = table.add(TaskState, "first")
    second = table.add(TaskState, "second")
    assert (first.name, second.name) == ("first", "second")
    assert first.id != second.id
    assert table.get(first.id) is first
    assert table.records() == [first, second]
    with pytest.raises(ManagerFullError, match="my manager is full: it already holds 2 tasks"):
        table.add(TaskState)
    assert table.pop(first.id)
    assert table.add(TaskState).id not in (first.id, second.id)  # ids are never reused
    assert len(table) == 2


def test_task_table_add_stores_nothing_when_making_the_record_fails() -> None:
    table: TaskTable[TaskState] = TaskTable(None, "my manager")

    def broken(task_id: int) -> TaskState:
        raise RuntimeError("cannot make it")

    with pytest.raises(RuntimeError):
        table.add(broken)
    assert len(table) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [None, 10_000_000])
def test_task_table_from_many_threads_at_once(limit: int | None) -> None:
    """Adds, reserves, puts and pops in four threads while a fifth reads the table:
    every id is unique, no reader sees the table change midway (a read that walked
    the dictionary while another thread popped raised "dictionary changed size
    during iteration"), and the table ends empty. Without a limit nothing takes the
    lock per task, so this is the case the lock no longer covers."""
    table: TaskTable[TaskState] = TaskTable(limit, "my manager")
    rounds = 20_000
    ids: list[list[int]] = [[] for _ in range(4)]
    failures: list[BaseException] = []
    writing = threading.Event()

    def write(mine: list[int], reserving: bool) -> None:
        try:
            for _ in range(rounds):
                if reserving:
                    task_id = table.reserve()
                    table.put(task_id, TaskState(task_id))
                else:
                    task_id = table.add(TaskState).id
                mine.append(task_id)
                assert table.get(task_id) is not None
                assert table.pop(task_id)
                assert not table.pop(task_id)
        except BaseException as exc:
            failures.append(exc)

    def read() -> None:
        try:
            while writing.is_set():
                for record in table.records():
                    assert isinstance(record, TaskState)
                table.ids()
                len(table)
        except BaseException as exc:
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(ids[n], n % 2 == 0)) for n in range(4)]
    writing.set()
    reader = threading.Thread(target=read)
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    reader.join()
    assert failures == []
    every = [task_id for mine in ids for task_id in mine]
    assert len(set(every)) == len(every) == 4 * rounds
    assert len(table) == 0 and table.ids() == [] and table.records() == []
