"""The measurements: keep-alive throughput, churn, idle capacity, stop latency.

weft and the raw backend are measured alternately, A/B/A/B, ``runs`` times each;
every single measurement becomes one record (a dict), and medians are taken later
(:mod:`benchmarks.report`). Each server is its own process on the server core.
"""

from __future__ import annotations

import contextlib
import math
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import instructions, workers, wrk
from .procs import Child, OthersCPU, ServerProcess, cpu_seconds
from .server import RAW_BACKENDS, raw_flavour

SUITES = ("throughput", "churn", "instructions", "idle", "stop", "workers")
#: Pause before reading RSS, so the server has finished reacting to the last batch.
SETTLE = 0.5
#: An idle step of MAX asks for as many connections as the server's fd limit, which
#: it cannot quite reach (it has a listener, stdio, its loop's fds): what it holds
#: is the most it allows.
MAX = 0


@dataclass
class Options:
    managers: list[str]
    only: set[str]
    runs: int
    seconds: float
    warmup: float
    connections: list[int]
    churn_connections: list[int]
    idle_steps: list[int]
    idle_threads_max: int
    stop_connections: int
    per_client: int
    reference: bool
    quick: bool
    logdir: Path
    wrk: str | None = None


@dataclass
class Recorder:
    """Every measurement, in the order taken."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self, suite: str, manager: str, impl: str, setting: str, run: int, **metrics: Any
    ) -> None:
        record = {
            "suite": suite,
            "manager": manager,
            "impl": impl,
            "setting": setting,
            "run": run,
            **metrics,
        }
        self.records.append(record)
        shown = ", ".join(
            f"{k}={_short(v)}"
            for k, v in metrics.items()
            if k not in ("argv", "errors") and v is not None
        )
        errors = {k: v for k, v in (metrics.get("errors") or {}).items() if v}
        note = f"  errors {errors}" if errors else ""
        progress(
            f"  {suite:<10} {manager:<8} {impl:<7} {setting:<10} run {run + 1}: {shown}{note}"
        )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- keep-alive throughput and churn (wrk, HTTP) ------------------------------------------


def http_suites(manager: str, flavour: str, opts: Options, rec: Recorder) -> None:
    assert opts.wrk is not None
    log = opts.logdir / "servers.log"
    with (
        ServerProcess("weft", manager, "http", log) as weft,
        ServerProcess("raw", flavour, "http", log) as raw,
    ):
        pairs = [("weft", weft), ("raw", raw)]
        settings: list[tuple[str, int, bool]] = []
        if "throughput" in opts.only:
            settings += [("throughput", c, False) for c in opts.connections]
        if "churn" in opts.only:
            settings += [("churn", c, True) for c in opts.churn_connections]
        for suite, conns, close in settings:
            _wrk_rounds(suite, manager, pairs, conns, close, opts, rec)


def reference_suites(opts: Options, rec: Recorder) -> None:
    """The asyncio reference row: absolute figures, no ratio."""
    log = opts.logdir / "servers.log"
    if opts.wrk and opts.only & {"throughput", "churn"}:
        with ServerProcess("asyncio", "asyncio", "http", log) as server:
            pairs = [("asyncio", server)]
            if "throughput" in opts.only:
                for conns in opts.connections:
                    _wrk_rounds("throughput", "asyncio", pairs, conns, False, opts, rec)
            if "churn" in opts.only:
                for conns in opts.churn_connections:
                    _wrk_rounds("churn", "asyncio", pairs, conns, True, opts, rec)
    if "idle" in opts.only:
        for run in range(opts.runs):
            _idle_once("asyncio", "asyncio", "asyncio", "asyncio", opts.idle_steps, run, opts, rec)


def _wrk_rounds(
    suite: str,
    manager: str,
    pairs: list[tuple[str, ServerProcess]],
    conns: int,
    close: bool,
    opts: Options,
    rec: Recorder,
) -> None:
    assert opts.wrk is not None
    for _, server in pairs:  # warm-up, not recorded
        wrk.run(opts.wrk, server.port, conns, opts.warmup, close=close)
    for run in range(opts.runs):
        for impl, server in pairs:
            others = OthersCPU([s.pid for _, s in pairs])
            cpu = cpu_seconds(server.pid)
            result = wrk.run(opts.wrk, server.port, conns, opts.seconds, close=close)
            cpu = cpu_seconds(server.pid) - cpu
            result["others_cores"] = others.done()
            server.check_alive()
            if result.get("requests") and result.get("seconds"):
                # The server's own CPU, beside the rate: a rate the load generator
                # bounds (a server core not busy) says little of what weft costs.
                result["server_cpu_us"] = cpu / result["requests"] * 1e6
                result["server_cores"] = cpu / result["seconds"]
            rec.add(suite, manager, impl, f"c={conns}", run, **result)


# -- instructions (callgrind) -------------------------------------------------------------

#: What each wall-clock figure of the HTTP suites costs in instructions, measured under
#: callgrind from one wrk connection: keep-alive requests (per request), then one
#: request per connection (per connection). One connection, so that each wake-up of
#: the server serves one request and the figure is the path's own cost, which the
#: machine's load leaves alone (with more, how many requests a wake-up finds moves
#: it by up to 10 %).
INSTRUCTION_LOADS: tuple[tuple[str, instructions.Load], ...] = (
    ("throughput", (1, False)),
    ("churn", (1, True)),
)
#: Measured seconds per load, and weft-then-raw pairs: two, to show the figure repeats.
INSTRUCTION_SECONDS = {False: 5.0, True: 2.0}
INSTRUCTION_RUNS = {False: 2, True: 1}


def instructions_suite(manager: str, flavour: str, opts: Options, rec: Recorder) -> None:
    """Instructions per request (keep-alive) and per connection (churn), weft and raw."""
    assert opts.wrk is not None
    loads = [load for _, load in INSTRUCTION_LOADS]
    with tempfile.TemporaryDirectory(prefix="weft-callgrind-") as tmp:
        for run in range(INSTRUCTION_RUNS[opts.quick]):
            for impl, name in (("weft", manager), ("raw", flavour)):
                figures = instructions.measure(
                    impl,
                    name,
                    loads,
                    INSTRUCTION_SECONDS[opts.quick],
                    opts.wrk,
                    Path(tmp),
                    opts.logdir / "servers.log",
                )
                for (load, (connections, _)), (count, requests) in zip(
                    INSTRUCTION_LOADS, figures, strict=True
                ):
                    rec.add(
                        "instructions",
                        manager,
                        impl,
                        f"c={connections}",
                        run,
                        load=load,
                        requests=requests,
                        instructions=count,
                        per_request=count / max(requests, 1),
                    )


# -- idle capacity and stop latency (Python clients, echo) ----------------------------------


class Clients:
    """Idle-client processes, each holding at most ``per_client`` connections from its own
    127.0.0.x source address (one process per 127.0.0.x, in order)."""

    def __init__(self, port: int, per_client: int, log: Path) -> None:
        self.port = port
        self.per_client = per_client
        self.log = log
        self.procs: list[Child] = []

    def _ensure(self, count: int) -> None:
        while len(self.procs) < count:
            i = len(self.procs)
            self.procs.append(
                Child(
                    "benchmarks.idleclient",
                    ["--port", str(self.port), "--source", f"127.0.0.{i + 1}"],
                    self.log,
                    f"idle client {i} (127.0.0.{i + 1})",
                )
            )

    def open(self, total: int, timeout: float = 600) -> tuple[int, list[str]]:
        """Hold ``total`` connections across the clients; (held, errors)."""
        self._ensure(math.ceil(total / self.per_client))
        shares = [
            max(0, min(self.per_client, total - i * self.per_client))
            for i in range(len(self.procs))
        ]
        for proc, share in zip(self.procs, shares, strict=True):
            proc.send(f"open {share}")
        held, errors = 0, []
        for proc in self.procs:
            count, error = proc.expect("OPEN", timeout)
            held += int(count)
            if error != "-":
                errors.append(error)
        return held, errors

    def tell(self, command: str) -> None:
        for proc in self.procs:
            proc.send(command)

    def collect(self, word: str, timeout: float) -> list[int]:
        totals: list[int] = []
        for proc in self.procs:
            fields = [int(x) for x in proc.expect(word, timeout)]
            totals = [a + b for a, b in zip(totals, fields, strict=True)] if totals else fields
        return totals

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warm(port: int) -> None:
    """One echo round trip, so the baseline includes what the first connection loads."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"w")
        sock.recv(1)
    time.sleep(SETTLE)


