"""Handlers for test_log_edges.py (in-process servers, and weft serve through PYTHONPATH)."""

from __future__ import annotations

from typing import Any


def raise_what_was_sent(conn: Any) -> None:
    """Raise a ValueError whose message is the bytes the client sent (as a parser does)."""
    data = conn.recv(4096)
    raise ValueError("bad request: " + data.decode("latin-1"))


async def raise_what_was_sent_async(stream: Any) -> None:
    data = await stream.receive_some(4096)
    raise ValueError("bad request: " + bytes(data).decode("latin-1"))


def failing_exception_handler(server: Any, conn: Any, exc: BaseException) -> None:
    """An exception_handler with a bug of its own."""
    raise RuntimeError("exception_handler bug")
