"""`weft ctl` and the control socket at their edges, as an operator and as a
hostile local user, on real ``python -m weft_core serve`` processes.

Each test is a documented promise (docs/deployment.md "Steering a running server",
the control socket's own docstrings) or what any serious server does, and each
failed before its fix (an outside check's findings): the docstrings say what
broke. Real processes, real Unix and TCP sockets on loopback; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _serving import (
    LISTENING,
    READY,
    Client,
    Served,
    environment,
    handler_for,
    host_port,
    weft_serve,
)

from weft_core import _ctl, available_managers
from weft_core._ctl import MAX_CLIENTS, REQUEST_TIMEOUT, ControlError, ControlSocket, request
from weft_core.testing._support import wait_until

#: The client's own bound on one command, shortened for the test: `weft ctl` run with
#: ``_ctl_cli.ANSWER_WAIT`` (30 s) set to this, by WEFT_CTL_SHORT_WAIT.
CTL_TIMEOUT = 4.0
#: `python -c` that runs `weft ctl ARGS` with its answer wait set to CTL_TIMEOUT.
WEFT_CTL_SHORT_WAIT = (
    "import sys; import weft_core._ctl_cli as c; from weft_core._cli import main; "
    f"c.ANSWER_WAIT = {CTL_TIMEOUT}; sys.exit(main(sys.argv[1:]))"
)


def need_manager(name: str) -> None:
    if name not in available_managers():
        pytest.skip(f"weft-{name} is not installed")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other users")


def serve(tmp_path: Path, control: Path | str, manager: str, *extra: str, **popen: Any) -> Served:
    need_manager(manager)
    return Served(
        weft_serve(handler_for(manager), "--manager", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", str(control), "--graceful-timeout", "20", *extra),
        cwd=tmp_path,
        **popen,
    )  # fmt: skip


def ctl(
    path: Path | str, *args: str, timeout: float = 60, **run: Any
) -> subprocess.CompletedProcess[str]:
    """``weft ctl --socket PATH ARGS``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "weft_core", "ctl", "--socket", str(path), *args],
        capture_output=True, text=True, timeout=timeout, env=environment(),
        stdin=subprocess.DEVNULL, **run,
    )  # fmt: skip


def served_now(address: tuple[str, int]) -> bool:
    """True if a new TCP client gets the handler's greeting (its pid line)."""
    try:
        with socket.create_connection(address, timeout=2) as client:
            return client.recv(64).strip().isdigit()
    except OSError:
        return False


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


# -- a hostile local user and the default path ----------------------------------------------

ATTACKER = r"""
import json, os, socket, sys
shared, uid = sys.argv[1], sys.argv[2]
folder = os.path.join(shared, "weft-" + uid)
os.mkdir(folder)
os.chmod(folder, 0o777)
path = os.path.join(folder, "ctl.sock")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
os.chmod(path, 0o777)
listener.listen(4)
listener.settimeout(40)
print("ready", flush=True)
while True:
    try:
        conn, _ = listener.accept()
    except OSError:
        break
    with conn:
        conn.settimeout(5)
        try:
            got = conn.recv(65536)
        except OSError:
            got = b""
        print("got", got.decode("utf-8", "replace").strip(), flush=True)
        forged = {"ok": True, "result": {"pid": 1, "paused": False, "forged": "by uid nobody"}}
        conn.sendall(json.dumps(forged).encode() + b"\n")
"""


