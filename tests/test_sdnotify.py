"""sd_notify: ``weft serve`` tells a ``Type=notify`` service manager what it does.

The test plays systemd: it binds an AF_UNIX datagram socket, with SO_PASSCRED so
each datagram carries its sender's pid, and passes its path in ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _load import APP, wait_for_version, write_app
from _serving import READY, Served, environment, host_port, weft_serve

from weft_core import _registry
from weft_core._sdnotify import (
    NOTIFY_WAIT,
    PING_MAX,
    PING_MIN,
    Notifier,
    child_environment,
    watchdog_interval,
)

LISTENING = r"\] weft: listening on (\S+) "
_CREDS = struct.calcsize("3i")


class FakeSystemd:
    """A NOTIFY_SOCKET listener: ``next()`` gives (sender pid, {key: value})."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(30)

    def next(self) -> tuple[int, dict[str, str]]:
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS))
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:_CREDS])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return pid, fields

    def until(self, key: str) -> tuple[int, dict[str, str]]:
        """Read until a datagram sets ``key``; every one read must come from one pid."""
        while True:
            pid, fields = self.next()
            if key in fields:
                return pid, fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    listener = FakeSystemd(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def test_a_datagram_reaches_a_path_socket(systemd: FakeSystemd) -> None:
    """READY=1 and STATUS in one datagram, to NOTIFY_SOCKET's path."""
    notifier = Notifier({"NOTIFY_SOCKET": systemd.sock.getsockname()})
    assert notifier.enabled
    notifier.ready("serving")
    pid, fields = systemd.next()
    assert pid == os.getpid()
    assert fields == {"READY": "1", "STATUS": "serving"}


def test_an_abstract_socket_is_written_with_at() -> None:
    """``@name`` is Linux's abstract namespace (a leading NUL byte)."""
    name = f"weft-test-{os.getpid()}"
    listener = FakeSystemd(b"\0" + name.encode())
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).reloading("reloading")
        _, fields = listener.next()
        assert fields["RELOADING"] == "1"
        assert int(fields["MONOTONIC_USEC"]) > 0
    finally:
        listener.close()


