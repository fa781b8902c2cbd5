"""weft's ``threads`` task manager: a thread per connection, idle threads reused."""

from __future__ import annotations

from ._manager import (
    DEFAULT_IDLE_EXPIRY,
    DEFAULT_IDLE_THREADS,
    IDLE_THREAD_NAME,
    ThreadManager,
    ThreadRuntime,
)

__all__ = [
    "DEFAULT_IDLE_EXPIRY",
    "DEFAULT_IDLE_THREADS",
    "IDLE_THREAD_NAME",
    "ThreadManager",
    "ThreadRuntime",
]
