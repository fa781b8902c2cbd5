"""Requests per core, two server processes against one, raw backend and weft; a check by
hand of ``performance.md``'s workers misses (trio on two cores, threads on one), not
one of the suites.

``python -m benchmarks.raw_workers [--manager trio|threads] [--cores 0,1] [--rounds N]
[--seconds S]`` runs, per round: the raw backend (``trio.serve_listeners``, or
``socketserver.ThreadingTCPServer``) in one forked process on core 0, then in two
sharing one listening socket on the cores ``--cores`` names (``0,1`` by default;
``0,0`` puts both on core 0, the same CPU as one), the same again with each process
a fresh interpreter given the socket ("spawned", as weft's workers are, where
forked ones share the pages imported before the fork), then ``weft serve --manager M
--workers 1`` and ``--workers 2`` pinned the same way, each loaded by wrk (100
keep-alive connections, on core 1, as the workers suite does). It prints each
layout's requests per second, per core used (the server processes' CPU), and for
raw trio the requests each turn of trio's loop found waiting (an ``Instrument``
counting ``before_io_wait``), then the two-over-one ratio of requests per core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import wrk
from .procs import CLIENT_CORE, cpu_seconds
from .workers import Serve

CONNECTIONS = 100


def _serve_raw_threads(listener: socket.socket, core: int, report: Path) -> None:
    """In a forked child: raw socketserver threads on ``listener`` until SIGUSR1."""
    os.sched_setaffinity(0, {core})
    import socketserver

    from .handlers import http_sync

    connections = 0

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            nonlocal connections
            connections += 1  # under the GIL, in one thread at a time: += is not atomic
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            http_sync(self.request)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.daemon_threads = True
    server.socket.close()
    server.socket = listener

    def stop(signum: int, frame: Any) -> None:
        report.write_text(json.dumps({"connections": connections}))
        os._exit(0)

    signal.signal(signal.SIGUSR1, stop)
    server.serve_forever()
    os._exit(0)


def _serve_raw_trio(listener: socket.socket, core: int, report: Path) -> None:
    """In a forked child: raw trio on ``listener`` until SIGUSR1, then write the counts."""
    os.sched_setaffinity(0, {core})
    import trio

    from .trio_gc import answer, counts  # the same handler, counting its requests

    turns = 0

    class Turns(trio.abc.Instrument):
        def before_io_wait(self, timeout: float) -> None:
            nonlocal turns
            turns += 1

    async def main() -> None:
        sock = trio.socket.from_stdlib_socket(listener)
        await trio.serve_listeners(answer, [trio.SocketListener(sock)])

    def stop(signum: int, frame: Any) -> None:
        report.write_text(json.dumps({"requests": counts.requests, "turns": turns}))
        os._exit(0)

    signal.signal(signal.SIGUSR1, stop)
    trio.run(main, instruments=[Turns()])
    os._exit(0)


def _measure(
    port: int, pids: list[int], seconds: float, warmed: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Requests per second under wrk, and requests per CPU second ``pids`` spent meanwhile."""
    path = shutil.which("wrk")
    if path is None:
        sys.exit("wrk is needed: apt-get install wrk")
    wrk.run(path, port, CONNECTIONS, 1)  # warm-up
    warmed()
    before = sum(cpu_seconds(pid) for pid in pids)
    result = wrk.run(path, port, CONNECTIONS, seconds)
    cpu = sum(cpu_seconds(pid) for pid in pids) - before
    return result["rps"], result["rps"] * (result.get("seconds") or seconds) / cpu


RAW = {"trio": _serve_raw_trio, "threads": _serve_raw_threads}