@pytest.mark.timeout(60)
def test_weft_ctl_does_not_talk_to_a_socket_another_user_planted_at_its_default_path(
    tmp_path: Path,
) -> None:
    """docs/deployment.md: the default socket is ``weft-UID/ctl.sock`` in the temporary
    directory, 'the directory is made 0700', and 'only the server's user and root are
    answered'. The server checks that directory (_ctl._private_directory refuses one
    another user owns); the client does not. Any local user can create
    /tmp/weft-UID/ before the operator's weft ctl runs (or while the server uses
    $XDG_RUNTIME_DIR and the operator's shell, after su or sudo, has none), listen
    there, receive the operator's commands (a console's input too) and have weft ctl
    print a forged answer with exit 0. Expected: weft ctl refuses a socket, or its
    directory, that is neither its user's nor root's (as tmux and ssh-agent do), and
    sends it nothing. Cause: _ctl.connect / _ctl.request (no owner check of the
    path, nor SO_PEERCRED of the server)."""
    need_root()
    victim, nobody = 4242, 65534
    shared = Path(tempfile.mkdtemp(prefix="weft-probe-tmp-"))
    shared.chmod(0o1777)  # what /tmp is: anyone may create, the sticky bit protects
    attacker = subprocess.Popen(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
         sys.executable, "-c", ATTACKER, str(shared), str(victim)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr
        env = {k: v for k, v in environment().items() if k != "XDG_RUNTIME_DIR"}
        env.update(TMPDIR=str(shared), HOME=str(shared))
        done = subprocess.run(
            ["setpriv", f"--reuid={victim}", f"--regid={victim}", "--clear-groups",
             sys.executable, "-m", "weft_core", "ctl", "status"],
            capture_output=True, text=True, timeout=40, env=env, cwd="/",
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        attacker.kill()
        heard, _ = attacker.communicate(timeout=10)
        shutil.rmtree(shared, ignore_errors=True)
    assert "forged" not in done.stdout and done.returncode != 0, (
        f"uid {victim}'s `weft ctl status` took the answer of uid {nobody}'s socket at "
        f"{shared}/weft-{victim}/ctl.sock: exit {done.returncode}, printed {done.stdout!r}; "
        f"the planted socket received: {heard.strip()!r}"
    )
    assert "command" not in heard, f"the operator's request reached uid {nobody}: {heard!r}"


# -- the control socket as a protocol ----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_a_deeply_nested_request_gets_one_line_saying_why(
    tmp_path: Path, control: Path, manager: str
) -> None:
    """_ctl.py: a bad request is answered ``{"ok": false, "error": TEXT}``
    (test_ctl.test_a_bad_request_gets_one_line_saying_why). A request well under
    MAX_REQUEST whose args nest 30,000 arrays deep (valid JSON) makes json.loads raise
    RecursionError, which _read_request does not catch (only ValueError): the request's
    thread dies with a traceback on the server's stderr and the client is closed with
    no answer at all. Expected: one JSON error line, no traceback."""
    with serve(tmp_path, control, manager) as served:
        served.wait_for(LISTENING)
        depth = 30_000
        sent = b'{"command": "status", "args": {"x": ' + b"[" * depth + b"]" * depth + b"}}\n"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(15)
            s.connect(str(control))
            s.sendall(sent)
            answer = s.makefile("rb").readline()
        still = request(str(control), "status", timeout=10)
        assert still["running"] is True
        assert answer, (
            "a valid JSON request nested 30,000 deep got no answer, the connection closed; "
            f"the server's log:\n{served.text[-1500:]}"
        )
        reply = json.loads(answer)
        assert reply["ok"] is False and reply["error"], reply
        assert "Traceback" not in served.text, served.text[-1500:]


@pytest.mark.timeout(60)
def test_clients_dripping_a_request_do_not_hold_the_socket_past_its_request_timeout(
    tmp_path: Path, control: Path
) -> None:
    """_ctl.REQUEST_TIMEOUT: 'How long a client gets to send its request (a stalled
    client must not pin a thread)'; with MAX_CLIENTS requests served at once, more are
    answered 'busy'. The 10 s is a timeout per recv, not for the request: a client
    that sends one byte a second never reaches it. MAX_CLIENTS such clients (any
    process of the server's user: a stuck script, a half-written tool) hold every slot
    for as long as they like, and the operator's `weft ctl` is told 'busy' for ever.
    Expected: each is cut off REQUEST_TIMEOUT after it connected, and the owner is
    answered again. Cause: _ctl.ControlSocket._answer (conn.settimeout per operation)
    and _read_line."""
    with serve(tmp_path, control, "threads") as served:
        served.wait_for(LISTENING)
        drippers = []
        stop = threading.Event()
        try:
            for _ in range(MAX_CLIENTS):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(control))
                drippers.append(s)

            def drip() -> None:
                while not stop.wait(1.0):
                    for s in drippers:
                        try:
                            s.sendall(b" ")
                        except OSError:
                            pass  # cut off: as it should be

            threading.Thread(target=drip, daemon=True).start()
            began = time.monotonic()
            answers: list[str] = []

            def answered() -> bool:
                try:
                    request(str(control), "status", timeout=3)
                except ControlError as exc:
                    answers.append(str(exc))
                    return False
                return True

            try:
                wait_until(answered, REQUEST_TIMEOUT + 10, "weft ctl status answered")
            except AssertionError:
                pytest.fail(
                    f"{MAX_CLIENTS} clients sending a byte a second still held every request "
                    f"slot {time.monotonic() - began:.0f}s after they connected (REQUEST_TIMEOUT "
                    f"is {REQUEST_TIMEOUT:g}s); the owner's last answer: {answers[-1:]}"
                )
        finally:
            stop.set()
            for s in drippers:
                s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "gevent", "trio"])