def test_without_notify_socket_nothing_happens() -> None:
    """No NOTIFY_SOCKET: disabled, and every call is a no-op."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog is None
    notifier.ready("x")
    notifier.alive()


def test_a_vanished_listener_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket nobody listens on: one WARNING, no exception."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.status("a")
    notifier.status("b")
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """sd_watchdog_enabled(3): half of WATCHDOG_USEC, only for the pid WATCHDOG_PID names."""
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 7) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval({}, 7) is None


def test_watchdog_usec_that_is_not_a_decimal_number_is_no_watchdog() -> None:
    """``²`` passed ``str.isdigit`` and then crashed weft serve in ``int()``; other
    Unicode digits were read as a number; 2e16 µs overflowed the wait, killing the
    pings; 1 µs pinged in a busy loop (the systemd check's F6)."""
    assert watchdog_interval({"WATCHDOG_USEC": "²"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "١٢٣٤٥٦٧"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": " 1000000"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1"}, 7) == PING_MIN
    assert watchdog_interval({"WATCHDOG_USEC": "18446744073709551615"}, 7) == PING_MAX


def test_children_do_not_inherit_the_notify_variables() -> None:
    """Workers never speak for the service."""
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    assert child_environment(env) == {"PATH": "/bin"}


def serve(folder: Path, systemd: FakeSystemd, *extra: str, **env: str) -> Served:
    write_app(folder, "v1")
    return Served(
        weft_serve(APP, "--bind", "127.0.0.1:0", "--graceful-timeout", "5", *extra),
        cwd=folder,
        env={**environment(), "NOTIFY_SOCKET": systemd.sock.getsockname(), **env},
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [(), ("--workers", "2")], ids=["one-process", "workers-2"])
def test_ready_reloading_ready_stopping(
    tmp_path: Path, systemd: FakeSystemd, extra: tuple[str, ...]
) -> None:
    """READY once serving, RELOADING then READY around a HUP, STOPPING on TERM, all from
    the PID systemd started."""
    with serve(tmp_path, systemd, *extra) as served:
        main = served.proc.pid
        pid, fields = systemd.until("READY")
        assert pid == main
        assert fields["STATUS"].startswith("serving")
        (match,) = served.wait_for(LISTENING)
        write_app(tmp_path, "v2")
        served.signal(signal.SIGHUP)
        pid, fields = systemd.until("RELOADING")
        assert pid == main and "MONOTONIC_USEC" in fields
        pid, _ = systemd.until("READY")
        assert pid == main
        wait_for_version(host_port(match.group(1)), "v2")
        served.signal(signal.SIGTERM)
        pid, _ = systemd.until("STOPPING")
        assert pid == main
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_watchdog_pings_from_the_supervisor(tmp_path: Path, systemd: FakeSystemd) -> None:
    """WATCHDOG_USEC=0.4 s: WATCHDOG=1 about every 0.2 s, from the supervisor alone."""
    with serve(tmp_path, systemd, "--workers", "2", WATCHDOG_USEC="400000") as served:
        served.wait_for(READY, count=2)
        began = time.monotonic()
        pids = {systemd.until("WATCHDOG")[0] for _ in range(5)}
        assert pids == {served.proc.pid}
        assert time.monotonic() - began < 5
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


BLOCKING = """\
import time


async def handle(stream):
    await stream.send_all(b"ok\\n")
    if await stream.receive_some(100) == b"block\\n":
        time.sleep(120)  # blocks trio's whole loop
"""


@pytest.mark.timeout(60)
def test_a_blocked_loop_stops_the_watchdog_pings(tmp_path: Path, systemd: FakeSystemd) -> None:
    """One process: the pings come from inside the runtime's loop, so a blocked trio loop
    stops them, and systemd's WatchdogSec= would restart the service."""
    if "trio" not in _registry.available_managers():
        pytest.skip("weft-trio is not installed")
    (tmp_path / "blocking.py").write_text(BLOCKING)
    env = {**environment(), "NOTIFY_SOCKET": systemd.sock.getsockname(), "WATCHDOG_USEC": "400000"}
    argv = weft_serve("blocking:handle", "--manager", "trio", "--bind", "127.0.0.1:0")
    with Served(argv, cwd=tmp_path, env=env) as served:
        (match,) = served.wait_for(LISTENING)
        systemd.until("WATCHDOG")
        with socket.create_connection(host_port(match.group(1)), timeout=10) as client:
            assert client.recv(100) == b"ok\n"
            client.sendall(b"block\n")
            # Healthy, 2 s bring 10 pings; one may have been in flight as the loop stopped.
            pings = 0
            deadline = time.monotonic() + 2.0
            while (left := deadline - time.monotonic()) > 0:
                systemd.sock.settimeout(left)
                try:
                    pings += "WATCHDOG" in systemd.next()[1]
                except TimeoutError:
                    break
            assert pings <= 1, served.text
        served.kill()


@pytest.mark.timeout(60)
def test_after_a_hup_a_blocked_worker_loop_is_still_caught(
    tmp_path: Path, systemd: FakeSystemd
) -> None:
    """One process under WatchdogSec without --timeout: after a HUP the pings come from
    the supervisor's loop, which a worker's blocked loop does not stop, so the service
    had no protection left (an outside check). The workers are now watched at
    WatchdogSec: the blocked one is dumped and replaced."""
    if "trio" not in _registry.available_managers():
        pytest.skip("weft-trio is not installed")
    (tmp_path / "blocking.py").write_text(BLOCKING)
    env = {
        **environment(),
        "NOTIFY_SOCKET": systemd.sock.getsockname(),
        "WATCHDOG_USEC": "1000000",
    }
    argv = weft_serve("blocking:handle", "--manager", "trio", "--bind", "127.0.0.1:0")
    with Served(argv, cwd=tmp_path, env=env) as served:
        (match,) = served.wait_for(LISTENING)
        served.signal(signal.SIGHUP)
        served.wait_for("the workers' loops are watched with timeout=1s")
        (ready,) = served.wait_for(READY)
        # Until then the in-process server may take the client (and be the one it
        # blocks): the worker alone accepts once it has drained.
        served.wait_for("the in-process server has drained")
        with socket.create_connection(host_port(match.group(1)), timeout=10) as client:
            assert client.recv(100) == b"ok\n"
            client.sendall(b"block\n")
            served.wait_for(rf"worker {ready.group(1)}: no heartbeat from its runtime loop")
            served.wait_for(rf"worker {ready.group(1)} exited with SIGKILL")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


#: The sockets that filled a listener's queue, kept open for the rest of the run.
_FILLERS: list[socket.socket] = []


def _fill(systemd: FakeSystemd) -> int:
    """Fill the listener's queue (nobody reads it, as a wedged service manager); how many.

    A sender's datagrams not yet read count against its own send buffer too: where
    net.unix.max_dgram_qlen is large (512 under systemd's defaults) one sender runs
    out of buffer first, its EAGAIN saying nothing of the queue. So senders are added
    until a fresh one cannot send.
    """
    sent = 0
    for _ in range(200):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _FILLERS.append(sock)
        sock.connect(systemd.sock.getsockname())
        sock.setblocking(False)
        fresh = True
        while True:
            try:
                sock.send(b"STATUS=filler")
            except BlockingIOError:
                break
            sent += 1
            fresh = False
        if fresh:  # the queue itself is full
            return sent
    raise AssertionError(f"the listener's queue took {sent} datagrams and was not full")


def test_a_listener_that_does_not_read_costs_a_bounded_wait_then_none(
    systemd: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    """A full queue: the first notification waits NOTIFY_WAIT and is dropped, with one
    WARNING; the next ones do not wait. Before, the send blocked with no bound (the
    supervisor's loop, and with it every signal, held until systemd read again)."""
    assert _fill(systemd) > 0
    notifier = Notifier({"NOTIFY_SOCKET": systemd.sock.getsockname()})
    began = time.monotonic()
    notifier.ready("serving")
    assert time.monotonic() - began < NOTIFY_WAIT + 1.0
    began = time.monotonic()
    for _ in range(20):
        notifier.alive()
    # 20 waits would take 20 * NOTIFY_WAIT (2 s); without them, milliseconds.
    assert time.monotonic() - began < 10 * NOTIFY_WAIT, "no wait once one was dropped"
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "READY=1 was dropped" in record.getMessage()
    systemd.sock.settimeout(0)
    while True:  # read again: notifications get through at once
        try:
            systemd.sock.recv(4096)
        except BlockingIOError:
            break
    systemd.sock.settimeout(10)
    notifier.stopping("stopping")
    assert systemd.next()[1]["STOPPING"] == "1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [(), ("--workers", "2")], ids=["one-process", "workers-2"])
def test_a_service_manager_that_stops_reading_does_not_hold_the_stop(
    tmp_path: Path, systemd: FakeSystemd, extra: tuple[str, ...]
) -> None:
    """A service manager that stopped reading (its queue full, here of our own
    datagrams; watchdog pings fill it as well); SIGTERM then still stops weft serve at
    once, exit 0. Before: the supervisor ignored TERM for good, blocked in STOPPING's
    send (its workers served on); one process blocked there before closing its
    listeners, then was ended by its deadline, exit 4, blaming a handler (the systemd
    check's F1)."""
    with serve(tmp_path, systemd, *extra) as served:
        (match,) = served.wait_for(LISTENING)
        systemd.until("READY")
        if extra:
            served.wait_for(READY, count=2)
        assert _fill(systemd) > 0
        address = host_port(match.group(1))
        began = time.monotonic()
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=15) == 0, served.text
        # Well inside the deadline (5 s + 2.5): it was the deadline that ended it, exit 4.
        assert time.monotonic() - began < 5.0, "no handler holds it: at once"
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=2).close()
    assert "cannot notify systemd on NOTIFY_SOCKET: its queue stayed full" in served.text


