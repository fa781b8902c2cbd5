"""The soak test's server, in its own process so its memory and descriptors are its own.

Usage: ``python _fault_soak_server.py MANAGER``. Prints ``PORT <n>`` once
listening, then answers lines on stdin with one JSON line each:

- ``stats``: the server's stats; after a garbage collection, the memory Python
  objects hold (tracemalloc), the RSS, and the RSS once ``malloc_trim`` has given
  free heap pages back; its open descriptors and threads; and what weft logged:
  ``intended`` errors (the handler's own :class:`~_fault_handlers.Boom`, asked for
  by the client) and ``unexplained`` records (any other warning or error, and any
  traceback), with the first few;
- ``stop``: stops the server, prints the same, and exits.

The handler reads a one-byte command: ``E`` echoes until end of input, ``B`` writes
a 4 MiB reply, ``X`` raises Boom.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import sys
import threading
import tracemalloc
from typing import Any

from _fault_handlers import Boom, handler

from weft_core import Server
from weft_core.testing import Body, Recv, Send


def soak() -> Body:
    command = yield Recv(1)
    if command == b"E":
        while data := (yield Recv()):
            yield Send(data)
    elif command == b"B":
        piece = b"x" * 65536
        for _ in range(64):
            yield Send(piece)
    elif command == b"X":
        raise Boom("soak: an error the client asked for")


class Ledger(logging.Handler):
    """Sorts weft's log records into intended errors and unexplained ones."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.intended = 0
        self.unexplained: list[str] = []
        self.unexplained_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Boom):
            self.intended += 1
        elif record.exc_info or record.levelno >= logging.WARNING:
            self.unexplained_count += 1
            if len(self.unexplained) < 5:
                name = type(exc).__name__ if exc is not None else "-"
                self.unexplained.append(f"{record.levelname} {record.getMessage()} [{name}]")


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS")


def report(server: Server, ledger: Ledger) -> dict[str, Any]:
    gc.collect()
    rss = rss_kib()
    ctypes.CDLL(None).malloc_trim(0)  # free heap pages back to the OS: what is left is in use
    return {
        **server.stats(),
        "traced_kib": tracemalloc.get_traced_memory()[0] // 1024,
        "rss_kib": rss,
        "rss_trimmed_kib": rss_kib(),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "intended": ledger.intended,
        "unexplained": ledger.unexplained_count,
        "unexplained_first": ledger.unexplained,
    }


def main() -> None:
    manager = sys.argv[1]
    tracemalloc.start()  # weft is pure Python: a leak of weft's shows up here
    ledger = Ledger()
    weft_log = logging.getLogger("weft")
    weft_log.setLevel(logging.INFO)
    weft_log.addHandler(ledger)
    server = Server(handler(soak, manager), manager=manager, backlog=4096)
    server.run()
    print(f"PORT {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(report(server, ledger)), flush=True)
        elif line.strip() == "stop":
            break
    clean = server.stop(timeout=5)
    print(json.dumps({**report(server, ledger), "clean": clean}), flush=True)


if __name__ == "__main__":
    main()