def test_the_control_socket_outlives_a_descriptor_shortage(
    tmp_path: Path, control: Path, manager: str
) -> None:
    """DESIGN: the acceptor 'must survive EMFILE/ENFILE/ENOBUFS/ENOMEM without spinning'
    (_acceptpolicy: 'These pass when something else closes, so back off and try again;
    never exit'). The TCP acceptor does; the control socket's does not: its accept
    loop (_ctl.ControlSocket._serve) returns on any error but EINTR/ECONNABORTED,
    logging 'accept failed (...); closed'. One `weft ctl` while clients have used up
    the descriptors kills the control socket for the life of the process: once the
    clients are gone and TCP is served again, every `weft ctl` waits out its timeout
    ('no answer'), since the socket still listens but nobody accepts. Expected: the
    control socket backs off as the acceptor does and answers once descriptors are
    back."""
    limit = 64

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with serve(tmp_path, control, manager, "--max-connections", "1000",
               preexec_fn=few_descriptors) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        assert request(str(control), "status", timeout=10)["running"] is True
        clients: list[socket.socket] = []
        try:
            for _ in range(limit + 16):
                client = socket.create_connection(address, timeout=5)
                clients.append(client)
                client.settimeout(2)
                try:
                    greeting = client.recv(64)
                except (TimeoutError, OSError):
                    greeting = b""
                if not greeting:  # not served: the server is out of descriptors
                    break
            else:
                pytest.fail(f"{limit + 16} clients served under a limit of {limit} descriptors")
            # Operators ask while the server is out of descriptors: a few at once (a
            # blocked accept() holds a descriptor of its own, the acceptor a spare),
            # so that the control socket's accept() meets EMFILE.
            asking = []
            for _ in range(4):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(3)
                s.connect(str(control))
                asking.append(s)
            for s in asking:
                s.sendall(b'{"command": "status"}\n')
            # Their answers are not the point (nobody may accept them): wait for them
            # 3 s in all, not 3 s each.
            until = time.monotonic() + 3
            for s in asking:
                s.settimeout(max(0.05, until - time.monotonic()))
                try:
                    s.recv(65536)
                except OSError:
                    pass
                s.close()
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: served_now(address), 20, "TCP clients served again")
        try:
            status = request(str(control), "status", timeout=10)
        except ControlError as exc:
            pytest.fail(
                f"{manager}: TCP is served again, but the control socket no longer answers "
                f"({exc}); the log:\n"
                + "".join(line for line in served.lines if "weft.ctl" in line)[-1200:]
            )
        assert status["running"] is True


# -- paths ---------------------------------------------------------------------------------------


def path_of_length(tmp_path: Path, length: int, created: list[str]) -> Path:
    base = str(tmp_path)
    if len(base) > length - 20:
        base = tempfile.mkdtemp(prefix="w")
        created.append(base)
    path = Path(base) / ("c" * (length - len(base) - 1))
    assert len(str(path)) == length
    return path


