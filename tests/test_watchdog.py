"""The watchdog (``timeout``) and worker recycling (``max_requests``) of ``weft serve``.

Real processes on loopback; settings through ``WEFT_*`` variables (the flags come
from the settings table). A handler that blocks its runtime's loop is written
into the test's folder: gevent's hub blocked by the unpatched ``time.sleep``, trio's
loop by ``time.sleep`` in an ``async def``.
"""

from __future__ import annotations

import re
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest
from _load import APP, Load, greeting, write_app
from _serving import READY, Served, environment, host_port, weft_serve

from weft_core import ConfigError, _registry
from weft_core._settings import validate

LISTENING = r"\] weft: listening on (\S+) "

BLOCKING = textwrap.dedent(
    """\
    import os
    import time


    def blocking_sleep(seconds):
        try:
            from gevent.monkey import get_original
        except ImportError:
            return time.sleep(seconds)
        return get_original("time", "sleep")(seconds)


    def handle(conn):
        conn.sendall(b"%d\\n" % os.getpid())
        while data := conn.recv(65536):
            if data == b"block\\n":
                blocking_sleep(120)  # the whole hub stops here
            conn.sendall(data)


    async def handle_async(stream):
        await stream.send_all(b"%d\\n" % os.getpid())
        while data := await stream.receive_some(65536):
            if data == b"block\\n":
                time.sleep(120)  # the whole trio loop stops here
            await stream.send_all(data)
    """
)


