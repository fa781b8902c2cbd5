"""``weft serve --workers N``: one address, N supervised worker processes.

Real processes on loopback. Every wait is on a line of the supervisor's stderr or a
reply, bounded by a timeout; nothing sleeps and then asserts. The handlers are in
``tests/_serving.py``: each connection first gets the serving worker's pid.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import date, datetime, timezone
from datetime import time as dtime
from pathlib import Path
from typing import Any

import pytest
from _serving import (
    LISTENING,
    OUR_MANAGERS,
    READY,
    STARTED,
    Client,
    Served,
    environment,
    free_port,
    handler_for,
    host_port,
    weft_serve,
)

from weft_core import ConfigError, Server, _registry
from weft_core._config import parse_option_value
from weft_core._exits import EXIT_TASKS_LEFT
from weft_core._signals import STOP_REPEAT_WINDOW
from weft_core._workers import (
    RESTART_DELAY_MAX,
    RESTART_DELAY_MIN,
    RESTART_RESET_AFTER,
    START_INTERVAL,
    check_capacity,
    describe_exit,
    option_text,
    restart_delay,
    worker_args,
)
from weft_core.testing._support import wait_until


@pytest.fixture(params=OUR_MANAGERS)
def manager(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name not in _registry.available_managers():
        pytest.skip(f"weft-{name} is not installed")
    return name


def start(
    tmp_path: Path,
    manager: str,
    *extra: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    handler: str | None = None,
) -> tuple[Served, str]:
    """Start a supervisor; return it and its address once every worker is ready.

    ``handler``: a ``module:attribute`` of the test's own (written to ``tmp_path``);
    by default the manager's from ``_serving``.
    """
    served = Served(
        weft_serve(handler or handler_for(manager), "--manager", manager,
                   "--workers", str(workers),
                   "--bind", "127.0.0.1:0", "--graceful-timeout", "20", *extra),
        cwd=tmp_path,
        env=env,
    )  # fmt: skip
    try:
        ((address, named),) = (m.groups() for m in served.wait_for(LISTENING))
        assert named == manager
        served.wait_for(READY, count=workers)
    except BaseException:
        served.kill()
        raise
    return served, address


def pids_serving(address: str, want: set[int], timeout: float = 30) -> set[int]:
    """Connect (and echo) until every pid in ``want`` has served a connection."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen:
        assert time.monotonic() < deadline, f"only {seen} served within {timeout}s; want {want}"
        with Client(host_port(address)) as client:
            assert client.echo(b"ping") == b"ping"
            seen.add(client.pid)
    return seen


def ready_pids(served: Served, count: int) -> set[int]:
    return {int(m.group(1)) for m in served.wait_for(READY, count=count)}


