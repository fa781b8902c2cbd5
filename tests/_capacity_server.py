"""A weft echo server in its own process, for tests that need many descriptors.

Usage: python _capacity_server.py MANAGER. Prints ``PORT <n>`` once listening;
on the line ``stop`` from stdin it stops the server and prints one JSON line with
how long ``stop()`` took, its result, and the descriptor counts.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

from weft_core import Server


def echo(conn: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


async def echo_async(stream: Any) -> None:
    async for data in stream:
        await stream.send_all(data)


def main() -> None:
    manager = sys.argv[1]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    handler = echo_async if manager == "trio" else echo
    fds_before = len(os.listdir("/proc/self/fd"))
    server = Server(handler, manager=manager, max_connections=None, backlog=4096)
    server.run()
    print(f"PORT {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    active = server.stats()["active"]
    started = time.monotonic()
    clean = server.stop(timeout=5)
    elapsed = time.monotonic() - started
    fds_after = len(os.listdir("/proc/self/fd"))
    print(
        json.dumps(
            {
                "stop_seconds": elapsed,
                "clean": clean,
                "active": active,
                "fds_before": fds_before,
                "fds_after": fds_after,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