ENV_APP = """\
import os

AT_IMPORT = os.environ.get("NOTIFY_SOCKET")


def handle(conn):
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    seen = [AT_IMPORT, *(os.environ.get(name) for name in names)]
    conn.sendall(repr(seen).encode() + b"\\n")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [(), ("--workers", "2")], ids=["one-process", "workers-2"])
def test_a_handler_does_not_see_the_notify_variables(
    tmp_path: Path, systemd: FakeSystemd, extra: tuple[str, ...]
) -> None:
    """Only weft speaks for the service. One process left NOTIFY_SOCKET and WATCHDOG_*
    in its environment, so ``systemd-notify STOPPING=1`` run by a handler reached
    systemd with weft's own PID, which NotifyAccess=main accepts (the systemd check's
    F7); workers never had them. And weft still notifies: READY, then a USR2 re-exec's
    READY, which needs them back in the new image."""
    (tmp_path / "envapp.py").write_text(ENV_APP)
    env = {
        **environment(),
        "NOTIFY_SOCKET": systemd.sock.getsockname(),
        "WATCHDOG_USEC": "4000000",
    }
    argv = weft_serve("envapp:handle", "--bind", "127.0.0.1:0", *extra)
    with Served(argv, cwd=tmp_path, env=env) as served:
        systemd.until("READY")
        (match,) = served.wait_for(LISTENING)
        with socket.create_connection(host_port(match.group(1)), timeout=10) as client:
            assert client.makefile("rb").readline() == b"[None, None, None, None]\n"
        served.signal(signal.SIGUSR2)
        systemd.until("RELOADING")
        pid, _ = systemd.until("READY")
        assert pid == served.proc.pid
        served.wait_for("reload done")
        served.signal(signal.SIGTERM)
        systemd.until("STOPPING")
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("extra", "signum", "workers"),
    [
        (("--workers", "2"), signal.SIGUSR2, 2),
        ((), signal.SIGUSR2, 1),
        ((), signal.SIGTTIN, 2),
    ],
    ids=["workers-2-USR2", "one-process-USR2", "one-process-TTIN"],
)
def test_after_reloading_the_next_ready_is_the_reloads_end(
    tmp_path: Path, systemd: FakeSystemd, extra: tuple[str, ...], signum: int, workers: int
) -> None:
    """Type=notify-reload ends `systemctl reload` at the first READY=1 after RELOADING=1.
    A supervisor one process became, or a re-executed one, sent it as its first worker
    was ready ("serving with 1 worker(s)" of 2), and a one-process USR2 sent it before
    re-executing, then again (the systemd check's F4). It now comes once, with every
    new worker serving."""
    with serve(tmp_path, systemd, *extra) as served:
        systemd.until("READY")
        served.signal(signum)
        systemd.until("RELOADING")
        pid, fields = systemd.until("READY")
        assert pid == served.proc.pid
        assert fields["STATUS"] == f"serving with {workers} worker(s)", fields
        served.wait_for("reload done")
        served.signal(signal.SIGTERM)
        while "STOPPING" not in fields:
            _, fields = systemd.next()
            assert "READY" not in fields, f"a READY=1 after the reload's end: {fields}"
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_weft_ctl_drain_of_one_process_says_stopping(tmp_path: Path, systemd: FakeSystemd) -> None:
    """A drain ends the process: systemd is told STOPPING=1, as on TERM and as a
    supervisor's drain tells it; one process said nothing and exited (the systemd
    check's F5)."""
    control = tmp_path / "ctl.sock"
    with serve(tmp_path, systemd, "--control-socket", str(control)) as served:
        systemd.until("READY")
        done = subprocess.run(
            [sys.executable, "-m", "weft_core", "ctl", "--socket", str(control), "drain"],
            capture_output=True, text=True, timeout=30, env=environment(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        pid, _ = systemd.until("STOPPING")
        assert pid == served.proc.pid
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_status_follows_the_workers_serving(tmp_path: Path, systemd: FakeSystemd) -> None:
    """STATUS= said "serving with 2 worker(s)" whatever happened after: TTIN and TTOU
    changed nothing, nor workers that could not start (the systemd check's F8)."""
    with serve(tmp_path, systemd, "--workers", "2") as served:
        served.wait_for(READY, count=2)
        systemd.until("READY")
        served.signal(signal.SIGTTIN)
        while systemd.until("STATUS")[1]["STATUS"] != "serving with 3 worker(s)":
            pass
        served.signal(signal.SIGTTOU)
        while systemd.until("STATUS")[1]["STATUS"] != "serving with 2 worker(s)":
            pass
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


def test_a_state_dropped_for_a_full_queue_is_sent_again_once_one_gets_through(
    systemd: FakeSystemd,
) -> None:
    """READY=1 dropped while the queue was full was never sent again: a
    Type=notify-reload unit waited on it for good (the review's finding). It goes
    with the next notification that gets through, a watchdog ping here."""
    assert _fill(systemd) > 0
    notifier = Notifier({"NOTIFY_SOCKET": systemd.sock.getsockname()})
    notifier.ready("serving")  # dropped
    systemd.sock.settimeout(0)
    while True:
        try:
            systemd.sock.recv(4096)
        except BlockingIOError:
            break
    systemd.sock.settimeout(10)
    notifier.alive()
    assert systemd.next()[1] == {"READY": "1", "STATUS": "serving"}
    assert systemd.next()[1] == {"WATCHDOG": "1"}