@pytest.mark.timeout(60)
def test_a_control_path_the_workers_cannot_bind_does_not_leave_nothing_serving(
    tmp_path: Path,
) -> None:
    """docs/deployment.md: under --workers each worker has its own socket 'beside the
    supervisor's, ctl.sock.worker-PID'. A configured control_socket of 100 characters
    fits a Unix socket (108 bytes), so the supervisor binds it and logs 'listening
    on'; each worker's path is 13 characters longer and does not: every worker exits 1
    before it is ready ('cannot listen on the control socket ...: None'), is restarted
    with a growing pause (up to 10 s), for ever: no worker is ever ready, and a client
    is served only by luck, by a worker about to exit (cut, or left waiting, else). Expected: the path refused at start, before anything listens (or the
    workers serve without a socket of their own)."""
    created: list[str] = []
    try:
        control = path_of_length(tmp_path, 100, created)
        with Served(
            weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--workers", "2",
                       "--control-socket", str(control)),
            cwd=tmp_path,
        ) as served:  # fmt: skip
            outcome: list[str] = []

            def settled() -> bool:
                if served.proc.poll() is not None:
                    outcome.append(f"exited {served.proc.returncode}")
                    return True
                if len(re.findall(READY, served.text)) >= 2:
                    outcome.append("served")  # both workers ready: they serve
                    return True
                return False

            try:
                wait_until(settled, 25, "served, or refused")
            except AssertionError:
                pytest.fail(
                    "with a 100-character control_socket and --workers 2, no worker was ready "
                    "within 25s (each exits 1 as it starts; a client is served now and then by "
                    "one about to exit, cut or left waiting otherwise) and the server did not "
                    "exit; its log:\n" + "".join(served.lines[-6:])
                )
            if outcome == ["served"]:
                return
            assert served.proc.returncode in (1, 2)
            assert "too long" in served.text.lower() and "listening on" not in served.text
    finally:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_control_path_too_long_for_a_unix_socket_says_why(tmp_path: Path) -> None:
    """A control_socket longer than a Unix socket address holds: weft serve exits 1 with
    'cannot listen on the control socket PATH: None' (the OSError 'AF_UNIX path too
    long' has no errno nor strerror; _ctl.ControlSocket.open formats exc.strerror).
    Expected: one line that says the path is too long (and its limit)."""
    created: list[str] = []
    try:
        control = path_of_length(tmp_path, 120, created)
        with serve(tmp_path, control, "threads") as served:
            status = served.finish(timeout=30)
            served.wait_closed()
    finally:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [line for line in served.lines if "control socket" in line]
    assert status != 0 and lines, served.text
    assert ": None" not in served.text and "too long" in served.text.lower(), lines


# -- weft ctl as a client ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"[1, 2]\n", b"\xc3\x28 not utf-8\n"],
    ids=["http", "json-list", "bad-utf8"],
)
def test_weft_ctl_says_in_one_line_that_a_socket_answers_garbage(
    tmp_path: Path, answer: bytes
) -> None:
    """docs/deployment.md: `weft ctl` 'exits 0, 1 when the server cannot be reached or
    refuses, 2 for a wrong command line', and every other failure is one line
    ('weft ctl: ...'). Pointed (--socket) at a socket that is not weft's, which answers
    something else, weft ctl dies with a Python traceback (JSONDecodeError,
    AttributeError 'list' object has no attribute 'get', UnicodeDecodeError). Cause:
    _ctl.request (json.loads and answer.get unchecked)."""
    path = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(30)

    def answer_once() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                conn.recv(65536)
                conn.sendall(answer)
            except OSError:
                pass

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        done = ctl(path, "status", timeout=45)
    finally:
        thread.join(10)
        listener.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("weft ctl: "), done.stderr


DRIP = r"""
import os, socket, sys, time
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(4)
conn, _ = listener.accept()
conn.recv(65536)
print("asked", flush=True)
end = time.monotonic() + 55
while time.monotonic() < end:
    if sys.argv[2] == "drip":
        conn.sendall(b"x")
    time.sleep(0.5)
"""


