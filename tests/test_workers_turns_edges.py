"""Two promises of the workers at their edges: their turns at a shared socket, and the log lock.

From an outside check of the workers' accept balance (``weft_core._balance``) and
of the lock they write their log lines under, past a holder that is stopped.

Real ``weft serve --workers N`` processes on loopback; the handlers are
``tests/_turns_edges_handlers.py`` (each connection first gets the serving
worker's pid). Every wait is on a line, a reply, or a state read with a deadline.

The accept balance's map is read from outside, as any process of the same user can:
the supervisor's memfd through ``/proc/PID/fd``, a worker's cell from the
``_WEFT_ACCEPT_BALANCE`` it was started with (``/proc/PID/environ`` keeps the
environment a process started with, whatever it removed since). A cell is
``(held, taken)``; ``held`` is -1 (ABSENT) while its worker does not accept.

The tests whose docstring says "Seen" failed on the code checked, each fixed
since. The guards that held are opt-in (``pytest -m outside``), as are the
``test_REPORT_*`` runs, which only print figures (turns on and off).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _log_pipes import lock_file, read_until, stopped_lock_holder
from _serving import LISTENING, READY, Client, Served, environment, host_port, weft_serve
from test_accept_balance import burst, cell_of, cells, first_lines, held, map_path, wait_until
from test_workers_reuse_port import paused

from weft_core import _registry
from weft_core._balance import ABSENT
from weft_core._balance import ENV as BALANCE_ENV
from weft_core._ctl import request
from weft_core._registry import get_manager_spec

H = "_turns_edges_handlers"
LOOP_MANAGERS = ("gevent", "trio", "asyncio")


def _have(manager: str) -> None:
    if manager not in _registry.available_managers():
        pytest.skip(f"weft-{manager} is not installed")


def handler(manager: str) -> str:
    kind = get_manager_spec(manager).handler_kind
    return f"{H}:handle_async" if kind == "async" else f"{H}:handle"


def quiet_env(**more: str) -> dict[str, str]:
    """The tests' environment, no control socket (as root, /run/weft is shared)."""
    return {**environment(), "WEFT_CONTROL_SOCKET": "off", **more}


def serve(
    tmp_path: Path,
    manager: str,
    *extra: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    graceful: str = "20",
) -> tuple[Served, str, set[int]]:
    """A supervisor of ``workers`` workers: it, its address, and the ready workers' pids."""
    served = Served(
        weft_serve(handler(manager), "--manager", manager, "--workers", str(workers),
                   "--bind", "127.0.0.1:0", "--graceful-timeout", graceful, *extra),
        cwd=tmp_path,
        env=quiet_env() if env is None else env,
    )  # fmt: skip
    try:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        pids = {int(m.group(1)) for m in served.wait_for(READY, count=workers)}
    except BaseException:
        served.kill()
        raise
    return served, address, pids


def stop(served: Served, timeout: float = 40) -> None:
    served.signal(signal.SIGTERM)
    assert served.finish(timeout) == 0, served.text
    assert "Traceback" not in served.text, served.text


def with_and_without_turns(
    tmp_path: Path, manager: str, *extra: str
) -> Iterator[tuple[str, Served, str, set[int]]]:
    """Serve with the turns, then with them off (PROBE_NO_TURNS=1), stopping each in turn:
    yields ``(label, served, address, pids)`` for the caller's measure of each."""
    for label, env in (("turns", quiet_env()), ("no-turns", quiet_env(PROBE_NO_TURNS="1"))):
        served, address, pids = serve(tmp_path, manager, *extra, env=env)
        with served:
            yield label, served, address, pids
            stop(served)


# -- clients ---------------------------------------------------------------------------------


def holding(address: str) -> Client:
    """A client that stays: its worker holds it until it closes."""
    client = Client(host_port(address), timeout=30)
    client.sock.sendall(b"hold\n")
    assert client.line() == b"holding"
    return client


def hold_on_each(address: str, pids: set[int], each: int = 1) -> list[Client]:
    """Held clients until every worker in ``pids`` holds at least ``each``."""
    clients: list[Client] = []
    counts: Counter[int] = Counter()
    for _ in range(400):
        if all(counts[pid] >= each for pid in pids):
            return clients
        client = holding(address)
        clients.append(client)
        counts[client.pid] += 1
    raise AssertionError(f"after 400 clients, held: {dict(counts)}; want {each} on each of {pids}")


def close_all(clients: list[Client] | list[socket.socket]) -> None:
    for client in clients:
        with contextlib.suppress(OSError):
            client.close()


@contextlib.contextmanager
def closing(clients: list) -> Iterator[list]:
    try:
        yield clients
    finally:
        close_all(clients)


# ===========================================================================================
# Promise 1: the accept balance
# ===========================================================================================


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["ttou", "hup", "ctl-drain", "max-requests"])
def test_a_draining_worker_is_not_counted(tmp_path: Path, how: str) -> None:
    """Promise: "a worker that is starting, paused or stopping is not waited for".
    A worker retired softly (TTOU, the old generation of a HUP reload, weft ctl
    drain; max_requests takes the same path) stops accepting at once but drains its
    connections for up to the graceful timeout. Its cell must say ABSENT meanwhile;
    else its count, falling as its clients leave, makes every sibling that is ahead
    of it leave it a turn (20 ms a second) that it never takes, for the whole drain.
    """
    extra: tuple[str, ...] = ()
    control = tmp_path / "ctl.sock"
    env = quiet_env()
    if how == "ctl-drain":
        extra = ("--control-socket", str(control))
        env = environment()
    if how == "max-requests":
        extra = ("--max-requests", "6")
    served, address, pids = serve(tmp_path, "threads", *extra, workers=3 if how == "ttou" else 2,
                                  env=env)  # fmt: skip
    with served, closing(hold_on_each(address, pids)) as kept:
        path = map_path(served.proc.pid)
        for pid in pids:  # every worker accepts, and holds what it serves
            assert held(path, pid) >= 1, (pid, cells(path)[:10])
        if how == "ttou":
            served.signal(signal.SIGTTOU)
            (m,) = served.wait_for(r"worker (\d+): retiring it \(fewer workers wanted\)")
            leaving = {int(m.group(1))}
        elif how == "hup":
            served.signal(signal.SIGHUP)
            served.wait_for(r"reload done: 2 new worker\(s\) serving", timeout=60)
            leaving = pids
        elif how == "max-requests":
            for _ in range(12):  # the held clients count as requests
                kept.append(holding(address))
                if "reached max_requests" in served.text:
                    break
            (m,) = served.wait_for(r"worker (\d+) reached max_requests: replacing it")
            leaving = {int(m.group(1))}
        else:
            request(str(control), "drain", {"timeout": 20})
            leaving = pids
        for pid in leaving:  # each worker says when it has stopped accepting
            served.wait_for(rf"\[{pid}\] \[INFO\] weft\.workers: asked to retire: draining")
        # They stopped accepting: new clients go to the others only (under ctl
        # drain, nobody takes them: the whole service drains).
        if how != "ctl-drain":  # (the line comes a moment before the acceptor ends)
            for _ in range(10):
                with closing(burst(address, 20)) as late:
                    if not set(first_lines(late)) & leaving:
                        break
            else:
                raise AssertionError(f"{leaving} still take new clients after draining")
        for pid in leaving:
            os.kill(pid, 0)  # still draining: it holds a client
        seen: dict[int, int] = {}

        def all_absent() -> bool:
            seen.update({pid: held(path, pid) for pid in leaving})
            return all(v == ABSENT for v in seen.values())

        deadline = time.monotonic() + 3
        while not all_absent() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(v == ABSENT for v in seen.values()), (
            f"{how}: draining worker(s) still counted as accepting, holding {seen} "
            f"(ABSENT is {ABSENT}); siblings ahead of them leave them turns they never take"
        )
    served.kill()


