"""The ``aio`` manager: a task per thunk on an asyncio loop in a daemon thread."""

from ._manager import AioManager, AioRuntime

__all__ = ["AioManager", "AioRuntime"]
