"""Requests per core, two trio processes on cores 0 and 1 against one on core 0, raw and weft;
a check by hand of ``performance.md``'s workers miss on trio, not one of the suites.

``python -m benchmarks.trio_workers [--rounds N] [--seconds S]`` runs, per round:
``trio.serve_listeners`` in one forked process on core 0, then in two sharing one
listening socket on cores 0 and 1, then ``weft serve --manager trio --workers 1``
and ``--workers 2`` pinned the same way, each loaded by wrk (100 keep-alive
connections, on core 1, as the workers suite does). It prints each layout's
requests per second, per core used (the server processes' CPU), and for raw trio
the requests each turn of trio's loop found waiting (an ``Instrument`` counting
``before_io_wait``), then the two-over-one ratio of requests per core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
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
LAYOUTS = ((0,), (0, CLIENT_CORE))


def _serve_raw(listener: socket.socket, core: int, report: Path) -> None:
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


def raw(cores: tuple[int, ...], seconds: float, tmp: Path) -> dict[str, Any]:
    """One raw layout: a process per core, sharing one listening socket forked to them."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    pids: list[int] = []
    for core in cores:
        pid = os.fork()
        if pid == 0:
            _serve_raw(listener, core, tmp / f"raw.{os.getpid()}")
        pids.append(pid)
    listener.close()
    try:
        time.sleep(0.5)  # trio imported and listening; wrk's warm-up covers the rest
        rps, per_core = _measure(port, pids, seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        for pid in pids:
            os.waitpid(pid, 0)
    turns = []
    for pid in pids:
        counts = json.loads((tmp / f"raw.{pid}").read_text())
        turns.append(round(counts["requests"] / max(counts["turns"], 1), 1))
    return {"rps": rps, "per_core": per_core, "requests_per_turn": turns}


def weft(cores: tuple[int, ...], seconds: float, tmp: Path) -> dict[str, Any]:
    """One weft layout: ``weft serve --workers len(cores)``, worker i on ``cores[i]``."""
    with Serve("trio", "async", len(cores), cores, tmp / "weft.log") as server:
        assert server.port is not None
        # Pinned again once warm: a thread started since inherits its maker's cores.
        rps, per_core = _measure(server.port, server.worker_pids, seconds, server.pin)
    return {"rps": rps, "per_core": per_core}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trio_workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {CLIENT_CORE})
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="weft-trio-workers-") as name:
        tmp = Path(name)
        for n in range(args.rounds):
            row = {
                f"{kind}{len(cores)}": run(cores, args.seconds, tmp)
                for cores in LAYOUTS
                for kind, run in (("raw", raw), ("weft", weft))
            }
            for key, got in row.items():
                turns = got.get("requests_per_turn")
                print(
                    f"round {n + 1} {key:6} {got['rps']:9.0f} req/s {got['per_core']:9.0f}"
                    " per core" + (f", requests per loop turn {turns}" if turns else ""),
                    flush=True,
                )
            for kind in ("raw", "weft"):
                ratio = row[f"{kind}2"]["per_core"] / row[f"{kind}1"]["per_core"]
                print(f"round {n + 1} {kind}: two over one, per core {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