def _burst_times(address: str, rounds: int = 8) -> list[float]:
    """Per round: a burst of 5 that closes once served, how long until all were served.

    Rounds a little over PASS_OVER (1 s) apart: a sibling passed over is counted
    again by the next round.
    """
    times = []
    for _ in range(rounds):
        time.sleep(1.1)  # let a pass-over (1 s) lapse: a timer of the code under test
        began = time.monotonic()
        with closing(burst(address, 5)) as clients:
            first_lines(clients)
        times.append(time.monotonic() - began)
    return sorted(times)


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_draining_worker_costs_its_sibling_no_turn(tmp_path: Path, manager: str) -> None:
    """The cost of the finding above, measured. Two workers; the survivor holds 10,
    the other 1 and is retired by TTOU (it drains that client). Bursts of 5 clients,
    a second apart: while the retired worker drains, the survivor, 9 ahead of it,
    leaves each burst's second client to it for a whole turn (20 ms) that it never
    takes; once it has gone (its client closed), a burst takes a few ms.
    Expected: no difference (a stopping worker is not waited for)."""
    _have(manager)
    served, address, _pids = serve(tmp_path, manager)
    with served:
        # TTOU retires the newest worker (the highest slot, the last started).
        started = [int(m.group(1)) for m in served.wait_for(r"workers: worker (\d+) started", 2)]
        survivor, leaving = started
        with closing(load_one(address, survivor, 10)):
            (last,) = load_one(address, leaving, 1)
            try:
                served.signal(signal.SIGTTOU)
                served.wait_for(rf"worker {leaving}: retiring it \(fewer workers wanted\)")
                served.wait_for(rf"\[{leaving}\] \[INFO\] weft\.workers: asked to retire")
                draining = _burst_times(address)
                assert _state(leaving) not in ("", "Z"), "it drains its client meanwhile"
            finally:
                last.close()
            served.wait_for(rf"worker {leaving} exited with 0")
            gone = _burst_times(address)
        stop(served)
    mid_draining, mid_gone = draining[len(draining) // 2], gone[len(gone) // 2]
    assert mid_draining < mid_gone + 0.010, (
        f"a burst of 5 took {mid_draining * 1000:.1f} ms (median) while a retired sibling "
        f"drained, {mid_gone * 1000:.1f} ms once it had gone: it was waited for "
        f"(all: {[round(t * 1000, 1) for t in draining]} vs {[round(t * 1000, 1) for t in gone]})"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_paused_worker_is_not_waited_for_and_takes_clients_after_resume(
    tmp_path: Path, manager: str
) -> None:
    """weft ctl pause on one worker's own control socket: its cell ABSENT, the other
    serves everything; after resume it is counted again and, holding nothing while
    its sibling holds 30, takes most of the next burst."""
    _have(manager)
    control = tmp_path / "ctl.sock"
    served, address, pids = serve(tmp_path, manager, "--control-socket", str(control),
                                  env=environment())  # fmt: skip
    with served:
        path = map_path(served.proc.pid)
        resting, other = sorted(pids)
        mine = f"{control}.worker-{resting}"
        request(mine, "pause")
        assert held(path, resting) == ABSENT
        with closing([holding(address) for _ in range(30)]) as kept:
            assert {c.pid for c in kept} == {other}
            assert held(path, other) == 30
            request(mine, "resume")
            wait_until("the resumed worker counted", lambda: held(path, resting) == 0)
            with closing(burst(address, 30)) as late:
                counts = first_lines(late)
            assert sum(counts.values()) == 30
            assert counts[resting] >= 10, (
                f"after resume, holding 0 against 30, the worker took {dict(counts)}"
            )
        stop(served)


@pytest.mark.timeout(120)
def test_a_worker_killed_holding_many_has_its_count_cleared(tmp_path: Path) -> None:
    """SIGKILL a worker holding 30 clients: the supervisor clears its cell (never 30
    again), its replacement takes the same cell from 0, and the next burst is served
    whole, the replacement taking its share while the survivor holds clients."""
    served, address, pids = serve(tmp_path, "threads")
    with served:
        path = map_path(served.proc.pid)
        victim, survivor = sorted(pids)
        with paused(survivor):  # so that every held client lands on the victim
            kept = [holding(address) for _ in range(30)]
        try:
            assert {c.pid for c in kept} == {victim}
            cell = cell_of(victim)
            assert cells(path)[2 + 2 * cell] == 30
            # Clients that arrive alone go to whoever runs first (documented): some
            # may still land on the victim.
            with closing(hold_on_each(address, {survivor}, 3)):
                os.kill(victim, signal.SIGKILL)
                served.wait_for(rf"worker {victim} exited with SIGKILL")
                assert cells(path)[2 + 2 * cell] in (ABSENT, 0), cells(path)[:8]
                (newcomer,) = {int(m.group(1)) for m in served.wait_for(READY, count=3)} - pids
                assert cell_of(newcomer) == cell
                wait_until("the replacement counted", lambda: held(path, newcomer) == 0)
                with closing(burst(address, 30)) as late:
                    counts = first_lines(late)
                assert sum(counts.values()) == 30
                assert set(counts) <= {newcomer, survivor}
                assert counts[newcomer] >= 10, dict(counts)
        finally:
            close_all(kept)
        stop(served)


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio", "asyncio"])
def test_a_worker_killed_holding_nothing_does_not_slow_the_survivor(
    tmp_path: Path, manager: str
) -> None:
    """The survivor holds 20; its sibling, holding none, is SIGKILLed and stays dead
    while its restart is delayed (SIGSTOP on the supervisor, which therefore neither
    reaps it nor clears its cell): 200 clients connect one by one and stay. Promise:
    a sibling that takes nothing costs one turn a second, so within 4 s."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager)
    with served:
        path = map_path(served.proc.pid)
        dead, survivor = sorted(pids)
        with paused(dead):
            kept = [holding(address) for _ in range(20)]
        cell = cell_of(dead)
        try:
            with paused(served.proc.pid):
                os.kill(dead, signal.SIGKILL)
                wait_until("the kill", lambda: _state(dead) in ("Z", "X", ""))
                assert cells(path)[2 + 2 * cell] == 0  # stale: nobody cleared it yet
                began = time.monotonic()
                for _ in range(200):
                    client = holding(address)
                    kept.append(client)
                    assert client.pid == survivor
                took = time.monotonic() - began
        finally:
            close_all(kept)
        assert took < 4.0, f"200 clients took {took:.1f}s past a dead sibling's stale cell"
        served.wait_for(rf"worker {dead} exited with SIGKILL")
        stop(served)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", LOOP_MANAGERS)
def test_a_worker_whose_loop_is_blocked_does_not_slow_the_other(
    tmp_path: Path, manager: str
) -> None:
    """One worker's handler blocks its whole loop (a busy loop: the gevent hub, the
    trio or asyncio loop) for 8 s while holding one client; 300 clients connect one
    by one and stay. Promise: the stuck worker costs the other a turn a second, so
    all are served by the other within 4 s."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager)
    with served:
        kept: list[Client] = []
        try:
            spinner = Client(host_port(address), timeout=30)
            kept.append(spinner)
            stuck = spinner.pid
            spinner.sock.sendall(b"spin 8\n")
            assert spinner.line() == b"spinning"
            (running,) = pids - {stuck}
            began = time.monotonic()
            for _ in range(300):
                client = holding(address)
                kept.append(client)
                assert client.pid == running
            took = time.monotonic() - began
            assert spinner.line() == b"spun"
        finally:
            close_all(kept)
        assert took < 4.0, f"300 clients took {took:.1f}s with a stuck sibling"
        stop(served)


@pytest.mark.outside
@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2], ids=["HUP", "USR2"])
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_reload_in_the_middle_of_a_burst_loses_no_client(
    tmp_path: Path, manager: str, signum: int
) -> None:
    """Each worker holds 10; a burst of 100 is sent and the reload signal with it.
    Promise: every client of the burst is served (by the old generation or the new),
    the new generation serves afterwards, and its cells are its own."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager)
    with served:
        kept = hold_on_each(address, pids, 10)
        done = threading.Event()
        stream: Counter[str] = Counter()

        def clients_all_along() -> None:  # 4 at a time, until the old generation is gone
            while not done.is_set():
                socks = burst(address, 4)
                for sock in socks:
                    with sock:
                        try:
                            ok = sock.recv(100).strip().isdigit()
                        except OSError:
                            ok = False
                    stream["served" if ok else "lost"] += 1

        along = threading.Thread(target=clients_all_along)
        along.start()
        try:
            clients = burst(address, 100)
            served.signal(signum)
            with closing(clients):
                counts = first_lines(clients)
            assert sum(counts.values()) == 100
            served.wait_for(r"reload done: 2 new worker\(s\) serving", timeout=60)
            new = {int(m.group(1)) for m in served.wait_for(READY, count=4)} - pids
            assert len(new) == 2
            close_all(kept)
            for pid in pids:
                served.wait_for(rf"worker {pid} exited with 0", timeout=30)
        finally:
            close_all(kept)
            done.set()
            along.join(30)
        assert stream["lost"] == 0 and stream["served"] > 0, dict(stream)
        path = map_path(served.proc.pid)  # after USR2: the re-executed image's map
        assert len({cell_of(pid) for pid in new}) == 2
        with closing(burst(address, 60)) as late:
            counts = first_lines(late)
        assert set(counts) == new, dict(counts)
        assert min(counts.values()) >= 10, dict(counts)
        wait_until("the new generation's counts back to 0",
                   lambda: all(held(path, pid) == 0 for pid in new))  # fmt: skip
        stop(served)


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_a_worker_added_by_ttin_takes_most_of_the_next_burst(tmp_path: Path, manager: str) -> None:
    """Two workers hold 20 each; TTIN adds a third, holding none. Promise: workers
    take a burst in turns by what they hold, so the newcomer takes at least a third
    of the next 30 (its siblings, ahead by 20, leave it a turn after each they take)."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager)
    with served, closing(hold_on_each(address, pids, 20)):
        served.signal(signal.SIGTTIN)
        (added,) = {int(m.group(1)) for m in served.wait_for(READY, count=3)} - pids
        path = map_path(served.proc.pid)
        wait_until("the newcomer counted", lambda: held(path, added) == 0)
        with closing(burst(address, 30)) as late:
            counts = first_lines(late)
        assert sum(counts.values()) == 30
        assert counts[added] >= 10, f"the newcomer holding 0 against 20 took {dict(counts)}"
        stop(served)


