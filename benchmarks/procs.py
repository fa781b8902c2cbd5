"""Processes: CPU pinning, fd limits, and the line protocol with server and client children.

Every server runs in its own process pinned to :data:`SERVER_CORE`; ``wrk``, the idle
clients and this orchestrator are pinned to :data:`CLIENT_CORE`, so load generation
never competes with the server for its core. Children talk in lines: a command on
stdin, one answer line on stdout (``PORT 4242``, ``OPEN 5000 ok``, ...); closing a
child's stdin makes it exit at once. Their stderr goes to a log file whose tail is
shown if a child dies.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE = 0
CLIENT_CORE = 1
#: The accept backlog of every server, weft and raw alike (the kernel caps it at somaxconn).
BACKLOG = 1024


class ChildError(RuntimeError):
    """A child process died, answered wrongly, or did not answer in time."""


def pin(core: int) -> None:
    """Run this process (and the threads it starts later) on ``core`` only, if it exists."""
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {core})


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def client_preexec() -> None:
    """For load generators started as children: the client core, every fd allowed."""
    pin(CLIENT_CORE)
    raise_nofile()


def rss_kib(pid: int) -> int:
    """``VmRSS`` of ``pid`` in KiB, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ChildError(f"no VmRSS for pid {pid}")


def say(line: str) -> None:
    """A child's answer to the orchestrator."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stdin_lines(wait: object = None) -> Iterator[str]:
    """Command lines from stdin until EOF; ``wait(fd)`` (gevent's ``wait_read``) first if given."""
    buf = b""
    while True:
        if callable(wait):
            wait(0)
        chunk = os.read(0, 4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


ChildT = TypeVar("ChildT", bound="Child")


class Child:
    """A child process (``python -m benchmarks.<module> ...``) spoken to in lines."""

    def __init__(
        self, module: str, args: list[str], log: Path, name: str, prefix: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.log = log
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        env.pop("PYTHONDEVMODE", None)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            err.write(f"--- {name}: {module} {' '.join(args)}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", module, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=env,
                text=True,
                bufsize=1,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name} exited ({self.proc.poll()}){self._tail()}") from None

    def expect(self, word: str, timeout: float) -> list[str]:
        """The next answer line, which must start with ``word``; its other fields."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise ChildError(f"{self.name}: no {word} within {timeout:.0f}s{self._tail()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise ChildError(f"{self.name} exited ({self.proc.returncode}){self._tail()}")
        fields = line.split()
        if not fields or fields[0] != word:
            raise ChildError(f"{self.name}: expected {word}, got {line.strip()!r}{self._tail()}")
        return fields[1:]

    def ask(self, command: str, word: str, timeout: float) -> list[str]:
        self.send(command)
        return self.expect(word, timeout)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildError(f"{self.name} exited ({self.proc.returncode}){self._tail()}")

    def rss_kib(self) -> int:
        self.check_alive()
        return rss_kib(self.pid)

    def close(self, timeout: float = 10.0) -> None:
        """Close stdin (the child exits), kill it if it lingers."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n  log " + str(self.log) + ":\n    " + "\n    ".join(text) if text else ""

    def __enter__(self: ChildT) -> ChildT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (every thread), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class ServerProcess(Child):
    """One server (``benchmarks.server``) on :data:`SERVER_CORE`; ``port`` once it listens.

    ``nofile`` is the server's fd limit, which bounds the connections it can hold.
    """

    def __init__(
        self,
        backend: str,
        flavour: str,
        handler: str,
        log: Path,
        prefix: Sequence[str] = (),
        start_timeout: float = 60,
        stoppable: bool = False,
    ) -> None:
        name = f"{backend}-{flavour} {handler} server"
        super().__init__(
            "benchmarks.server",
            [
                "--backend",
                backend,
                "--flavour",
                flavour,
                "--handler",
                handler,
                "--core",
                str(SERVER_CORE),
                *(["--stoppable"] if stoppable else []),
            ],
            log,
            name,
            prefix,
        )
        try:
            port, nofile = self.expect("PORT", start_timeout)
            self.port, self.nofile = int(port), int(nofile)
        except BaseException:
            self.close(2)
            raise

    def stop(self, timeout: float = 120) -> tuple[float, bool]:
        """Ask the server to ``stop()``; (seconds it took, whether it ended cleanly)."""
        seconds, clean = self.ask("stop", "STOPPED", timeout)
        return float(seconds), clean == "1"


def cpu_ticks() -> tuple[int, int]:
    """Clock ticks every core has spent busy, and in all, since boot (``/proc/stat``).

    Busy is all but idle and iowait, steal included: on a virtual machine the time
    the host gave to other guests is time the server did not get either.
    """
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


def machine_busy_seconds() -> float:
    """CPU seconds every core has spent busy since boot (:func:`cpu_ticks`)."""
    return cpu_ticks()[0] / _TICK


class OthersCPU:
    """The CPU other processes used while a figure was measured, in cores.

    The machine's busy time over the measurement, less what the measured processes
    (``pids``), the load generator (this process's children that ended meanwhile:
    wrk) and this process itself used. What is left ran beside the figure on the same
    two cores: another tenant, a helper, the tail of a previous run. Per figure, not
    once per run, since the machine's load moves within a run. Read ``done`` once,
    after the load generator was reaped and before the measured processes end.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(dict.fromkeys(pids))  # a process named twice counts once
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (
            time.monotonic(),
            machine_busy_seconds(),
            sum(cpu_seconds(pid) for pid in self.pids),
            children.ru_utime + children.ru_stime,
            time.process_time(),
        )

    def done(self) -> float | None:
        """Cores' worth of CPU others used since this was made (≥ 0); None if unreadable."""
        try:
            end = self._sample()
        except (OSError, ValueError, IndexError):
            return None
        elapsed, busy, measured, generator, own = (
            b - a for a, b in zip(self._start, end, strict=True)
        )
        if elapsed <= 0:
            return None
        return max(0.0, busy - measured - generator - own) / elapsed
