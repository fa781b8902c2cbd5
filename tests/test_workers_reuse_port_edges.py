"""``weft serve --workers N --reuse-port`` at its edges: no socket without a worker.

docs/deployment.md ("A socket per worker (reuse_port)", the workers and
zero-downtime sections): every socket the supervisor keeps listening has a worker
accepting from it after a resize during a restart and after an abandoned reload;
USR2 hands every worker on, draining ones too; an inherited socket is shared, not
twinned. Found by an outside check (each failed before its fix). Real ``python -m
weft_core serve`` processes on 127.0.0.1; every wait is on a log line, a reply or a
process exit, bounded.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serving import (
    LISTENING,
    READY,
    STARTED,
    Served,
    environment,
    host_port,
    listening,
    weft_serve,
)
from test_workers import manager

__all__ = ["manager"]  # the fixture: every manager

APP = "_reuse_port_app"


def app_for(manager: str) -> str:
    from weft_core._registry import get_manager_spec

    kind = get_manager_spec(manager).handler_kind
    return f"{APP}:handle_async" if kind == "async" else f"{APP}:handle"


def serve(
    tmp_path: Path, manager: str, *extra: str, workers: int, env: dict[str, str] | None = None
) -> tuple[Served, str]:
    served = Served(
        weft_serve(app_for(manager), "--manager", manager, "--workers", str(workers),
                   "--bind", "127.0.0.1:0", "--graceful-timeout", "5", "--reuse-port", *extra),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        served.wait_for(READY, count=workers)
    except BaseException:
        served.kill()
        raise
    return served, address


def socket_inodes(pid: int) -> set[str]:
    """The socket inodes process ``pid`` holds."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def unserved(address: str, count: int, within: float) -> int:
    """Connect ``count`` clients at once; how many got no pid line ``within`` seconds."""
    clients = [socket.create_connection(host_port(address), timeout=10) for _ in range(count)]
    waiting = list(clients)
    deadline = time.monotonic() + within
    try:
        while waiting and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(waiting, [], [], left)
            for sock in ready:
                assert sock.recv(64).rstrip().isdigit()
            waiting = [sock for sock in waiting if sock not in ready]
        return len(waiting)
    finally:
        for sock in clients:
            sock.close()


# -- TTOU while a lower slot's worker is being replaced -------------------------------------


@pytest.mark.timeout(60)
def test_ttou_while_a_lower_slot_restarts_leaves_no_socket_unserved(tmp_path: Path) -> None:
    """TTOU (or ``weft ctl workers -1``) while slot 0's worker waits for its replacement:
    the worker in the slot given up retires, the start fills slot 0, every client is
    served (it used to drop the start, leaving slot 0's socket with no worker).

    On trio (the ``ctl`` case below on threads): the resize is the supervisor's and
    no manager's; that each manager's worker serves the slot socket it is given is
    test_workers_reuse_port's ``test_a_paused_worker_still_gets_its_share_of_clients``.
    """
    from weft_core import available_managers

    if "trio" not in available_managers():
        pytest.skip("weft-trio is not installed")
    resize_while_a_lower_slot_restarts(tmp_path, "trio", "TTOU")


@pytest.mark.timeout(60)
def test_workers_minus_one_while_a_lower_slot_restarts_leaves_no_socket_unserved(
    tmp_path: Path,
) -> None:
    """The same with ``weft ctl workers -1``, the same resize (on threads)."""
    resize_while_a_lower_slot_restarts(tmp_path, "threads", "ctl")


def resize_while_a_lower_slot_restarts(tmp_path: Path, manager: str, how: str) -> None:
    flag = tmp_path / "crash"
    env = environment()
    env["PROBE_CRASH_FLAG"] = str(flag)
    control = tmp_path / "ctl.sock"
    served, address = serve(
        tmp_path, manager, "--control-socket", str(control), workers=3, env=env
    )
    with served:
        slots = [int(m.group(1)) for m in served.wait_for(STARTED, count=3)]  # slot order
        flag.touch()  # replacements crash at import: the back-off grows
        os.kill(slots[0], signal.SIGKILL)
        served.wait_for(r"starting another in 3\.2s", timeout=40)
        if how == "TTOU":  # within the 3.2 s before the next start
            served.signal(signal.SIGTTOU)
        else:
            subprocess.run(
                [sys.executable, "-m", "weft_core", "ctl", "--socket", str(control),
                 "workers", "-1"],
                env=environment(), check=True, capture_output=True, timeout=20,
            )  # fmt: skip
        served.wait_for(r"(received SIGTTOU|control: workers -1): 2 worker\(s\) now")
        flag.unlink()  # any worker started from now on serves
        # The worker of the slot given up retires; clients queued on its socket as it
        # closes are reset (documented), so the clients below come after that.
        (retired,) = (m.group(1) for m in served.wait_for(r"worker (\d+): retiring it"))
        served.wait_for(rf"worker {retired} exited with 0")
        port = host_port(address)[1]
        lost = unserved(address, 60, within=8)
        # Every socket the supervisor keeps listening is one a live worker accepts from.
        orphans = set(listening(port)) & socket_inodes(served.proc.pid)
        for pid in re.findall(STARTED, served.text):
            if os.path.exists(f"/proc/{pid}"):
                orphans -= socket_inodes(int(pid))
        assert lost == 0 and not orphans, (
            f"{lost} of 60 clients got no reply within 8 s from the 2 workers left;"
            f" listening socket(s) {orphans} of the supervisor have no worker"
        )
        served.signal(signal.SIGTERM)
        served.finish()


