"""`weft ctl` against a real `weft serve`: one process on every manager, and --workers.

Each test starts `weft serve` with a control socket of its own (``--control-socket``)
and drives it with the `weft ctl` command, as an operator would: the answers, what
they change for real clients, the log line each action leaves, and the exits. The
socket's own defences (other users, bad and stalled clients) are in test_ctl.py.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import (
    LISTENING,
    OUR_MANAGERS,
    READY,
    Client,
    Served,
    as_user,
    environment,
    handler_for,
    host_port,
    weft_serve,
)

from weft_core import available_managers
from weft_core._ctl import ControlError, request
from weft_core.testing._support import wait_until

pytestmark = pytest.mark.timeout(90)

MANAGERS = [m for m in OUR_MANAGERS if m in available_managers()]


def ctl(path: Path, *args: str, stdin: str | None = None, user: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``weft ctl --socket PATH ARGS``; its output once it exits."""
    done = subprocess.run(
        [sys.executable, "-m", "weft_core", "ctl", "--socket", str(path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
        user=user,
    )
    if check:
        assert done.returncode == 0, f"weft ctl {' '.join(args)}: {done.stderr}"
    return done


def peer_of(client: Client) -> str:
    host, port = client.sock.getsockname()
    return f"{host}:{port}"


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


def start(tmp_path: Path, control: Path, manager: str, *extra: str) -> Served:
    served = Served(
        weft_serve(handler_for(manager), "--manager", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", str(control), "--graceful-timeout", "20", *extra),
        cwd=tmp_path,
    )  # fmt: skip
    return served


@pytest.fixture(params=MANAGERS)
def one(
    request: pytest.FixtureRequest, tmp_path: Path, control: Path
) -> Iterator[tuple[Served, tuple[str, int]]]:
    """One `weft serve` process on each manager, its control socket at ``control``."""
    served = start(tmp_path, control, request.param, "--console")
    with served:
        (match,) = served.wait_for(LISTENING)
        yield served, host_port(match.group(1))
    assert "Traceback" not in served.text, served.text
    assert served.text.count("control socket for weft ctl at") == 1, "served once"


def test_status_connections_and_stacks_of_one_process(
    one: tuple[Served, tuple[str, int]], control: Path
) -> None:
    served, address = one
    with Client(address) as client:
        assert client.echo(b"ping") == b"ping"
        status = as_json(ctl(control, "status"))
        assert status["pid"] == served.proc.pid
        assert status["stats"]["accepted"] == 1 and status["stats"]["active"] == 1
        (conn,) = as_json(ctl(control, "connections"))
        assert conn["peer"] == peer_of(client)
        assert conn["bytes_in"] >= 4, "bytes count what the client sent"
        assert conn["bytes_out"] >= len(b"%d\n" % client.pid) + 4
        stacks = ctl(control, "stacks").stdout
        # The connection's own task is shown, whatever it is (a thread, a greenlet, a
        # coroutine): its handler is on the stack.
        assert "in handle" in stacks, stacks
    served.wait_for(rf"control: stacks by uid {os.geteuid()} \(pid \d+\)")


def test_pause_holds_new_clients_in_the_backlog_until_resume(
    one: tuple[Served, tuple[str, int]], control: Path
) -> None:
    served, address = one
    assert "paused" in ctl(control, "pause").stdout
    assert as_json(ctl(control, "status"))["paused"] is True
    waiting = socket.create_connection(address, timeout=20)  # the kernel completes it
    try:
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(1)  # nobody accepted it: no greeting
        ctl(control, "resume")
        waiting.settimeout(20)
        assert waiting.recv(64).strip().isdigit(), "accepted once resumed, nothing lost"
    finally:
        waiting.close()
    served.wait_for(rf"control: pause by uid {os.geteuid()}")
    served.wait_for(rf"control: resume by uid {os.geteuid()}")


def test_max_connections_lowered_and_raised_live(
    one: tuple[Served, tuple[str, int]], control: Path
) -> None:
    _, address = one
    with Client(address) as first:
        assert ctl(control, "set", "max-connections", "1").stdout.strip() == "max-connections 1"
        with socket.create_connection(address, timeout=20) as second:
            # Full: the default on_full answers nothing and closes (or holds it waiting);
            # either way the first connection is still served.
            assert first.echo(b"still") == b"still", "lowering the limit cut nobody"
            off = ctl(control, "set", "max-connections", "none", check=False)
            assert off.returncode == 1 and "turned on or off only while stopped" in off.stderr
            ctl(control, "set", "max-connections", "100")
            second.settimeout(20)
            data = second.recv(64)
            if data:  # held while full, then admitted: it is served now
                assert data.strip().isdigit()
    bad = ctl(control, "set", "max-connections", "many", check=False)
    assert bad.returncode == 2 and "whole number" in bad.stderr  # a wrong command line


def test_close_one_connection_by_its_task_id(
    one: tuple[Served, tuple[str, int]], control: Path
) -> None:
    _, address = one
    with Client(address) as keep, Client(address) as gone:
        peer = peer_of(gone)
        (target,) = [c for c in as_json(ctl(control, "connections")) if c["peer"] == peer]
        assert ctl(control, "close", target["task_id"], "5").stdout.startswith("closed")
        assert gone.rest() == b"", "its client sees the end"
        assert keep.echo(b"x") == b"x", "the others are still served"
        missing = ctl(control, "close", target["task_id"], check=False)
        assert missing.returncode == 1 and "no open connection has task id" in missing.stderr


def test_console_runs_beside_the_handlers(
    one: tuple[Served, tuple[str, int]], control: Path
) -> None:
    served, address = one
    with Client(address) as client:
        out = ctl(
            control, "console",
            stdin="server.stats()['active']\nimport os; os.getpid()\n",
        ).stdout  # fmt: skip
        assert ">>> 1\n" in out, out
        assert f">>> {served.proc.pid}\n" in out, out
        assert client.echo(b"after") == b"after"
    served.wait_for(rf"\[WARNING\] weft.ctl: control: console opened by uid {os.geteuid()}")


def test_two_consoles_never_wait_for_each_other(
    one: tuple[Served, tuple[str, int]], control: Path, tmp_path: Path
) -> None:
    """A console ran its code holding a process-wide lock (for sys.displayhook): a
    second console waited for the first's slowest statement, and under gevent's
    patching (the lock an OS lock, each console a greenlet of the hub's thread) that
    wait blocked the hub: the whole server hung, the first console with it. Here the
    first waits, in one statement, for a file the second creates."""
    _, address = one
    started, go = tmp_path / "started", tmp_path / "go"
    with subprocess.Popen(
        [sys.executable, "-m", "weft_core", "ctl", "--socket", str(control), "console"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment(),
    ) as first:  # fmt: skip
        try:
            first.stdin.write(  # type: ignore[union-attr]
                "import os, time\n"
                "for _ in [0]:\n"
                f"    open({str(started)!r}, 'w').close()\n"
                "    t = time.monotonic()\n"
                f"    while not os.path.exists({str(go)!r}) and time.monotonic() - t < 20:\n"
                "        time.sleep(0.02)\n"
                f"    seen = os.path.exists({str(go)!r})\n"
                "\n"
                "seen\n"
            )
            first.stdin.close()  # type: ignore[union-attr]
            wait_until(started.exists, 20, "the first console running its statement")
            with Client(address) as client:
                second = ctl(control, "console", stdin=f"open({str(go)!r}, 'w').close()\n2 + 2\n")
                assert ">>> 4\n" in second.stdout, second.stdout
                assert client.echo(b"beside") == b"beside", "the handlers are served meanwhile"
            out = first.stdout.read()  # type: ignore[union-attr]
            err = first.stderr.read()  # type: ignore[union-attr]
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0, err
    assert ">>> True\n" in out, f"the first console never saw the second's file: {out!r}"


def test_drain_exits_when_idle(one: tuple[Served, tuple[str, int]], control: Path) -> None:
    served, address = one
    client = Client(address)
    ctl(control, "drain", "20")
    refused = False
    try:
        socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        refused = True
    assert refused, "a drain stops accepting at once"
    assert client.echo(b"served") == b"served", "the open connection is not cut"
    client.close()
    assert served.finish(timeout=20) == 0
    assert not control.exists(), "the socket file goes with the server"


def test_drain_cuts_what_is_left_at_its_deadline(tmp_path: Path, control: Path) -> None:
    with start(tmp_path, control, "threads") as served:
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as client:
            began = time.monotonic()
            ctl(control, "drain", "1")
            assert served.finish(timeout=20) == 0
            assert time.monotonic() - began < 1 + 2 + 3, "by the deadline plus the stop's grace"
            assert client.rest() == b"", "the stayer was closed"


def test_reload_and_workers_make_one_process_a_supervisor(tmp_path: Path, control: Path) -> None:
    with start(tmp_path, control, "threads") as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        assert "SIGTTIN" in ctl(control, "workers", "+1").stdout
        served.wait_for(READY, count=2)
        status = as_json(ctl(control, "status"))
        assert status["pid"] == served.proc.pid, "the same process, now the supervisor"
        # The in-process server may still be listed, draining (leaving).
        assert len([w for w in status["workers"] if not w.get("leaving")]) == 2
        with Client(address) as client:
            assert client.pid != served.proc.pid, "served by a worker now"


@pytest.mark.parametrize("manager", MANAGERS)
def test_one_process_turned_supervisor_lists_and_closes_what_it_still_drains(
    tmp_path: Path, control: Path, manager: str
) -> None:
    """After a HUP, one process's own server drains its connections (up to the
    graceful timeout) while a worker serves new ones. Those connections were invisible
    to weft ctl (the supervisor asked only its workers): not listed, not closable,
    and ``status`` said nothing of them (the soak check's F6)."""
    with start(tmp_path, control, manager) as served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        with Client(address) as held:
            assert held.pid == served.proc.pid
            served.signal(signal.SIGHUP)
            served.wait_for("a worker is ready: the in-process server drains now")
            assert held.echo(b"still") == b"still", "served on while it drains"
            status = as_json(ctl(control, "status"))
            (mine,) = [w for w in status["workers"] if w["pid"] == served.proc.pid]
            assert mine["leaving"] is True and mine["result"]["stats"]["active"] == 1
            assert status["totals"]["active"] >= 1
            (conn,) = [c for c in as_json(ctl(control, "connections"))
                       if c["peer"] == peer_of(held)]  # fmt: skip
            assert conn["worker"] == served.proc.pid
            assert ctl(control, "close", conn["task_id"], "5").stdout.startswith("closed")
            assert held.rest() == b"", "its client sees the end"
        served.wait_for("the in-process server has drained")
        wait_until(lambda: all(w["pid"] != served.proc.pid
                               for w in as_json(ctl(control, "status"))["workers"]))  # fmt: skip
        with Client(address) as fresh:
            assert fresh.pid != served.proc.pid, "served by the worker"
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=30) == 0, served.text


def test_weft_ctl_is_answered_across_a_usr2_re_exec(tmp_path: Path, control: Path) -> None:
    """The control socket is kept open across the exec, as the listening sockets are.

    It was closed by the exec and bound afresh by the new image: for that tenth of a
    second ``weft ctl`` said "no weft serve is running" (outside check ops F5). A
    request the old image was answering as it exec'd may still be cut (the message
    says to ask again); none is refused.
    """
    with start(tmp_path, control, "threads", "--workers", "2") as served:
        served.wait_for(READY, count=2)
        answered, cut = 0, 0
        served.signal(signal.SIGUSR2)
        until = time.monotonic() + 20
        while "re-executed (pid" not in served.text or answered < 20:
            assert time.monotonic() < until, served.text
            try:
                status = request(str(control), "status", timeout=10)
            except ControlError as exc:
                assert "closed the connection without answering" in str(exc), str(exc)
                assert "re-executing on USR2" in str(exc)
                cut += 1
                continue
            assert status["pid"] == served.proc.pid
            answered += 1
        assert cut <= 2, f"{cut} requests cut; only one in flight at the exec could be"
        assert as_json(ctl(control, "status"))["pid"] == served.proc.pid
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not control.exists(), "the file is removed at the stop, by the image that kept it"


@pytest.mark.parametrize("manager", MANAGERS)
def test_weft_ctl_is_answered_after_a_usr2_of_one_process(
    manager: str, tmp_path: Path, control: Path
) -> None:
    """One process, each manager: after the re-exec the new image answers. On gevent
    the kept socket came back non-blocking (the old image's open file), the new
    image's accept() failed with EAGAIN, and weft ctl waited in the backlog of a
    socket nobody accepted on (an outside check's signal fuzzer)."""
    with start(tmp_path, control, manager) as served:
        served.wait_for(LISTENING)
        served.signal(signal.SIGUSR2)  # a supervisor of one worker, then the exec
        served.wait_for(r"re-executed \(pid")
        served.wait_for("worker ready on", count=2)
        assert request(str(control), "status", timeout=10)["pid"] == served.proc.pid
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=30) == 0, served.text
    assert "accept failed" not in served.text, served.text


@pytest.fixture
def workers(tmp_path: Path, control: Path) -> Iterator[tuple[Served, tuple[str, int]]]:
    served = start(tmp_path, control, "gevent", "--workers", "2", "--console")
    with served:
        served.wait_for(READY, count=2)
        (match,) = served.wait_for(LISTENING)
        yield served, host_port(match.group(1))


def test_supervisor_sums_the_workers(
    workers: tuple[Served, tuple[str, int]], control: Path
) -> None:
    served, address = workers
    clients = [Client(address) for _ in range(6)]
    try:
        pids = {c.pid for c in clients}
        status = as_json(ctl(control, "status"))
        assert status["pid"] == served.proc.pid
        assert {w["pid"] for w in status["workers"]} >= pids
        totals = status["totals"]
        assert totals["workers"] == totals["answered"] == 2
        each = [w["result"]["stats"] for w in status["workers"]]
        assert totals["accepted"] == sum(s["accepted"] for s in each) == 6
        assert totals["active"] == 6
        histogram = totals["durations"]
        assert all(histogram[k] == sum(s["durations"][k] for s in each) for k in histogram)
        listed = as_json(ctl(control, "connections"))
        assert sorted(c["worker"] for c in listed) == sorted(c.pid for c in clients)
        last = clients.pop()
        (mine,) = [c for c in listed if c["peer"] == peer_of(last)]
        closed = ctl(control, "close", f"{mine['worker']}:{mine['task_id']}").stdout
        assert closed.startswith("closed")
        assert last.rest() == b""
        last.close()
        answers = as_json(ctl(control, "pause"))
        assert [a.get("error") for a in answers] == [None, None]
        ctl(control, "resume")
        stacks = ctl(control, "stacks").stdout
        assert stacks.count("== worker ") == 2 and "== supervisor" in stacks
    finally:
        for client in clients:
            client.close()


def test_supervisor_resizes_reloads_and_relays_the_console(
    workers: tuple[Served, tuple[str, int]], control: Path
) -> None:
    served, _ = workers
    assert ctl(control, "workers", "+1").stdout.strip() == "workers +1: 3 now"
    served.wait_for(READY, count=3)
    wait_until(lambda: len(as_json(ctl(control, "status"))["workers"]) == 3, 20,
               "three workers answer")  # fmt: skip
    assert ctl(control, "workers", "-2").stdout.strip() == "workers -2: 1 now"
    wait_until(lambda: len(as_json(ctl(control, "status"))["workers"]) == 1, 30,
               "one worker is left")  # fmt: skip
    (before,) = [w["pid"] for w in as_json(ctl(control, "status"))["workers"]]
    ctl(control, "reload")
    wait_until(lambda: [w["pid"] for w in as_json(ctl(control, "status"))["workers"]]
               not in ([before], []), 30, "a new worker replaced the old")  # fmt: skip
    out = ctl(control, "console", stdin="import os; os.getppid()\n").stdout
    assert f">>> {served.proc.pid}\n" in out, "the console runs in a worker of this supervisor"
    ctl(control, "drain")
    assert served.finish(timeout=30) == 0
    assert not list(control.parent.glob("ctl.sock*")), "no socket file is left behind"


@pytest.mark.timeout(90)
def test_a_console_relayed_to_a_worker_that_does_not_answer_gives_up(
    workers: tuple[Served, tuple[str, int]], control: Path
) -> None:
    """The supervisor's console waits ANSWER_TIMEOUT for its worker, then says so.

    With the workers stopped (SIGSTOP: wedged, as far as anyone can tell), the relay
    waited for ever for the worker's first line, holding one of the supervisor's
    control slots and the operator's terminal. It must give up, say which worker did
    not answer, and leave the supervisor able to relay the next console.
    """
    from weft_core._ctl import ANSWER_TIMEOUT

    served, _ = workers
    pids = [w["pid"] for w in as_json(ctl(control, "status"))["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        done = ctl(control, "console", stdin="1\n", check=False)
        took = time.monotonic() - began
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert "did not answer within" in done.stdout + done.stderr, (done.stdout, done.stderr)
    assert took < ANSWER_TIMEOUT + 8, f"weft ctl console took {took:.1f}s"
    out = ctl(control, "console", stdin="import os; os.getppid()\n").stdout
    assert f">>> {served.proc.pid}\n" in out, "the next console is relayed as before"


@pytest.mark.timeout(90)
def test_a_console_relayed_to_a_worker_without_a_control_socket_says_so(
    workers: tuple[Served, tuple[str, int]], control: Path
) -> None:
    """A worker with no control socket (it could not open one, or another user took
    its name): the relay's connect raised, a traceback went to the supervisor's log
    and weft ctl console died with one of its own (local-attacker check 2, F7). Now
    the operator is told in one line, and the next console is relayed as before."""
    served, _ = workers
    pids = sorted(w["pid"] for w in as_json(ctl(control, "status"))["workers"])
    sockets = [Path(f"{control}.worker-{pid}") for pid in pids]
    for path in sockets:
        path.rename(path.with_name(path.name + ".away"))
    try:
        done = ctl(control, "console", stdin="1\n", check=False)
    finally:
        for path in sockets:
            path.with_name(path.name + ".away").rename(path)
    said = done.stdout + done.stderr
    assert said.startswith("weft console: worker ") and ".worker-" in said, said
    assert "Traceback" not in said + served.text, said + served.text
    out = ctl(control, "console", stdin="import os; os.getppid()\n").stdout
    assert f">>> {served.proc.pid}\n" in out, "the next console is relayed as before"


def test_console_is_off_unless_configured(tmp_path: Path, control: Path) -> None:
    with start(tmp_path, control, "threads") as served:
        served.wait_for(LISTENING)
        done = ctl(control, "console", stdin="1\n", check=False)
        assert done.returncode == 1
        assert "the console is off; set console = true" in done.stderr


def as_nobody(path: Path, command: str) -> str:
    """``weft ctl``'s request, as uid nobody, in a forked child: the error it gets."""
    nobody = pwd.getpwnam("nobody")

    def ask() -> str:
        request(str(path), command, timeout=10)
        return "answered"

    return as_user(nobody.pw_uid, ask, nobody.pw_gid)


def test_another_user_cannot_steer_it(tmp_path: Path) -> None:
    """As nobody, weft ctl gets a clear refusal, logged with its uid; the server goes on."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    shared = Path(tempfile.mkdtemp(prefix="weft-ctl-"))  # reachable by nobody (tmp_path is not)
    shared.chmod(0o755)
    control = shared / "ctl.sock"
    try:
        with start(tmp_path, control, "threads") as served:
            (match,) = served.wait_for(LISTENING)
            assert (control.stat().st_mode & 0o777) == 0o600
            refused = as_nobody(control, "pause")
            assert "permission denied on the control socket" in refused
            assert "belongs to uid 0" in refused
            assert request(str(control), "status")["paused"] is False
            with Client(host_port(match.group(1))) as client:
                assert client.echo(b"x") == b"x"
            # With the file's mode opened up, the kernel's SO_PEERCRED still says who.
            os.chmod(control, 0o666)
            refused = as_nobody(control, "pause")
            assert "closed the connection without answering" in refused
            nobody = pwd.getpwnam("nobody").pw_uid
            served.wait_for(rf"refused uid {nobody} \(pid \d+\): only uid 0 may steer")
            assert request(str(control), "status")["paused"] is False
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_no_server_and_an_off_socket_say_so(tmp_path: Path, control: Path) -> None:
    done = ctl(control, "status", check=False)
    assert done.returncode == 1
    assert f"no weft serve is running with the control socket {control}" in done.stderr
    (tmp_path / "weft.toml").write_text('control_socket = "off"\n')
    off = subprocess.run(
        [sys.executable, "-m", "weft_core", "ctl", "status"],
        capture_output=True, text=True, cwd=tmp_path, env=environment(), timeout=60,
    )  # fmt: skip
    assert off.returncode == 2 and "the control socket is off" in off.stderr


def test_a_configured_path_in_use_is_an_error(tmp_path: Path, control: Path) -> None:
    with start(tmp_path, control, "threads") as first:
        first.wait_for(LISTENING)
        with start(tmp_path, control, "threads") as second:
            assert second.finish(timeout=30) == 1
            assert "another weft serve answers on the control socket" in second.text
        assert request(str(control), "status")["pid"] == first.proc.pid


def test_the_default_path_in_use_is_a_warning(tmp_path: Path) -> None:
    """Two servers of one user, neither configuring a path: the second goes without.
    The first is not told of a bad request: the second's probe (connect, then close)
    sent nothing, and was logged at WARNING as one cut short (an outside check)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**environment(), "XDG_RUNTIME_DIR": str(runtime)}
    argv = weft_serve(handler_for("threads"), "--manager", "threads", "--bind", "127.0.0.1:0")
    with Served(argv, cwd=tmp_path, env=env) as first:
        first.wait_for(LISTENING)
        with Served(argv, cwd=tmp_path, env=env) as second:
            (match,) = second.wait_for(LISTENING)
            second.wait_for(r"\[WARNING\] weft.ctl: another weft serve answers on the default")
            with Client(host_port(match.group(1))) as client:
                assert client.echo(b"x") == b"x"
        default = runtime / "weft" / "ctl.sock"
        assert request(str(default), "status")["pid"] == first.proc.pid
        # A bad request is still one, said once: after the probe's.
        with socket.socket(socket.AF_UNIX) as bad:
            bad.connect(str(default))
            bad.sendall(b"not json\n")
            bad.recv(1024)
        first.wait_for("bad request from .*: a request is one JSON object on one line")
        assert first.text.count("bad request from") == 1, first.text


def test_a_worker_that_cannot_open_its_control_socket_serves_without_one(
    tmp_path: Path,
) -> None:
    """The control socket's directory removed under a running supervisor (a cleaner
    of /run, a full disk does the same): each new worker failed to make its own
    socket beside it, exited 1 and was restarted for ever, so a reload never ended
    (the supervisor check's F7). A worker now serves without one, saying so."""
    folder = tmp_path / "run"
    folder.mkdir()
    control = folder / "ctl.sock"
    with start(tmp_path, control, "threads", "--workers", "2") as served:
        served.wait_for(READY, count=2)
        shutil.rmtree(folder)
        served.signal(signal.SIGHUP)
        served.wait_for("this worker serves without a control socket", count=2)
        served.wait_for("reload done: 2 new worker")
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"served") == b"served"
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=30) == 0, served.text
