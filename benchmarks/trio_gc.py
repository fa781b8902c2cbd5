"""Generation-0 collections per 1,000 keep-alive requests on trio: raw, raw with a
``CancelScope`` per connection, raw run in a thread of its own (as weft runs trio),
and weft; a check by hand of ``performance.md``'s trio lead, not one of the suites.

``python -m benchmarks.trio_gc {raw,raw-scope,raw-thread,weft} PORT SECONDS`` serves a minimal
keep-alive HTTP reply on ``PORT``, prints ``ready``, lets 2 s of load pass, then
counts for ``SECONDS`` and prints the figure. Load it with, for example,
``taskset -c 1 wrk -t1 -c1000 -d9s http://127.0.0.1:PORT/`` (the server on core 0).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from typing import Any

import trio

from .handlers import BUFSIZE, END_OF_HEAD, RESPONSE, TRIO_PEER_ERRORS

WARMUP_S = 2.0


class Counts:
    """Requests answered and generation-0 collections started, since the last reset."""

    def __init__(self) -> None:
        self.requests = 0
        self.collections = 0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 0:
            self.collections += 1

    def report(self, label: str) -> str:
        per = 1000 * self.collections / max(self.requests, 1)
        return f"{label}: {self.requests} requests, {self.collections} gen0, {per:.2f} per 1000"


counts = Counts()


async def answer(stream: trio.SocketStream) -> None:
    """Reply to every request received, until the client goes."""
    try:
        while data := await stream.receive_some(BUFSIZE):
            n = data.count(END_OF_HEAD)
            counts.requests += n
            await stream.send_all(RESPONSE * n)
    except TRIO_PEER_ERRORS:
        pass


async def answer_in_a_scope(stream: trio.SocketStream) -> None:
    with trio.CancelScope():
        await answer(stream)


def measure(seconds: float) -> None:
    time.sleep(WARMUP_S)
    counts.requests = counts.collections = 0
    gc.callbacks.append(counts.on_gc)
    time.sleep(seconds)
    gc.callbacks.remove(counts.on_gc)


async def serve_raw(handler: Any, port: int, seconds: float, label: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_tcp, handler, port)
        print("ready", flush=True)
        await trio.to_thread.run_sync(measure, seconds)
        print(counts.report(label), flush=True)
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    kind, port, seconds = argv[0], int(argv[1]), float(argv[2])
    if kind in ("raw", "raw-scope"):
        handler = answer if kind == "raw" else answer_in_a_scope
        trio.run(serve_raw, handler, port, seconds, kind)
        return 0
    if kind == "raw-thread":
        loop = threading.Thread(target=trio.run, args=(serve_raw, answer, port, seconds, kind))
        loop.start()
        loop.join()
        return 0
    from weft_core import Server

    server = Server(answer, port=port, manager="trio", max_connections=None)
    server.run()
    print("ready", flush=True)
    measure(seconds)
    print(counts.report("weft"), flush=True)
    server.stop(timeout=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