# -- USR2 while a retired worker still drains --------------------------------------------------


def fds_of(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


@pytest.mark.timeout(90)
def test_usr2_while_a_retired_worker_drains_leaks_no_descriptor(
    tmp_path: Path, manager: str
) -> None:
    """USR2 twice in a row, a worker of the first still draining a client: the
    re-executed image adopts the draining worker too (watched to its end, its link
    closed), where it used to leak the link and forget the worker."""
    from _serving import HOLD, Client

    served, address = serve(tmp_path, manager, workers=2)
    with served:
        sup = served.proc.pid
        before = fds_of(sup)
        held = Client(host_port(address))
        held.sock.sendall(HOLD)
        assert held.line() == b"holding"
        served.signal(signal.SIGUSR2)
        served.wait_for(r"reload done: 2 new worker\(s\) serving", timeout=40)
        served.signal(signal.SIGUSR2)  # the held client's worker is still draining
        served.wait_for(r"reload done: 2 new worker\(s\) serving", count=2, timeout=40)
        held.close()
        gone = [int(m.group(1)) for m in served.wait_for(READY, count=6, timeout=40)][:4]
        for pid in gone:  # the first two generations have exited and are reaped
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}"):
                assert time.monotonic() < deadline, f"worker {pid} still there"
                time.sleep(0.05)
        # The pid leaves /proc as the supervisor reaps it, a moment before it closes
        # that worker's link and dump pipe (its loop's next lines): wait that out.
        deadline = time.monotonic() + 10
        while len(after := fds_of(sup)) != len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(after) == len(before), (
            f"the supervisor held {len(before)} descriptors before two USR2s and"
            f" {len(after)} after, every worker of before gone: {sorted(after.values())}"
        )
        served.signal(signal.SIGTERM)
        served.finish()


# -- an inherited socket (fd:N) ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_inherited_reuse_port_socket_is_shared_not_twinned(tmp_path: Path) -> None:
    """An inherited socket with SO_REUSEPORT (systemd's ``ReusePort=yes``) is shared by
    every worker: no socket of weft's joins its owner's port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    with sock:
        served = Served(
            weft_serve(f"{APP}:handle", "--manager", "threads", "--workers", "3",
                       "--bind", f"fd:{sock.fileno()}", "--graceful-timeout", "5",
                       "--reuse-port"),
            cwd=tmp_path, pass_fds=(sock.fileno(),),
        )  # fmt: skip
        with served:
            served.wait_for(READY, count=3)
            sockets = set(listening(port))
            assert len(sockets) == 1, (
                f"{len(sockets)} sockets listen on the inherited socket's port {port};"
                " the doc promises the inherited one is shared by every worker"
            )
            served.signal(signal.SIGTERM)
            served.finish()


# -- a reload abandoned -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_an_abandoned_reload_leaves_no_slot_without_a_worker(tmp_path: Path, manager: str) -> None:
    """HUP whose new code fails in one slot: the old workers serve on, each slot with
    a worker (an old worker retires only once a new one serves its slot)."""
    marker = tmp_path / "broken-inode"
    env = environment()
    env["PROBE_BROKEN_INODE"] = str(marker)
    served, address = serve(tmp_path, manager, workers=2, env=env)
    port = host_port(address)[1]
    with served:
        slot0, slot1 = (int(m.group(1)) for m in served.wait_for(STARTED, count=2))
        # slot 0's worker is replaced once (a crash), so slot 1's is the oldest.
        os.kill(slot0, signal.SIGKILL)
        served.wait_for(READY, count=3)
        (twin,) = socket_inodes(slot1) & set(listening(port))
        marker.write_text(twin)  # the new code breaks in slot 1 only
        served.signal(signal.SIGHUP)
        served.wait_for(r"the reload is abandoned", timeout=40)
        # Whichever went: the new slot-0 worker, still starting (SIGTERM), or, had it
        # been ready by then, the old worker it replaced, drained (0).
        served.wait_for(r"exited with (0|SIGTERM)", timeout=20)
        marker.unlink()
        held: set[str] = set()
        for match in served.wait_for(STARTED, count=5):
            if os.path.exists(f"/proc/{match.group(1)}"):
                held |= socket_inodes(int(match.group(1)))
        orphans = (set(listening(port)) & socket_inodes(served.proc.pid)) - held
        lost = unserved(address, 60, within=8)
        assert lost == 0 and not orphans, (
            f"{lost} of 60 clients got no reply within 8 s after the abandoned reload;"
            f" listening socket(s) {orphans} of the supervisor have no worker"
        )
        served.signal(signal.SIGTERM)
        served.finish()
