"""``weft serve --manager gevent``: patched before the handler's import, blocked hubs reported.

Each test runs ``python -m weft_core serve`` for real and talks to it over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(manager gevent\)")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "blocking_app.py").write_text(
        textwrap.dedent(
            """
            import os, socket, time
            import gevent.monkey

            PATCHED_AT_IMPORT = gevent.monkey.is_module_patched("socket")

            def handle(conn):
                what = conn.recv(100)
                if what == b"patched?":
                    conn.sendall(str(PATCHED_AT_IMPORT).encode())
                elif what == b"stdlib socket":
                    # A stdlib socket to a peer that answers late: blocks the hub unpatched.
                    with socket.create_connection(("127.0.0.1", int(os.environ["SLOW_PORT"]))) as s:
                        conn.sendall(s.recv(100))
                elif what == b"sleep":
                    # time.sleep until the test says go: unpatched, the first of these
                    # holds the hub and no other client is ever served.
                    conn.sendall(b"started\\n")
                    while not os.path.exists("go"):
                        time.sleep(0.02)
                    time.sleep(0.3)
                    conn.sendall(b"done\\n")
                else:
                    conn.sendall(b"quick")
            """
        )
    )
    (tmp_path / "self_patching_app.py").write_text(
        textwrap.dedent(
            """
            import gevent.monkey
            gevent.monkey.patch_all()

            def handle(conn):
                conn.recv(100)
                gevent.monkey.get_original("time", "sleep")(0.8)  # never yields
                conn.sendall(b"late")
            """
        )
    )
    return tmp_path


@pytest.fixture
def slow_peer() -> Iterator[tuple[int, threading.Event]]:
    """A listener that answers each client only once the event is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            release.wait(30)
            conn.sendall(b"slow answer")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], release
    release.set()
    listener.close()
    for conn in held:
        conn.close()


def start(
    app_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft_core", "serve", *args, "-k", "gevent", "-b", "127.0.0.1:0"],
        cwd=app_dir,
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if match := LISTENING.search(line):
            return proc, int(match.group(1))
    proc.wait()
    pytest.fail(f"weft serve exited {proc.returncode} before listening:\n{''.join(seen)}")


def ask(port: int, message: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(message)
        client.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: client.recv(100), b""))


def stop(proc: subprocess.Popen[str], *, signalled: bool = False) -> tuple[int, str]:
    """SIGTERM (unless sent already: a second one quits at once), then the exit status."""
    if not signalled and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.timeout(60)
def test_handler_module_is_imported_patched_and_stdlib_sockets_do_not_block_the_hub(
    app_dir: Path, slow_peer: tuple[int, threading.Event]
) -> None:
    slow_port, release = slow_peer
    proc, port = start(app_dir, "blocking_app:handle", env={"SLOW_PORT": str(slow_port)})
    try:
        assert ask(port, b"patched?") == b"True"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as waiting:
            waiting.sendall(b"stdlib socket")
            # While that handler waits on its stdlib socket, another client is served:
            # unpatched, the whole hub would wait with it and this would time out.
            assert ask(port, b"hello", timeout=5) == b"quick"
            release.set()
            assert waiting.recv(100) == b"slow answer"
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.timeout(60)
def test_sigterm_under_load_lets_sleeping_handlers_finish(app_dir: Path) -> None:
    proc, port = start(app_dir, "blocking_app:handle", "--graceful-timeout", "20")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    signalled = False
    try:
        for client in clients:
            client.sendall(b"sleep")
        for client in clients:  # every handler is inside time.sleep now
            assert client.recv(8) == b"started\n"
        proc.send_signal(signal.SIGTERM)
        signalled = True
        (app_dir / "go").touch()  # the handlers finish while the server drains
        for client in clients:
            assert b"".join(iter(lambda c=client: c.recv(100), b"")) == b"done\n"
    finally:
        for client in clients:
            client.close()
        code, err = stop(proc, signalled=signalled)
    assert code == 0, err


@pytest.mark.timeout(60)
def test_patch_false_and_a_self_patching_app_still_get_the_blocked_hub_report(
    app_dir: Path,
) -> None:
    proc, port = start(
        app_dir, "self_patching_app:handle", "-o", "patch=false", "-o", "max_blocking_time=0.2"
    )
    try:
        assert ask(port, b"x") == b"late"
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "weft.gevent: the gevent hub was blocked for over 0.2s" in err
    # The report names the line that blocks.
    assert re.search(
        r'self_patching_app\.py", line \d+, in handle\n +gevent\.monkey\.get_original', err
    )


def test_a_weft_gevent_variable_is_said_not_to_be_read(app_dir: Path) -> None:
    """``WEFT_GEVENT_PATCH=false`` reads as an option, and the process was patched all
    the same, unsaid (an outside check of the config surfaces): it is a warning that
    names the manager option to set, said once (weft's config says it; the plugin
    says only what names no option, as ``WEFT_GEVENT_FOO``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env.update(WEFT_GEVENT_PATCH="false", WEFT_GEVENT_FOO="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "weft_core", "serve", "blocking_app:handle", "-k", "gevent",
         "--check-config"],
        cwd=app_dir, env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    patch = [line for line in done.stderr.splitlines() if "WEFT_GEVENT_PATCH" in line]
    assert patch == [
        "weft: warning: ignoring WEFT_GEVENT_PATCH: the gevent manager reads no variable of"
        " that name; its option 'patch' is set as WEFT_MANAGER_OPTIONS_PATCH (or -o patch=...)"
    ], done.stderr
    foo = [line for line in done.stderr.splitlines() if "WEFT_GEVENT_FOO" in line]
    assert len(foo) == 1 and "this plugin reads no variable of its own" in foo[0], done.stderr
