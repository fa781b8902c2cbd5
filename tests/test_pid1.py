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
from pathlib import Path

import pytest
from _serving import environment

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
