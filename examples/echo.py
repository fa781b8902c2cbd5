"""The demo echo server: ``weft serve examples.echo:handle`` (threads or gevent).

``handle_async`` is the same for ``--manager trio``:
``weft serve examples.echo:handle_async --manager trio``.
"""

from __future__ import annotations

from typing import Any

from weft_core import shutdown_requested


def handle(conn: Any) -> None:
    """Echo every byte back until the client closes (or the server stops)."""
    while not shutdown_requested():
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


async def handle_async(stream: Any) -> None:
    """The same echo for trio: ``stream`` is a ``trio.SocketStream``."""
    async for data in stream:
        await stream.send_all(data)
