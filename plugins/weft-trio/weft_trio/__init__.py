"""weft's ``trio`` task manager: a task per connection in a trio nursery.

Its names are imported on first use, and trio with them: weft imports this
package whenever it looks for managers, and a server on another manager never
loads trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._manager import TrioManager
    from ._runtime import IdleTimeoutStream, TrioListener, TrioRuntime, TrioSlots

__all__ = ["IdleTimeoutStream", "TrioListener", "TrioManager", "TrioRuntime", "TrioSlots"]

_MODULE_OF = {
    "IdleTimeoutStream": "._runtime",
    "TrioListener": "._runtime",
    "TrioManager": "._manager",
    "TrioRuntime": "._runtime",
    "TrioSlots": "._runtime",
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
