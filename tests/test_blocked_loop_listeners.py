"""Listeners while a handler blocks the runtime's loop (an outside check, 2026-12-07).

A handler that blocks its loop (``time.sleep`` in a coroutine, or in an unpatched
gevent handler) holds up everything the loop must do: an acceptor's end, a
socket's close. What weft promises around such a handler:

- a stop removes a Unix socket's file at once, so new Unix clients get ``ENOENT``
  instead of a connection the kernel completes and the server resets seconds later
  unserved (a TCP listener still closes only once the loop answers: documented);
- a pause that could not end its acceptor, then a resume, leave the server serving
  once the loop is free (gevent's two waiters on one listener stopped the server:
  the plugin's own test makes the pause give up sooner).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _every_manager import MANAGERS, is_async

from weft_core import Server
from weft_core.testing import WAIT

#: How long the handler blocks its loop: past the stop's wait for the loop (1 s).
BLOCK = 2.0


def _blocker(manager: str, entered: threading.Event, done: threading.Event) -> Callable[..., Any]:
    """A handler that reads a byte, then blocks its loop (its thread, on threads)."""
    if is_async(manager):

        async def block(stream: Any) -> None:
            await stream.receive_some(1)
            entered.set()
            time.sleep(BLOCK)
            done.set()

        return block

    def block_sync(conn: Any) -> None:
        conn.recv(1)
        entered.set()
        time.sleep(BLOCK)
        done.set()

    return block_sync


@pytest.mark.parametrize("manager,options", MANAGERS)
@pytest.mark.parametrize("how", ["stop_accepting", "stop"])
def test_a_stop_refuses_new_unix_clients_at_once_while_a_handler_blocks_the_loop(
    manager: str, options: dict[str, Any], how: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "s.sock")
    entered, done = threading.Event(), threading.Event()
    server = Server(
        _blocker(manager, entered, done),
        bind=[f"unix:{path}"],
        manager=manager,
        manager_options=options,
    )
    server.run()
    client = socket.socket(socket.AF_UNIX)
    stopper = None
    try:
        client.connect(path)
        client.sendall(b"x")
        assert entered.wait(WAIT)
        if how == "stop":
            stopper = threading.Thread(target=server.stop, args=(0,))
            stopper.start()
        else:
            server.stop_accepting()
        # While the handler still blocks: the path is gone, so a new client is
        # refused, not queued in a backlog nobody serves until the loop is free.
        while os.path.exists(path) and not done.is_set():
            time.sleep(0.01)
        assert not done.is_set(), "the socket file stayed until the loop was free"
        late = socket.socket(socket.AF_UNIX)
        with pytest.raises(FileNotFoundError):
            late.connect(path)
        late.close()
    finally:
        client.close()
        if stopper is not None:
            stopper.join(WAIT + BLOCK)
        server.stop(timeout=WAIT)
        assert server.wait(WAIT)