# -- serving --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_every_worker_serves_one_address(tmp_path: Path, manager: str) -> None:
    served, address = start(tmp_path, manager)
    with served:
        workers = ready_pids(served, 2)
        started = {int(m.group(1)) for m in served.wait_for(STARTED, count=2)}
        assert workers == started
        assert pids_serving(address, workers) == workers
        # The supervisor's line is the only "listening on": workers say "worker ready on".
        assert len(re.findall(LISTENING, served.text)) == 1
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    for pid in workers:
        assert f"worker {pid} exited with " in served.text
    assert "Traceback" not in served.text


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "flags", [("--port", "{port}"), ("--address", "127.0.0.1", "--port", "{port}")]
)
def test_workers_serve_an_address_given_by_port_flags(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """``--port N --workers 2``: the supervisor listens there and each worker serves it.

    Each worker was given the supervisor's ``--port`` beside the ``--bind=fd:N`` of the
    socket it inherits, refused the pair ("give either --bind or --port") and exited
    2, and the service stopped; only ``--bind`` worked.
    """
    port = free_port()
    served = Served(
        weft_serve(handler_for("threads"), "--workers", "2", "--graceful-timeout", "5",
                   *(f.format(port=port) for f in flags)),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        assert address == f"127.0.0.1:{port}"
        workers = ready_pids(served, 2)
        assert pids_serving(address, workers) == workers
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


WAITING = 10


@pytest.mark.timeout(60)
def _counting_accepted(loop_manager: str, seen: list[int], box: list[Server]) -> Any:
    """A handler that notes how many clients the server (``box[0]``) had accepted, then says x."""

    def handle(conn: Any) -> None:
        seen.append(box[0].stats()["accepted"])
        conn.sendall(b"x")

    async def handle_async(stream: Any) -> None:
        seen.append(box[0].stats()["accepted"])
        await stream.send_all(b"x")

    return handle if loop_manager == "gevent" else handle_async


@pytest.mark.parametrize("loop_manager", ["gevent", "trio", "asyncio"])
def test_a_shared_listener_is_served_one_client_per_turn(loop_manager: str) -> None:
    """On an inherited listener (a worker's), the first client is served before the rest are taken.

    Workers share one listening socket; an event loop that accepted every waiting
    client in one turn would leave none to the worker that woke second (gevent's
    acceptor once took 97 of 100). With WAITING clients in the backlog, the first
    handler sees fewer than WAITING accepted; so does one taken before the others
    are, which an event loop serves only by yielding between accepts.
    """
    if loop_manager not in _registry.available_managers():
        pytest.skip(f"weft-{loop_manager} is not installed")
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(WAITING)]
    seen: list[int] = []

    box: list[Server] = []
    handler = _counting_accepted(loop_manager, seen, box)
    server = Server(handler, bind=[f"fd:{listener.detach()}"], manager=loop_manager)
    box.append(server)
    server.run()
    try:
        for client in clients:
            assert client.recv(1) == b"x"
    finally:
        for client in clients:
            client.close()
        assert server.stop(timeout=5)
    assert len(seen) == WAITING
    assert seen[0] < WAITING, f"every waiting client was accepted before the first ran: {seen}"


@pytest.mark.parametrize("loop_manager", ["gevent", "trio", "asyncio"])
def test_a_listener_of_its_own_takes_its_waiting_clients_in_one_turn(loop_manager: str) -> None:
    """Clients that arrive together are all accepted before the first is served.

    The counterpart of the shared listener's rule: a listener no other process
    accepts on takes every waiting client (up to a burst of 100) in one turn of the
    loop. Taking one per turn made a burst wait on every client already served:
    with a thousand keep-alive clients opening at once on trio, the last waited
    about three seconds in the kernel's queue (p99 54x raw trio's). Clients queue
    here while accepting is paused, then accepting resumes.
    """
    if loop_manager not in _registry.available_managers():
        pytest.skip(f"weft-{loop_manager} is not installed")
    seen: list[int] = []

    box: list[Server] = []
    server = Server(
        _counting_accepted(loop_manager, seen, box), port=0, backlog=64, manager=loop_manager
    )
    box.append(server)
    server.run()
    clients: list[socket.socket] = []
    try:
        server.pause_accepting()
        clients = [
            socket.create_connection(("127.0.0.1", int(server.port)), timeout=20)
            for _ in range(WAITING)
        ]
        server.resume_accepting()
        for client in clients:
            assert client.recv(1) == b"x"
    finally:
        for client in clients:
            client.close()
        assert server.stop(timeout=5)
    assert seen[0] == WAITING, f"the waiting clients were not taken in one turn: {seen}"


@pytest.mark.timeout(90)
def test_one_worker_stopping_leaves_the_socket_to_the_others(tmp_path: Path) -> None:
    served, address = start(tmp_path, "threads")
    with served:
        first = ready_pids(served, 2)
        leaving, staying = sorted(first)
        os.kill(leaving, signal.SIGTERM)
        served.wait_for(rf"worker {leaving} exited with 0 after")
        assert pids_serving(address, {staying}) >= {staying}
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert f"worker {staying} exited with 0" in served.text
    assert "ERROR" not in served.text


@pytest.mark.timeout(90)
def test_a_killed_worker_is_replaced(tmp_path: Path, manager: str) -> None:
    served, address = start(tmp_path, manager)
    with served:
        first = ready_pids(served, 2)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        served.wait_for(rf"worker {victim} exited with SIGKILL after [\d.]+s; starting another in")
        (newcomer,) = ready_pids(served, 3) - first
        assert pids_serving(address, {newcomer}) >= {newcomer}
        assert pids_serving(address, first - {victim} | {newcomer})
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert served.text.count("worker ready on") == 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_workers_and_exits_0(tmp_path: Path, manager: str, signum: int) -> None:
    served, address = start(tmp_path, manager)
    with served, Client(host_port(address)) as client:
        assert client.echo(b"before\n") == b"before\n"
        client.sock.sendall(b"hold\n")
        assert client.line() == b"holding"
        began = time.monotonic()
        served.signal(signum)
        # The worker's stop half-closes the connection; the handler still answers.
        assert client.rest() == b"done\n"
        assert served.finish(timeout=30) == 0, served.text
        assert time.monotonic() - began < 20  # within --graceful-timeout
    name = signal.Signals(signum).name
    assert f"received {name}: stopping 2 worker(s)" in served.text
    assert "killing" not in served.text


@pytest.mark.timeout(60)
def test_second_signal_kills_workers_at_once(tmp_path: Path) -> None:
    served, address = start(tmp_path, "threads")
    with served, Client(host_port(address)) as client:
        client.sock.sendall(b"stall\n")  # the handler outlives the graceful timeout
        assert client.line() == b"stalling"
        served.signal(signal.SIGTERM)
        served.wait_for("received SIGTERM: stopping")
        # Sent within STOP_REPEAT_WINDOW of the first it would be the same request
        # (test_signals.py::test_a_stop_signal_sent_twice_at_once_is_one_request).
        time.sleep(2 * STOP_REPEAT_WINDOW)
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=15) == 1, served.text  # well before --graceful-timeout 20
    assert "received SIGTERM again: killing the workers" in served.text


