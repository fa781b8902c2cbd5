"""What test_log_edges.py and test_log_writer_edges.py share: the managers, and stderr read as a pipe."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _serving import environment

#: Every manager we ship, uvloop as a fifth, with its ``weft serve`` flags.
MANAGERS: list[tuple[str, tuple[str, ...]]] = [
    ("threads", ()),
    ("gevent", ()),
    ("trio", ()),
    ("asyncio", ()),
    ("asyncio", ("-o", "loop=uvloop")),
]
IDS = ["threads", "gevent", "trio", "asyncio", "uvloop"]
#: fcntl's F_SETPIPE_SZ (Linux), which Python 3.10's fcntl module may not name.
F_SETPIPE_SZ = 1031


def env() -> dict[str, str]:
    """The tests' environment, no control socket (as root, /run/weft is shared)."""
    return {**environment(), "WEFT_CONTROL_SOCKET": "off"}


def read_until(fd: int, marker: bytes, count: int = 1, timeout: float = 30) -> bytes:
    """Read ``fd`` until ``marker`` came ``count`` times; fails at EOF or past ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while buf.count(marker) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"no {count}x {marker!r} within {timeout}s: {buf[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF before {count}x {marker!r}: {buf[-2000:]!r}"
            buf += chunk
    return buf


def non_json(text: str) -> list[str]:
    """The lines of ``text`` that are not one JSON object each."""
    bad = []
    for line in text.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


#: A process that takes the service's log line lock as weft does (its pid written at
#: the start of the lock file), says so, and stops itself; once continued, lets go.
_HOLDER = """
import fcntl, os, signal, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, struct.pack("<q", os.getpid()), 0)
sys.stdout.write("held\\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGSTOP)
fcntl.flock(fd, fcntl.LOCK_UN)
"""


def lock_file(supervisor: int, worker: int) -> str:
    """The path (through /proc) of the lock the service's processes write log lines under."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    number = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"_WEFT_LOG_LOCK_FD="))
    return f"/proc/{supervisor}/fd/{int(number)}"


@contextlib.contextmanager
def stopped_lock_holder(supervisor: int, worker: int) -> Iterator[Callable[[], None]]:
    """A process holding the service's log line lock, stopped (SIGSTOP): a worker a
    debugger stopped in the middle of a line. Yields ``resume``, which continues it
    (it lets go and exits); it is killed on the way out in any case."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lock_file(supervisor, worker)],
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        deadline = time.monotonic() + 10
        while _state(holder.pid) not in ("T", "t"):
            assert time.monotonic() < deadline, "the lock holder did not stop"
            time.sleep(0.001)

        def resume() -> None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.wait(10)

        yield resume
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]
