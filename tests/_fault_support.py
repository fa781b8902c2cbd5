"""Helpers for the fault tests: servers in subprocesses, and misbehaving clients.

:class:`WeftServe` runs ``python -m weft_core serve`` with ``tests/`` on the path,
reads its stderr in a thread, and lets a test wait for a log line (never on a
sleep). :class:`ScriptServer` runs one of the test server scripts that answer
commands on stdin with a JSON line. :class:`Readers` reads many client sockets at
once until each is closed.
"""

from __future__ import annotations

import json
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from _serving import Served, environment, weft_serve

from weft_core.testing._support import WAIT

LISTENING = re.compile(r"listening on (\S+):(\d+) \(manager (\S+)\)")
HERE = Path(__file__).parent


class ScriptServer:
    """A test server script of ``tests/`` in a subprocess, asked questions on stdin.

    The script (``_capacity_server.py``, ``_fault_soak_server.py``) prints ``PORT n``
    once listening, then answers each command line with one JSON line.
    """

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def ask(self, command: str) -> dict[str, Any]:
        """Send ``command``; its JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class WeftServe:
    """``weft serve ARGS`` in a subprocess; stderr is collected line by line.

    A thin face over ``_serving.Served`` (the same stderr reader the worker tests
    use) with the calls the fault tests make.
    """

    def __init__(self, *args: str, cwd: Path) -> None:
        self.served = Served(weft_serve(*args), cwd=cwd, env=environment())
        self.proc = self.served.proc

    @property
    def stderr(self) -> str:
        return self.served.text

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails on timeout or exit."""
        return self.served.wait_for(pattern, 1, timeout)[0]

    def port(self) -> int:
        """The port it listens on, once it says so."""
        return int(self.wait_for(LISTENING.pattern).group(2))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.served.signal(signum)

    def exit_code(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit (and its stderr to be read); its status."""
        code = self.served.finish(timeout)
        self.served.wait_closed(timeout)
        return code

    def close(self) -> None:
        self.served.kill()


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER 0): the peer sees a reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_without_data(sock: socket.socket) -> bool:
    """True if the server closes ``sock`` (EOF or reset) before sending a byte."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Readers:
    """Reads many client sockets at once, each into its own buffer, until each is closed."""

    def __init__(self, socks: Iterable[socket.socket]) -> None:
        self.socks = list(socks)
        self.data = {s: bytearray() for s in self.socks}
        self.closed: set[socket.socket] = set()
        self.resets: set[socket.socket] = set()
        self._sel = selectors.DefaultSelector()
        for sock in self.socks:
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ)

    def pump(self, done: Callable[[], bool], timeout: float = WAIT) -> None:
        """Read until ``done()``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                got = sorted(len(self.data[s]) for s in self.socks)
                raise AssertionError(f"timed out reading; bytes per client: {got}")
            self.poll(min(left, 0.5))

    def poll(self, timeout: float = 0) -> None:
        """One pass: read every socket that is ready within ``timeout``."""
        for key, _ in self._sel.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                self.resets.add(sock)
                chunk = b""
            if chunk:
                self.data[sock] += chunk
            else:
                self._sel.unregister(sock)
                self.closed.add(sock)

    def until_closed(self, timeout: float = WAIT) -> None:
        self.pump(lambda: len(self.closed) == len(self.socks), timeout)

    def close(self) -> None:
        self._sel.close()
        for sock in self.socks:
            sock.close()
