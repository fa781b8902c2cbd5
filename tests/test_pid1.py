"""`weft serve` as PID 1, as in a container: SIGTERM drains it and it exits 0.

The process really is PID 1 of a fresh PID namespace (`unshare --pid --fork`), so
the kernel gives it no default signal handling: weft's own SIGTERM handler must act.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serving import environment

from weft_core._signals import STOP_REPEAT_WINDOW

ROOT = Path(__file__).parent.parent

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root"),
]


def test_sigterm_to_pid_1_drains_and_exits_0() -> None:
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            sys.executable,
            "-m",
            "weft_core",
            "serve",
            "examples.echo:handle",
            "--bind",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=environment(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "listening on" not in line:  # other lines may come first (weft.ctl)
            line = proc.stderr.readline()
        assert "listening on" in line, line
        assert "[1]" in line, f"weft serve is not PID 1 in its namespace: {line}"
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (weft,) = map(int, children)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            os.kill(weft, signal.SIGTERM)  # what `docker stop` sends to PID 1
            assert client.recv(1) == b"", "the idle connection is ended by the drain"
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _pid1(folder: Path, handler: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """``weft serve handler`` as PID 1 of a new PID namespace; it and weft's host pid."""
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "weft_core",
         "serve", handler, "--bind", "127.0.0.1:0", "--control-socket", "off", *extra],
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        env=env,
    )  # fmt: skip
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 20
    while not children.read_text().split():  # unshare forks weft at once
        assert time.monotonic() < deadline, "unshare started nothing"
        time.sleep(0.01)
    return proc, int(children.read_text().split()[0])


HOLDING = """\
import time


def hold(conn):
    conn.sendall(b"+")
    while True:  # ignores its end of input: only an interruption ends it
        try:
            if not conn.recv(100):
                time.sleep(0.05)
        except OSError:
            return
"""


def test_a_second_sigterm_to_pid_1_quits_at_once(tmp_path: Path) -> None:
    """The log says "send it again to quit at once": as PID 1 it did nothing, since the
    kernel spares PID 1 the default action weft gave the signal back (an outside
    check: the stop ran its whole graceful timeout, then exit 4)."""
    (tmp_path / "holding.py").write_text(HOLDING)
    proc, weft = _pid1(tmp_path, "holding:hold", "--graceful-timeout", "30")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "listening on" not in line:
            line = proc.stderr.readline()
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(1) == b"+"
            os.kill(weft, signal.SIGTERM)
            line = proc.stderr.readline()
            while line and "received SIGTERM: stopping" not in line:
                line = proc.stderr.readline()
            time.sleep(STOP_REPEAT_WINDOW)  # past the window: a second request, not a repeat
            began = time.monotonic()
            os.kill(weft, signal.SIGTERM)
            assert proc.wait(10) == 128 + signal.SIGTERM
            assert time.monotonic() - began < 5, "it waited for the graceful timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


SLOW_IMPORT = """\
import pathlib
import time

pathlib.Path("importing").touch()
time.sleep(30)  # an application that takes long to import


def handle(conn):
    conn.sendall(b"served\\n")
"""


def test_a_sigterm_to_pid_1_while_the_application_imports_stops_it(tmp_path: Path) -> None:
    """``docker stop`` as the container boots: TERM kept its default action during
    the start, which the kernel does not apply to PID 1, so the TERM was lost and the
    container served on until its SIGKILL (an outside check)."""
    (tmp_path / "slowapp.py").write_text(SLOW_IMPORT)
    proc, weft = _pid1(tmp_path, "slowapp:handle")
    try:
        assert proc.stderr is not None
        # weft's hold is in once its package is imported: the application's import
        # begins after it, and says so.
        deadline = time.monotonic() + 20
        while not (tmp_path / "importing").exists():
            assert time.monotonic() < deadline, "weft never began importing the application"
            time.sleep(0.01)
        os.kill(weft, signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
