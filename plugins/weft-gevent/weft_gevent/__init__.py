"""weft's ``gevent`` task manager: a greenlet per connection.

Its names are imported on first use, and gevent with them: weft imports this
package whenever it looks for managers, and a server on another manager never
loads gevent. Importing gevent patches nothing: whether tasks run in the
application's hub or in one the manager starts depends on whether the application
has monkey-patched (see :mod:`weft_gevent._hub`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._manager import GeventManager
    from ._runtime import GeventRuntime, GeventSocket

__all__ = ["GeventManager", "GeventRuntime", "GeventSocket"]

_MODULE_OF = {
    "GeventManager": "._manager",
    "GeventRuntime": "._runtime",
    "GeventSocket": "._runtime",
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