@pytest.mark.outside
@pytest.mark.timeout(120)
def test_ttou_while_balanced_sends_nobody_to_the_retired_worker(tmp_path: Path) -> None:
    """Three gevent workers hold 5 each; TTOU retires one (which drains its 5). The
    next burst of 60 goes to the two left, all served within the bound of a burst."""
    _have("gevent")
    served, address, pids = serve(tmp_path, "gevent", workers=3)
    with served, closing(hold_on_each(address, pids, 5)):
        served.signal(signal.SIGTTOU)
        (m,) = served.wait_for(r"worker (\d+): retiring it \(fewer workers wanted\)")
        retired = int(m.group(1))
        served.wait_for(rf"\[{retired}\] \[INFO\] weft\.workers: asked to retire")
        for _ in range(10):  # its acceptor ends a moment after that line
            began = time.monotonic()
            with closing(burst(address, 60)) as late:
                counts = first_lines(late, timeout=10)
            took = time.monotonic() - began
            assert sum(counts.values()) == 60, dict(counts)
            assert took < 5.0, took
            if retired not in counts:
                break
        else:
            raise AssertionError(f"the retired worker {retired} still takes clients")
        stop(served)


@contextlib.contextmanager
def on_one_core() -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.outside
@pytest.mark.timeout(150)
@pytest.mark.parametrize("manager", ["gevent", "trio", "asyncio"])
def test_four_workers_on_one_core_share_a_burst(tmp_path: Path, manager: str) -> None:
    """Four workers and the clients on one core: a burst of 100 that stays, twice.
    Promise: taken in turns by what each holds, so no worker is left with less than
    a tenth (a fair share is 25)."""
    _have(manager)
    with on_one_core():
        served, address, pids = serve(tmp_path, manager, workers=4)
        with served:
            path = map_path(served.proc.pid)
            for _ in range(2):
                wait_until(
                    "every worker holds nothing", lambda: {held(path, p) for p in pids} == {0}
                )
                with closing(burst(address, 100)) as clients:
                    counts = first_lines(clients)
                assert set(counts) <= pids and sum(counts.values()) == 100
                assert min(counts[pid] for pid in pids) >= 10, dict(counts)
            stop(served)


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_on_full_backlog_serves_a_burst_that_fits_the_workers(
    tmp_path: Path, manager: str
) -> None:
    """max_connections 5 a worker, on_full backlog, two workers: 10 clients that stay
    are all served (5 each); an 11th waits, unrefused, and is served once one closes."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager, "--max-connections", "5",
                                  "--on-full", "backlog")  # fmt: skip
    with served:
        with closing(burst(address, 10)) as clients:
            counts = first_lines(clients)
            assert counts == Counter(dict.fromkeys(pids, 5)), dict(counts)
            extra = socket.create_connection(host_port(address), timeout=30)
            with extra:
                extra.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    extra.recv(1)  # waits in the backlog: not refused
                clients[0].close()
                extra.settimeout(30)
                assert extra.recv(100).strip().isdigit()
        stop(served)


@contextlib.contextmanager
def one_full_one_empty(
    tmp_path: Path, manager: str, limit: int
) -> Iterator[tuple[str, int, Callable[[], None]]]:
    """Two workers of ``limit`` connections each on one socket, the first holding its
    ``limit``: yields the address, the other worker's pid, and a wait until that one
    holds none. Stops them after."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager, "--max-connections", str(limit))
    with served:
        full, other = sorted(pids)
        path = map_path(served.proc.pid)
        with closing(load_one(address, full, limit)):
            yield (
                address,
                other,
                lambda: wait_until("the other worker holds none", lambda: held(path, other) == 0),
            )
        stop(served)


