"""Handlers for test_log_writer_edges.py (weft serve finds them through PYTHONPATH)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

log = logging.getLogger("app")


def _count(data: bytes) -> int:
    return int(data.split()[0])


def burst(conn: Any) -> None:
    """Log N short lines (N the first word the client sends), then say done."""
    for i in range(_count(conn.recv(100))):
        log.info("line %06d %s", i, "x" * 80)
    conn.sendall(b"done\n")


async def burst_async(stream: Any) -> None:
    for i in range(_count(bytes(await stream.receive_some(100)))):
        log.info("line %06d %s", i, "x" * 80)
    await stream.send_all(b"done\n")


#: How long each of long_lines' lines is (more than a pipe holds).
LONG = 200_000


def _long_line() -> None:
    mark = "ABCDEFGH"[os.getpid() % 8]
    log.info("%d %s", os.getpid(), mark * LONG)


def long_lines(conn: Any) -> None:
    """Log N lines of LONG bytes each, all one letter of this process's own."""
    for _ in range(_count(conn.recv(100))):
        _long_line()
    conn.sendall(b"done\n")


async def long_lines_async(stream: Any) -> None:
    for _ in range(_count(bytes(await stream.receive_some(100)))):
        _long_line()
    await stream.send_all(b"done\n")


def warns(conn: Any) -> None:
    """A handler that calls warnings.warn (a deprecated API of a library it uses)."""
    conn.recv(100)
    warnings.warn("handler: careful", UserWarning, stacklevel=1)
    conn.sendall(b"done\n")


async def warns_async(stream: Any) -> None:
    await stream.receive_some(100)
    warnings.warn("handler: careful", UserWarning, stacklevel=1)
    await stream.send_all(b"done\n")


def last_resort(conn: Any) -> None:
    """A library logger that does not propagate and has no handler: logging.lastResort."""
    conn.recv(100)
    quiet = logging.getLogger("app.quiet")
    quiet.propagate = False
    quiet.warning("through logging.lastResort")
    conn.sendall(b"done\n")


def thread_raises(conn: Any) -> None:
    """A handler whose helper thread fails (threading.excepthook writes its traceback)."""
    import threading

    conn.recv(100)

    def helper() -> None:
        raise ValueError("helper thread failed")

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join(10)
    conn.sendall(b"done\n")
