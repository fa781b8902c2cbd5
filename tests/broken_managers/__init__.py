"""Task managers that each break one rule of DESIGN section 3, for testing the suite.

``sound`` is a plain thread-per-task manager that keeps every rule; each other
manager changes the one thing its docstring names, the way a real manager gets it
wrong. ``tests/test_broken_managers.py`` registers this module in a pytest run of
its own (``weft_core._registry.register``) and checks that the conformance suite
fails each broken manager, saying which rule it broke.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from weft_core import (
    BLOCKING_RUNTIME,
    BlockingRuntime,
    Conformance,
    ManagerSpec,
    TaskState,
    TaskTable,
    hookimpl,
    run_task,
)
from weft_core.testing import SyncAdapter


class SoundManager:
    """A thread per task, keeping every rule (the control case)."""

    runtime = BLOCKING_RUNTIME

    def __init__(self, *, limit: int | None = None) -> None:
        self._table: TaskTable[TaskState] = TaskTable(limit, type(self).__name__)
        self.limit = limit

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        task_id = self._table.reserve()
        state = TaskState(task_id, getattr(thunk, "__name__", ""))
        self._table.put(task_id, state)
        self._start(state, thunk)
        return task_id

    def _start(self, state: TaskState, thunk: Callable[[], Any]) -> None:
        context = self._context()
        threading.Thread(target=self._run, args=(state, thunk, context), daemon=True).start()

    def _context(self) -> contextvars.Context:
        return contextvars.copy_context()

    def _run(
        self, state: TaskState, thunk: Callable[[], Any], context: contextvars.Context
    ) -> None:
        try:
            run_task(state, thunk, context)
        finally:
            self._table.pop(state.id)

    def remove_task(self, task_id: Hashable) -> bool:
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        state = self._table.get(task_id)
        if state is None:
            return True
        state.request_shutdown()
        if state.done.wait(timeout):
            return True
        state.interrupt()
        self._grace(state)
        return False

    def _grace(self, state: TaskState) -> None:
        """After the interrupt: wait INTERRUPT_GRACE (2 s) at most for the task to end."""
        state.done.wait(2.0)

    def all_tasks(self) -> list[Hashable]:
        return self._table.ids()


class NeverFullManager(SoundManager):
    """Takes ``limit=`` but never enforces it: add_task never raises ManagerFullError."""

    def __init__(self, *, limit: int | None = None) -> None:
        super().__init__(limit=None)
        self.limit = limit  # reported, not enforced


class ReusedIdsManager(SoundManager):
    """Gives each task the lowest free number, as file descriptors are: ids come back."""

    def __init__(self, *, limit: int | None = None) -> None:
        super().__init__(limit=limit)
        self._lock = threading.Lock()
        self._states: dict[Hashable, TaskState] = {}

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        with self._lock:
            task_id = next(i for i in range(len(self._states) + 1) if i not in self._states)
            state = self._states[task_id] = TaskState(task_id, getattr(thunk, "__name__", ""))
        self._start(state, thunk)
        return task_id

    def _run(
        self, state: TaskState, thunk: Callable[[], Any], context: contextvars.Context
    ) -> None:
        try:
            run_task(state, thunk, context)
        finally:
            with self._lock:
                self._states.pop(state.id, None)

    def remove_task(self, task_id: Hashable) -> bool:
        with self._lock:
            return self._states.pop(task_id, None) is not None

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        with self._lock:
            state = self._states.get(task_id)
        if state is None:
            return True
        state.request_shutdown()
        return bool(state.done.wait(timeout))

    def all_tasks(self) -> list[Hashable]:
        with self._lock:
            return list(self._states)


class IgnoresStopManager(SoundManager):
    """stop_task returns True at once, without flagging the task or waiting for it."""

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        return True


class DropsContextManager(SoundManager):
    """Runs every task in a fresh, empty context, as a pool of pre-started workers does."""

    def _context(self) -> contextvars.Context:
        return contextvars.Context()


class FrozenContextManager(SoundManager):
    """Runs every task in (a copy of) the context of the first add_task call, as a loop
    or worker that call started would: the first caller's contextvars for everyone."""

    _frozen: contextvars.Context | None = None

    def _context(self) -> contextvars.Context:
        if self._frozen is None:
            self._frozen = contextvars.copy_context()
        return self._frozen.copy()


class LeaksFdManager(SoundManager):
    """Opens a wake-up pipe for each task (the self-pipe trick) and never closes it.

    The server closes every connection itself, whatever the manager does, so what
    a manager leaks in practice is its own per-task descriptors; the suite's fd
    check after a stop is what catches them.
    """

    def __init__(self, *, limit: int | None = None) -> None:
        super().__init__(limit=limit)
        self.wakeups: dict[Hashable, tuple[int, int]] = {}

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        task_id = super().add_task(thunk)
        self.wakeups[task_id] = os.pipe()  # never closed: the bug
        return task_id


class RunsInCallerManager(SoundManager):
    """Runs each task in the thread that calls add_task, returning only once it ended."""

    def _start(self, state: TaskState, thunk: Callable[[], Any]) -> None:
        self._run(state, thunk, self._context())


