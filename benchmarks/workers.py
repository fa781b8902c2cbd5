"""The workers suite: ``weft serve --workers 2`` against ``--workers 1``, same manager.

Each layout is a real ``weft serve`` command (``python -m weft_core serve
benchmarks.handlers:http_sync --manager NAME --workers N``), so what is measured is
what a deployment runs: with N > 1 a supervisor binds the socket once and N worker
processes accept from it. The layouts, measured in turn (A/B/C/A/B/C...) with
``wrk -c100`` keep-alive load:

- ``w1``: one process (``--workers 1``, no supervisor), pinned to core 0; wrk on core 1.
- ``w2``: two workers, one pinned to core 0 and one to core 1; wrk on core 1 as well.
  On a two-core machine wrk has to share the second worker's core, and it needs
  half a core or more at these rates, so the ratio shows how much of core 1 the
  second worker got as much as how weft scales. Hence the CPU figures below, and
  requests per second per core the workers used, which does not depend on it.
- ``w2rp``: as ``w2``, with ``--reuse-port``: each worker has a socket of its own
  and the kernel spreads wrk's connections over them, where ``w2``'s share one
  socket and the worker that wakes first takes them.
- ``w2same``: two workers, both pinned to core 0; wrk on core 1. The same CPU as
  ``w1``: the ratio shows what splitting one core between two processes sharing a
  listener costs (or gains), with no extra CPU.

Besides wrk's figures, each run records the CPU time every worker used and wrk's
own (``RUSAGE_CHILDREN``), and how many of wrk's connections each worker held, so
the report shows how the load spread over the workers and how much of core 1 wrk
took.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import wrk
from .procs import (
    CLIENT_CORE,
    ROOT,
    SERVER_CORE,
    ChildError,
    OthersCPU,
    cpu_seconds,
    raise_nofile,
)
from .server import weft_manager

#: (name, workers, cores of each worker, what it is) for every layout, in the order run.
LAYOUTS = (
    ("w1", 1, (SERVER_CORE,), "--workers 1 on core 0"),
    ("w2", 2, (SERVER_CORE, CLIENT_CORE), "--workers 2 on cores 0 and 1 (wrk shares core 1)"),
    ("w2rp", 2, (SERVER_CORE, CLIENT_CORE), "--workers 2 --reuse-port on cores 0 and 1"),
    ("w2same", 2, (SERVER_CORE, SERVER_CORE), "--workers 2, both on core 0"),
)
#: The layouts run with ``--reuse-port`` (a socket per worker).
REUSE_PORT = frozenset({"w2rp"})
CONNECTIONS = 100
HANDLERS = {"sync": "benchmarks.handlers:http_sync", "async": "benchmarks.handlers:http_trio"}
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_STARTED = re.compile(r"worker (\d+) started")
_READY = "worker ready on"


def pin_process(pid: int, cores: set[int]) -> None:
    """Pin every thread of ``pid`` (threads made later inherit their maker's cores)."""
    for _ in range(3):  # again, in case a thread was starting while we listed them
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cores)


class Serve:
    """``weft serve ... --workers N`` in the background, every worker pinned to its core."""

    def __init__(
        self,
        manager: str,
        kind: str,
        workers: int,
        cores: tuple[int, ...],
        log: Path,
        reuse_port: bool = False,
    ) -> None:
        self.workers = workers
        self.cores = cores
        self.log = log
        self.port: int | None = None
        self.worker_pids: list[int] = []
        self._ready = 0
        self._seen = threading.Condition()
        base, options = weft_manager(manager)
        argv = [
            sys.executable,
            "-m",
            "weft_core",
            "serve",
            HANDLERS[kind],
            "--manager",
            base,
            *(f"-o{key}={value}" for key, value in options.items()),
            "--bind",
            "127.0.0.1:0",
            "--workers",
            str(workers),
            "--max-connections",
            "none",
            "--graceful-timeout",
            "5",
            "--log-level",
            "info",
            *(["--reuse-port"] if reuse_port else []),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "WEFT_BACKLOG": "1024",
        }
        env.pop("PYTHONDEVMODE", None)
        env.pop("WEFT_CONFIG", None)
        # An empty directory: no weft.toml or pyproject.toml of ours to pick up.
        self.cwd = log.parent / "serve-cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        everywhere = set(cores)

        def preexec() -> None:
            os.sched_setaffinity(0, everywhere)  # the supervisor, and workers until pinned
            raise_nofile()

        with open(log, "ab") as out:
            out.write(f"--- {' '.join(argv[2:])} on cores {cores}\n".encode())
        self.name = f"weft serve --manager {manager} --workers {workers}"
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            text=True,
            preexec_fn=preexec,
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        try:
            self._wait_ready(60)
            if workers == 1:
                self.worker_pids = [self.proc.pid]
            self.pin()
        except BaseException:
            self.close()
            raise

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log, "a") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                with self._seen:
                    if (m := _LISTENING.search(line)) and self.port is None:
                        self.port = int(m[1])
                    elif m := _STARTED.search(line):
                        self.worker_pids.append(int(m[1]))
                    elif _READY in line:
                        self._ready += 1
                    self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        needed = 0 if self.workers == 1 else self.workers
        with self._seen:
            while self.port is None or self._ready < needed:
                if self.proc.poll() is not None:
                    raise ChildError(
                        f"{self.name} exited ({self.proc.returncode}); see {self.log}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChildError(
                        f"{self.name}: not ready within {timeout:.0f}s; see {self.log}"
                    )
                self._seen.wait(min(left, 0.5))

    def pin(self) -> None:
        """Worker i on ``cores[i]`` (every thread of it); called again after a warm-up."""
        for pid, core in zip(self.worker_pids, self.cores, strict=False):
            pin_process(pid, {core})

    def cpu(self) -> list[float]:
        """CPU seconds used so far by each worker."""
        return [cpu_seconds(pid) for pid in self.worker_pids]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
        if self.workers > 1 and len(self.worker_pids) != self.workers:
            raise ChildError(f"{self.name}: a worker was replaced; see {self.log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # a second signal would do, but this is certain
                self.proc.wait(5)
                for pid in self.worker_pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sockets(pid: int) -> int:
    """How many sockets ``pid`` holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def measure(server: Serve, wrk_path: str, seconds: float) -> dict[str, Any]:
    """One wrk run against ``server``, with the CPU its workers and wrk used.

    Halfway through the run the connections each worker holds are counted (sockets
    open then, less those open before): how the kernel spread wrk's connections.
    """
    assert server.port is not None
    idle = [sockets(pid) for pid in server.worker_pids]
    held: list[int] = []

    def count() -> None:
        time.sleep(max(0.5, seconds / 2))
        with contextlib.suppress(OSError):
            held.extend(sockets(pid) - n for pid, n in zip(server.worker_pids, idle, strict=True))

    counter = threading.Thread(target=count, daemon=True)
    others = OthersCPU([server.proc.pid, *server.worker_pids])
    before, wrk_before = server.cpu(), _children_cpu()
    counter.start()
    result = wrk.run(wrk_path, server.port, CONNECTIONS, seconds)
    after, wrk_after = server.cpu(), _children_cpu()
    result["others_cores"] = others.done()
    counter.join()
    server.check_alive()
    elapsed = result.get("seconds") or seconds
    result["worker_cpu"] = [(b - a) / elapsed for a, b in zip(before, after, strict=True)]
    result["wrk_cpu"] = (wrk_after - wrk_before) / elapsed
    result["worker_conns"] = held or None
    return result