def refused_within(address: str, seconds: float) -> bool:
    """A new client is closed unserved (the refusal of a full server) within ``seconds``."""
    began = time.monotonic()
    with socket.create_connection(host_port(address), timeout=30) as sock:
        try:
            got = sock.recv(100)
        except ConnectionResetError:
            got = b""
    return got == b"" and time.monotonic() - began < seconds


@pytest.mark.serial  # timed, or needs a sibling run within 0.25 s: not beside other load
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio", "asyncio"])
def test_a_full_worker_leaves_new_clients_to_a_sibling_with_room(
    tmp_path: Path, manager: str
) -> None:
    """max_connections 10 a worker, on_full refuse (the default), two workers on one
    socket, one holding 10 and the other none. Seen: the full worker took about half
    of the next clients and refused them, ten slots free beside it. Now the ten are
    all served by the other; an eleventh, with both full, is refused at once (three
    rounds)."""
    with one_full_one_empty(tmp_path, manager, 10) as (address, other, emptied):
        for _ in range(3):
            emptied()
            with closing([]) as newcomers:
                for _ in range(10):
                    try:
                        newcomers.append(holding(address))
                    except AssertionError:
                        pytest.fail(f"refused after {len(newcomers)} served, with room")
                assert [c.pid for c in newcomers] == [other] * 10
                assert refused_within(address, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "asyncio"])
def test_a_full_worker_beside_a_stopped_sibling_still_refuses_promptly(
    tmp_path: Path, manager: str
) -> None:
    """As above, with the worker that has room stopped (SIGSTOP: stuck, or starved of
    CPU): the full worker leaves a client to it for one turn only, then refuses it as
    before, and the next at once; nothing hangs on the stopped sibling."""
    with one_full_one_empty(tmp_path, manager, 5) as (address, other, emptied):
        emptied()
        with paused(other):
            assert refused_within(address, 2)
            assert refused_within(address, 2)


@pytest.mark.serial  # timed, or needs a sibling run within 0.25 s: not beside other load
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio", "asyncio"])
def test_on_full_refuse_serves_a_burst_that_fits_the_workers(tmp_path: Path, manager: str) -> None:
    """max_connections 5 a worker, on_full refuse (the default), two workers: a burst
    of 10 that stays fits them, and none is refused, in 5 rounds. Seen: 1-2 of the 10
    refused in most rounds on gevent (3-5 with the turns off), 0-2 on threads and
    trio: the worker that filled first took more of the burst and refused them."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager, "--max-connections", "5")
    with served:
        path = map_path(served.proc.pid)
        for _ in range(5):
            wait_until("the last round's clients gone",
                       lambda: all(held(path, pid) == 0 for pid in pids))  # fmt: skip
            with closing(burst(address, 10)) as clients:
                assert first_lines(clients) == Counter(dict.fromkeys(pids, 5))
        stop(served)


#: How long load_one tries to put its clients on one worker.
LOAD_ONE_WITHIN = 30.0


def load_one(address: str, pid: int, count: int) -> list[Client]:
    """Held clients on worker ``pid`` only, ``count`` of them (those landing elsewhere close).

    Bounded by time, not by tries: once ``pid`` holds more than its sibling, the turns
    leave each next client to the sibling (which this closes) until its nap budget
    is spent, so how many tries land one on ``pid`` depends on how fast they come
    (20 tries a client fell short on a fast machine: 9 of 10 in 200).
    """
    kept: list[Client] = []
    tries = 0
    deadline = time.monotonic() + LOAD_ONE_WITHIN
    while len(kept) < count and time.monotonic() < deadline:
        tries += 1
        client = holding(address)
        if client.pid == pid:
            kept.append(client)
        else:
            client.close()
    if len(kept) == count:
        return kept
    close_all(kept)
    raise AssertionError(f"worker {pid} took {len(kept)} of {tries} clients in {LOAD_ONE_WITHIN}s")


def churn(address: str, threads: int = 8, each: int = 200) -> tuple[float, Counter[int]]:
    """``threads`` clients at a time, ``each`` short connections apiece (connect, read
    the pid line, close): how long it took, and which worker served how many."""
    spread: Counter[int] = Counter()
    lock = threading.Lock()
    failed: list[BaseException] = []

    def run() -> None:
        mine: Counter[int] = Counter()
        try:
            for _ in range(each):
                with (
                    socket.create_connection(host_port(address), timeout=30) as sock,
                    sock.makefile("rb") as lines,
                ):
                    mine[int(lines.readline())] += 1
        except BaseException as exc:
            failed.append(exc)
        with lock:
            spread.update(mine)

    began = time.monotonic()
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    took = time.monotonic() - began
    assert not failed, failed[:3]
    assert sum(spread.values()) == threads * each, dict(spread)
    return took, spread


def _churn_both(tmp_path: Path, manager: str, *extra: str) -> dict[str, tuple[float, dict]]:
    """One worker holding 40 idle clients; 1,600 short connections (8 at a time), with
    the turns and without (PROBE_NO_TURNS=1): how long, and who served how many."""
    results = {}
    for label, _, address, pids in with_and_without_turns(tmp_path, manager, *extra):
        loaded = min(pids)
        with closing(load_one(address, loaded, 40)):
            took, spread = churn(address)
            results[label] = (round(took, 2), {("loaded" if p == loaded else "other"): n
                                               for p, n in spread.items()})  # fmt: skip
    return results


@pytest.mark.outside
@pytest.mark.timeout(240)
@pytest.mark.parametrize("manager", ["threads", "gevent", "asyncio"])
def test_churn_on_a_shared_socket_is_not_slowed_by_the_turns(tmp_path: Path, manager: str) -> None:
    """Short connections (connect, read the pid line, close), 8 at a time, 1,600 in all,
    while one worker holds 40 idle clients (so the turns are in play): with the turns
    and with them off. Promise: nothing else about serving changes; asserted loosely
    (within 2x + 0.5 s), the numbers reported."""
    _have(manager)
    results = _churn_both(tmp_path, manager)
    print(f"\nREPORT churn {manager} shared: {results}")
    assert results["turns"][0] < 2 * results["no-turns"][0] + 0.5, results


@pytest.mark.serial  # timed, or needs a sibling run within 0.25 s: not beside other load
@pytest.mark.timeout(240)
@pytest.mark.parametrize("manager", ["gevent"])
def test_with_reuse_port_churn_on_a_loaded_worker_is_not_slowed(
    tmp_path: Path, manager: str
) -> None:
    """The same churn with --reuse-port: a socket per worker, so the kernel puts half
    the clients in the loaded worker's own queue, where no sibling can take them; yet
    the loaded worker, 40 ahead, naps after each client for a sibling to take the
    next (weft takes every fd:N socket for shared). Promise: nothing else about
    serving changes with --reuse-port. Seen: 2.2-2.5 s with the turns against
    0.13-0.16 s without, on every manager."""
    _have(manager)
    results = _churn_both(tmp_path, manager, "--reuse-port")
    print(f"\nREPORT churn {manager} reuse-port: {results}")
    assert results["turns"][0] < 2 * results["no-turns"][0] + 0.5, (
        f"--reuse-port, 1,600 short connections while one worker holds 40: "
        f"{results['turns'][0]} s with the turns, {results['no-turns'][0]} s without: {results}"
    )


@contextlib.contextmanager
def starved(pid: int, off: float = 0.010, on: float = 0.002) -> Iterator[None]:
    """Worker ``pid`` short of CPU: stopped ``off`` seconds, run ``on``, over and over
    (SIGSTOP/SIGCONT from a thread: a load generator, not a wait)."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            done.wait(off)
            os.kill(pid, signal.SIGCONT)
            done.wait(on)

    cycler = threading.Thread(target=cycle)
    cycler.start()
    try:
        yield
    finally:
        done.set()
        cycler.join(5)
        os.kill(pid, signal.SIGCONT)