#: (command, how its peer misbehaves): a socket that drips bytes and never ends a line,
#: and one that never answers at all.
UNBOUNDED = (("status", "drip"), ("console", "silent"))


@pytest.mark.timeout(60)
def test_weft_ctl_is_bounded_by_its_timeout(tmp_path: Path) -> None:
    """A `weft ctl` command that gets no answer gives up after its timeout (30 s:
    'no answer from PATH within 30s', exit 1; shortened here to CTL_TIMEOUT, the same
    code). Two ways it once did not: the timeout counted per recv, so a socket that
    sends a byte every half second without a newline (not weft's; anything at a wrong
    --socket path) held `weft ctl status` until 16 MiB had come; and `weft ctl console`
    connected with no timeout at all, then waited for the first answer line, so a
    server that never answers (a gevent server whose hub a handler blocks) hung it
    for ever. Expected: both end within the client's timeout with exit 1 and one line
    naming it. The two run side by side, each against its own peer: one wait of the
    timeout, not two."""
    peers: list[subprocess.Popen[str]] = []
    commands: list[tuple[str, str, subprocess.Popen[str]]] = []
    try:
        for command, how in UNBOUNDED:
            path = tmp_path / f"{how}.sock"
            peers.append(subprocess.Popen(
                [sys.executable, "-c", DRIP, str(path), how],
                stdout=subprocess.PIPE, text=True, env=environment(),
            ))  # fmt: skip
            wait_until(path.exists, 10, f"the {how} socket")
            argv = [
                sys.executable,
                "-c",
                WEFT_CTL_SHORT_WAIT,
                "ctl",
                "--socket",
                str(path),
                command,
            ]
            commands.append((command, how, subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL, env=environment(),
            )))  # fmt: skip
        began = time.monotonic()
        for command, how, proc in commands:
            try:
                _, stderr = proc.communicate(
                    timeout=max(CTL_TIMEOUT + 10 - (time.monotonic() - began), 1)
                )
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"`weft ctl {command}` against a socket that {'drips bytes' if how == 'drip' else 'never answers'}"
                    f" still waited after {time.monotonic() - began:.0f}s (its timeout: {CTL_TIMEOUT:g}s)"
                )
            assert proc.returncode == 1 and "Traceback" not in stderr, (command, stderr)
            assert f"within {CTL_TIMEOUT:g}s" in stderr, (command, stderr)
    finally:
        for _, _, proc in commands:
            proc.kill()
            proc.communicate()
        for peer in peers:
            peer.kill()
            peer.wait(10)
            assert peer.stdout is not None
            peer.stdout.close()


