"""``weft serve`` in a real process, for test_workers.py and test_activation.py.

Two halves: handlers that the served process imports (``_serving:handle`` and
friends, found through PYTHONPATH), and :class:`Served`, which the tests use to run
a command and wait for lines on its stderr.

Every connection first gets the serving process's pid on a line of its own, so a
test can tell which worker served it. Then ``hold`` is answered ``holding``; the
handler waits for end of input (the client closing, or a graceful stop's
half-close) and answers ``done``: a reply written while the server stops. With
``handle``, ``stall`` is answered ``stalling`` and then nothing, for a minute, stop
or no stop: a handler that outlives any graceful timeout a test sets (threads only,
as it blocks its thread). Anything else is echoed back.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOLD = b"hold\n"
STALL = b"stall\n"
STALL_SECONDS = 60

# -- run by weft serve ------------------------------------------------------------------


def handle(conn: Any) -> None:
    """The sync flavour: threads and gevent (``conn`` is a socket)."""
    conn.sendall(b"%d\n" % os.getpid())
    while data := conn.recv(65536):
        if data == HOLD:
            conn.sendall(b"holding\n")
            while conn.recv(65536):
                pass
            conn.sendall(b"done\n")
            return
        if data == STALL:
            conn.sendall(b"stalling\n")
            time.sleep(STALL_SECONDS)
            return
        conn.sendall(data)


async def handle_async(stream: Any) -> None:
    """The trio flavour (``stream`` is a trio.SocketStream)."""
    await stream.send_all(b"%d\n" % os.getpid())
    while data := await stream.receive_some(65536):
        if data == HOLD:
            await stream.send_all(b"holding\n")
            while await stream.receive_some(65536):
                pass
            await stream.send_all(b"done\n")
            return
        await stream.send_all(data)


def report_env(conn: Any) -> None:
    """Send the pid line, then the LISTEN_* variables this process sees, as JSON."""
    env = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
    conn.sendall(b"%d\n%s\n" % (os.getpid(), json.dumps(env).encode()))


#: Each manager's own backend: the modules a server on another manager has no use for.
BACKENDS = {"asyncio": ("asyncio",), "gevent": ("gevent", "greenlet"), "trio": ("trio",)}


def report_backends(conn: Any) -> None:
    """Send which managers' backends this process has imported, as a JSON list."""
    loaded = sorted(m for mods in BACKENDS.values() for m in mods if m in sys.modules)
    conn.sendall(json.dumps(loaded).encode() + b"\n")


async def report_backends_async(stream: Any) -> None:
    """:func:`report_backends` for an async manager (a trio or asyncio stream)."""
    loaded = sorted(m for mods in BACKENDS.values() for m in mods if m in sys.modules)
    await stream.send_all(json.dumps(loaded).encode() + b"\n")


# -- used by the tests --------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
#: The managers this project ships; tests that start ``weft serve`` run against each.
OUR_MANAGERS = ("asyncio", "gevent", "threads", "trio")


def handler_for(manager: str) -> str:
    """The test handler for ``manager`` by its handler kind: a third party's manager too."""
    from weft_core._registry import get_manager_spec

    kind = get_manager_spec(manager).handler_kind
    return "_serving:handle_async" if kind == "async" else "_serving:handle"


LISTENING = r"\] weft: listening on (\S+) \(manager (\S+)\)"
READY = r"\[(\d+)\] \[INFO\] weft: worker ready on (\S+)"
STARTED = r"weft\.workers: worker (\d+) started"


#: What weft serve reads from its environment, where a CI runner may have set it (a
#: platform's PORT, a systemd unit's NOTIFY_SOCKET): the tests set these themselves.
OURS = ("WEFT_", "LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET", "PORT")


def environment() -> dict[str, str]:
    """This environment without what weft serve reads, with the repo and tests/ importable."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith(OURS[:3]) or k in OURS[3:])}
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def weft_serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "weft_core", "serve", *args]


def connects(port: int) -> bool:
    """True if something on 127.0.0.1 accepts a connection on ``port`` now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port nobody listens on now, for a process that binds it a moment later.

    Drawn from outside the kernel's ephemeral range, which every bind to port 0
    uses: a port found there, closed and bound again by a process starting up,
    could be taken in between by another test's server (the other xdist worker
    binds port 0 all the time).
    """
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    below = range(max(1024, low - 10000), low)
    choices = below if len(below) >= 1000 else range(high + 1, 65536)
    for _ in range(200):
        port = random.choice(choices)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {choices}")


def need(tool: str) -> str:
    import pytest

    path = shutil.which(tool)
    if path is None:
        pytest.skip(
            f"{tool} is not installed (Debian package: systemd for systemd-socket-activate)"
        )
    return path


class Served:
    """A process whose stderr is read line by line in the background."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                 stdin_socket: socket.socket | None = None, **popen: Any) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=environment() if env is None else env,
            stdin=subprocess.DEVNULL if stdin_socket is None else stdin_socket.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
        """Wait until ``count`` stderr lines match ``pattern``; return the matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    why = "stderr closed" if self.closed else f"{timeout}s passed"
                    raise AssertionError(
                        f"{why} before {count} line(s) matched {pattern!r}:\n{''.join(self.lines)}"
                    )
                self._changed.wait(left)

    def wait_closed(self, timeout: float = 30) -> None:
        """Wait until every writer of stderr has gone (the process and its children)."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"stderr still open after {timeout}s:\n{self.text}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 30) -> int:
        """Wait for the process to exit; return its status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        if not self._reader.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def as_user(uid: int, move: Callable[[], str], gid: int | None = None) -> str:
    """Run ``move`` in a forked child switched to ``uid`` (and ``gid``, else ``uid``).

    What it returned, or its error as ``Type: message``. A fork needs no path to a
    Python the other user may run (a venv under /root is not one). Needs root.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            result = move()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        try:
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        said = reader.read().decode()
    os.waitpid(pid, 0)
    return said


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def listening(port: int) -> dict[str, int]:
    """The TCP sockets listening on ``port`` (IPv4 and IPv6): inode -> clients queued.

    In ``/proc/net/tcp{,6}`` a listening socket is in state 0A, and its receive
    queue is its accept queue.
    """
    found = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found[fields[9]] = int(fields[4].split(":")[1], 16)
    return found


def queued(port: int) -> int:
    """Clients waiting in the accept queues of the listening sockets on ``port``."""
    return sum(listening(port).values())


class Client:
    """A line-reading client of the test handlers."""

    def __init__(self, address: tuple[str, int] | str, timeout: float = 20) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.settimeout(timeout)
                self.sock.connect(address)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""
        try:
            self.pid = int(self.line())
        except BaseException:
            # A refused client is the test's failure to report, not a socket left to
            # the collector (an unraisable warning, an error under -W error, later on).
            self.sock.close()
            raise

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received

    def rest(self) -> bytes:
        """Everything until the server closes."""
        data = self.buffer
        while chunk := self.sock.recv(65536):
            data += chunk
        self.buffer = b""
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def server_certs(folder: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 and localhost, made by trustme.

    Written into ``folder``; returns the paths of ``ca``, ``cert`` (the chain) and
    ``key``. Skips the test where trustme is missing.
    """
    import pytest

    trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(paths["cert"], append=i > 0)
    return paths
