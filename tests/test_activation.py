"""Inherited sockets: systemd socket activation (``LISTEN_FDS``) and ``fd:N`` endpoints.

The parsing is tested in-process; serving runs real processes on loopback, started
by ``systemd-socket-activate`` (Debian package ``systemd``; skipped without it) or
handed a socket the test bound, with ``pass_fds``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _serving import (
    LISTENING,
    READY,
    Client,
    Served,
    environment,
    free_port,
    need,
    weft_serve,
)

from weft_core import ConfigError
from weft_core._activation import InheritedSocket, listen_fds, parse_listen_env

# -- reading the environment ----------------------------------------------------------------


def test_nothing_without_listen_pid() -> None:
    assert parse_listen_env({"LISTEN_FDS": "2"}, 100) == []


def test_sockets_for_another_process_are_ignored() -> None:
    assert parse_listen_env({"LISTEN_PID": "99", "LISTEN_FDS": "2"}, 100) == []


def test_sockets_start_at_fd_3_with_their_names() -> None:
    env = {"LISTEN_PID": "100", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    assert parse_listen_env(env, 100) == [InheritedSocket(3, "web"), InheritedSocket(4, "admin")]
    assert [s.endpoint for s in parse_listen_env(env, 100)] == ["fd:3", "fd:4"]


@pytest.mark.parametrize("names", [None, "", "only-one", "a::b", "a:b:c:d"])
def test_missing_or_mismatched_names_are_unknown(names: str | None) -> None:
    env = {"LISTEN_PID": "100", "LISTEN_FDS": "3"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    assert [s.name for s in parse_listen_env(env, 100)] == ["unknown"] * 3


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me' is not a process id"),
        ({"LISTEN_PID": "100", "LISTEN_FDS": "0"}, "LISTEN_FDS='0' is not a positive number"),
        ({"LISTEN_PID": "100", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a positive number"),
        ({"LISTEN_PID": "100", "LISTEN_FDS": "x"}, "LISTEN_FDS='x' is not a positive number"),
    ],
)
def test_malformed_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_listen_env(env, 100)


def test_variables_are_unset_even_when_not_for_us() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert listen_fds(env) == []
    assert env == {"OTHER": "kept"}


def test_variables_are_unset_after_an_error_too() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}
    with pytest.raises(ConfigError):
        listen_fds(env)
    assert env == {}


def test_unset_environment_false_keeps_them() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(env, unset_environment=False) == []
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


# -- systemd-socket-activate ----------------------------------------------------------------


def activate(tmp_path: Path, port: int, *args: str, fdname: str | None = None) -> Served:
    """weft serve under systemd-socket-activate, which execs it on the first connection."""
    tool = need("systemd-socket-activate")
    env = environment()
    # systemd-socket-activate passes only the variables it is told to (and PATH etc.).
    passed = [f"--setenv=PYTHONPATH={env['PYTHONPATH']}"]
    if fdname is not None:
        passed.append(f"--fdname={fdname}")
    served = Served(
        [tool, f"--listen=127.0.0.1:{port}", *passed, *weft_serve(*args)], cwd=tmp_path, env=env
    )
    served.wait_for(rf"Listening on 127\.0\.0\.1:{port} as 3\.")
    return served


@pytest.mark.timeout(60)
def test_socket_activation_serves_on_the_inherited_socket(tmp_path: Path) -> None:
    port = free_port()
    with activate(tmp_path, port, "_serving:handle", fdname="echo") as served:
        # The first connection makes systemd-socket-activate exec weft serve, in place.
        with Client(("127.0.0.1", port)) as client:
            assert client.pid == served.proc.pid
            assert client.echo(b"activated") == b"activated"
        ((address, manager),) = (m.groups() for m in served.wait_for(LISTENING))
        assert (address, manager) == (f"127.0.0.1:{port}", "threads")
        served.wait_for(r"using 1 socket\(s\) from socket activation: fd 3 \(echo\)")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_socket_activation_replaces_a_configured_bind(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_text('bind = "127.0.0.1:0"\nmanager = "gevent"\n')
    port = free_port()
    with activate(tmp_path, port, "_serving:handle") as served:
        with Client(("127.0.0.1", port)) as client:
            assert client.echo(b"configured") == b"configured"
        ((address, manager),) = (m.groups() for m in served.wait_for(LISTENING))
        assert (address, manager) == (f"127.0.0.1:{port}", "gevent")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_socket_activation_variables_are_not_inherited(tmp_path: Path) -> None:
    port = free_port()
    with activate(tmp_path, port, "_serving:report_env") as served:
        with Client(("127.0.0.1", port)) as client:
            assert json.loads(client.line()) == {}
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_socket_activation_with_workers(tmp_path: Path) -> None:
    port = free_port()
    with activate(tmp_path, port, "_serving:report_env", "--workers", "2") as served:
        with Client(("127.0.0.1", port)) as client:
            assert client.pid != served.proc.pid  # a worker served it, not the supervisor
            assert json.loads(client.line()) == {}
        served.wait_for(READY, count=2)
        served.wait_for(rf"listening on 127\.0\.0\.1:{port} ")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


#: systemd's part, for an IPv6 socket: listen on [::1] as fd 3, say so in LISTEN_*,
#: exec weft serve with the arguments given (the pid stays).
_ACTIVATE_IPV6 = """
import os, socket, sys
sock = socket.socket(socket.AF_INET6)
sock.bind(("::1", 0))
sock.listen()
os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
print("activated on port", sock.getsockname()[1], file=sys.stderr, flush=True)
os.execv(sys.executable, [sys.executable, "-m", "weft_core", "serve", *sys.argv[1:]])
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["ipv6", "dual"])
def test_socket_activation_with_workers_and_an_ipv6_family(tmp_path: Path, family: str) -> None:
    """A supervisor's start check had no LISTEN_FDS: it checked the default 127.0.0.1
    against family='ipv6' and refused to start (an outside review). The sockets systemd
    passes are the binds, and the check is skipped for them."""
    served = Served(
        [sys.executable, "-c", _ACTIVATE_IPV6, "_serving:handle", "--family", family,
         "--workers", "2", "--control-socket", "off"],
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        (match,) = served.wait_for(r"activated on port (\d+)")
        served.wait_for(READY, count=2)
        with Client(("::1", int(match.group(1)))) as client:
            assert client.echo(b"six") == b"six"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_bind_overrides_socket_activation(tmp_path: Path) -> None:
    port = free_port()
    with activate(tmp_path, port, "_serving:handle", "--bind", "127.0.0.1:0") as served:
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
            assert address != f"127.0.0.1:{port}"
            served.wait_for(r"ignoring 1 socket\(s\) from socket activation .*--bind/--fd")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_malformed_listen_fds_is_one_line_exit_2(tmp_path: Path) -> None:
    # sh's $$ is the pid weft serve gets, since exec keeps it.
    script = 'LISTEN_PID=$$ LISTEN_FDS=abc exec "$@"'
    result = subprocess.run(
        ["sh", "-c", script, "sh", *weft_serve("_serving:handle")],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "weft: environment: LISTEN_FDS='abc' is not a positive number of descriptors"
        " (systemd socket activation)"
    )


# -- fd:N and --fd N ------------------------------------------------------------------------


@pytest.fixture
def bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how", [["--bind", "fd:{fd}"], ["--fd", "{fd}"], ["--fd", "{fd}", "--workers", "2"]]
)
def test_serving_a_socket_passed_by_number(
    tmp_path: Path, bound: socket.socket, how: list[str]
) -> None:
    with bound:
        fd = bound.fileno()
        port = bound.getsockname()[1]
        args = [a.format(fd=fd) for a in how]
        with Served(weft_serve("_serving:handle", *args), cwd=tmp_path, pass_fds=[fd]) as served:
            ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
            assert address == f"127.0.0.1:{port}"
            with Client(("127.0.0.1", port)) as client:
                assert client.echo(b"by number") == b"by number"
            served.signal(signal.SIGTERM)
            assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_socket_passed_as_stdin_is_served_by_workers_too(
    tmp_path: Path, bound: socket.socket, workers: str
) -> None:
    """``--fd 0``: the listening socket as stdin (inetd's way, systemd's
    ``StandardInput=socket``). One process served it; under --workers every worker
    failed, "cannot listen on fd:0: Socket operation on non-socket" (its stdin is its
    own), and was restarted for ever, nothing served (the systemd check's F3)."""
    with bound:
        port = bound.getsockname()[1]
        argv = weft_serve("_serving:handle", "--fd", "0", "--workers", workers)
        with Served(argv, cwd=tmp_path, stdin_socket=bound) as served:
            served.wait_for(LISTENING)
            if workers != "1":
                served.wait_for(READY, count=int(workers))
            with Client(("127.0.0.1", port)) as client:
                assert client.echo(b"on stdin") == b"on stdin"
            served.signal(signal.SIGTERM)
            assert served.finish() == 0, served.text
    assert "Socket operation on non-socket" not in served.text