@pytest.mark.serial  # timed, or needs a sibling run within 0.25 s: not beside other load
@pytest.mark.timeout(240)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_starved_sibling_does_not_pace_the_loaded_worker(tmp_path: Path, manager: str) -> None:
    """One shared socket; the loaded worker holds 40 idle clients; its sibling runs
    2 ms in every 12 (SIGSTOP/SIGCONT; as a worker gets a core shared with busy
    processes, in slices): short of CPU, yet it takes a client within each 20 ms
    turn, so it is never passed over. 800 short connections, 8 at a time, with the
    turns and without. Promise: a starved worker costs the others at most a turn a
    second. Seen: about 6x slower with the turns (0.5 s against 0.08 s), the starved
    worker serving ~700 of the 800: the loaded one naps after each client until the
    starved one next runs."""
    _have(manager)
    results = {}
    for label, _, address, pids in with_and_without_turns(tmp_path, manager):
        loaded, other = min(pids), max(pids)
        with closing(load_one(address, loaded, 40)):
            with starved(other):
                took, spread = churn(address, 8, 100)
            results[label] = (round(took, 2), {("loaded" if p == loaded else "starved"): n
                                               for p, n in spread.items()})  # fmt: skip
    print(f"\nREPORT churn with a starved sibling {manager}: {results}")
    # Loose (CI's noise doubles a figure this short): the turns' fault was 6x.
    assert results["turns"][0] < 2.5 * results["no-turns"][0] + 0.25, (
        f"800 short connections with a starved sibling: {results['turns'][0]} s with the "
        f"turns, {results['no-turns'][0]} s without: {results}"
    )


def _loaded_bursts(tmp_path: Path, manager: str, *extra: str) -> dict[str, float]:
    """One worker holding 40, the other none: how long a burst of 200 that stays
    takes to be served (median of 5), with the turns and without (PROBE_NO_TURNS=1)."""
    times = {}
    for label, _, address, pids in with_and_without_turns(tmp_path, manager, *extra):
        with closing(load_one(address, min(pids), 40)):
            rounds = []
            for _ in range(5):
                began = time.monotonic()
                with closing(burst(address, 200)) as clients:
                    counts = first_lines(clients)
                    rounds.append(time.monotonic() - began)
                assert sum(counts.values()) == 200
            times[label] = sorted(rounds)[2]
    return times


@pytest.mark.outside
@pytest.mark.timeout(240)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_REPORT_shared_socket_bursts_with_and_without_turns(tmp_path: Path, manager: str) -> None:
    """The same measure as below on one shared socket, for comparison (reported only)."""
    _have(manager)
    print(f"\nREPORT shared bursts {manager}: {_loaded_bursts(tmp_path, manager)}")


@pytest.mark.serial  # timed, or needs a sibling run within 0.25 s: not beside other load
@pytest.mark.timeout(240)
@pytest.mark.parametrize("manager", ["trio"])
def test_with_reuse_port_a_worker_ahead_does_not_nap_for_a_sibling(
    tmp_path: Path, manager: str
) -> None:
    """--reuse-port gives each worker a socket of its own (the kernel spreads clients
    over them): no sibling can take a client queued on this worker's socket. Yet a
    worker's sockets come as fd:N, which weft takes for shared, so the turns run:
    a worker ahead naps (1 ms at least, up to 20) after each client while its own
    clients wait. Promise: nothing else about serving changes (--reuse-port).
    Measured: the loaded worker holds 40, the other none; bursts of 200 that stay
    until all are served, five rounds, with the turns and with them off
    (PROBE_NO_TURNS=1: SLACK made huge in the worker).

    The first check is what the fix changed: no worker is told a --reuse-port socket is
    shared, so no turn is ever taken on it. The timed one is loose (CI's noise once
    doubled a 17 ms burst): a nap of 1 ms at least after each of the ~100 clients
    the loaded worker's own socket gets adds 100 ms or more."""
    _have(manager)
    for extra, want_shared in (((), True), (("--reuse-port",), False)):
        served, _, pids = serve(tmp_path, manager, *extra)
        with served:
            told = {pid: shared_of(pid) for pid in pids}
            stop(served)
        assert all(bool(fds) == want_shared for fds in told.values()), (extra, told)
    times = _loaded_bursts(tmp_path, manager, "--reuse-port")
    print(f"\nREPORT reuse-port bursts {manager}: {times}")
    assert times["turns"] < 2 * times["no-turns"] + 0.060, (
        f"--reuse-port, a burst of 200 with one worker 40 ahead: {times['turns'] * 1000:.0f} ms "
        f"(median of 5) with the turns, {times['no-turns'] * 1000:.0f} ms without"
    )


