"""``python -m benchmarks instructions``: CPU instructions per request, weft against raw.

Requests per second on a shared machine move by 10 % between runs a minute apart;
the instructions a server executes per request, with one connection, hardly do. Each server (weft, then
its raw backend, same handler) runs under ``valgrind --tool=callgrind`` (Debian's
``valgrind``; nothing is installed here) while ``wrk`` loads it: a warm-up, then
callgrind's counters are zeroed, a measured run, and a dump. The figure is the
instructions of the whole server process (interpreter, backend, weft, handler;
not the kernel's) divided by the requests wrk completed in the measured run.

With one connection (the default), each wake-up of the server serves one request,
so the figure is the cost of the request path itself: two runs of the same pair
agree on the ratio to 0.1-0.3 %. With more connections, how many requests one
wake-up finds waiting changes between runs and moves the per-request figure of
either server by up to 10 %. Under callgrind a server runs some 50 times slower,
so a churn load keeps its accept queue full, which the clock's runs do not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import wrk
from .procs import ServerProcess
from .server import RAW_BACKENDS
from .suites import installed_flavour

WARMUP_S = 3.0


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


def measure(
    backend: str, flavour: str, args: argparse.Namespace, wrk_path: str, work: Path
) -> tuple[int, int]:
    """(instructions, requests) of one server under callgrind for one measured wrk run."""
    out = work / f"{backend}.%p.out"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with ServerProcess(
        backend, flavour, "http", work / "servers.log", prefix=prefix, start_timeout=300
    ) as server:
        wrk.run(wrk_path, server.port, args.connections, WARMUP_S, close=args.churn, timeout_s=30)
        _control("-z", server.pid)  # zero the counters: the warm-up is not measured
        result = wrk.run(
            wrk_path, server.port, args.connections, args.seconds, close=args.churn, timeout_s=30
        )
        _control("-d", server.pid)  # dump what the measured run executed
    dumps = sorted(work.glob(f"{backend}.{server.pid}.out.*"))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {backend} (see {work})")
    return total_instructions(dumps[-1]), int(result["requests"])


def command_instructions(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    wrk_path = wrk.find()
    if wrk_path is None:
        print(wrk.MISSING, file=sys.stderr)
        return 2
    flavour = installed_flavour(args.manager)
    if flavour is None:
        return 2
    load = "one request per connection" if args.churn else "keep-alive"
    print(
        f"{args.manager} against {RAW_BACKENDS[flavour]}: wrk -c{args.connections}, {load}, "
        f"{args.seconds:g} s measured, under callgrind"
    )
    per_request = {}
    with tempfile.TemporaryDirectory(prefix="weft-callgrind-") as tmp:
        for backend, name in (("weft", args.manager), ("raw", flavour)):
            instructions, requests = measure(backend, name, args, wrk_path, Path(tmp))
            per_request[backend] = instructions / max(requests, 1)
            print(
                f"  {backend:4s} {requests:7d} requests, {instructions:,} instructions: "
                f"{per_request[backend]:,.0f} per request"
            )
    print(f"  weft/raw: {per_request['weft'] / per_request['raw']:.3f}")
    return 0
