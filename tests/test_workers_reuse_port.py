"""``weft serve --workers N --reuse-port``: a socket per worker, spread by the kernel.

Without ``reuse_port`` the workers share one socket and whichever wakes first takes
the next client, so a worker short of CPU gets few or none. With it, each worker
slot has a socket of its own on the same port, and the kernel spreads clients by a
hash of their addresses whoever is awake. The tests pause a worker (SIGSTOP: the
starved worker, on demand) while clients connect: its share waits in its own
socket's queue, and is served once it runs again. Real processes on loopback; the
handlers are ``tests/_serving.py``'s (each connection first gets the worker's pid).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import READY, Client, Served, host_port, queued
from test_workers import manager, pids_serving, ready_pids, start

from weft_core._worker_sockets import WorkerSockets

__all__ = ["manager"]  # the fixture, shared with test_workers

#: Clients connected at once in each check: enough that each of 2 or 3 slots gets
#: a share (the kernel's hash: a slot with under a sixth of 90 is a 1-in-10^6 draw).
CLIENTS = 90


def connect_all(address: str, count: int = CLIENTS) -> list[socket.socket]:
    """``count`` clients connected (the kernel completes each; no worker need accept)."""
    return [socket.create_connection(host_port(address), timeout=30) for _ in range(count)]


def pids_of(clients: list[socket.socket]) -> Counter[int]:
    """How many of ``clients`` each worker serves: the pid line each is sent first."""
    served: Counter[int] = Counter()
    for sock in clients:
        with sock, sock.makefile("rb") as lines:
            served[int(lines.readline())] += 1
    return served


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The worker ``pid`` stopped (SIGSTOP), as a worker starved of CPU is.

    Returns once every thread of it is stopped: a thread woken from ``accept`` by the
    signal could otherwise still take one client on its way to stopping.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not all(_state(pid, tid) == "T" for tid in os.listdir(f"/proc/{pid}/task")):
            assert time.monotonic() < deadline, f"worker {pid} did not stop"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _state(pid: int, tid: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # a thread that has ended
        return "T"


def share_of_paused(address: str, pid: int) -> Counter[int]:
    """Connect CLIENTS while ``pid`` is paused, then let it run; who served how many.

    It runs again only once the running workers have taken every client they can:
    each client is either served or still queued, in a socket only ``pid`` accepts
    from.
    """
    port = host_port(address)[1]
    served: Counter[int] = Counter()
    with paused(pid):
        clients = connect_all(address)
        waiting = list(clients)
        deadline = time.monotonic() + 30
        while sum(served.values()) + queued(port) < CLIENTS:
            assert time.monotonic() < deadline, f"{dict(served)}, {queued(port)} queued"
            ready, _, _ = select.select(waiting, [], [], 0.1)
            served += pids_of(ready)
            waiting = [sock for sock in waiting if sock not in ready]
    return served + pids_of(waiting)


def stop(served: Served) -> None:
    served.signal(signal.SIGTERM)
    assert served.finish() == 0, served.text
    assert "Traceback" not in served.text


@pytest.mark.timeout(120)
def test_a_paused_worker_still_gets_its_share_of_clients(tmp_path: Path, manager: str) -> None:
    served, address = start(tmp_path, manager, "--reuse-port")
    with served:
        starved, other = sorted(ready_pids(served, 2))
        counts = share_of_paused(address, starved)
        assert sum(counts.values()) == CLIENTS  # every client served, the paused one's too
        assert counts[starved] >= CLIENTS // 6, (
            f"the paused worker got {counts[starved]} of {CLIENTS}: its clients went to the "
            f"running worker, so the workers share one socket ({dict(counts)})"
        )
        assert counts[other] >= CLIENTS // 6, dict(counts)
        stop(served)


@pytest.mark.timeout(120)
def test_without_reuse_port_the_workers_share_one_socket(tmp_path: Path) -> None:
    # The default keeps one queue for every worker: a paused worker's clients are
    # not held for it, the running one takes them all.
    served, address = start(tmp_path, "threads")
    with served:
        starved, other = sorted(ready_pids(served, 2))
        with paused(starved):  # every client is served while it sleeps
            assert pids_of(connect_all(address)) == Counter({other: CLIENTS})
        stop(served)


@pytest.mark.timeout(120)
def test_clients_queued_for_a_killed_worker_are_served_by_its_replacement(
    tmp_path: Path,
) -> None:
    served, address = start(tmp_path, "threads", "--reuse-port")
    with served:
        first = ready_pids(served, 2)
        victim, survivor = sorted(first)
        with paused(survivor):  # so that only the victim's socket could lose clients
            os.kill(victim, signal.SIGKILL)
            served.wait_for(rf"worker {victim} exited with SIGKILL after")
            clients = connect_all(address)
        counts = pids_of(clients)  # none reset: the slot's socket outlived its worker
        (newcomer,) = ready_pids(served, 3) - first
        assert sum(counts.values()) == CLIENTS
        assert counts[newcomer] >= CLIENTS // 6, dict(counts)
        stop(served)


@pytest.mark.timeout(120)
def test_a_slot_given_up_by_ttou_loses_no_new_client(tmp_path: Path) -> None:
    served, address = start(tmp_path, "threads", "--reuse-port", workers=3)
    with served:
        pids = ready_pids(served, 3)
        served.signal(signal.SIGTTOU)
        (retired,) = (
            int(m.group(1)) for m in served.wait_for(r"worker (\d+): retiring it \(fewer")
        )
        served.wait_for(rf"worker {retired} exited with 0")
        # Every later client reaches a worker: none waits on a socket nobody accepts.
        counts = pids_of(connect_all(address))
        assert sum(counts.values()) == CLIENTS
        assert set(counts) == pids - {retired}, dict(counts)
        stop(served)


@pytest.mark.timeout(120)
def test_a_worker_added_by_ttin_gets_a_socket_of_its_own(tmp_path: Path) -> None:
    served, address = start(tmp_path, "threads", "--reuse-port")
    with served:
        first = ready_pids(served, 2)
        served.signal(signal.SIGTTIN)
        (added,) = ready_pids(served, 3) - first
        counts = share_of_paused(address, added)
        assert counts[added] >= CLIENTS // 6, dict(counts)
        assert set(counts) == first | {added}, dict(counts)
        stop(served)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2], ids=["HUP", "USR2"])
def test_a_new_generation_takes_over_the_slots(tmp_path: Path, signum: int) -> None:
    served, address = start(tmp_path, "threads", "--reuse-port")
    with served:
        first = ready_pids(served, 2)
        queued = connect_all(address, 30)  # served by the old generation or the new
        served.signal(signum)
        served.wait_for(r"reload done: 2 new worker\(s\) serving", timeout=60)
        new = ready_pids(served, 4) - first
        assert sum(pids_of(queued).values()) == 30  # none reset by the hand-over
        for pid in first:  # the old generation has drained and gone
            served.wait_for(rf"worker {pid} exited with 0")
        starved = min(new)
        counts = share_of_paused(address, starved)
        assert counts[starved] >= CLIENTS // 6, dict(counts)
        assert set(counts) == new, dict(counts)
        assert pids_serving(address, new) == new
        stop(served)


@pytest.mark.timeout(90)
def test_reuse_port_on_a_unix_socket_shares_it(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    served = Served(
        [*_serve_args(), "--bind", f"unix:{path}", "--workers", "2", "--reuse-port"],
        cwd=tmp_path,
    )
    with served:
        pids = {int(m.group(1)) for m in served.wait_for(READY, count=2)}
        seen = set()
        for _ in range(200):
            with Client(path) as client:
                seen.add(client.pid)
            if seen == pids:
                break
        assert seen == pids
        stop(served)


def _serve_args() -> list[str]:
    from _serving import weft_serve

    return weft_serve("_serving:handle", "--manager", "threads", "--graceful-timeout", "20")


# -- WorkerSockets on its own ------------------------------------------------------------------


def _reuse_port_listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_twins_listen_on_the_base_sockets_address() -> None:
    with _reuse_port_listener() as base:
        sockets = WorkerSockets([base], spread=True, backlog=16)
        try:
            (twin,) = sockets.of(1)
            assert twin is not base
            assert twin.getsockname() == base.getsockname()
            assert sockets.of(1) == [twin]  # made once per slot
            assert sockets.of(0) == [base]
            assert len(sockets.every()) == 2
            sockets.trim(1)
            assert twin.fileno() == -1
            assert base.fileno() != -1  # the base socket is its opener's
        finally:
            sockets.close()


def test_without_reuse_port_every_slot_shares_the_base() -> None:
    with socket.create_server(("127.0.0.1", 0)) as base:
        for spread in (True, False):  # spread without SO_REUSEPORT on the base: shared
            sockets = WorkerSockets([base], spread=spread, backlog=16)
            assert not sockets.spread
            assert sockets.of(3) == [base]
            assert sockets.state() == []


def test_the_slots_survive_a_re_execution() -> None:
    with _reuse_port_listener() as base:
        before = WorkerSockets([base], spread=True, backlog=16)
        (twin,) = before.of(2)
        state = before.state()
        assert state == [[], [twin.fileno()]]
        assert os.get_inheritable(twin.fileno())
        # What the re-executed image does with ADOPT_ENV: the same descriptors.
        after = WorkerSockets([base], spread=True, backlog=16, adopted=state)
        (adopted,) = after.of(2)
        assert adopted.fileno() == twin.fileno()
        assert not os.get_inheritable(adopted.fileno())
        twin.detach()
        after.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to open a socket as another user")
def test_a_twin_that_cannot_bind_shares_the_base_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The kernel groups SO_REUSEPORT sockets of one user only: a base socket that
    # another user opened (systemd's, say) takes no twin of ours.
    os.seteuid(65534)
    try:
        base = _reuse_port_listener()
    finally:
        os.seteuid(0)
    with base:
        sockets = WorkerSockets([base], spread=True, backlog=16)
        assert sockets.of(1) == [base]
        assert sockets.of(2) == [base]
        warnings = [r.getMessage() for r in caplog.records if "reuse_port" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "worker slot 1" in warnings[0]
        assert "shares the first worker's sockets" in warnings[0]


def test_the_supervisors_ttou_closes_no_socket_a_serving_worker_holds() -> None:
    with _reuse_port_listener() as base:
        sockets = WorkerSockets([base], spread=True, backlog=16)
        (one,) = sockets.of(1)
        (two,) = sockets.of(2)
        sockets.trim(1, in_use={2})  # slot 2's worker still serves: its socket stays
        assert one.fileno() == -1
        assert two.fileno() != -1
        sockets.close()
        assert two.fileno() == -1