@pytest.mark.timeout(60)
def test_quit_during_a_graceful_stop_cuts_it_short(tmp_path: Path) -> None:
    """QUIT after TERM interrupts the workers' connections and exits 0, as one process does.

    It killed the workers (exit 1) before, as a second TERM does.
    """
    (tmp_path / "lingering.py").write_text(textwrap.dedent("""
        import time

        def handle(conn):
            conn.sendall(b"ready\\n")
            while conn.recv(65536):
                pass
            while True:  # input ended by the graceful stop: write on until cut off
                conn.sendall(b".")
                time.sleep(0.05)
    """))  # fmt: skip
    served, address = start(tmp_path, "threads", handler="lingering:handle")
    with (
        served,
        socket.create_connection(host_port(address), timeout=20) as client,
        client.makefile("rb") as reader,
    ):
        assert reader.readline() == b"ready\n"
        served.signal(signal.SIGTERM)
        served.wait_for("received SIGTERM: stopping 2 worker")
        assert reader.read(1) == b"."  # the graceful stop is under way
        began = time.monotonic()
        served.signal(signal.SIGQUIT)
        assert served.finish(timeout=20) == 0, served.text
        assert time.monotonic() - began < 10, served.text  # not the 20 s graceful timeout
        with contextlib.suppress(ConnectionError):
            while reader.read(4096):  # the connection was cut
                pass
    assert "received SIGQUIT during the graceful stop: cutting it short" in served.text
    assert "killing" not in served.text


