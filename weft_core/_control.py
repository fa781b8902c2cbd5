"""What ``Server.connections()`` returns: a snapshot of one open connection.

The live control operations themselves (pause and resume the acceptors, change
``max_connections``, close one connection) are the Engine's (``_engine.py``),
since they act on its acceptor tasks, slots and connection table; this module
holds the record they hand out, so that it can be read without the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._connection import ConnectionInfo

__all__ = ["ConnectionSnapshot"]


@dataclass(slots=True, repr=False, eq=False)
class ConnectionSnapshot(ConnectionInfo):
    """A ``ConnectionInfo`` copied at one moment, with what a live view adds.

    ``age`` is seconds since its task began serving it (0 while it waits to be
    started); ``bytes_in`` and ``bytes_out`` are the kernel's counts so far (Linux
    ``TCP_INFO``: received, and sent and acknowledged; None for Unix sockets and
    where the kernel cannot tell); ``stop_requested`` is True once ``stop()`` or
    ``close_connection()`` has asked its task to shut down. A copy: it does not
    change as the connection goes on.
    """

    age: float = 0.0
    bytes_in: int | None = None
    bytes_out: int | None = None
    stop_requested: bool = False

    def __repr__(self) -> str:
        shown = ("peer", "task_id", "age", "bytes_in", "bytes_out", "stop_requested")
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"ConnectionSnapshot({fields})"
