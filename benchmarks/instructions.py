"""``python -m benchmarks instructions``: CPU instructions per request, weft against raw.

Requests per second on a shared machine move by 10 % between runs a minute apart;
the instructions a server executes per request, with one connection, hardly do. Each server (weft, then
its raw backend, same handler) runs under ``valgrind --tool=callgrind`` (Debian's
``valgrind``; nothing is installed here) while ``wrk`` loads it: a warm-up, then
callgrind's counters are zeroed, a measured run, and a dump. The figure is the
instructions of the whole server process (interpreter, backend, weft, handler;
not the kernel's) divided by the requests wrk completed in the measured run.

With one connection (the default), each wake-up of the server serves one request,
so the figure is the cost of the request path itself: two 8-20 s runs of the
same pair agree on the ratio to 0.1-0.3 % (short runs move more: see
docs/performance.md). With more connections, how many requests one wake-up finds
waiting changes between runs and moves the per-request figure of either server by
up to 10 %. Under callgrind a server runs some 50 times slower,
so a churn load keeps its accept queue full, which the clock's runs do not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import wrk
from .procs import ServerProcess
from .server import RAW_BACKENDS, installed_flavour

WARMUP_S = 3.0
#: How long a dump may take to appear once asked for.
DUMP_WAIT = 30.0
MISSING = "needs valgrind (apt-get install valgrind)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = sub.add_parser("instructions", help="instructions per request under callgrind")
    cmd.add_argument("--manager", default="gevent")
    cmd.add_argument("--connections", type=int, default=1)
    cmd.add_argument("--churn", action="store_true", help="one request per connection")
    cmd.add_argument("--seconds", type=float, default=20.0, help="measured wrk run")


def total_instructions(dump: Path) -> int:
    """The ``summary:``/``totals:`` line of a callgrind output file (Ir events)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


#: One load under callgrind: (wrk connections, one request per connection?).
Load = tuple[int, bool]


def available() -> bool:
    """True when valgrind's callgrind and its control tool are installed."""
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def measure(
    backend: str,
    flavour: str,
    loads: list[Load],
    seconds: float,
    wrk_path: str,
    work: Path,
    log: Path | None = None,
) -> list[tuple[int, int]]:
    """(instructions, requests) of one server under callgrind, for each load in turn.

    The server is started once; before each load a warm-up, then callgrind's counters
    are zeroed, the measured wrk run, and a dump of what it executed.
    """
    out = work / f"{backend}.%p.out"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    figures = []
    with ServerProcess(
        backend, flavour, "http", log or work / "servers.log", prefix=prefix, start_timeout=300
    ) as server:
        for connections, close in loads:
            wrk.run(wrk_path, server.port, connections, WARMUP_S, close=close, timeout_s=30)
            before = set(work.glob(f"{backend}.{server.pid}.out.*"))
            _control("-z", server.pid)  # zero the counters: the warm-up is not measured
            result = wrk.run(
                wrk_path, server.port, connections, seconds, close=close, timeout_s=30
            )
            _control("-d", server.pid)  # dump what the measured run executed
            dump = _new_dump(work, f"{backend}.{server.pid}.out.*", before)
            figures.append((total_instructions(dump), int(result["requests"])))
    return figures


def _new_dump(work: Path, pattern: str, before: set[Path]) -> Path:
    """The dump callgrind wrote since ``before``, once it is there (``DUMP_WAIT`` at most)."""
    deadline = time.monotonic() + DUMP_WAIT
    while True:
        dumps = set(work.glob(pattern)) - before
        if dumps:
            return max(dumps, key=lambda p: p.stat().st_mtime_ns)
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no dump in {DUMP_WAIT:g} s (see {work})")
        time.sleep(0.1)


def command_instructions(args: argparse.Namespace) -> int:
    if not available():
        print(MISSING, file=sys.stderr)
        return 2
    wrk_path = wrk.find()
    if wrk_path is None:
        print(wrk.MISSING, file=sys.stderr)
        return 2
    flavour = installed_flavour(args.manager)
    if flavour is None:
        return 2
    kind = "one request per connection" if args.churn else "keep-alive"
    print(
        f"{args.manager} against {RAW_BACKENDS[flavour]}: wrk -c{args.connections}, {kind}, "
        f"{args.seconds:g} s measured, under callgrind"
    )
    per_request = {}
    with tempfile.TemporaryDirectory(prefix="weft-callgrind-") as tmp:
        for backend, name in (("weft", args.manager), ("raw", flavour)):
            load: Load = (args.connections, args.churn)
            [(instructions, requests)] = measure(
                backend, name, [load], args.seconds, wrk_path, Path(tmp)
            )
            per_request[backend] = instructions / max(requests, 1)
            print(
                f"  {backend:4s} {requests:7d} requests, {instructions:,} instructions: "
                f"{per_request[backend]:,.0f} per request"
            )
    print(f"  weft/raw: {per_request['weft'] / per_request['raw']:.3f}")
    return 0