#: Idle memory barely moves between runs (the spread is a few tenths of a KiB),
#: and each run opens up to 20,000 connections twice: three are enough.
IDLE_RUNS = 3


def idle_suite(manager: str, flavour: str, opts: Options, rec: Recorder) -> None:
    steps = opts.idle_steps
    if "threads" in (manager, flavour):  # a thread per connection: no MAX step either
        steps = [n for n in steps if MAX < n <= opts.idle_threads_max] or [opts.idle_threads_max]
    for run in range(min(opts.runs, IDLE_RUNS)):
        _idle_once(manager, "weft", "weft", manager, steps, run, opts, rec)
        _idle_once(manager, "raw", "raw", flavour, steps, run, opts, rec)


def _idle_once(
    manager: str,
    impl: str,
    backend: str,
    flavour: str,
    steps: list[int],
    run: int,
    opts: Options,
    rec: Recorder,
) -> None:
    log = opts.logdir / "servers.log"
    with (
        ServerProcess(backend, flavour, "echo", log) as server,
        Clients(server.port, opts.per_client, opts.logdir / "clients.log") as clients,
    ):
        _warm(server.port)
        base = server.rss_kib()
        held = 0
        for step in steps:
            n = step if step != MAX else server.nofile
            if n <= held:
                continue
            started = time.perf_counter()
            held, errors = clients.open(n)
            opened = time.perf_counter() - started
            time.sleep(SETTLE)
            rss = server.rss_kib()
            rec.add(
                "idle",
                manager,
                impl,
                "n=max" if step == MAX else f"n={n}",
                run,
                n=n,
                held=held,
                base_kib=base,
                rss_kib=rss,
                kib_per_conn=(rss - base) / held if held else None,
                open_s=opened,
                clients=len(clients.procs),
                nofile=server.nofile,
                error=";".join(errors) or None,
            )
            if held < n:
                break
        clients.tell("echo")
        ok, failed = clients.collect("ECHO", 300)
        rec.add("idle-echo", manager, impl, f"n={held}", run, ok=ok, failed=failed)