def shared_of(pid: int) -> list[int]:
    """The listeners worker ``pid`` was told its siblings accept from too (its turns)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(BALANCE_ENV.encode() + b"="):
            return [int(fd) for fd in item.split(b":")[2].split(b",") if fd]
    raise AssertionError(f"worker {pid} was given no cell")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_a_stop_during_turns_is_bounded(tmp_path: Path, manager: str) -> None:
    """One worker holds 20, the other is stopped (SIGSTOP) for the first half second of
    a steady stream of new clients, so the first is in its turns; then SIGTERM with
    --graceful-timeout 2. Promise: the stop is bounded: exit 0 within the graceful
    timeout and its margin."""
    _have(manager)
    served, address, pids = serve(tmp_path, manager, graceful="2")
    with served:
        _first, second = sorted(pids)
        with paused(second):
            kept = [holding(address) for _ in range(20)]
        late: list[socket.socket] = []
        try:
            with paused(second):
                late = burst(address, 50)
                first_lines(late[:1])
            served.signal(signal.SIGTERM)
            began = time.monotonic()
            status = served.finish(20)
            took = time.monotonic() - began
        finally:
            close_all(kept)
            close_all(late)
        assert status == 0, served.text
        assert took < 2 + 5, took


@pytest.mark.outside
@pytest.mark.timeout(120)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_garbage_in_the_map_stops_no_serving(tmp_path: Path, manager: str) -> None:
    """A stranger of the same user opens the map (the supervisor's /proc/PID/fd) and
    fills it with garbage: large, negative, huge counts. Promise: nothing else about
    serving changes: 100 clients that stay are all served, within a bound."""
    _have(manager)
    served, address, _pids = serve(tmp_path, manager)
    with served:
        path = map_path(served.proc.pid)
        rng = random.Random(7)
        size = len(Path(path).read_bytes())
        garbage = [rng.choice([0, 1, -5, 2**62, -(2**63), rng.randrange(-100, 100)])
                   for _ in range(size // 8)]  # fmt: skip
        garbage[0] = 10**6  # how many cells were handed out
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack(f"{len(garbage)}q", *garbage), 0)
        finally:
            os.close(fd)
        began = time.monotonic()
        kept = []
        try:
            for _ in range(100):
                kept.append(holding(address))
        finally:
            close_all(kept)
        assert time.monotonic() - began < 10
        stop(served)


@pytest.mark.timeout(60)
def test_a_stranger_that_shrinks_the_map_stops_no_service(tmp_path: Path) -> None:
    """A stranger of the same user (or a stray tool walking /proc) opens the map and
    truncates it. Promise: nothing about serving changes; the map is the workers'
    business. Seen: the next accept or connection end touches a page past the
    file's end: SIGBUS in the worker; the supervisor, clearing the dead worker's
    cell, takes SIGBUS too, and the whole service is gone. A sealed memfd
    (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) cannot be shrunk."""
    served, address, _pids = serve(tmp_path, "threads")
    with served:
        fd = os.open(map_path(served.proc.pid), os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # sealed: what the fix does
        finally:
            os.close(fd)
        for _ in range(20):  # clients come and go: accepts, connection ends
            with (
                contextlib.suppress(OSError),
                socket.create_connection(host_port(address), timeout=5) as sock,
            ):
                sock.recv(100)
        alive = served.proc.poll() is None
        assert alive and "SIGBUS" not in served.text, (
            f"the supervisor {'runs' if alive else f'exited {served.proc.returncode}'} after its "
            f"map was truncated:\n{served.text[-3000:]}"
        )
        stop(served)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["threads", "trio"])
def test_a_handlers_child_inherits_neither_the_map_nor_its_variable(
    tmp_path: Path, manager: str
) -> None:
    """A handler starts a process with close_fds=False (as os.system does): it must
    see no descriptor of the map and no _WEFT_ACCEPT_BALANCE."""
    _have(manager)
    served, address, _ = serve(tmp_path, manager)
    with served:
        with Client(host_port(address)) as client:
            client.sock.sendall(b"child\n")
            seen = json.loads(client.line())
        assert BALANCE_ENV not in seen["env"], seen
        assert not [t for t in seen["fds"].values() if "weft-accept-balance" in t], seen
        stop(served)


@pytest.mark.timeout(90)
def test_a_handlers_child_does_not_inherit_the_log_lock(tmp_path: Path) -> None:
    """The same child as above, for the log's line lock: the supervisor's lock file
    and _WEFT_LOG_LOCK_FD reach a handler's child (the worker keeps the inherited
    descriptor open and inheritable, and the variable in its environment), as the
    accept balance's commit took care they would not for its map. A child that is
    itself a weft serve (or keeps the number and finds another file there) then
    takes part in the service's lock."""
    served, address, _ = serve(tmp_path, "threads")
    with served:
        with Client(host_port(address)) as client:
            client.sock.sendall(b"child\n")
            seen = json.loads(client.line())
        lock_fds = [t for t in seen["fds"].values() if "weft-log-lock" in t]
        assert not lock_fds and "_WEFT_LOG_LOCK_FD" not in seen["env"], (
            f"a handler's child inherited the log line lock: descriptors {lock_fds}, "
            f"environment {seen['env']}; all its descriptors: {seen['fds']}"
        )
        stop(served)


# ===========================================================================================
# Promise 2: the shared log line lock, past a stopped holder
# ===========================================================================================


