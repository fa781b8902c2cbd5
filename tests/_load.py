"""Clients under load and a handler whose code a test edits, for the operations tests.

:func:`write_app` writes ``app.py`` into a test's folder: each connection first gets
``VERSION PID`` on a line, then its lines are echoed. Rewriting it with another
version and reloading shows which code serves a new connection. :class:`Load` runs
clients in threads, each one connection after another (connect, read the greeting,
echo a line, close), and counts every failure: a refused connect, a cut reply, a
wrong echo.
"""

from __future__ import annotations

import collections
import socket
import textwrap
import threading
import time
from pathlib import Path

APP = "app:handle"
APP_ASYNC = "app:handle_async"


def write_app(folder: Path, version: str) -> None:
    """(Re)write ``folder/app.py`` answering ``version``; the next import sees it."""
    path = folder / "app.py"
    path.write_text(
        textwrap.dedent(
            f"""\
            import os

            VERSION = b"{version}"


            def handle(conn):
                conn.sendall(VERSION + b" %d\\n" % os.getpid())
                while data := conn.recv(65536):
                    conn.sendall(data)


            async def handle_async(stream):
                await stream.send_all(VERSION + b" %d\\n" % os.getpid())
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            """
        )
    )
    # A rewrite within the same second keeps the old .pyc's timestamp: remove it.
    for pyc in (folder / "__pycache__").glob("app.*.pyc"):
        pyc.unlink()


def greeting(address: tuple[str, int], timeout: float = 10) -> tuple[str, int]:
    """Connect once; the (version, pid) that served."""
    with socket.create_connection(address, timeout=timeout) as sock:
        line = sock.makefile("rb").readline()
    version, pid = line.split()
    return version.decode(), int(pid)


def wait_for_version(address: tuple[str, int], version: str, timeout: float = 30) -> None:
    """Connect until ``version`` answers (a reload is done once it does)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = greeting(address)[0]
        if seen == version:
            return
        time.sleep(0.05)  # pacing the probe, not waiting for an outcome
    raise AssertionError(f"version {version!r} not serving after {timeout}s (last {seen!r})")


class Load:
    """``clients`` threads of back-to-back connections until :meth:`stop`."""

    def __init__(self, address: tuple[str, int], clients: int = 4) -> None:
        self.address = address
        self.failures: collections.Counter[str] = collections.Counter()
        self.versions: collections.Counter[str] = collections.Counter()
        self.pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=20) as sock:
                    reader = sock.makefile("rb")
                    version, pid = reader.readline().split()
                    sock.sendall(b"ping\n")
                    if reader.readline() != b"ping\n":
                        raise ConnectionError("echo cut or wrong")
                with self._lock:
                    self.versions[version.decode()] += 1
                    self.pids.add(int(pid))
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failures[f"{type(exc).__name__}: {exc}"] += 1

    @property
    def served(self) -> int:
        with self._lock:
            return sum(self.versions.values())

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load client hung"
