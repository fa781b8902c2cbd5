"""Load for the ops2 probe: clients in a loop, plain or TLS, counting every failure."""

from __future__ import annotations

import collections
import socket
import ssl
import textwrap
import threading
from pathlib import Path

APPS = {
    "threads": "app:handle",
    "gevent": "app:handle",
    "trio": "app:handle_async",
    "asyncio": "app:handle_async",
}


def write_app(folder: Path, version: str) -> None:
    (folder / "app.py").write_text(
        textwrap.dedent(f"""\
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
        """)
    )
    for pyc in (folder / "__pycache__").glob("app.*.pyc"):
        pyc.unlink()


class Load:
    """``clients`` threads: connect, read the greeting, echo two lines, close; repeat."""

    def __init__(
        self,
        address,
        clients: int = 4,
        cafile: str | None = None,
        limit: int = 100000,
        timeout: float = 20,
    ) -> None:
        self.timeout = timeout
        self.address = address
        self.ctx = None
        if cafile:
            self.ctx = ssl.create_default_context(cafile=cafile)
        self.failures: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []
        self.versions: collections.Counter[str] = collections.Counter()
        self.pids: set[int] = set()
        self.limit = limit
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(clients)
        ]
        for t in self._threads:
            t.start()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        if self.ctx is not None:
            sock = self.ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    def _client(self) -> None:
        while not self._stop.is_set() and self.served < self.limit:
            try:
                with self._connect() as sock:
                    reader = sock.makefile("rb")
                    version, pid = reader.readline().split()
                    for word in (b"ping\n", b"pong\n"):
                        sock.sendall(word)
                        if reader.readline() != word:
                            raise ConnectionError("echo cut or wrong")
                with self._lock:
                    self.versions[version.decode()] += 1
                    self.pids.add(int(pid))
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                self._stop.wait(0.01)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failures[f"{type(exc).__name__}: {exc}"] += 1

    @property
    def served(self) -> int:
        with self._lock:
            return sum(self.versions.values())

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load client hung"
