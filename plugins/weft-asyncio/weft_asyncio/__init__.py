"""weft's ``asyncio`` task manager: a task per connection on an asyncio (or uvloop) loop."""

from __future__ import annotations

from ._manager import AsyncioManager
from ._runtime import AsyncioListener, AsyncioRuntime, AsyncioSlots, AsyncioSocket
from ._stream import AsyncioStream

__all__ = [
    "AsyncioListener",
    "AsyncioManager",
    "AsyncioRuntime",
    "AsyncioSlots",
    "AsyncioSocket",
    "AsyncioStream",
]