class WaitsOutItsTaskManager(SoundManager):
    """After the interrupt, waits for the task to end however long it takes."""

    def _grace(self, state: TaskState) -> None:
        state.done.wait()  # the bug: a task deaf to its interrupt holds stop_task for ever


class SleeplessRuntime(BlockingRuntime):
    """The blocking runtime, but ``sleep`` returns at once whatever it is asked."""

    def sleep(self, seconds: float) -> None:
        time.sleep(0)


class SleeplessManager(SoundManager):
    """Keeps every task rule; its runtime's sleep does not wait (a back-off that spins)."""

    runtime: Any = SleeplessRuntime()


class NoRunInLoopRuntime:
    """The blocking runtime without ``run_in_loop``: written from an old, partial contract."""

    kind = "sync"
    conn_is_stream = False
    adopt_listener = BlockingRuntime.adopt_listener
    wake_listener = BlockingRuntime.wake_listener
    slots = BlockingRuntime.slots
    sleep = BlockingRuntime.sleep
    wrap_connection = BlockingRuntime.wrap_connection
    wrap_tls = BlockingRuntime.wrap_tls
    close = BlockingRuntime.close


class PartialRuntimeManager(SoundManager):
    """Keeps every task rule, but its runtime lacks a member the server calls."""

    runtime: Any = NoRunInLoopRuntime()


class DeafSlots:
    """A semaphore whose acquire waits for a slot however long, its timeout ignored."""

    def __init__(self, n: int) -> None:
        self._semaphore = threading.Semaphore(n)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return self._semaphore.acquire(blocking)  # the bug: timeout dropped

    def release(self) -> None:
        self._semaphore.release()


class DeafSlotsRuntime(BlockingRuntime):
    def slots(self, n: int) -> Any:
        return DeafSlots(n)


class DeafSlotsManager(SoundManager):
    """Keeps every task rule; its runtime's slots ignore an acquire's timeout."""

    runtime: Any = DeafSlotsRuntime()


class OneSend:
    """A socket whose sendall is one send(): what fits in the buffer, the rest dropped."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def sendall(self, data: bytes) -> None:
        self.socket.send(data)  # the bug: a partial send ends it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.socket, name)


class OneSendRuntime(BlockingRuntime):
    def wrap_connection(self, sock: socket.socket) -> OneSend:
        return OneSend(sock)


class OneSendManager(SoundManager):
    """Keeps every task rule; its connections' sendall stops at a partial send."""

    runtime: Any = OneSendRuntime()


class Channel:
    """writing-a-manager.md's connection object: read/write instead of recv/sendall."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def read(self, n: int) -> bytes:
        return self.socket.recv(n)

    def write(self, data: bytes) -> None:
        self.socket.sendall(data)

    def close(self) -> None:
        self.socket.close()


class ChannelRuntime(BlockingRuntime):
    """The docs' runtime handing each handler a Channel over its socket."""

    conn_is_stream = True  # a Channel has no makefile: Server(stream=True) is refused

    def wrap_connection(self, sock: socket.socket) -> Channel:
        return Channel(sock)


class ChannelManager(SoundManager):
    """Keeps every rule, its handlers given the docs' Channel (a second control case)."""

    runtime: Any = ChannelRuntime()


class ChannelAdapter(SyncAdapter):
    """The docs' adapter: drives the suite's handlers over Channel objects."""

    def recv(self, conn: Any, n: int) -> bytes:
        data: bytes = conn.read(n)
        return data

    def send(self, conn: Any, data: bytes) -> None:
        conn.write(data)


MANAGERS: dict[str, tuple[type[SoundManager], str]] = {
    "sound": (SoundManager, "a thread per task, keeping every rule"),
    "never-full": (NeverFullManager, "never raises ManagerFullError"),
    "reused-ids": (ReusedIdsManager, "reuses the ids of ended tasks"),
    "ignores-stop": (IgnoresStopManager, "stop_task returns at once without stopping"),
    "drops-context": (DropsContextManager, "runs tasks without the caller's contextvars"),
    "frozen-context": (FrozenContextManager, "runs tasks in the first caller's contextvars"),
    "leaks-fd": (LeaksFdManager, "leaks a descriptor per task"),
    "partial-runtime": (PartialRuntimeManager, "its runtime lacks run_in_loop"),
    "runs-in-caller": (RunsInCallerManager, "add_task runs the task in the caller's thread"),
    "waits-out-its-task": (WaitsOutItsTaskManager, "stop_task waits for ever after the interrupt"),
    "sleepless": (SleeplessManager, "its runtime's sleep returns at once"),
    "deaf-slots": (DeafSlotsManager, "its runtime's slots ignore an acquire's timeout"),
    "one-send": (OneSendManager, "its connections' sendall stops at a partial send"),
    "channel": (ChannelManager, "hands handlers the docs' Channel, keeping every rule"),
}

#: How the suite drives a manager's connections, where not sockets.
#: (The control managers start plain threads and name none of them: a rule of its own.)
CONFORMANCE = {"channel": Conformance(adapter_class=ChannelAdapter, names_tasks=False)}


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    for name, (factory, description) in MANAGERS.items():
        yield ManagerSpec(
            name=f"test-{name}",
            factory=factory,
            description=description,
            conformance=CONFORMANCE.get(name, Conformance()),
        )
