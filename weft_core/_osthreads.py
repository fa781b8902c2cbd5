"""OS threads and locks that stay OS threads and locks in a gevent-patched process.

What must run whatever the application's loop does (the stop deadline, the log's
writer) cannot be a greenlet of a hub that a handler may block. And what must run
whatever other threads do with the GIL: :class:`OneCpu`, :class:`ShortSwitches`.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "STOP_SWITCH_INTERVAL",
    "OneCpu",
    "ShortSwitches",
    "one_cpu",
    "short_switches",
    "thread_primitives",
]


def thread_primitives() -> tuple[Any, Any]:
    """``start_new_thread`` and ``allocate_lock`` as the OS provides them, never patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        start, allocate = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
        return start, allocate
    return _thread.start_new_thread, _thread.allocate_lock


class _Nested:
    """A process-wide change made by the first of nested holds, undone by the last.

    Holds nest: two servers of one process may stop at once.
    """

    def __init__(self) -> None:
        _, allocate = thread_primitives()
        self._lock = allocate()
        self._holders = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The change for the block (a stop, or the part of it that interrupts)."""
        with self._lock:
            self._holders += 1
            self._hold(first=self._holders == 1)
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if not self._holders:
                    self._undo()

    def _hold(self, first: bool) -> None:
        """Under the lock, at each hold: make the change if ``first``."""
        raise NotImplementedError

    def _undo(self) -> None:
        """Under the lock, as the last hold ends: undo the change."""
        raise NotImplementedError


class OneCpu(_Nested):
    """Every thread of this process on one of its CPUs while held (Linux; elsewhere nothing).

    Against a GIL convoy while a stop interrupts. A thread that gives up the GIL
    for a system call that returns at once and takes it back (a trio loop with a
    task ready to run polls with a zero timeout on every turn: a handler that
    swallows its cancellation in a loop) wins it back before a waiter woken on
    another CPU can take it, and each such release restarts the waiter's wait for
    its turn: the stopping thread waited 0.1-1.5 s for each take of the GIL on two
    CPUs (an embedded stop bounded at 2.5 s took 2.9-3.3 s; ``weft serve`` exited
    4.5-5.5 s after SIGTERM, bound 4); on one CPU the woken waiter runs at once
    (0.1 ms). When the last hold ends, each thread goes back to the CPUs it had (a
    thread begun meanwhile, to those of the thread that held first), unless
    :attr:`stay` was set (by ``weft serve`` for the stop it exits by: its exit must
    not wait in the convoy).
    """

    def __init__(self) -> None:
        super().__init__()
        self._masks: dict[int, set[int]] = {}
        self._default: set[int] = set()
        self._kept = False
        #: Once held, stay on one CPU for good (a process that ends with its stop).
        self.stay = False

    def _hold(self, first: bool) -> None:
        self._kept = self._kept or self.stay
        if not first:
            return
        try:
            cpus = os.sched_getaffinity(0)
            tids = _threads()
        except (AttributeError, OSError):
            return
        if len(cpus) < 2 or len(tids) > MOST_PINNED:
            return
        self._default = cpus
        one = {_this_cpu(cpus)}
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that has just ended
                self._masks[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, one)

    def _undo(self) -> None:
        if self._kept or not self._default:
            return
        masks, self._masks = self._masks, {}
        default, self._default = self._default, set()
        with contextlib.suppress(OSError):
            for tid in _threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, masks.get(tid, default))


#: The most threads :class:`OneCpu` pins. The convoy it is for is a few threads
#: trading the GIL (a loop's and the stopping one); with thousands of handler
#: threads, two system calls each cost the stop more than the pin saves (1.3 s of
#: a 4 s bound for 3,000 threads), and :class:`ShortSwitches` is what helps there.
MOST_PINNED = 256


def _this_cpu(cpus: set[int]) -> int:
    """The CPU this thread last ran on (so processes stopping at once stay apart)."""
    try:
        with open("/proc/thread-self/stat", "rb") as stat:
            cpu = int(stat.read().rsplit(b")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return min(cpus)
    return cpu if cpu in cpus else min(cpus)


def _threads() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


#: The process's one :class:`OneCpu`: every server's stop holds it while it interrupts.
one_cpu = OneCpu()


class ShortSwitches(_Nested):
    """The GIL's switch interval shortened while held (``sys.setswitchinterval``).

    Against the convoy a stop meets among many busy threads. The stopping thread
    makes a system call per connection (ending its input, shutting it down), and
    after each it waits for the GIL behind the handler threads: with thousands of
    them sending (a broadcast to every parked subscriber), each wait took up to the
    5 ms interval, and ``stop(3)`` returned after 9-20 s (bound 5). At
    :data:`STOP_SWITCH_INTERVAL` it returned in 3.9-4.2 s, nothing left behind.
    The last hold to end puts the interval back, unless something else changed it
    meanwhile.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: float | None = None
        #: The interval as Python reports it once set: it keeps whole microseconds,
        #: so 0.0002 reads back as 0.00019999999999999998, and a comparison with
        #: STOP_SWITCH_INTERVAL never matched: every stop left the process at 0.2 ms.
        self._set: float | None = None

    def _hold(self, first: bool) -> None:
        if first:
            self._saved = sys.getswitchinterval()
            if self._saved > STOP_SWITCH_INTERVAL:
                sys.setswitchinterval(STOP_SWITCH_INTERVAL)
                self._set = sys.getswitchinterval()

    def _undo(self) -> None:
        saved, self._saved = self._saved, None
        was_set, self._set = self._set, None
        if saved is not None and was_set is not None and sys.getswitchinterval() == was_set:
            sys.setswitchinterval(saved)


#: The GIL's switch interval while a stop runs: short enough that the stopping
#: thread's turn comes within a fraction of a millisecond after each system call.
STOP_SWITCH_INTERVAL = 0.0002

#: The process's one :class:`ShortSwitches`: every server's stop holds it.
short_switches = ShortSwitches()
