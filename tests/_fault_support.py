"""Helpers for the fault tests: ``weft serve`` in a subprocess, and misbehaving clients.

:class:`WeftServe` runs ``python -m weft_core serve`` with ``tests/`` on the path,
reads its stderr in a thread, and lets a test wait for a log line (never on a
sleep). :class:`Readers` reads many client sockets at once until each is closed.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from weft_core.testing._support import WAIT

HERE = Path(__file__).parent
REPO = HERE.parent
LISTENING = re.compile(r"listening on (\S+):(\d+) \(manager (\S+)\)")


def _env() -> dict[str, str]:
    # WEFT_* variables are config: one left in the environment would change the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    return env


class WeftServe:
    """``weft serve ARGS`` in a subprocess; stderr is collected line by line."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weft_core", "serve", *args],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    raise AssertionError(
                        f"weft serve never logged {pattern!r} "
                        f"({'it exited' if self._done else 'timed out'}):\n{''.join(self.lines)}"
                    )
                self._changed.wait(left)

    def port(self) -> int:
        """The port it listens on, once it says so."""
        return int(self.wait_for(LISTENING.pattern).group(2))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def exit_code(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit (and its stderr to be read); its status."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


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
            for key, _ in self._sel.select(min(left, 0.5)):
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
