"""weft's ``asyncio`` task manager: a task per connection on an asyncio (or uvloop) loop.

Its names are imported on first use, and asyncio with them: weft imports this
package whenever it looks for managers, and a server on another manager never
loads asyncio for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULE_OF = {
    "AsyncioListener": "._runtime",
    "AsyncioManager": "._manager",
    "AsyncioRuntime": "._runtime",
    "AsyncioSlots": "._runtime",
    "AsyncioSocket": "._runtime",
    "AsyncioStream": "._stream",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
