"""Long-poll: what a parked subscriber costs, and how fast one broadcast reaches them all.

``python -m benchmarks longpoll`` (issue 20). For each manager, weft and the raw
backend written by hand run the same subscriber handler with the same protocol as
examples/longpoll.py (``SUB`` is answered ``SUBSCRIBED``, then one line per message):

| benchmark name | weft publishes through | raw backend, and its way in from a thread |
| --- | --- | --- |
| gevent | ``server.submit`` | ``gevent.server.StreamServer``, ``loop.run_callback_threadsafe`` |
| trio | ``server.submit`` | ``trio.serve_tcp``, ``TrioToken.run_sync_soon`` |
| asyncio, asyncio-uvloop | ``server.submit`` | ``asyncio.start_server``, ``loop.call_soon_threadsafe`` |
| threads | ``server.submit`` (a thread per call) | ``socketserver.ThreadingTCPServer``, the queues directly |

A subscriber parks on its runtime's queue (``gevent.queue.Queue``, a trio memory
channel, ``asyncio.Queue``; ``queue.SimpleQueue`` on threads, holding a thread each:
what iomux-acceptor exists to avoid). The publisher is a thread of the server
process outside the runtime: it stamps ``time.monotonic_ns()`` into the message just
before handing it to the runtime, and the client process (one, on the client core,
one selector for all its sockets) notes when the last subscriber has read it; the
clock is the system-wide CLOCK_MONOTONIC, so the difference is the broadcast time,
client reads included (the same client for weft and raw).

RSS per subscriber is the server's RSS with N subscribers parked, less its RSS with
one subscriber that has had one broadcast, over N - 1. weft and raw alternate (weft,
raw, weft, raw, ...); the ratio shown is the median of the per-pair ratios, with
their range. The machine's load average is recorded beside the figures.

Roles: ``python -m benchmarks.longpoll serve|client ...`` are the child processes
(line protocol of :mod:`benchmarks.procs`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import selectors
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report
from .procs import (
    BACKLOG,
    CLIENT_CORE,
    SERVER_CORE,
    Child,
    ChildError,
    pin,
    raise_nofile,
    say,
    stdin_lines,
)
from .server import HOST, RAW_BACKENDS, announce_port, start_weft, weft_manager

NAMES = ("gevent", "trio", "asyncio", "asyncio-uvloop", "threads")
COUNTS = (1_000, 10_000)
#: Pairs (weft then raw) per manager; each opens 10,000 subscribers twice.
RUNS = 3
#: Broadcasts timed at each count; the run's figure is their median.
BROADCASTS = 5
#: Pause before reading RSS, so the server has finished reacting to the last batch.
SETTLE = 0.5
#: Subscribers connected at once: well inside the listen backlog (1024).
BATCH = 500
#: Bound on every wait for a child: a broken server fails the run, not hangs it.
TIMEOUT = 120.0
SUBSCRIBED = b"SUBSCRIBED\n"
RESULTS = Path(__file__).resolve().parent / "results"

# -- the subscriber handlers: the same code under weft and under the raw backend ---------
#
# Each app is (handler, deliver): ``deliver(message)`` puts the message in every
# subscriber's queue and must run in the runtime (or, on threads, anywhere).


def _read_sub(recv: Callable[[int], bytes]) -> bool:
    """Read up to the end of the ``SUB`` line; False if the client left first."""
    buf = b""
    while b"\n" not in buf:
        data = recv(64)
        if not data:
            return False
        buf += data
    return True


def _blocking_app(
    new_inbox: Callable[[], Any], copy: bool
) -> tuple[Callable[..., Any], Callable[[bytes], None]]:
    """The handler and ``deliver`` of a blocking-socket server: a queue per subscriber.

    ``copy``: ``deliver`` iterates over a copy of the subscribers (threads add and
    remove them meanwhile; in a gevent hub nothing switches while it runs).
    """
    subscribers: set[Any] = set()

    def handle(conn: Any) -> None:
        if not _read_sub(conn.recv):
            return
        inbox = new_inbox()
        subscribers.add(inbox)
        try:
            conn.sendall(SUBSCRIBED)
            while True:
                conn.sendall(inbox.get())
        except OSError:
            pass
        finally:
            subscribers.discard(inbox)

    def deliver(message: bytes) -> None:
        for inbox in list(subscribers) if copy else subscribers:
            inbox.put(message)

    return handle, deliver


def threads_app() -> tuple[Callable[..., Any], Callable[[bytes], None]]:
    import queue

    return _blocking_app(queue.SimpleQueue, copy=True)


def gevent_app() -> tuple[Callable[..., Any], Callable[[bytes], None]]:
    import gevent.queue

    return _blocking_app(gevent.queue.Queue, copy=False)


def trio_app() -> tuple[Callable[..., Any], Callable[[bytes], None]]:
    import trio

    subscribers: set[trio.MemorySendChannel[bytes]] = set()

    async def handle(stream: Any) -> None:
        try:
            buf = b""
            while b"\n" not in buf:
                data = await stream.receive_some(64)
                if not data:
                    return
                buf += data
            inbox, messages = trio.open_memory_channel[bytes](math.inf)
            subscribers.add(inbox)
            try:
                await stream.send_all(SUBSCRIBED)
                async for message in messages:
                    await stream.send_all(message)
            finally:
                subscribers.discard(inbox)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def deliver(message: bytes) -> None:
        for inbox in subscribers:
            inbox.send_nowait(message)

    return handle, deliver


def asyncio_app() -> tuple[Callable[..., Any], Callable[[bytes], None]]:
    """``handle(reader, writer)`` for asyncio.start_server, ``handle(stream)`` for weft."""
    import asyncio

    subscribers: set[asyncio.Queue[bytes]] = set()

    async def handle(reader: Any, writer: Any = None) -> None:
        writer = writer or reader
        try:
            if not (await reader.readline()).endswith(b"\n"):
                return
            inbox: asyncio.Queue[bytes] = asyncio.Queue()
            subscribers.add(inbox)
            try:
                writer.write(SUBSCRIBED)
                await writer.drain()
                while True:
                    writer.write(await inbox.get())
                    await writer.drain()
            finally:
                subscribers.discard(inbox)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def deliver(message: bytes) -> None:
        for inbox in subscribers:
            inbox.put_nowait(message)

    return handle, deliver


APPS = {
    "threads": threads_app,
    "gevent": gevent_app,
    "trio": trio_app,
    "asyncio": asyncio_app,
    "asyncio-uvloop": asyncio_app,
}

# -- the server process -------------------------------------------------------------------


def _publisher(into_runtime: Callable[[bytes], object]) -> None:
    """The publisher thread: on ``pub``, stamp the time and hand a message to the runtime.

    Answers ``PUB t0_ns`` once handed over; exits the process at end of input.
    """

    def run() -> None:
        for line in stdin_lines():
            if line == "pub":
                t0 = time.monotonic_ns()
                into_runtime(b"%d\n" % t0)
                say(f"PUB {t0}")
        sys.stdout.flush()
        os._exit(0)

    threading.Thread(target=run, name="publisher", daemon=True).start()


def serve_weft(name: str) -> None:
    import weft_core

    manager = weft_manager(name)[0]
    handle, deliver = APPS[name]()
    if weft_core.available_managers()[manager].handler_kind == "async":

        async def broadcast(message: bytes) -> None:
            deliver(message)

        fn: Callable[[bytes], Any] = broadcast
    else:
        fn = deliver
    server = start_weft(name, handle)
    _publisher(lambda message: server.submit(fn, message))
    server.wait()


def serve_raw(name: str) -> None:
    handle, deliver = APPS[name]()
    if name == "threads":
        import socketserver

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True
            request_queue_size = BACKLOG

        threaded = Server((HOST, 0), Handler)
        announce_port(threaded.server_address[1])
        _publisher(deliver)  # the queues are thread-safe: no runtime to enter
        threaded.serve_forever()
    elif name == "gevent":
        import gevent
        from gevent.server import StreamServer

        def on_connection(sock: Any, _addr: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handle(sock)

        streams = StreamServer((HOST, 0), on_connection, backlog=BACKLOG)
        streams.start()
        loop = gevent.get_hub().loop
        announce_port(streams.server_port)
        _publisher(lambda message: loop.run_callback_threadsafe(deliver, message))
        streams.serve_forever()
    elif name == "trio":
        import functools

        import trio

        async def main_trio() -> None:
            token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                serve = functools.partial(trio.serve_tcp, handle, 0, host=HOST, backlog=BACKLOG)
                listeners = await nursery.start(serve)
                announce_port(listeners[0].socket.getsockname()[1])
                _publisher(lambda message: token.run_sync_soon(deliver, message))

        trio.run(main_trio)
    else:
        import asyncio

        async def main_asyncio() -> None:
            server = await asyncio.start_server(handle, HOST, 0, backlog=BACKLOG)
            loop = asyncio.get_running_loop()
            announce_port(server.sockets[0].getsockname()[1])
            _publisher(lambda message: loop.call_soon_threadsafe(deliver, message))
            await asyncio.Event().wait()

        if name == "asyncio-uvloop":
            import uvloop

            uvloop.run(main_asyncio())
        else:
            asyncio.run(main_asyncio())


# -- the client process -------------------------------------------------------------------


class Subscribers:
    """Subscribed connections, read through one selector."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, bytes] = {}

    def open(self, total: int) -> str:
        """Subscribe until ``total`` are held; '-' or the error that stopped it short."""
        try:
            while len(self.pending) < total:
                batch = []
                for _ in range(min(BATCH, total - len(self.pending))):
                    sock = socket.create_connection((HOST, self.port), timeout=TIMEOUT)
                    sock.sendall(b"SUB\n")
                    batch.append(sock)
                for sock in batch:
                    if sock.recv(len(SUBSCRIBED), socket.MSG_WAITALL) != SUBSCRIBED:
                        return "not-subscribed"
                    sock.setblocking(False)
                    self.selector.register(sock, selectors.EVENT_READ)
                    self.pending[sock] = b""
        except OSError as exc:
            return f"{exc.__class__.__name__}:{exc}".replace(" ", "_")
        return "-"

    def wait_one(self) -> tuple[set[bytes], int, int, int]:
        """One line on every subscriber: (distinct lines, first_ns, last_ns, how many got it)."""
        waiting = len(self.pending)
        lines: set[bytes] = set()
        first = last = 0
        deadline = time.monotonic() + TIMEOUT
        while waiting and time.monotonic() < deadline:
            for key, _ in self.selector.select(deadline - time.monotonic()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = self.pending[sock] + sock.recv(256)
                line, sep, rest = data.partition(b"\n")
                if not sep:
                    self.pending[sock] = data
                    continue
                now = time.monotonic_ns()
                first = first or now
                last = now
                self.pending[sock] = rest
                lines.add(line)
                waiting -= 1
        return lines, first, last, len(self.pending) - waiting


def client(port: int) -> None:
    pin(CLIENT_CORE)
    raise_nofile()
    subs = Subscribers(port)
    for line in stdin_lines():
        command, *rest = line.split()
        if command == "open":
            error = subs.open(int(rest[0]))
            say(f"OPEN {len(subs.pending)} {error}")
        elif command == "wait":
            say("WAITING")
            lines, first, last, got = subs.wait_one()
            value = lines.pop().decode() if len(lines) == 1 else "mixed"
            say(f"GOT {value} {first} {last} {got}")


# -- the orchestrator ---------------------------------------------------------------------


def _measure(
    name: str, impl: str, counts: list[int], broadcasts: int, log: Path
) -> list[dict[str, Any]]:
    """One server of ``impl`` (weft or raw): RSS and broadcast times at each count."""
    records = []
    args = ["serve", "--backend", impl, "--flavour", name]
    with Child("benchmarks.longpoll", args, log, f"{impl} {name} longpoll server") as server:
        port, _nofile = server.expect("PORT", 60)
        with Child("benchmarks.longpoll", ["client", "--port", port], log, "client") as client:

            def broadcast() -> tuple[float, int]:
                client.ask("wait", "WAITING", TIMEOUT)
                (t0,) = server.ask("pub", "PUB", TIMEOUT)
                value, _first, last, got = client.expect("GOT", TIMEOUT)
                if value != t0:
                    raise ChildError(f"{name} {impl}: subscribers got {value!r}, sent {t0}")
                return (int(last) - int(t0)) / 1e6, int(got)

            held, error = client.ask("open 1", "OPEN", TIMEOUT)
            broadcast()  # the baseline includes what the first broadcast loads
            time.sleep(SETTLE)
            base = server.rss_kib()
            for n in counts:
                held, error = client.ask(f"open {n}", "OPEN", 600)
                time.sleep(SETTLE)
                rss = server.rss_kib()
                times = [broadcast() for _ in range(broadcasts)]
                records.append(
                    {
                        "manager": name,
                        "impl": impl,
                        "n": n,
                        "held": int(held),
                        "error": None if error == "-" else error,
                        "base_kib": base,
                        "rss_kib": rss,
                        "kib_per_sub": (rss - base) / max(1, int(held) - 1),
                        "broadcast_ms": [t for t, _ in times],
                        "reached": [g for _, g in times],
                        "median_ms": statistics.median(t for t, _ in times),
                    }
                )
                shown = ", ".join(f"{t:.1f}" for t, _ in times)
                print(
                    f"  {name:<14} {impl:<4} n={n:<6} held {held}: "
                    f"{records[-1]['kib_per_sub']:.2f} KiB/sub, broadcast ms {shown}",
                    file=sys.stderr,
                    flush=True,
                )
                if int(held) < n:
                    break
    return records


def _pair_ratios(records: list[dict[str, Any]], name: str, n: int, key: str) -> list[float]:
    by_run: dict[int, dict[str, float]] = {}
    for r in records:
        if r["manager"] == name and r["n"] == n:
            by_run.setdefault(r["run"], {})[r["impl"]] = r[key]
    return [p["weft"] / p["raw"] for p in by_run.values() if p.get("weft") and p.get("raw")]


def _cell(records: list[dict[str, Any]], name: str, impl: str, n: int, key: str) -> float | None:
    values = [r[key] for r in records if (r["manager"], r["impl"], r["n"]) == (name, impl, n)]
    return statistics.median(values) if values else None


def table(result: dict[str, Any]) -> str:
    records = result["records"]
    info = result["machine"]
    lines = [
        "# Long-poll: parked subscribers and one broadcast",
        "",
        f"{result['started']}; {info['cpu']}, {info['cores']} cores; {info['python']}; "
        f"{info['kernel']}; load average (1, 5, 15 min) at start {info['loadavg_start']}, "
        f"at end {info['loadavg_end']}; CPU busy with others before/after "
        f"{info['busy_start']:.0%} / {info['busy_end']:.0%}. {result['runs']} pairs "
        f"(weft, then raw) per manager, {result['broadcasts']} broadcasts per count and "
        "run; server on core 0, client on core 1.",
        "",
        "Broadcast: from the publisher thread handing the message to the runtime until the "
        "last subscriber has read it (client reads included). Ratio: the median of the "
        "per-pair weft/raw ratios, [min-max] over the pairs.",
        "",
        "| manager | raw backend | subscribers | KiB/sub weft | KiB/sub raw | ratio "
        "| broadcast ms weft | broadcast ms raw | ratio |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]

    def ratio(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for name in result["managers"]:
        for n in result["counts"]:
            cells = [
                num(_cell(records, name, "weft", n, "kib_per_sub"), 2),
                num(_cell(records, name, "raw", n, "kib_per_sub"), 2),
                ratio(_pair_ratios(records, name, n, "kib_per_sub")),
                num(_cell(records, name, "weft", n, "median_ms"), 1),
                num(_cell(records, name, "raw", n, "median_ms"), 1),
                ratio(_pair_ratios(records, name, n, "median_ms")),
            ]
            lines.append(f"| {name} | {RAW_BACKENDS[name]} | {n:,} | " + " | ".join(cells) + " |")
    lines.append(
        "\nLoad average (1, 5, 15 min) before and after each manager's runs (a thread per "
        "subscriber counts in it: 10,000 threads woken by a broadcast are 10,000 runnable "
        "tasks to Linux, so the threads rows raise it themselves):\n"
    )
    for name, (before, after) in result.get("load_by_manager", {}).items():
        lines.append(f"- {name}: {before} -> {after}")
    short = [
        r for r in records if r["held"] < r["n"] or r["error"] or min(r["reached"]) < r["held"]
    ]
    for r in short:
        lines.append(
            f"\n{r['manager']} {r['impl']} run {r['run'] + 1}: asked {r['n']}, held {r['held']}, "
            f"reached {r['reached']}, error {r['error']}"
        )
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    import weft_core

    installed = weft_core.available_managers()
    names = [n for n in args.managers if weft_manager(n)[0] in installed]
    for n in set(args.managers) - set(names):
        print(f"skipping {n!r}: manager {weft_manager(n)[0]!r} not installed", file=sys.stderr)
    pin(CLIENT_CORE)
    raise_nofile()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = RESULTS / "raw" / f"longpoll-{stamp}.log"
    info = report.machine(None)
    records: list[dict[str, Any]] = []
    load: dict[str, list[Any]] = {}
    for name in names:
        print(f"== {name}: weft vs {RAW_BACKENDS[name]}", file=sys.stderr, flush=True)
        load[name] = [report.loadavg()]
        for run in range(args.runs):
            for impl in ("weft", "raw"):
                for record in _measure(name, impl, args.counts, args.broadcasts, log):
                    records.append({**record, "run": run})
        load[name].append(report.loadavg())
    info["loadavg_end"] = report.loadavg()
    info["busy_end"] = report.cpu_busy()
    result = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": info,
        "managers": names,
        "counts": args.counts,
        "runs": args.runs,
        "broadcasts": args.broadcasts,
        "load_by_manager": load,
        "records": records,
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(result)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"written: {out}, {out.with_suffix('.json')}", file=sys.stderr)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace("_", "").split(",") if x]


def add_parser(sub: Any) -> None:
    """``python -m benchmarks longpoll``."""
    run = sub.add_parser("longpoll", help="parked subscribers: RSS and broadcast time")
    run.add_argument(
        "--managers",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=list(NAMES),
        help=f"comma-separated (default {','.join(NAMES)})",
    )
    run.add_argument(
        "--counts", type=_ints, default=list(COUNTS), help="subscriber counts (1000,10000)"
    )
    run.add_argument("--runs", type=int, default=RUNS, help=f"weft/raw pairs (default {RUNS})")
    run.add_argument("--broadcasts", type=int, default=BROADCASTS, help="per count and run")
    run.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "longpoll.md",
        help="the table (and a .json beside it); default benchmarks/results/longpoll.md",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.longpoll")
    sub = parser.add_subparsers(dest="role", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--backend", choices=["weft", "raw"], required=True)
    serve.add_argument("--flavour", choices=sorted(APPS), required=True)
    cli = sub.add_parser("client")
    cli.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.role == "client":
        client(args.port)
        return
    pin(SERVER_CORE)
    raise_nofile()
    if args.backend == "weft":
        serve_weft(args.flavour)
    else:
        serve_raw(args.flavour)


if __name__ == "__main__":
    main()
