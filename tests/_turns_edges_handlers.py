"""Handlers for test_workers_turns_edges.py (``weft serve`` finds them through PYTHONPATH).

Every connection is first sent the serving process's pid on a line of its own.
Then, line by line:

- ``hold``: answered ``holding``; the connection stays until the client closes.
- ``spin N``: answered ``spinning``, then the process's loop is blocked for N
  seconds (a busy loop: the gevent hub, the trio or asyncio loop, or one thread),
  then ``spun``.
- ``child``: a child process started with ``close_fds=False`` (as ``os.system`` or a
  non-Python spawner would) answers what it inherited: its descriptors' targets and
  the ``_WEFT_*`` variables of its environment, as one JSON line.
- ``log N SIZE``: N lines of SIZE bytes (this process's own letter) are logged on
  the ``app`` logger, then ``logged``.
- ``lognum N TAG``: N numbered short lines ``TAG 000000`` .. are logged, then ``logged``.
- anything else is echoed.

``PROBE_NO_TURNS=1`` in the environment turns the accept balance's turns off in
this worker (SLACK made huge): the baseline of the churn measurement.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

if os.environ.get("PROBE_NO_TURNS") == "1":
    from weft_core import _balance

    _balance.SLACK = 10**9

log = logging.getLogger("app")

_CHILD = (
    "import json, os\n"
    "fds = {}\n"
    "for fd in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        fds[fd] = os.readlink('/proc/self/fd/' + fd)\n"
    "    except OSError:\n"
    "        pass\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('_WEFT')}\n"
    "print(json.dumps({'fds': fds, 'env': env}))\n"
)


def _child() -> bytes:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], close_fds=False, capture_output=True, timeout=20
    )
    return done.stdout.strip() + b"\n"


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _log(words: list[bytes]) -> None:
    count, size = int(words[1]), int(words[2])
    mark = "ABCDEFGH"[os.getpid() % 8]
    for _ in range(count):
        log.info("%d %s", os.getpid(), mark * size)


def _lognum(words: list[bytes]) -> None:
    count, tag = int(words[1]), words[2].decode()
    for i in range(count):
        log.info("%s %06d", tag, i)


def _answers(line: bytes) -> Iterator[bytes]:
    """The replies to one command line, its work done between them: a generator, so
    that the sync and async handlers each send them their own way, in order."""
    words = line.split()
    if words[:1] == [b"spin"]:
        yield b"spinning\n"
        _spin(float(words[1]))
        yield b"spun\n"
    elif line == b"child":
        yield _child()
    elif words[:1] == [b"log"]:
        _log(words)
        yield b"logged\n"
    elif words[:1] == [b"lognum"]:
        _lognum(words)
        yield b"logged\n"
    else:
        yield line + b"\n"


def handle(conn: Any) -> None:
    conn.sendall(b"%d\n" % os.getpid())
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            if line == b"hold":
                conn.sendall(b"holding\n")
                while conn.recv(65536):
                    pass
                return
            for reply in _answers(line):
                conn.sendall(reply)


async def handle_async(stream: Any) -> None:
    await stream.send_all(b"%d\n" % os.getpid())
    buf = b""
    while True:
        data = bytes(await stream.receive_some(65536))
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            if line == b"hold":
                await stream.send_all(b"holding\n")
                while await stream.receive_some(65536):
                    pass
                return
            for reply in _answers(line):  # child and spin block the loop: test commands
                await stream.send_all(reply)