# -- commands against what the docs say ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_limit_every_worker_refuses_exits_1_under_workers(tmp_path: Path, control: Path) -> None:
    """docs/deployment.md: `weft ctl` 'exits 0, 1 when the server cannot be reached or
    refuses'; `set max-connections none` on a running server is refused ('A limit is
    turned on or off only by a restart: a running server refuses it, saying so'), and
    with one process weft ctl exits 1 with the reason (test_ctl_serve). Under
    --workers the supervisor fans `set` (and pause, resume) out and returns each
    worker's refusal inside a successful answer: exit 0, a JSON list of errors on
    stdout, nothing on stderr; a script checking $? believes the limit was changed.
    Cause: _ctl_commands.supervisor_commands (each(): no answer is ever an error).
    Expected: exit 1 when every worker refused, saying why."""
    with serve(tmp_path, control, "threads", "--workers", "2") as served:
        served.wait_for(READY, count=2)
        done = ctl(control, "set", "max-connections", "none")
        assert done.returncode == 1 and "turned on or off only" in done.stderr, (
            f"every worker refused, yet weft ctl exit {done.returncode}, "
            f"stdout {done.stdout.strip()!r}, stderr {done.stderr.strip()!r}"
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "trio"])
def test_drain_seconds_under_workers_cut_at_that_deadline_without_killing(
    tmp_path: Path, control: Path, manager: str
) -> None:
    """docs/deployment.md: `weft ctl drain [SECONDS]`: 'stop accepting, exit once the
    open connections have ended, or after SECONDS ... cut what is left' (one process:
    test_ctl_serve.test_drain_cuts_what_is_left_at_its_deadline). Under --workers
    the supervisor takes SECONDS as its own graceful timeout (Supervisor.drain) but
    only sends each worker the DRAIN byte, and the worker drains with its configured
    --graceful-timeout (_worker_link._maybe_drain). With --graceful-timeout 20 and
    `drain 1`, a worker holding an idle client is still draining at 1 + EXIT_MARGIN,
    the supervisor SIGKILLs it ('still running 6s after a drain request: killing
    it') and exits 1. Expected: the client cut at about 1 s, exit 0. (With SECONDS
    above --graceful-timeout the workers cut early instead.)"""
    with serve(tmp_path, control, manager, "--workers", "2") as served:
        served.wait_for(READY, count=2)
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"between two requests\n") == b"between two requests\n"
            began = time.monotonic()
            done = ctl(control, "drain", "1")
            assert done.returncode == 0, done.stderr
            status = served.finish(timeout=30)
            took = time.monotonic() - began
        killed = [line for line in served.lines if "killing it" in line or "SIGKILL" in line]
        assert status == 0 and not killed, (
            f"`weft ctl drain 1` under --workers 2: exit {status} after {took:.1f}s; {killed}"
        )
        assert took < 1 + 2 + 3, f"the drain took {took:.1f}s"


@pytest.mark.timeout(60)
def test_workers_plus_n_on_one_process_says_what_it_does(tmp_path: Path, control: Path) -> None:
    """docs/deployment.md: on one process `weft ctl workers +1` makes it the supervisor
    of two workers (as SIGTTIN) and more at once is refused. It answered 'workers +3:
    this process becomes their supervisor' and made two: nothing said the other two
    were dropped. Now +3 is refused with one line saying how, changing nothing, and
    +1 then +2 make four."""
    with serve(tmp_path, control, "threads") as served:
        served.wait_for(LISTENING)
        refused = ctl(control, "workers", "+3")
        assert refused.returncode == 1 and "workers +1" in refused.stderr, refused.stderr
        done = ctl(control, "workers", "+1")
        assert done.returncode == 0, done.stderr
        served.wait_for(READY, count=2)
        more = ctl(control, "workers", "+2")
        assert more.returncode == 0 and "4 now" in more.stdout, (more.stdout, more.stderr)
        served.wait_for(READY, count=4, timeout=20)


@pytest.mark.timeout(60)
# trio too (2 of 3 runs: its connection may end before the wait begins); threads every run.
@pytest.mark.parametrize("manager", ["threads"])
def test_close_with_a_long_timeout_closes_the_connection(
    tmp_path: Path, control: Path, manager: str
) -> None:
    """docs/deployment.md: `weft ctl close [PID:]TASK_ID [SECONDS]`; SECONDS is 'a
    finite number, 0 or more' (_ctl.timeout_seconds), so `close ID 1e10` (an operator's
    'take your time') is accepted by weft ctl. The server's close waits on a
    deadline that overflows: OverflowError, logged with a traceback ('control: close
    failed'), and weft ctl exits 1 with 'OverflowError: timestamp out of range for
    platform time_t', the connection's input already ended. Expected: closed as with any other SECONDS (or refused as a wrong
    command line, exit 2, before anything is done)."""
    with serve(tmp_path, control, manager) as served:
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as gone:
            gone.sock.sendall(b"hold\n")
            assert gone.line() == b"holding"
            (target,) = json.loads(ctl(control, "connections").stdout)
            done = ctl(control, "close", target["task_id"], "1e10")
            if done.returncode == 2:
                return  # refused as a wrong command line: fine
            assert done.returncode == 0 and done.stdout.startswith("closed"), (
                f"exit {done.returncode}: {(done.stdout + done.stderr).strip()!r}"
            )
        assert "Traceback" not in served.text, served.text[-1500:]


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