def stop_suite(manager: str, flavour: str, opts: Options, rec: Recorder) -> None:
    """weft's ``server.stop()`` and the raw backend's stop by hand, alternated, each run.

    Each stop has ``stop_connections`` idle connections that each served one echo; the
    raw stop does the same work as weft's (see :mod:`benchmarks.server`), so the pair's
    ratio says what weft adds, where the absolute time also says how fast the machine is.
    """
    for run in range(opts.runs):
        _stop_once(manager, "weft", "weft", manager, run, opts, rec)
        _stop_once(manager, "raw", "raw", flavour, run, opts, rec)


def _stop_once(
    manager: str, impl: str, backend: str, flavour: str, run: int, opts: Options, rec: Recorder
) -> None:
    n = opts.stop_connections
    with (
        ServerProcess(
            backend, flavour, "echo", opts.logdir / "servers.log", stoppable=True
        ) as server,
        Clients(server.port, opts.per_client, opts.logdir / "clients.log") as clients,
    ):
        held, errors = clients.open(n)
        time.sleep(SETTLE)
        clients.tell("eof 60")
        seconds, clean = server.stop()
        eof, reset, timeout = clients.collect("EOF", 120)
        rec.add(
            "stop",
            manager,
            impl,
            f"n={n}",
            run,
            seconds=seconds,
            clean=clean,
            held=held,
            eof=eof,
            reset=reset,
            timeout=timeout,
            error=";".join(errors) or None,
        )


# -- workers: weft serve --workers 2 against --workers 1 ------------------------------------


def workers_suite(manager: str, kind: str, opts: Options, rec: Recorder) -> None:
    """Every layout of :data:`workers.LAYOUTS` up at once, measured in turn, ``runs`` times."""
    assert opts.wrk is not None
    log = opts.logdir / "workers.log"
    with contextlib.ExitStack() as stack:
        servers = [
            (
                name,
                stack.enter_context(
                    workers.Serve(
                        manager, kind, count, cores, log, reuse_port=name in workers.REUSE_PORT
                    )
                ),
            )
            for name, count, cores, _ in workers.LAYOUTS
        ]
        for _, server in servers:  # warm-up, not recorded; then pin the threads it made
            assert server.port is not None
            wrk.run(opts.wrk, server.port, workers.CONNECTIONS, opts.warmup)
            server.pin()
        for run in range(opts.runs):
            for name, server in servers:
                result = workers.measure(server, opts.wrk, opts.seconds)
                rec.add("workers", manager, name, f"c={workers.CONNECTIONS}", run, **result)


def run_all(opts: Options, specs: dict[str, Any]) -> Recorder:
    """Every requested suite for every requested manager, then the asyncio reference."""
    rec = Recorder()
    for manager in opts.managers:
        flavour = raw_flavour(manager, specs[manager].handler_kind)
        progress(f"== {manager}: weft vs {RAW_BACKENDS[flavour]}")
        if opts.wrk and opts.only & {"throughput", "churn"}:
            http_suites(manager, flavour, opts, rec)
        if opts.wrk and "instructions" in opts.only:  # command_run drops it without valgrind
            instructions_suite(manager, flavour, opts, rec)
        if "idle" in opts.only:
            idle_suite(manager, flavour, opts, rec)
        if "stop" in opts.only:
            stop_suite(manager, flavour, opts, rec)
        if opts.wrk and "workers" in opts.only:
            workers_suite(manager, specs[manager].handler_kind, opts, rec)
    if opts.reference and opts.only - {"workers"}:
        progress("== asyncio reference (asyncio.start_server)")
        reference_suites(opts, rec)
    return rec