def serve(folder: Path, handler: str, manager: str, env: dict[str, str], *extra: str) -> Served:
    return Served(
        weft_serve(handler, "--manager", manager, "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "5", *extra),
        cwd=folder,
        env={**environment(), **env},
    )  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", ["gevent", "trio"])
def test_a_blocked_loop_is_dumped_and_replaced(tmp_path: Path, manager: str) -> None:
    """One process with timeout: a handler blocking its loop stops the heartbeat; the
    worker's stacks reach the log (the handler's frame among them) and a new worker serves."""
    if manager not in _registry.available_managers():
        pytest.skip(f"weft-{manager} is not installed")
    (tmp_path / "blocking.py").write_text(BLOCKING)
    handler = "blocking:handle_async" if manager == "trio" else "blocking:handle"
    # gevent's own blocked-hub report is off here: its monitor thread formats every
    # thread's stack in Python once a second, and faulthandler's dump (a C signal
    # handler reading every thread's frames without the GIL) crashed the worker with
    # SIGSEGV when it caught that thread mid-report (CI, once). A hazard of the two
    # together, said in docs/deployment.md; this test is about the watchdog's dump.
    extra = ("-o", "max_blocking_time=false") if manager == "gevent" else ()
    with serve(tmp_path, handler, manager, {"WEFT_TIMEOUT": "2"}, *extra) as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        (ready,) = served.wait_for(READY)
        stuck = int(ready.group(1))
        with socket.create_connection(address, timeout=20) as victim:
            assert int(victim.makefile("rb").readline()) == stuck
            victim.sendall(b"block\n")
            served.wait_for(rf"worker {stuck}: no heartbeat from its runtime loop for 2s")
            served.wait_for(rf"worker {stuck}: every thread's stack")
            served.wait_for(r"in handle")  # faulthandler's dump names the frame
            served.wait_for(rf"worker {stuck} exited with SIGKILL")
            replacement = int(served.wait_for(READY, count=2)[1].group(1))
            with socket.create_connection(address, timeout=20) as client:
                assert int(client.makefile("rb").readline()) == replacement
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_a_draining_worker_whose_loop_blocks_is_dumped_and_killed_at_the_timeout(
    tmp_path: Path,
) -> None:
    """A HUP retires the worker whose handler blocks its loop: draining, it was no
    longer watched, so its stacks never reached the log and it lingered until the
    drain's deadline (graceful timeout plus a margin) with its clients (an outside
    check). It is dumped and killed at ``timeout``, as a serving one is."""
    if "trio" not in _registry.available_managers():
        pytest.skip("weft-trio is not installed")
    (tmp_path / "blocking.py").write_text(BLOCKING)
    env = {"WEFT_TIMEOUT": "2"}
    with serve(tmp_path, "blocking:handle_async", "trio", env, "--graceful-timeout", "60",
               "--workers", "2") as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        ready = {int(m.group(1)) for m in served.wait_for(READY, count=2)}
        with socket.create_connection(address, timeout=20) as victim:
            stuck = int(victim.makefile("rb").readline())
            assert stuck in ready
            victim.sendall(b"block\n")
            served.signal(signal.SIGHUP)  # its replacement starts; it is asked to drain
            served.wait_for(rf"\[{stuck}\] \[INFO\] weft.workers: asked to retire")
            served.wait_for(
                rf"worker {stuck} \(draining\): no heartbeat from its runtime loop for 2s"
            )
            served.wait_for(rf"worker {stuck}: every thread's stack")
            served.wait_for(rf"worker {stuck} exited with SIGKILL")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


#: A log line of weft's text format begins with its time.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT")
#: What faulthandler writes: a thread's heading, or one of its frames.
DUMP_LINE = re.compile(r"^(Thread 0x|Current thread 0x|  File |  <no Python frame>)")
DUMP_HEADING = r"worker (\d+): every thread's stack \(DUMP_SIGNAL\):$"


@pytest.mark.timeout(90)
def test_two_stuck_workers_dump_whole_blocks_no_line_cuts_into(tmp_path: Path) -> None:
    """Two workers stuck at once: each dump is one block of the log, under a line that
    names its worker; no other line lands inside one, and no frame lands outside.

    faulthandler wrote each dump straight to the shared stderr, a line at a time, so
    the two dumps and the supervisor's lines cut into each other (the hookplugin
    check saw a log line start inside a frame's line). The supervisor now reads each
    worker's dump from a pipe of its own and logs it as one record."""
    if "gevent" not in _registry.available_managers():
        pytest.skip("weft-gevent is not installed")
    (tmp_path / "blocking.py").write_text(BLOCKING)
    # A socket per worker (--reuse-port): the kernel spreads clients by their port,
    # where one shared socket may give every lone client to the same worker.
    extra = ("-o", "max_blocking_time=false", "--workers", "2", "--reuse-port")
    with serve(tmp_path, "blocking:handle", "gevent", {"WEFT_TIMEOUT": "2"}, *extra) as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        first = {int(m.group(1)) for m in served.wait_for(READY, count=2)}
        clients: dict[int, socket.socket] = {}
        try:
            for _ in range(40):  # until each worker serves one
                client = socket.create_connection(address, timeout=20)
                pid = int(client.makefile("rb").readline())
                if pid in clients:
                    client.close()
                else:
                    clients[pid] = client
                if set(clients) == first:
                    break
            assert set(clients) == first, f"reached only {set(clients)} of {first}"
            for client in clients.values():
                client.sendall(b"block\n")
            dumped = {int(m.group(1)) for m in served.wait_for(DUMP_HEADING, count=2)}
            assert dumped == first
            for pid in first:
                served.wait_for(rf"worker {pid} exited with SIGKILL")
            served.wait_for(READY, count=4)
        finally:
            for client in clients.values():
                client.close()
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    lines = served.text.splitlines()
    blocks: list[list[str]] = []
    inside = False
    for line in lines:
        if re.search(DUMP_HEADING, line):
            blocks.append([])
            inside = True
        elif LOG_LINE.match(line):
            inside = False
        elif inside:
            blocks[-1].append(line)
        else:
            assert not DUMP_LINE.match(line), f"a line of a dump outside its block: {line!r}"
    assert len(blocks) == 2, served.text
    for block in blocks:
        assert block and all(DUMP_LINE.match(x) or not x.strip() for x in block), block
        assert any("in handle" in x for x in block), block


@pytest.mark.timeout(60)
def test_a_healthy_worker_is_left_alone(tmp_path: Path) -> None:
    """Idle connections and an idle loop keep beating: nothing is replaced in 3 timeouts."""
    write_app(tmp_path, "v1")
    # 2 s, as the other cases here: a worker of a loaded machine can go unscheduled for
    # some tenths of a second, which a 0.5 s timeout took for a hang.
    with serve(tmp_path, APP, "threads", {"WEFT_TIMEOUT": "2"}, "--workers", "2") as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        served.wait_for(READY, count=2)
        load = Load(address, clients=2)
        try:
            # An absence is under test: it takes a stretch of time, three timeouts.
            time.sleep(6)
        finally:
            load.stop()
        assert not load.failures
        assert "no heartbeat" not in served.text, served.text
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2])
def test_max_requests_replaces_workers_under_load(tmp_path: Path, workers: int) -> None:
    """max_requests (with jitter): workers are replaced as they reach it, no client fails."""
    write_app(tmp_path, "v1")
    env = {"WEFT_MAX_REQUESTS": "200", "WEFT_MAX_REQUESTS_JITTER": "20"}
    with serve(tmp_path, APP, "threads", env, "--workers", str(workers)) as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        first = {int(m.group(1)) for m in served.wait_for(READY, count=workers)}
        load = Load(address)
        try:
            served.wait_for(r"reached max_requests: replacing it", count=workers + 1)
            served.wait_for(READY, count=2 * workers + 1)
        finally:
            load.stop()
        assert not load.failures, f"{dict(load.failures)}\n{served.text}"
        assert load.pids - first, "no replacement served"
        assert greeting(address)[0] == "v1"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "killing" not in served.text


def test_the_settings_check_their_values() -> None:
    """timeout > 0 or off; max_requests >= 1 or off (0 is off, as in gunicorn); jitter >= 0."""
    assert validate("timeout", None) is None
    assert validate("timeout", 2) == 2.0
    assert validate("timeout", 0) is None
    assert validate("max_requests", 1000) == 1000
    assert validate("max_requests", 0) is None
    assert validate("max_requests_jitter", 0) == 0
    for key, bad in (("timeout", -1), ("max_requests", -1), ("max_requests_jitter", -1)):
        with pytest.raises(ConfigError, match=key):
            validate(key, bad)
