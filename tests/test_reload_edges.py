"""A reload that cannot start its new code, on one process (session 11's check).

A single ``weft serve`` given HUP or USR2 with broken new code abandoned the reload
as documented, then retired its own in-process server anyway (the worker count had
dropped to 0): the listener stayed bound and nothing accepted, with no exit for a
service manager to see. It now serves on. (The same check found that a drain or a
stop resets clients already queued in the listen backlog: left for a later round.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from _load import APP, APP_ASYNC, Load, wait_for_version, write_app
from _serving import Served, host_port, weft_serve

from weft_core import available_managers

LISTENING = r"\] weft: listening on (\S+) "
MANAGERS = ["threads", "gevent", "asyncio", "trio"]


def serve(folder: Path, manager: str) -> tuple[Served, tuple[str, int]]:
    if manager not in available_managers():
        pytest.skip(f"weft-{manager} is not installed")
    write_app(folder, "v1")
    handler = APP_ASYNC if manager in ("trio", "asyncio") else APP
    served = Served(
        weft_serve(handler, "-k", manager, "--bind", "127.0.0.1:0", "--graceful-timeout", "5",
                   "--control-socket", "off"),
        cwd=folder,
    )  # fmt: skip
    try:
        (match,) = served.wait_for(LISTENING)
        return served, host_port(match.group(1))
    except BaseException:
        served.kill()
        raise


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
        wait_for_version(address, "v1")
        load = Load(address, clients=3)
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