@pytest.mark.timeout(60)
def test_a_worker_ended_by_another_during_the_stop_makes_the_exit_1(tmp_path: Path) -> None:
    """A worker signalled directly as well (``pkill``, systemd's ``KillMode=control-group``)
    quits at once and cuts its connections: said at WARNING, and the exit is not 0.
    """
    served, address = start(tmp_path, "threads")
    with served, Client(host_port(address)) as client:
        client.sock.sendall(b"stall\n")  # the handler outlives the graceful timeout
        assert client.line() == b"stalling"
        served.signal(signal.SIGTERM)
        served.wait_for(rf"\[{client.pid}\] \[INFO\] weft: received SIGTERM: stopping")
        os.kill(client.pid, signal.SIGTERM)  # its second: it quits at once
        assert served.finish(timeout=15) == 1, served.text  # well before --graceful-timeout 20
    assert (
        f"worker {client.pid} exited with SIGTERM during the stop, not by the stop it was told"
        in served.text
    )


@contextlib.contextmanager
def _asked_a_slow_reply(tmp_path: Path) -> Iterator[tuple[Served, Any, int]]:
    """Two threads workers, asked once: the server, the client's reader, the worker's pid.

    The handler answers with its pid, then, 2 s later, with ``the whole reply``.
    """
    (tmp_path / "slow_reply.py").write_text(textwrap.dedent("""
        import os
        import time

        def handle(conn):
            conn.recv(64)
            conn.sendall(b"%d\\n" % os.getpid())
            time.sleep(2.0)
            conn.sendall(b"the whole reply\\n")
    """))  # fmt: skip
    served, address = start(tmp_path, "threads", handler="slow_reply:handle")
    with (
        served,
        socket.create_connection(host_port(address), timeout=20) as client,
        client.makefile("rb") as reader,
    ):
        client.sendall(b"ask\n")
        yield served, reader, int(reader.readline())


@pytest.mark.timeout(60)
def test_a_sigterm_to_the_workers_and_the_supervisor_at_once_drains(tmp_path: Path) -> None:
    """systemd's default KillMode=control-group (and `pkill`) signal the supervisor and
    every worker at the same moment; the supervisor's own SIGTERM to each worker
    follows within milliseconds. That was a second SIGTERM for the worker, which
    quit at once, cutting the reply in progress (exit 1). Within STOP_REPEAT_WINDOW
    the two are one request: the worker drains, the reply comes, exit 0."""
    with _asked_a_slow_reply(tmp_path) as (served, reader, worker):
        os.kill(worker, signal.SIGTERM)  # as systemd: the worker and its supervisor
        served.signal(signal.SIGTERM)
        assert reader.readline() == b"the whole reply\n", served.text
        assert served.finish(timeout=30) == 0, served.text
    assert "during the stop, not by the stop it was told" not in served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("upgrading", [False, True], ids=["late", "during-a-usr2"])
def test_a_supervisor_told_late_leaves_a_worker_stopping_on_its_own_to_drain(
    tmp_path: Path, upgrading: bool
) -> None:
    """A worker TERMed directly, its supervisor after the repeat window: the supervisor
    held its TERM across a USR2's exec (0.2-0.5 s; a signal fuzzer's pkill during an
    upgrade), or was slow. Its own TERM came as the worker's second and the worker
    quit at once, cutting the reply (exit 1). The worker says it is stopping
    (STOPPING on its link), and the supervisor then sends it none."""
    with _asked_a_slow_reply(tmp_path) as (served, reader, worker):
        os.kill(worker, signal.SIGTERM)
        served.wait_for(rf"\[{worker}\] \[INFO\] weft: received SIGTERM: stopping")
        time.sleep(0.3)  # past STOP_REPEAT_WINDOW: whatever the supervisor sends is late
        if upgrading:  # its TERM caught during the exec, the worker's STOPPING carried
            served.signal(signal.SIGUSR2)
            served.wait_for("received SIGUSR2: upgrading in place")
        served.signal(signal.SIGTERM)
        got = reader.readline()
        rc = served.finish(timeout=30)
        assert got == b"the whole reply\n", served.text
        assert rc == 0, served.text
    assert "during the stop, not by the stop it was told" not in served.text