def raw(
    manager: str, cores: tuple[int, ...], seconds: float, tmp: Path, spawn: bool = False
) -> dict[str, Any]:
    """One raw layout: a process per core, sharing one listening socket.

    Forked from this process (as gunicorn's workers are), or with ``spawn``, each a
    fresh interpreter given the socket (as weft's workers are): forked ones share
    the pages of what was imported before the fork, until written.
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    pids: list[int] = []
    children: list[subprocess.Popen[bytes]] = []
    for core in cores:
        if spawn:
            code = (
                "import socket, sys; from pathlib import Path;"
                f" sys.path.insert(0, {os.getcwd()!r});"
                " from benchmarks.raw_workers import RAW;"
                f" RAW[{manager!r}](socket.socket(fileno={listener.fileno()}), {core},"
                f" Path({str(tmp)!r}) / f'raw.{{__import__(\"os\").getpid()}}')"
            )
            child = subprocess.Popen([sys.executable, "-c", code], pass_fds=[listener.fileno()])
            children.append(child)
            pids.append(child.pid)
            continue
        pid = os.fork()
        if pid == 0:
            RAW[manager](listener, core, tmp / f"raw.{os.getpid()}")
        pids.append(pid)
    listener.close()
    try:
        time.sleep(1.0 if spawn else 0.5)  # imported and listening; wrk's warm-up covers the rest
        rps, per_core = _measure(port, pids, seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        for child in children:
            child.wait()
        for pid in pids:
            if not children:
                os.waitpid(pid, 0)
    turns, spread = [], []
    for pid in pids:
        counts = json.loads((tmp / f"raw.{pid}").read_text())
        if "turns" in counts:
            turns.append(round(counts["requests"] / max(counts["turns"], 1), 1))
        if "connections" in counts:
            spread.append(counts["connections"])
    return {"rps": rps, "per_core": per_core, "requests_per_turn": turns, "connections": spread}


def raw_spawned(manager: str, cores: tuple[int, ...], seconds: float, tmp: Path) -> dict[str, Any]:
    """:func:`raw` with each process a fresh interpreter, as weft's workers are."""
    return raw(manager, cores, seconds, tmp, spawn=True)


def weft(manager: str, cores: tuple[int, ...], seconds: float, tmp: Path) -> dict[str, Any]:
    """One weft layout: ``weft serve --workers len(cores)``, worker i on ``cores[i]``."""
    kind = "async" if manager == "trio" else "sync"
    with Serve(manager, kind, len(cores), cores, tmp / "weft.log") as server:
        assert server.port is not None
        # Pinned again once warm: a thread started since inherits its maker's cores.
        rps, per_core = _measure(server.port, server.worker_pids, seconds, server.pin)
    return {"rps": rps, "per_core": per_core}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_workers")
    parser.add_argument("--manager", choices=sorted(RAW), default="trio")
    parser.add_argument("--cores", default=f"0,{CLIENT_CORE}", help="the two processes' cores")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    two = tuple(int(core) for core in args.cores.split(","))
    if len(two) != 2:
        parser.error("--cores names two cores, one per process: 0,1 or 0,0")
    layouts = ((two[0],), two)
    os.sched_setaffinity(0, {CLIENT_CORE})
    print(
        f"{args.manager}, cores {args.cores}; load average at the start: {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="weft-trio-workers-") as name:
        tmp = Path(name)
        for n in range(args.rounds):
            row = {
                f"{kind}{len(cores)}": run(args.manager, cores, args.seconds, tmp)
                for cores in layouts
                for kind, run in (("raw", raw), ("spawned", raw_spawned), ("weft", weft))
            }
            for key, got in row.items():
                turns = got.get("requests_per_turn")
                spread = got.get("connections")
                print(
                    f"round {n + 1} {key:8} {got['rps']:9.0f} req/s {got['per_core']:9.0f}"
                    " per core"
                    + (f", requests per loop turn {turns}" if turns else "")
                    + (f", connections per process {spread}" if spread else ""),
                    flush=True,
                )
            for kind in ("raw", "spawned", "weft"):
                ratio = row[f"{kind}2"]["per_core"] / row[f"{kind}1"]["per_core"]
                print(f"round {n + 1} {kind}: two over one, per core {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
