"""weft-pool: an example third-party task manager for weft.

``pool`` runs tasks on a fixed pool of worker threads fed by a queue, so a flood of
clients waits in the queue instead of spawning threads. Select it with
``Server(handler, manager="pool", manager_options={"workers": 32})`` or
``manager = "pool"`` in ``weft.toml``.
"""

from __future__ import annotations

from ._manager import DEFAULT_WORKERS, MIN_WORKERS, PoolManager, PoolRuntime

__all__ = ["DEFAULT_WORKERS", "MIN_WORKERS", "PoolManager", "PoolRuntime"]

__version__ = "0.1.0"
