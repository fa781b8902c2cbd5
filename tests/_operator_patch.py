"""A handler that says whether its process is gevent-monkey-patched (b'patched' or b'plain')."""

from __future__ import annotations

from typing import Any


def handle(conn: Any) -> None:
    import gevent.monkey

    patched = gevent.monkey.is_module_patched("socket")
    conn.sendall(b"patched\n" if patched else b"plain\n")