def _log_serve(
    manager: str, *extra: str, port: int | None = None
) -> tuple[int, subprocess.Popen[bytes], int]:
    from _serving import free_port

    port = port or free_port()
    argv = weft_serve(handler(manager), "-b", f"127.0.0.1:{port}", "-k", manager,
                      "--workers", "2", "--graceful-timeout", "5", *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=quiet_env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stderr is not None
    return port, proc, proc.stderr.fileno()


def _in_pipe(fd: int) -> int:
    """How many bytes wait in the pipe whose read end is ``fd`` (FIONREAD)."""
    import array
    import termios

    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def _wait_pipe_full(fd: int, timeout: float = 10) -> None:
    """Until the pipe holds over 32 KiB and takes no more for 0.3 s (its writers wait)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        now, size = time.monotonic(), _in_pipe(fd)
        if size != last:
            last, since = size, now
        elif size > 32768 and now - since > 0.3:
            return
        assert now < deadline, f"stderr never filled: {size} bytes in it"
        time.sleep(0.01)


#: Readers still running: each is stopped before its pipe closes (a reader left
#: running would read the next test's pipe, which may get the same descriptor number).
_READERS: list[Reader] = []


def _end(proc: subprocess.Popen[bytes]) -> None:
    while _READERS:
        _READERS.pop().stop()
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


class Reader:
    """stderr read in the background as it comes (a log pipeline that keeps up)."""

    def __init__(self, fd: int, head: bytes = b"") -> None:
        self.fd = fd
        self.data = bytearray(head)
        self.cond = threading.Condition()
        self.eof = False
        self.go = threading.Event()
        self.go.set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        _READERS.append(self)

    def stop(self) -> None:
        self.stopped.set()
        self.go.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the stderr reader did not stop"

    def _run(self) -> None:
        try:
            self._read()
        except (OSError, ValueError):  # the test closed the pipe: it is done reading
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _read(self) -> None:
        while not self.stopped.is_set():
            self.go.wait()
            if select.select([self.fd], [], [], 0.1)[0]:
                chunk = os.read(self.fd, 1 << 20)
                with self.cond:
                    if not chunk:
                        self.eof = True
                        self.cond.notify_all()
                        return
                    self.data += chunk
                    self.cond.notify_all()

    def wait_for(self, pattern: bytes, count: int = 1, timeout: float = 10) -> float:
        """Wait until ``pattern`` (a regex) matched ``count`` times; when (monotonic)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(regex.findall(self.data)) < count:
                left = deadline - time.monotonic()
                assert left > 0 and not self.eof, (
                    f"{count}x {pattern!r} not within {timeout}s: ...{bytes(self.data[-1500:])!r}"
                )
                self.cond.wait(left)
        return time.monotonic()

    def text(self) -> str:
        with self.cond:
            return self.data.decode("utf-8", "replace")


def _ask(port: int, line: bytes, pid: int | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """Send ``line`` on a new connection (to worker ``pid``: retried until it lands there)."""
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        with sock, sock.makefile("rb") as lines:
            got = int(lines.readline())
            if pid is not None and got != pid:
                continue
            sock.sendall(line)
            return got, lines.readline().strip()
    raise AssertionError(f"no connection reached worker {pid}")


@pytest.mark.outside
@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_holder_that_lets_go_after_1_5_s_loses_and_doubles_no_line(manager: str) -> None:
    """The lock is held 1.5 s (a holder stopped, then resumed) while a worker logs 500
    numbered lines; then it logs 500 more. Promise: none is lost, none written twice,
    and the first came within a grace."""
    _have(manager)
    port, proc, fd = _log_serve(manager)
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        pids = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, pids[0]) as resume:
            asked = time.monotonic()
            assert _ask(port, b"lognum 500 early\n")[1] == b"logged"
            first = reader.wait_for(rb"app: early 000000", 1, 5)
            time.sleep(max(0.0, 1.5 - (time.monotonic() - asked)))  # the holder's 1.5 s
            resume()
        assert _ask(port, b"lognum 500 late\n")[1] == b"logged"
        reader.wait_for(rb"app: late 000499", 1, 10)
        text = reader.text()
    finally:
        _end(proc)
    for tag in ("early", "late"):
        numbers = Counter(re.findall(rf"app: {tag} (\d{{6}})", text))
        assert sorted(numbers) == [f"{i:06d}" for i in range(500)], (tag, len(numbers))
        assert set(numbers.values()) == {1}, [n for n, c in numbers.items() if c > 1][:5]
    assert first - asked < 1.0 + 2.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["threads"])
def test_after_a_holder_was_passed_a_later_live_holder_is_waited_for(
    manager: str,
) -> None:
    """A worker's line goes without the lock past a stopped holder. The holder resumes
    and lets go. Then another process holds the lock for a second, alive (here the
    test), and the worker logs a line. Promise: only a stopped holder is passed: this
    one is waited for. Seen before: the line was written at once, without the lock:
    a flag "held elsewhere" set by the first holder was cleared only when the worker
    next took the lock, so the next holder, alive and mid-line, was passed with no
    wait, and the line could land inside its long line."""
    _have(manager)
    port, proc, fd = _log_serve(manager)
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        pids = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        worker = pids[0]
        with stopped_lock_holder(proc.pid, worker) as resume:
            _ask(port, b"lognum 1 first\n", worker)
            reader.wait_for(rb"app: first 000000", 1, 5)  # passed
            resume()
        holder = os.open(lock_file(proc.pid, worker), os.O_RDWR)
        try:
            fcntl.flock(holder, fcntl.LOCK_EX)  # a live holder, mid-line
            os.pwrite(holder, struct.pack("<q", os.getpid()), 0)
            let_go = threading.Timer(1.0, fcntl.flock, (holder, fcntl.LOCK_UN))
            let_go.start()
            asked = time.monotonic()
            _ask(port, b"lognum 1 second\n", worker)
            came = reader.wait_for(rb"app: second 000000", 1, 5)
            let_go.join()
        finally:
            os.close(holder)
    finally:
        _end(proc)
    waited = came - asked
    assert waited > 0.8, (
        f"with the lock held by a live holder, the worker's line went out after "
        f"{waited:.3f}s, without waiting for it to let go (1 s)"
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["gevent"])
def test_a_process_once_passed_does_not_cut_into_a_live_workers_long_line(manager: str) -> None:
    """The consequence of the flag above, with real processes only after the set-up:
    worker A passes a stopped holder once (which then resumes and lets go). Later
    worker B logs 30 lines of 200,000 bytes while A logs 200 short lines. Promise:
    lines are written under the shared lock ("each line whole, of one process");
    only a stopped holder is passed. Seen before: A's first lines went out without
    the lock while B was mid-line, inside B's long lines (also with a flag that a
    recheck every 0.1 s cleared: B, writing line after line, held the lock at
    nearly every look)."""
    _have(manager)
    port, proc, fd = _log_serve(manager)
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        a, b = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, a) as resume:
            _ask(port, b"lognum 1 passed\n", a)
            reader.wait_for(rb"app: passed 000000", 1, 5)
            resume()
        results: list[tuple[int, bytes]] = []
        long_lines = threading.Thread(
            target=lambda: results.append(_ask(port, b"log 30 200000\n", b))
        )
        long_lines.start()
        reader.wait_for(rf"{b} [A-H]{{200000}}\n".encode(), 1, 20)  # B is writing now
        _ask(port, b"lognum 200 short\n", a)
        long_lines.join(60)
        reader.wait_for(rb"app: short 000199", 1, 20)
        with contextlib.suppress(AssertionError):
            reader.wait_for(rb"\d+ [A-H]{200000}\n", 30, 5)
        text = reader.text()
    finally:
        _end(proc)
    long = [line for line in text.splitlines() if len(line) > 1000]
    broken = [line for line in long if line.rsplit(" ", 1)[-1] != "ABCDEFGH"[b % 8] * 200_000]
    shorts = len(re.findall(r"app: short \d{6}", text))
    assert shorts == 200, shorts
    shown = [_squeeze(x)[:300] for x in broken[:2]]
    assert len(long) == 30 and not broken, (
        f"{len(long)} long lines of worker {b} (30 logged), {len(broken)} cut into, e.g. {shown}"
    )


def _squeeze(line: str) -> str:
    """A line with each run of one letter shortened: what cut into it shows."""
    return re.sub(r"([A-H])\1{20,}", lambda m: f"{m.group(1)}x{len(m.group(0))}", line)


