"""A weft echo server in its own process, for tests that need many (or few) descriptors.

Usage: ``python _capacity_server.py MANAGER [NOFILE]``. With NOFILE the process's
descriptor limit is lowered to it (to run out on purpose); otherwise raised to the
hard limit. Prints ``PORT <n>`` once listening, then answers lines on stdin:

- ``stats``: one JSON line with the server's stats, the CPU seconds used so far,
  and how many capacity warnings were logged;
- ``stop``: stops the server and prints one JSON line with how long ``stop()``
  took, its result, and the descriptor counts, then exits.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any

from weft_core import Server


def echo(conn: Any) -> None:
    conn.sendall(b"+")
    while data := conn.recv(65536):
        conn.sendall(data)


async def echo_async(stream: Any) -> None:
    await stream.send_all(b"+")
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.capacity = 0
        self.tracebacks = 0
        #: The first few warnings, for a failing test's message.
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 5:
            self.messages.append(record.getMessage())
        if "shed" in record.getMessage():
            self.capacity += 1
        if record.exc_info:
            self.tracebacks += 1


def main() -> None:
    manager = sys.argv[1]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = int(sys.argv[2]) if len(sys.argv) > 2 else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    counter = Count()
    logging.getLogger("weft").addHandler(counter)
    handler = echo_async if manager in ("trio", "asyncio") else echo
    fds_before = len(os.listdir("/proc/self/fd"))
    server = Server(handler, manager=manager, max_connections=None, backlog=4096)
    server.run()
    print(f"PORT {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            print(
                json.dumps(
                    {
                        **server.stats(),
                        "cpu": usage.ru_utime + usage.ru_stime,
                        "capacity_logs": counter.capacity,
                        "tracebacks": counter.tracebacks,
                    }
                ),
                flush=True,
            )
        elif line.strip() == "stop":
            break
    active = server.stats()["active"]
    started = time.monotonic()
    cpu_before = time.process_time()
    clean = server.stop(timeout=5)  # tests/test_many_connections.py: STOP_TIMEOUT
    elapsed = time.monotonic() - started
    cpu_after = time.process_time()
    fds_after = len(os.listdir("/proc/self/fd"))
    print(
        json.dumps(
            {
                "stop_seconds": elapsed,
                "clean": clean,
                "active": active,
                "fds_before": fds_before,
                "fds_after": fds_after,
                "warnings": counter.messages,
                "cpu_during_stop": cpu_after - cpu_before,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
