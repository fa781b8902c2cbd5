"""A reload that cannot start its new code, on one process (session 11's check).

A single ``weft serve`` given HUP or USR2 with broken new code abandoned the reload
as documented, then retired its own in-process server anyway (the worker count had
dropped to 0): the listener stayed bound and nothing accepted, with no exit for a
service manager to see. It now serves on. (The same check found that a drain or a
stop resets clients already queued in the listen backlog: left for a later round.)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _reload_load import APPS, Load, write_app
from _serving import Served, environment, host_port, weft_serve

from weft_core import available_managers

LISTENING = r"\] weft: listening on (\S+) "
READY = r"\[(\d+)\] \[INFO\] weft: worker ready on"
MANAGERS = ["threads", "gevent", "asyncio", "trio"]


def need_manager(name: str) -> None:
    if name not in available_managers():
        pytest.skip(f"weft-{name} is not installed")


def serve(folder: Path, manager: str, *extra: str) -> tuple[Served, tuple[str, int]]:
    need_manager(manager)
    write_app(folder, "v1")
    served = Served(
        weft_serve(APPS[manager], "-k", manager, "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "5", "--control-socket", str(folder / "ctl.sock"),
                   *extra),
        cwd=folder,
    )  # fmt: skip
    try:
        (match,) = served.wait_for(LISTENING)
        return served, host_port(match.group(1))
    except BaseException:
        served.kill()
        raise


def hello(address: tuple[str, int], timeout: float = 5) -> bytes:
    """One connection's greeting line (b"VERSION PID\\n")."""
    with socket.create_connection(address, timeout=timeout) as sock:
        return sock.makefile("rb").readline()


def wait_serving(address: tuple[str, int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if hello(address):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{address} never served"
        time.sleep(0.05)  # pacing the probe


# -- 1. a broken HUP/USR2 on one process leaves nothing serving -----------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2], ids=["HUP", "USR2"])
@pytest.mark.parametrize("manager", MANAGERS)
def test_a_broken_reload_of_one_process_keeps_it_serving(
    tmp_path: Path, manager: str, signum: int
) -> None:
    """docs/deployment.md, Reloading: "If the new code cannot start (a worker exits with
    status 2 before it is ready: an import error ...), the reload is abandoned, logged at
    ERROR, and the old workers serve on". A single `weft serve` given HUP (or USR2) with
    a syntax error in its handler logs exactly that, then drains its own in-process
    server anyway: nothing accepts any more, clients hang in the backlog for ever."""
    served, address = serve(tmp_path, manager)
    with served:
        wait_serving(address)
        load = Load(address, clients=3, timeout=5)
        try:
            (tmp_path / "app.py").write_text("def handle(conn:\n    pass\n")
            for pyc in (tmp_path / "__pycache__").glob("app.*.pyc"):
                pyc.unlink()
            served.signal(signum)
            served.wait_for("the reload is abandoned and the old workers serve on")
            before = load.served
            deadline = time.monotonic() + 3
            while load.served < before + 20 and time.monotonic() < deadline:
                time.sleep(0.05)  # pacing: waiting for replies to be counted
        finally:
            load.stop()
        assert load.served >= before + 20 and not load.failures, (
            f"served {load.served - before} after the abandoned reload; failures"
            f" {dict(load.failures)}\n{served.text}"
        )
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


# -- 2. a drain resets the clients a pause queued ------------------------------------


def ctl(folder: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft_core", "ctl", "--socket", str(folder / "ctl.sock"),
         *command],
        capture_output=True, text=True, timeout=20, env=environment(),
    )  # fmt: skip
