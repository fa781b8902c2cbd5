"""OS threads and locks that stay OS threads and locks in a gevent-patched process.

What must run whatever the application's loop does (the stop deadline, the log's
writer) cannot be a greenlet of a hub that a handler may block. And what must run
whatever another thread does with the GIL: :func:`onto_one_cpu`.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import sys
from typing import Any

__all__ = ["onto_one_cpu", "thread_primitives"]


def thread_primitives() -> tuple[Any, Any]:
    """``start_new_thread`` and ``allocate_lock`` as the OS provides them, never patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        start, allocate = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
        return start, allocate
    return _thread.start_new_thread, _thread.allocate_lock


def onto_one_cpu() -> None:
    """Every thread of this process onto one of its CPUs (Linux; elsewhere nothing).

    Against a GIL convoy. A thread that gives up the GIL for a system call that
    returns at once and takes it back (a trio loop with a task ready to run polls
    with a zero timeout on every turn: a handler that swallows its cancellation in
    a loop) wins it back before a waiter woken on another CPU can take it, and
    every such release restarts the waiter's wait for its turn: the stop's thread
    and its last resort waited 0.1-1.5 s for each take of the GIL on two CPUs, 0.1
    ms on one, where the waiter runs as soon as it is woken. Only for a process
    that is ending: it gives up running on several CPUs.
    """
    try:
        cpus = os.sched_getaffinity(0)
        tids = os.listdir("/proc/self/task")
    except (AttributeError, OSError):
        return
    if len(cpus) < 2:
        return
    one = {min(cpus)}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), one)
