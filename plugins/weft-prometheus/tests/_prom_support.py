"""Test helpers: run ``weft serve`` in a real process, talk to it, scrape it.

Every wait is on a line of the served process's stderr or on a scrape, bounded by
a deadline; nothing sleeps and then asserts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from weft_prometheus import ADDRESS_ENV

HERE = Path(__file__).resolve().parent
WEFT = [sys.executable, "-m", "weft_core"]
HANDLERS = {
    "threads": "_prom_serving:handle",
    "gevent": "_prom_serving:handle",
    "trio": "_prom_serving:handle_async",
    "asyncio": "_prom_serving:handle_async",
}
LISTENING = r"listening on (127\.0\.0\.1:\d+) \(manager (\w+)\)"
READY = r"\[(\d+)\] \[INFO\] weft: worker ready on"
WAIT = 30.0  # generous: two cores shared with other test runs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """A port free now on 127.0.0.1 (for the metrics address, which must be fixed).

    Drawn from below the kernel's ephemeral range, which every bind to port 0 uses
    (the served process's own listener among them): a port found there, closed and
    bound again by a process starting up, could be taken in between.
    """
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    below = range(max(1024, low - 10000), low)
    choices = below if len(below) >= 1000 else range(high + 1, 65536)
    for _ in range(200):
        port = random.choice(choices)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {choices}")


def environment(metrics: str | None) -> dict[str, str]:
    """The environment for a served process: our handlers importable, the address set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if metrics is not None:
        env[ADDRESS_ENV] = metrics
    return env


class Served:
    """A process whose stderr is collected by a thread, for waiting on its lines."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(args), env=dict(env), cwd=HERE, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._lines.append("")  # end of output
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the output, waiting for them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = list(re.finditer(pattern, "".join(self._lines)))
                if len(found) >= count:
                    return found[:count]
                ended = self._lines and self._lines[-1] == ""
                left = deadline - time.monotonic()
                assert not ended and left > 0, (
                    f"{pattern!r} x{count} not seen within {timeout}s:\n{''.join(self._lines)}"
                )
                self._changed.wait(left)

    def stop(self) -> int:
        """SIGTERM, then the exit status (killing it if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        return code

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def weft_serve(
    manager: str, metrics: str | None, *extra: str, env: Mapping[str, str] = {}
) -> tuple[Served, str]:
    """Start ``weft serve`` with our handler; return it and its address once it listens."""
    served = Served(
        [*WEFT, "serve", HANDLERS[manager], "--manager", manager, "--bind", "127.0.0.1:0",
         "--graceful-timeout", "10", *extra],
        {**environment(metrics), **env},
    )  # fmt: skip
    try:
        ((address, named),) = (m.groups() for m in served.wait_for(LISTENING))
        assert named == manager
    except BaseException:
        served.stop()
        raise
    return served, address


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Client:
    """One connection to the served handler: it first reads the serving pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(host_port(address), timeout=WAIT)
        self.file = self.sock.makefile("rb")
        line = self.file.readline()
        self.pid = int(line)
        self.received = len(line)  # what the server sent, as the client counts it
        self.sent = 0

    def echo(self, payload: bytes) -> None:
        self.sock.sendall(payload)
        self.sent += len(payload)
        assert self.file.read(len(payload)) == payload
        self.received += len(payload)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)
        self.sent += len(payload)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scrape(metrics: str) -> Samples:
    """One real HTTP scrape of ``metrics``, parsed: (sample name, labels) -> value."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=WAIT) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def scrape_until(metrics: str, name: str, value: float, **labels: Any) -> Samples:
    """Scrape until ``name`` (summed over ``labels``) reaches ``value``; return that scrape."""
    deadline = time.monotonic() + WAIT
    while True:
        samples = scrape(metrics)
        now = total(samples, name, **labels)
        if now == value:
            return samples
        assert now < value and time.monotonic() < deadline, (
            f"{name}{labels} is {now}, expected {value}"
        )
        time.sleep(0.05)  # polling a scrape: the count is the event waited for