@pytest.mark.timeout(60)
def test_workers_plus_a_huge_n_is_refused_and_the_service_goes_on(
    tmp_path: Path, control: Path
) -> None:
    """docs/deployment.md 'How many workers the machine holds': before anything starts,
    `--workers` is checked against RLIMIT_NPROC and MemAvailable, and too many is one
    line naming the limit (exit 2). `weft ctl workers +N` skips that check
    (Supervisor.resize only adds), and the supervisor's next turn builds a list of N
    pending starts at once (Supervisor._balance: _due.extend(... range(missing))):
    `weft ctl workers +1000000000` (a typo away from +1) has the supervisor allocate
    tens of GB, which on this machine (no swap) ends with the OOM killer. Here the
    supervisor's address space is capped at +400 MB over its size, so it meets
    MemoryError instead: weft ctl answered 'workers +1000000000: 1000000001 now',
    exit 0, then the supervisor died with a traceback and its workers stopped.
    Expected: refused as --workers would be (exit 1, naming the limit), the service
    unchanged."""
    with serve(tmp_path, control, "threads", "--workers", "2") as served:
        served.wait_for(READY, count=2)
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        pid = served.proc.pid
        cap = _vm_size(pid) + 400 * 2**20
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))  # the supervisor only
        done = ctl(control, "workers", "+1000000000")
        try:
            served.proc.wait(3)
        except subprocess.TimeoutExpired:
            pass
        alive = served.proc.poll() is None
        assert done.returncode == 1 and alive and served_now(address), (
            f"`weft ctl workers +1000000000`: exit {done.returncode} "
            f"({(done.stdout + done.stderr).strip()!r}); supervisor "
            f"{'alive' if alive else f'exited {served.proc.returncode}'}; its log:\n"
            + "".join(served.lines[-8:])
        )


@pytest.mark.timeout(60)
def test_status_answers_the_documented_jq_path_on_one_process(
    tmp_path: Path, control: Path
) -> None:
    """docs/deployment.md: 'Results print as JSON (`weft ctl status | jq
    .totals.active`)'; README: `weft ctl status | jq .totals  # stats, per worker and
    summed`. One process (the default) answers {"pid", ..., "stats": {...}} with no
    "totals", so the documented jq prints null; only a supervisor has "totals" (and
    no "stats"), so no one jq path reads both. Expected: `.totals.active` is the open
    connections on one process too (or the docs name the path that works)."""
    with serve(tmp_path, control, "threads") as served:
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"x") == b"x"
            status = json.loads(ctl(control, "status").stdout)
        assert (status.get("totals") or {}).get("active") == 1, (
            f"`weft ctl status | jq .totals.active` on one process reads null: {sorted(status)}"
        )


@pytest.mark.timeout(60)
def test_clients_that_never_read_their_answers_give_their_slots_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that asks for a long answer (a stack dump) and never reads it held its
    thread, and MAX_CLIENTS of them every slot, for ever: weft ctl then got "busy"
    until the server restarted. An answer now goes out within ANSWER_TIMEOUT or is
    dropped, and the slot with it."""
    monkeypatch.setattr(_ctl, "ANSWER_TIMEOUT", 1.0, raising=False)
    path = str(tmp_path / "ctl.sock")
    long_answer = "x" * (8 * 1024 * 1024)  # far more than the socket buffers hold
    control = ControlSocket(
        path, {"dump": lambda args, peer: long_answer, "ping": lambda args, peer: "pong"}
    )
    control.open()
    control.start()
    stuck: list[socket.socket] = []
    try:
        for _ in range(MAX_CLIENTS):
            client = socket.socket(socket.AF_UNIX)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(path)
            client.sendall(b'{"command": "dump"}\n')
            stuck.append(client)  # and never read

        def answered() -> bool:
            try:
                return request(path, "ping", timeout=5) == "pong"
            except ControlError:  # "busy" while the slots are held
                return False

        wait_until(answered, timeout=20, what="a slot given back by a client that never read")
    finally:
        for client in stuck:
            client.close()
        control.close()
