"""weft's ``gevent`` task manager: a greenlet per connection.

Importing this package imports gevent but patches nothing: whether tasks run in
the application's hub or in one the manager starts depends on whether the
application has monkey-patched (see :mod:`weft_gevent._hub`).
"""

from __future__ import annotations

from ._manager import GeventManager
from ._runtime import GeventRuntime, GeventSocket

__all__ = ["GeventManager", "GeventRuntime", "GeventSocket"]