@pytest.mark.timeout(60)
def test_worker_that_will_not_stop_is_killed(tmp_path: Path) -> None:
    # A worker that ignores SIGTERM, and keeps weft serve from handling it.
    (tmp_path / "stubborn.py").write_text(textwrap.dedent("""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal = lambda signum, handler: signal.SIG_IGN
        from _serving import handle
    """))  # fmt: skip
    served = Served(
        weft_serve("stubborn:handle", "--workers", "2", "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "0.5"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        served.wait_for(READY, count=2)
        began = time.monotonic()
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=30) == 1, served.text
        took = time.monotonic() - began
    assert served.text.count("after SIGTERM: killing it") == 2
    assert served.text.count("exited with SIGKILL") == 2
    assert 5.5 <= took < 20  # graceful timeout + EXIT_MARGIN, not much more


@pytest.mark.timeout(60)
def test_a_worker_that_left_tasks_makes_the_supervisor_exit_4(tmp_path: Path) -> None:
    """A worker's stop that abandons stuck handlers (its exit 4) is the service's exit 4."""
    served = Served(
        weft_serve("_stuck_handlers:stuck", "--manager", "threads", "--workers", "2",
                   "--bind", "127.0.0.1:0", "--graceful-timeout", "0.5"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        served.wait_for(READY, count=2)
        with socket.create_connection(host_port(address), timeout=20) as stuck:
            assert stuck.recv(1) == b"+"  # one worker's handler is stuck in os.read
            served.signal(signal.SIGTERM)
            assert served.finish(timeout=30) == EXIT_TASKS_LEFT, served.text
    assert "it left tasks running" in served.text
    assert "killing it" not in served.text  # it exited by itself, within its bound


@pytest.mark.timeout(60)
def test_workers_drain_and_exit_when_the_supervisor_dies(tmp_path: Path) -> None:
    """Killed, or a USR2 whose new image fails to start: the workers drain, as on a
    reload, and exit. They stopped as on SIGTERM, which cut every keep-alive client
    between two requests at once (an outside check: a total outage, its clients cut)."""
    served, address = start(tmp_path, "threads")
    with served:
        workers = ready_pids(served, 2)
        with socket.create_connection(host_port(address), timeout=20) as idle:
            reader = idle.makefile("rb")
            pid = int(reader.readline())
            served.proc.kill()
            served.proc.wait()
            served.wait_for(r"the supervisor is gone: draining", count=2)
            # The other worker, holding no client, has ended; this one still serves
            # its client's next request.
            (other,) = workers - {pid}
            wait_until(lambda: _gone(other), timeout=30)
            assert not _gone(pid)
            idle.sendall(b"next request\n")
            assert reader.readline() == b"next request\n"
            reader.close()
        served.wait_closed()  # every worker has exited: no writer of stderr is left
    assert "stopping" not in served.text, served.text


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie no init has reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.timeout(60)
def test_a_socket_shut_down_under_the_workers_stops_the_supervisor(tmp_path: Path) -> None:
    with socket.socket() as shared:
        shared.bind(("127.0.0.1", 0))
        shared.listen()
        port = shared.getsockname()[1]
        fd = shared.fileno()
        argv = weft_serve("_serving:handle", "--fd", str(fd), "--workers", "2")
        with Served(argv, cwd=tmp_path, pass_fds=[fd]) as served:
            ready_pids(served, 2)
            shared.shutdown(socket.SHUT_RD)  # in every process that shares it
            assert served.finish() == 1, served.text
    assert f"the listening socket on 127.0.0.1:{port} no longer listens" in served.text
    assert "starting another" not in served.text


# -- restarts -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_crash_loop_backs_off(tmp_path: Path) -> None:
    # os._exit at import: not a handler import error (exit 2) but a crash (exit 3).
    (tmp_path / "crasher.py").write_text("import os\nos._exit(3)\n")
    served = Served(weft_serve("crasher:handle", "--workers", "2", "-b", "127.0.0.1:0"),
                    cwd=tmp_path)  # fmt: skip
    with served:
        exits = served.wait_for(r"exited with 3 after [\d.]+s; starting another in (\S+)s", 8)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    # Each of the two workers' places backs off on its own: 0.1, 0.2, 0.4, ... seconds.
    delays = sorted(float(m.group(1)) for m in exits)
    assert delays[:6] == [0.1, 0.1, 0.2, 0.2, 0.4, 0.4]
    assert set(delays) <= {0.1, 0.2, 0.4, 0.8, 1.6}


def test_restart_delay_doubles_to_a_cap_and_resets_after_a_healthy_run() -> None:
    delays = [restart_delay(None, 0.0)]
    for _ in range(12):
        delays.append(restart_delay(delays[-1], 1.0))
    assert delays[:4] == [RESTART_DELAY_MIN, 0.2, 0.4, 0.8]
    assert delays[-1] == RESTART_DELAY_MAX
    assert max(delays) == RESTART_DELAY_MAX
    assert restart_delay(RESTART_DELAY_MAX, RESTART_RESET_AFTER) == RESTART_DELAY_MIN


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["no_such_module:handle"], "cannot import handler 'no_such_module:handle'"),
        (["_serving:handle", "-o", "limt=5"], "did you mean 'limit' for 'limt'?"),
        (["_serving:handle", "--shutdown-secret", "s3cret"], "only applies with shutdown_port"),
        (["_serving:handle", "--manager", "trio"], "is a plain function, but manager 'trio'"),
        (
            ["_serving:handle", "--certfile", "not.pem", "--keyfile", "not.pem"],
            "not.pem is not a PEM certificate",
        ),
    ],
    ids=["no-import", "option-typo", "secret-without-port", "handler-kind", "not-pem"],
)
@pytest.mark.parametrize("workers", ["2", "1 --timeout 30"], ids=["workers", "watchdog"])
def test_a_mistake_only_a_server_finds_is_exit_2_before_anything_binds(
    tmp_path: Path, workers: str, args: list[str], said: str
) -> None:
    """What one process and --check-config refuse, a supervisor refuses the same way.

    It bound the port, said "listening on" and started its workers, the first of
    which found the mistake and exited 2; a shutdown secret without its port was
    dropped unsaid and the service served. Checked now by the command itself run as
    --check-config, before anything binds: one line, exit 2.
    """
    if "trio" in args and "trio" not in _registry.available_managers():
        pytest.skip("the trio manager is not installed")
    (tmp_path / "not.pem").write_text("not a certificate\n")
    with socket.socket() as held:  # a bind would fail with exit 1: it must not be tried
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        served = Served(
            weft_serve(*args, "--workers", *workers.split(), "--bind", f"127.0.0.1:{port}"),
            cwd=tmp_path,
        )
        with served:
            assert served.finish() == 2, served.text
    assert said in served.text, served.text
    assert "started" not in served.text and "listening" not in served.text, served.text
    assert len(served.text.strip().splitlines()) == 1, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["2", "1 --timeout 30"], ids=["workers", "watchdog"])
