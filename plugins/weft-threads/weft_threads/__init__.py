"""weft's ``threads`` task manager: a thread per connection."""

from __future__ import annotations

from ._manager import ThreadManager

__all__ = ["ThreadManager"]
