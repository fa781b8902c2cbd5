"""OS threads and locks that stay OS threads and locks in a gevent-patched process.

What must run whatever the application's loop does (the stop deadline, the log's
writer) cannot be a greenlet of a hub that a handler may block.
"""

from __future__ import annotations

import _thread
import sys
from typing import Any

__all__ = ["thread_primitives"]


def thread_primitives() -> tuple[Any, Any]:
    """``start_new_thread`` and ``allocate_lock`` as the OS provides them, never patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        start, allocate = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
        return start, allocate
    return _thread.start_new_thread, _thread.allocate_lock