def test_an_unknown_manager_is_exit_2_before_anything_binds(tmp_path: Path, workers: str) -> None:
    """As without a supervisor: the name is looked up first, so nothing binds or starts.

    The supervisor bound the port and started its workers before (``listening on``,
    a worker's error, then exit 2).
    """
    with socket.socket() as held:  # a bind would fail with exit 1: it must not be tried
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        served = Served(
            weft_serve("_serving:handle", "--manager", "thread", "--workers", *workers.split(),
                       "--bind", f"127.0.0.1:{port}"),
            cwd=tmp_path,
        )  # fmt: skip
        with served:
            assert served.finish() == 2, served.text
    assert "no task manager named 'thread' is installed" in served.text
    assert "started" not in served.text and "listening" not in served.text


@pytest.mark.timeout(90)
def test_a_worker_exiting_2_after_boot_is_replaced(tmp_path: Path) -> None:
    # Status 2 from a worker that served: a handler ending its process (os._exit(2);
    # a handler's sys.exit(2) ends only its task), not a mistake a restart cannot fix.
    (tmp_path / "exit2.py").write_text(textwrap.dedent("""
        import os

        def handle(conn):
            conn.sendall(b"%d\\n" % os.getpid())
            while data := conn.recv(65536):
                if data == b"exit2\\n":
                    os._exit(2)
                conn.sendall(data)
    """))  # fmt: skip
    served = Served(
        weft_serve("exit2:handle", "--workers", "2", "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "20"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        first = ready_pids(served, 2)
        with Client(host_port(address)) as client:
            client.sock.sendall(b"exit2\n")
            assert client.sock.recv(64) == b"", "the worker ended"
        served.wait_for(rf"worker {client.pid} exited with 2 after [\d.]+s; starting another in")
        (newcomer,) = ready_pids(served, 3) - first
        assert pids_serving(address, (first - {client.pid}) | {newcomer})
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "cannot fix" not in served.text


# -- what the machine can hold, and signals during starts -----------------------------------


@pytest.mark.timeout(60)
def test_more_workers_than_memory_holds_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        weft_serve("_serving:handle", "--workers", "100000", "--bind", "127.0.0.1:0"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("weft: command line --workers, key 'workers': 100,000 workers need")
    assert "use --workers" in line and ("MemAvailable" in line or "RLIMIT_NPROC" in line)
    assert "listening" not in result.stderr


@pytest.mark.timeout(60)
def test_more_workers_than_the_process_limit_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # RLIMIT_NPROC lowered in the child (by a tiny launcher, which then execs weft).
    launcher = (
        "import os, resource, sys;"
        " soft, hard = resource.getrlimit(resource.RLIMIT_NPROC);"
        " resource.setrlimit(resource.RLIMIT_NPROC, (8, hard));"
        " os.execv(sys.argv[1], sys.argv[1:])"
    )
    argv = weft_serve("_serving:handle", "--workers", "4", "--bind", "127.0.0.1:0")
    result = subprocess.run(
        [sys.executable, "-c", launcher, *argv],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "weft: command line --workers, key 'workers': 4 workers need 16 processes/threads"
    ), line
    assert "the process limit is 8 (RLIMIT_NPROC" in line and "ulimit -u" in line, line
    assert "listening" not in result.stderr


@pytest.mark.timeout(120)
def test_sigint_during_the_start_of_many_workers(tmp_path: Path) -> None:
    count = 200
    try:
        check_capacity(count)
    except ConfigError as exc:
        pytest.skip(f"this machine cannot hold {count} workers: {exc}")
    # Workers that take a minute to import their handler: never ready, mostly asleep.
    (tmp_path / "slowboot.py").write_text(
        "import time\ntime.sleep(60)\nfrom _serving import handle\n"
    )
    served = Served(
        weft_serve("slowboot:handle", "--workers", str(count), "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "5"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        served.wait_for(STARTED, count=10)
        sent = time.time()
        served.signal(signal.SIGINT)
        (stopping,) = served.wait_for(r"^(\S+) .*received SIGINT: stopping (\d+) worker")
        acted = datetime.fromisoformat(stopping.group(1)).timestamp()  # zoned ISO 8601
        assert acted - sent < 0.5 + 1.0, f"acted on SIGINT {acted - sent:.3f}s after it"
        assert served.finish(timeout=60) == 0, served.text
    started = int(stopping.group(2))
    assert started < count
    assert len(re.findall(STARTED, served.text)) == started, "no worker started after SIGINT"
    assert "killing" not in served.text


def test_workers_start_at_a_bounded_rate() -> None:
    assert 0 < START_INTERVAL <= 0.1, "a start between two reads of the signal pipe"


@pytest.mark.timeout(60)
def test_bind_error_in_supervisor_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            weft_serve("_serving:handle", "--workers", "2", "--bind", f"127.0.0.1:{port}"),
            cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "worker" not in result.stderr  # none was started


# -- Unix sockets -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_workers_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    served = Served(weft_serve("_serving:handle", "--workers", "2", "--bind", f"unix:{path}"),
                    cwd=tmp_path)  # fmt: skip
    with served:
        served.wait_for(rf"listening on unix:{re.escape(str(path))} ")
        served.wait_for(READY, count=2)
        with Client(str(path)) as client:
            assert client.echo(b"over unix") == b"over unix"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not path.exists()


# -- what a worker is given -----------------------------------------------------------------


def test_worker_args_repeat_the_settings_without_bind_or_workers() -> None:
    flags: dict[str, Any] = {
        "handler": "app:handle",
        "manager": "gevent",
        "max_connections": "none",
        "full_wait": "-1",
        "proxy_protocol": True,
        "idle_timeout": None,
        "workers": "4",
        "bind": ["127.0.0.1:5000"],
        "manager_options": {"limit": 5, "mode": "fast"},
    }
    assert worker_args(flags, "conf/weft.toml") == [
        "app:handle",
        "--config=conf/weft.toml",
        "--manager=gevent",
        "--max-connections=none",
        "--full-wait=-1",
        "--proxy-protocol",
        "--manager-option=limit=5",
        "--manager-option=mode=fast",
        "--workers=1",
    ]


@pytest.mark.parametrize(
    "value",
    [
        5, -3, 0.25, 1e100, math.inf, -math.inf, True, False, "plain", "5", "true", "[1]",
        "with \"quotes\" and \\ and \n\t\x7f\x01 and é", "", [1, "a", [True]],
        {"a": 1, "b c": ["x"]}, date(2024, 1, 2), datetime(2024, 1, 2, 3, 4, 5, 6, timezone.utc),
        dtime(1, 2, 3),
    ],
)  # fmt: skip
def test_manager_options_reach_workers_unchanged(value: Any) -> None:
    assert parse_option_value(option_text(value)) == value


def test_nan_reaches_workers_as_nan() -> None:
    assert math.isnan(parse_option_value(option_text(math.nan)))


def test_exits_are_described_by_status_or_signal() -> None:
    assert describe_exit(0) == "0"
    assert describe_exit(3) == "3"
    assert describe_exit(-signal.SIGKILL) == "SIGKILL"


def test_supervisor_fd_must_be_open(tmp_path: Path) -> None:
    result = subprocess.run(
        weft_serve("_serving:handle", "--supervisor-fd", "987"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--supervisor-fd 987" in result.stderr
    assert "set by `weft serve --workers N`" in result.stderr


@pytest.mark.timeout(60)
def test_a_check_ends_with_its_process_whatever_it_left_behind(tmp_path: Path) -> None:
    """A check whose process left a child holding its stderr (an application that
    forks at import) kept the supervisor waiting for the pipe's end, 5 s on every start
    (an outside review). The check's stderr is a file: its own exit ends it."""
    from weft_core._supervise import run_check

    pid_file = tmp_path / "left.pid"
    leaves = (
        "import pathlib, subprocess, sys; child = subprocess.Popen(['sleep', '30']);"
        f" pathlib.Path({str(pid_file)!r}).write_text(str(child.pid));"
        " print('weft: a mistake', file=sys.stderr); sys.exit(2)"
    )
    began = time.monotonic()
    try:
        result = run_check([sys.executable, "-c", leaves], "_WEFT_TEST_CHECK", 20)
        took = time.monotonic() - began
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert result == (2, "weft: a mistake"), result
    assert took < 10, f"the check was waited for {took:.1f}s, past its own end"


def test_the_usr2_check_asks_for_a_check_that_binds_nothing(tmp_path: Path) -> None:
    """A USR2 to a weft older than the check: its marker unknown there, the check was
    that release's whole ``weft serve`` (it bound, or ran a supervisor on a shared
    port). ``--check-config`` is added, which any release checks without binding."""
    from weft_core._supervise import _new_image_fails

    seen = tmp_path / "argv.json"
    image = tmp_path / "image.py"
    image.write_text(
        f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    assert _new_image_fails([sys.executable, str(image), "serve", "app:handle"]) is None
    assert json.loads(seen.read_text()) == ["serve", "app:handle", "--check-config"]