@pytest.mark.timeout(60)
def test_a_descriptor_that_is_not_open_is_a_bind_error(tmp_path: Path) -> None:
    result = subprocess.run(
        weft_serve("_serving:handle", "--bind", "fd:987"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot listen on fd:987" in result.stderr


#: A handler that starts a child the way ``os.system`` or a shell's ``&`` does, keeping
#: every inheritable descriptor (``close_fds=False``), and answers with its pid.
SPAWNING_APP = """
import subprocess

def handle(conn):
    child = subprocess.Popen(
        ["sleep", "60"], close_fds=False, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    conn.sendall(b"%d\\n" % child.pid)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how",
    [["--fd", "{fd}"], ["--fd", "{fd}", "--workers", "2"], ["--bind", "{addr}", "--workers", "2"]],
    ids=["fd", "fd-workers", "bind-workers"],
)
def test_a_handlers_child_does_not_inherit_the_listening_socket(
    tmp_path: Path, bound: socket.socket, how: list[str]
) -> None:
    """A listener weft adopts (``fd:N``, systemd's sockets, a worker's) is not inherited
    by what a handler starts: a child that outlives weft would keep the port
    listening, clients queued on it for ever and the next ``weft serve`` refused with
    "address in use". After weft exits the port must refuse connections."""
    (tmp_path / "spawning_app.py").write_text(SPAWNING_APP)
    fd = bound.fileno()
    port = bound.getsockname()[1]
    if "{addr}" in how[1]:
        bound.close()
        port = free_port()
    args = [a.format(fd=fd, addr=f"127.0.0.1:{port}") for a in how]
    pass_fds = [fd] if "{fd}" in how[1] else []
    children: list[int] = []
    try:
        with Served(
            weft_serve("spawning_app:handle", *args), cwd=tmp_path, pass_fds=pass_fds
        ) as served:
            served.wait_for(LISTENING)
            for _ in range(4):  # with workers, most likely from both
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    answer = b""
                    while not answer.endswith(b"\n") and (part := client.recv(64)):
                        answer += part
                    children.append(int(answer))
            if pass_fds:
                bound.close()  # ours: only weft's copy, and its children's, remain
            served.signal(signal.SIGTERM)
            assert served.finish() == 0, served.text
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        bound.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