@pytest.mark.outside
@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_stopped_holder_with_stderr_full_then_read_resumes_the_log(manager: str) -> None:
    """The lock is held (a stopped holder) and nobody reads stderr until it is full;
    a worker logs 300 lines of 1,000 bytes. Then reading resumes. Promise: nobody
    blocks forever: every line comes once reading resumes, within a grace."""
    _have(manager)
    port, proc, fd = _log_serve(manager)
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        pids = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, pids[0]):
            assert _ask(port, b"log 300 1000\n")[1] == b"logged"
            # The test is the reader, and reads nothing: the lines, written without
            # the lock past the stopped holder, fill the pipe.
            _wait_pipe_full(fd)
            resumed = time.monotonic()
            reader = Reader(fd, head)
            reader.wait_for(rb"\d+ [A-H]{1000}\n", 300, 10)
            took = time.monotonic() - resumed
    finally:
        _end(proc)
    assert took < 1.0 + 3.0, took


@pytest.mark.outside
@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["threads", "trio"])
def test_json_lines_stay_json_past_a_stopped_holder(manager: str) -> None:
    """--log-format json; the lock is held (a stopped holder) while both workers and
    the supervisor log (a worker is SIGKILLed). Promise: every line is one JSON
    object, the supervisor's exit line comes within a grace."""
    _have(manager)
    port, proc, fd = _log_serve(manager, "--log-format", "json")
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        pids = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, pids[0]):
            assert _ask(port, b"lognum 200 json\n", pids[0])[1] == b"logged"
            killed = time.monotonic()
            os.kill(pids[1], signal.SIGKILL)
            came = reader.wait_for(rf"worker {pids[1]} exited with SIGKILL".encode(), 1, 10)
            reader.wait_for(rb"json 000199", 1, 10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.thread.join(10)
        text = reader.text()
    finally:
        _end(proc)
    bad = []
    for line in text.splitlines():
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            bad.append(line[:120])
    assert not bad, bad[:5]
    assert came - killed < 1.0 + 4.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["trio"])
def test_sigterm_with_a_stopped_holder_is_bounded(manager: str) -> None:
    """The lock is held for good (a stopped holder) when the service gets SIGTERM.
    Promise: the stop is bounded (exit 0 within the graceful timeout, 5 s, and a
    grace), and every process's stop lines are written."""
    _have(manager)
    _port, proc, fd = _log_serve(manager)
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        pids = [int(m) for m in re.findall(rb"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, pids[0]):
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(30)
            took = time.monotonic() - began
            reader.thread.join(10)
        text = reader.text()
    finally:
        _end(proc)
    assert status == 0, text[-2000:]
    assert took < 5 + 4, took
    for pid in pids:
        assert f"worker {pid} exited with 0" in text, text[-2000:]


@pytest.mark.timeout(150)
def test_after_usr2_the_supervisor_and_its_new_workers_share_one_log_lock(
    tmp_path: Path,
) -> None:
    """USR2 re-executes the supervisor, whose environment still names the old lock's
    descriptor number (_WEFT_LOG_LOCK_FD; the file itself is closed on exec). Promise:
    under --workers every line is written under one lock the supervisor and its
    workers share: after the re-exec, every lock file open in the new supervisor is
    the one its new workers have."""
    served, address, pids = serve(tmp_path, "threads")
    with served:
        served.signal(signal.SIGUSR2)
        served.wait_for(r"reload done: 2 new worker\(s\) serving", timeout=60)
        new = {int(m.group(1)) for m in served.wait_for(READY, count=4)} - pids
        for pid in pids:
            served.wait_for(rf"worker {pid} exited with 0", timeout=30)
        for _ in range(10):  # each process logs again (a lock is opened on first use)
            with Client(host_port(address)) as client:
                client.sock.sendall(b"lognum 1 after\n")
                assert client.line() == b"logged"
        locks = {pid: _lock_files(pid) for pid in (served.proc.pid, *new)}
        assert len(set.union(*locks.values())) == 1, locks
        stop(served)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP], ids=["USR2", "HUP-control"])
def test_during_usr2_the_old_and_new_workers_long_lines_do_not_interleave(
    tmp_path: Path, signum: int
) -> None:
    """USR2: the re-executed supervisor makes a new lock file for its new workers,
    while the old workers it adopted drain with the old one. Promise: every line is
    written under a lock the processes sharing stderr share, so a long line is never
    cut into. Here each old worker, draining a connection opened before USR2, logs
    15 lines of 200,000 bytes while each new worker logs as many: two locks, so the
    old and the new generation's lines may interleave mid-line. The HUP case (one
    supervisor, one lock, the old generation draining the same way) is the control:
    it holds."""
    from _serving import free_port

    port = free_port()
    argv = weft_serve(f"{H}:handle", "-b", f"127.0.0.1:{port}", "-k", "threads",
                      "--workers", "2", "--graceful-timeout", "20")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=quiet_env(), stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    old: dict[int, socket.socket] = {}
    new: dict[int, socket.socket] = {}
    try:
        head = read_until(fd, b"worker ready", 2, 30)
        reader = Reader(fd, head)
        first = {int(m) for m in re.findall(rb"worker (\d+) started", head)}
        for _ in range(200):
            if set(old) == first:
                break
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            pid = int(sock.makefile("rb").readline())
            if pid in old:
                sock.close()
            else:
                old[pid] = sock
        assert set(old) == first
        proc.send_signal(signum)
        reader.wait_for(rb"reload done: 2 new worker\(s\) serving", 1, 60)
        for _ in range(200):
            if len(new) == 2:
                break
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            pid = int(sock.makefile("rb").readline())
            if pid in new or pid in first:
                sock.close()
            else:
                new[pid] = sock
        assert len(new) == 2
        everyone = [*old.values(), *new.values()]
        for sock in everyone:  # at once: the four processes log together
            sock.sendall(b"log 15 200000\n")
        for sock in everyone:
            sock.settimeout(60)
            assert sock.makefile("rb").readline() == b"logged\n"
        with contextlib.suppress(AssertionError):  # cut lines never match: judged below
            reader.wait_for(rb"\d+ [A-H]{200000}\n", 60, 20)
        text = reader.text()
    finally:
        for sock in [*old.values(), *new.values()]:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            _end(proc)
    long = [line for line in text.splitlines() if len(line) > 1000]
    broken = []
    for line in long:
        parts = line.rsplit(" ", 2)
        pid, body = parts[-2:] if len(parts) >= 2 else ("", line)
        if not pid.isdigit() or body != "ABCDEFGH"[int(pid) % 8] * 200_000:
            broken.append(_squeeze(line)[:300])
    assert len(long) == 60 and not broken, (
        f"USR2 overlap: {len(long)} long lines (60 logged), {len(broken)} cut into: {broken[:3]}"
    )


def _lock_files(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if "weft-log-lock" in target:
                found.add(target)
    return found


def _env_value(pid: int, name: str) -> str | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return item.split(b"=", 1)[1].decode()
    return None
