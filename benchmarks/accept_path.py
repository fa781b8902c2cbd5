"""``python -m benchmarks.accept_path``: what accepting in Python costs on uvloop.

A diagnostic, not a target. weft's acceptor accepts in Python and makes each
connection's transport with ``loop.connect_accepted_socket``; ``asyncio.start_server``
on uvloop accepts in C and makes the transport there. This runs the benchmark's own
asyncio HTTP handler, with no weft at all, both ways: ``c`` is ``start_server``, ``py``
a Python acceptor task and ``connect_accepted_socket`` under ``asyncio.StreamReader``
and ``StreamWriter``, as ``start_server`` would hand them. wrk churns them
alternately (one request per connection), and each server's CPU per connection
is read from ``/proc``. The difference between the two is the part of weft's cost on
uvloop that is its accept path rather than its per-connection record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import handlers, wrk
from .procs import CLIENT_CORE, SERVER_CORE, Child, cpu_seconds, pin, say
from .report import TIMES


async def _serve(mode: str) -> None:
    loop = asyncio.get_running_loop()
    handler = handlers.ASYNCIO["http"]
    if mode == "c":
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    else:
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

        async def serve(sock: socket.socket) -> None:
            reader = asyncio.StreamReader(limit=2**16, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
            await handler(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

        waiter: list[asyncio.Future[None]] = []

        def wake() -> None:  # the reader stays registered, as weft's and start_server's do
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

        loop.add_reader(listener.fileno(), wake)

        async def accept() -> None:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    waiter[:] = [loop.create_future()]
                    await waiter[0]
                    continue
                task = loop.create_task(serve(sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        tasks.add(loop.create_task(accept()))
    say(f"PORT {port}")
    await loop.run_in_executor(None, sys.stdin.read)  # until the orchestrator closes stdin


def _server(mode: str) -> None:
    import uvloop

    pin(SERVER_CORE)
    uvloop.run(_serve(mode))


def _measure(
    wrk_path: str, mode: str, connections: int, seconds: float, log: Path
) -> dict[str, Any]:
    with Child("benchmarks.accept_path", ["--serve", mode], log, f"accept_path {mode}") as child:
        port = int(child.expect("PORT", 60)[0])
        wrk.run(wrk_path, port, connections, 1, close=True)  # warm-up
        before = cpu_seconds(child.pid)
        result = wrk.run(wrk_path, port, connections, seconds, close=True)
        cpu = cpu_seconds(child.pid) - before
    return {**result, "cpu_us": cpu / max(result["requests"], 1) * 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accept_path")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--serve", choices=["c", "py"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _server(args.serve)
        return
    wrk_path = wrk.find()
    if wrk_path is None:
        sys.exit("needs wrk (apt-get install wrk)")
    pin(CLIENT_CORE)
    log = Path(tempfile.mkdtemp(prefix="weft-accept-path-")) / "servers.log"
    runs: dict[str, list[dict[str, Any]]] = {"c": [], "py": []}
    for _ in range(args.runs):
        for mode in runs:  # alternated, so that a pair shares the machine's moment
            runs[mode].append(_measure(wrk_path, mode, args.connections, args.seconds, log))
    ratios = [p["cpu_us"] / c["cpu_us"] for c, p in zip(runs["c"], runs["py"], strict=True)]
    for mode, label in (("c", "start_server (C accept)"), ("py", "Python accept")):
        rs = runs[mode]
        print(
            f"{label:>24}: {statistics.median(r['rps'] for r in rs):,.0f} conn/s, "
            f"{statistics.median(r['cpu_us'] for r in rs):.1f} µs CPU per connection"
        )
    print(
        f"Python accept / C accept, CPU per connection: {statistics.median(ratios):.3f}{TIMES} "
        f"({min(ratios):.2f}-{max(ratios):.2f}), {args.runs} pairs at {args.connections} "
        f"connections; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
