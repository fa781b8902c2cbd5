"""Soak: a bounded mixed run against each manager; nothing grows, nothing is lost.

Opt-in (``pytest -m soak tests/test_soak.py -s``): skipped unless the marker is
selected. ``SOAK_SECONDS`` sets the length of each manager's run (default 120),
``SOAK_WORKERS`` the number of client threads (default 16).

Clients mix short echoes, long-lived connections, half-closes, handler errors they
ask for, resets mid-exchange and clients that vanish without reading. The server
runs in a subprocess (``_fault_soak_server.py``). After a warm-up (the first 15 %,
then a quiet moment) its memory and descriptor count are the baseline; at the end,
once quiet again: no more descriptors or threads, the memory Python objects hold
(tracemalloc: weft is pure Python, so any leak of weft's is there) within
TRACED_TOLERANCE, the RSS (after ``malloc_trim``) within RSS_TOLERANCE, every
echoed byte back in order, and no error logged but the ones clients asked for.

The RSS bound is loose on purpose: a process whose threads live long (``pool``'s
workers, gevent's and trio's loop threads) creeps by a few hundred bytes per
connection in the C allocator, as a plain stdlib thread pool running the same load
does; that is not a leak of weft's, and tracemalloc tells the two apart.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from _fault_support import ScriptServer, reset

from weft_core import available_managers
from weft_core.testing._support import recv_exactly, recv_until_closed, wait_until

SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "16"))
WARM_UP = 0.15
#: Python objects held after the run beyond the baseline: under 50 bytes per
#: connection over a default run, so a leak of one small object per connection fails.
TRACED_TOLERANCE_KIB = 512
#: RSS growth allowed over the run (see the module docstring).
RSS_TOLERANCE = 0.25

#: Weights of the client behaviours.
KINDS = {
    "short": 50,
    "long": 8,
    "half_close": 12,
    "error": 8,
    "reset": 12,
    "vanish": 10,
}


@dataclass
class Tally:
    """What the clients did and saw (one per worker, merged at the end)."""

    kinds: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    echoed: int = 0
    failures: list[str] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.kinds.update(other.kinds)
        self.sent += other.sent
        self.echoed += other.echoed
        self.failures.extend(other.failures[:5])


class SoakServer(ScriptServer):
    """``_fault_soak_server.py``, which also says when it has no connection open."""

    def __init__(self, manager: str) -> None:
        super().__init__("_fault_soak_server.py", manager)

    def quiet(self) -> dict[str, Any]:
        """Stats once no connection is open."""
        stats: dict[str, Any] = {}

        def idle() -> bool:
            stats.update(self.ask("stats"))
            return stats["active"] == 0

        wait_until(idle, timeout=30, what="the server to have no connection open")
        return stats


def exchange(client: socket.socket, rng: random.Random, tally: Tally, rounds: int) -> None:
    """``rounds`` round trips of random sizes, each checked byte for byte."""
    for _ in range(rounds):
        data = rng.randbytes(rng.randint(1, 16384))
        client.sendall(data)
        tally.sent += len(data)
        got = recv_exactly(client, len(data))
        if got != data:
            raise AssertionError("echo differs from what was sent")
        tally.echoed += len(got)


def one_client(port: int, kind: str, rng: random.Random, tally: Tally) -> None:
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        if kind == "error":
            client.sendall(b"X")
            if recv_until_closed(client) != b"":
                raise AssertionError("a handler that raised sent something")
        elif kind == "vanish":
            client.sendall(b"B")
            recv_exactly(client, 1024)
        else:
            client.sendall(b"E")
            if kind == "short":
                exchange(client, rng, tally, rng.randint(1, 4))
            elif kind == "long":
                deadline = time.monotonic() + rng.uniform(1, 3)
                while time.monotonic() < deadline:
                    exchange(client, rng, tally, 1)
                    time.sleep(0.1)  # a client that pauses between requests
            elif kind == "reset":
                exchange(client, rng, tally, rng.randint(1, 3))
                client.sendall(b"cut short")  # its echo is never read
                reset(client)
                return
            elif kind == "half_close":
                data = rng.randbytes(rng.randint(1, 65536))

                def send_then_half_close() -> None:
                    client.sendall(data)
                    client.shutdown(socket.SHUT_WR)

                sender = threading.Thread(target=send_then_half_close)
                sender.start()
                got = recv_until_closed(client)
                sender.join(30)
                tally.sent += len(data)
                if got != data:
                    raise AssertionError(f"half-close: {len(got)} of {len(data)} bytes came back")
                tally.echoed += len(got)
    finally:
        client.close()


def load(port: int, seconds: float, seed: int) -> Tally:
    """WORKERS threads of mixed clients for ``seconds``; what they did."""
    deadline = time.monotonic() + seconds
    tallies = [Tally() for _ in range(WORKERS)]

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        tally = tallies[i]
        names, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = rng.choices(names, weights)[0]
            try:
                one_client(port, kind, rng, tally)
            except (OSError, AssertionError) as exc:
                tally.failures.append(f"{kind}: {type(exc).__name__}: {exc}")
            tally.kinds[kind] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return total


@pytest.mark.soak
@pytest.mark.timeout(int(SECONDS * 1.5) + 120)
@pytest.mark.parametrize("manager", sorted(available_managers()))
def test_soak(manager: str, request: pytest.FixtureRequest) -> None:
    markexpr = request.config.getoption("markexpr") or ""
    if "soak" not in markexpr or "not soak" in markexpr:
        pytest.skip("opt-in: pytest -m soak")
    server = SoakServer(manager)
    try:
        started = time.monotonic()
        warm = load(server.port, SECONDS * WARM_UP, seed=1)
        baseline = server.quiet()
        main = load(server.port, SECONDS * (1 - WARM_UP), seed=2)
        final = server.quiet()
        elapsed = time.monotonic() - started
        stopped = server.ask("stop")
    finally:
        server.close()
    main.merge(warm)
    connections = sum(main.kinds.values())
    figures = {
        "manager": manager,
        "seconds": round(elapsed, 1),
        "connections": connections,
        "per_second": round(connections / elapsed),
        "kinds": dict(main.kinds),
        "echoed_mib": round(main.echoed / 2**20, 1),
        "traced_kib": [baseline["traced_kib"], final["traced_kib"]],
        "rss_kib": [baseline["rss_kib"], final["rss_kib"]],
        "rss_trimmed_kib": [baseline["rss_trimmed_kib"], final["rss_trimmed_kib"]],
        "fds": [baseline["fds"], final["fds"]],
        "threads": [baseline["threads"], final["threads"]],
        "handler_errors": final["handler_errors"],
        "peer_errors": final["peer_errors"],
        "intended_errors": final["intended"],
        "unexplained": final["unexplained"],
        "client_failures": len(main.failures),
    }
    print("\nSOAK " + json.dumps(figures))
    assert main.failures == [], main.failures
    assert main.echoed == main.sent, "every echoed byte came back"
    assert final["unexplained"] == 0, final["unexplained_first"]
    assert final["handler_errors"] == final["intended"] == main.kinds["error"]
    assert final["accepted"] == connections
    assert final["fds"] <= baseline["fds"], (baseline["fds"], final["fds"])
    # weft-threads keeps idle threads for reuse, at most one per client that ran at
    # once: more than the warm-up's peak is allowed, never more than that.
    assert final["threads"] <= baseline["threads"] + (WORKERS if manager == "threads" else 0)
    assert final["traced_kib"] - baseline["traced_kib"] < TRACED_TOLERANCE_KIB
    assert final["rss_trimmed_kib"] <= baseline["rss_trimmed_kib"] * (1 + RSS_TOLERANCE)
    assert stopped["clean"] is True and stopped["active"] == 0
