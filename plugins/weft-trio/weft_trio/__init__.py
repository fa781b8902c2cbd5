"""weft's ``trio`` task manager: a task per connection in a trio nursery."""

from __future__ import annotations

from ._manager import TrioManager
from ._runtime import TrioListener, TrioRuntime, TrioSlots

__all__ = ["TrioListener", "TrioManager", "TrioRuntime", "TrioSlots"]
