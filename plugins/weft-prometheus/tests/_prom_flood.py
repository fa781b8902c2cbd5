"""A handler for the scrape-flood test, imported by ``weft serve --manager gevent``.

It wraps the endpoint's ``generate_latest`` to note the OS thread of each rendering.
A connection that sends ``renders`` gets, as a JSON line, how many renderings there
were and how many ran in the thread it is served in (the hub's); anything else is
echoed back.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from weft_prometheus import _exporter

RENDERS = b"renders\n"
#: The OS thread of each rendering so far.
_threads: list[int] = []
_generate = _exporter.generate_latest


def _noting(registry: Any) -> bytes:
    _threads.append(threading.get_native_id())  # gevent patches get_ident, not this
    return _generate(registry)


_exporter.generate_latest = _noting


def handle(conn: Any) -> None:
    while data := conn.recv(65536):
        if data == RENDERS:
            here = threading.get_native_id()
            seen = list(_threads)
            report = {"renders": len(seen), "in_hub": sum(t == here for t in seen)}
            conn.sendall(json.dumps(report).encode() + b"\n")
        else:
            conn.sendall(data)
