"""What test_log_edges.py and test_log_writer_edges.py share: the managers, and stderr read as a pipe."""

from __future__ import annotations

import json
import os
import select
import time

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
