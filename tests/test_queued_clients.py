"""Clients the kernel queued before weft set up its listener get weft's socket options.

``nodelay`` and ``keepalive`` apply "on each accepted TCP connection"
(docs/networking.md). Linux copies them from the listener when a connection's
handshake completes, so weft sets them once, on the listener, as its engine starts.
Connections completed before that took none: clients that connected while the
workers imported the application (the supervisor binds first), or before an
inherited socket reached weft (a socket activation's first client). From an
outside check of 2026-12-05 (both failed: the early client had TCP_NODELAY 0 and
SO_KEEPALIVE 0 for its whole life, on every manager; trio sets TCP_NODELAY itself).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from _serving import Served, environment, free_port, weft_serve

from weft_core import available_managers

MANAGERS = [
    name for name in ("threads", "gevent", "trio", "asyncio") if name in available_managers()
]
BOTH = "nodelay=1 keepalive=1"


def _handler(manager: str) -> str:
    return "_sockopts_app:" + ("handle_async" if manager in ("trio", "asyncio") else "handle")


def _answer(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        return client.recv(100).decode().strip()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", MANAGERS)
@pytest.mark.parametrize("reuse_port", [False, True], ids=["shared", "reuse-port"])
def test_a_client_queued_while_the_workers_import_gets_the_options(
    tmp_path: Path, manager: str, reuse_port: bool
) -> None:
    """``--workers 2 --keepalive``: a client that connects while both workers import."""
    gate = tmp_path / "gate"
    env = environment()
    env.update(WEFT_TEST_GATE=str(gate), WEFT_TEST_GATE_PARENT=str(os.getpid()))
    port = free_port()
    args = [_handler(manager), "-k", manager, "-b", f"127.0.0.1:{port}", "--keepalive",
            "--control-socket", "off", "-w", "2", *(["--reuse-port"] if reuse_port else [])]  # fmt: skip
    with Served(weft_serve(*args), cwd=tmp_path, env=env) as served:
        served.wait_for(r"listening on", timeout=30)
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("gate.*"))) < 2:  # both workers wait in their import
            assert time.monotonic() < deadline, served.text
            time.sleep(0.02)
        early = socket.create_connection(("127.0.0.1", port), timeout=20)
        with early:
            gate.write_text("go")
            early_answer = early.recv(100).decode().strip()
        served.wait_for(r"worker ready", count=2, timeout=30)
        later = {_answer(port) for _ in range(4)}
        served.signal(signal.SIGTERM)
        assert served.finish(timeout=30) == 0
    assert later == {BOTH}, later
    assert early_answer == BOTH, f"a client queued while the workers imported: {early_answer}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", MANAGERS)
def test_a_client_queued_before_an_inherited_socket_reached_weft_gets_the_options(
    tmp_path: Path, manager: str
) -> None:
    """One process, ``--fd N --keepalive``: the client that connected before weft started."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    os.set_inheritable(listener.fileno(), True)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as first:
        argv = weft_serve(_handler(manager), "-k", manager, "--fd", str(listener.fileno()),
                          "--keepalive", "--control-socket", "off")  # fmt: skip
        with Served(argv, cwd=tmp_path, pass_fds=[listener.fileno()]) as served:
            listener.close()
            first_answer = first.recv(100).decode().strip()
            served.wait_for(r"listening on", timeout=30)
            later = _answer(port)
            served.signal(signal.SIGTERM)
            assert served.finish(timeout=30) == 0
    assert later == BOTH, later
    assert first_answer == BOTH, f"the client queued before weft started: {first_answer}"
