"""The end of a stop at its edges: its hooks, ``on_stop`` and ``weft ctl console``.

docs/hooks.md: a ``stop(timeout)`` returns by its bound even while an earlier
stop's ``weft_server_stopped`` hook blocks; an ``on_stop`` raising SystemExit
skips no plugin's stopped hook. deployment.md: ``weft ctl console`` ended by the
server exits 0 or 1, never of SIGABRT. Found by an outside check (each failed
before its fix). Real sockets on 127.0.0.1, in-process Servers and ``weft serve``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _every_manager import MANAGERS, aecho, echo, is_async
from test_hooks import register

from weft_core import Server, hookimpl
from weft_core._engine import STOP_GRACE

__all__ = ["register"]

WAIT = 10.0


# -- weft_server_stopped: a blocking hook and a stop(timeout)'s bound ---------------------


class _BlockingStoppedHook:
    """A weft_server_stopped that blocks (a metrics push to a service that is down)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        self.entered.set()
        self.release.wait(60)  # bounded, so that the test's process never hangs


@pytest.fixture
def blocking_hook(register: Callable[[object], str]) -> Iterator[_BlockingStoppedHook]:
    plugin = _BlockingStoppedHook()
    register(plugin)
    try:
        yield plugin
    finally:
        plugin.release.set()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("first", ["stop_accepting", "stop"])
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_a_stop_with_a_timeout_returns_by_its_bound_while_an_unbounded_stops_hook_blocks(
    blocking_hook: _BlockingStoppedHook, manager: str, options: dict[str, Any], first: str
) -> None:
    """docs/hooks.md: a blocking stopped hook is "logged and left running, never holding
    the stop"; Server.stop: "with a timeout, within timeout plus STOP_GRACE seconds".
    A stop begun without a bound (stop_accepting()'s drain, or a plain stop() in
    another thread) runs the hooks unbounded; a stop(timeout=0.5) called then waits
    for that hook for ever instead of returning by 0.5 + STOP_GRACE."""
    server = Server(aecho if is_async(manager) else echo, manager=manager, manager_options=options)
    server.run()
    if first == "stop_accepting":
        server.stop_accepting()  # no connection open: its drain stops the server at once
    else:
        threading.Thread(target=server.stop, daemon=True).start()
    assert blocking_hook.entered.wait(WAIT), "the stopped hook ran"
    bound = 0.5 + STOP_GRACE
    result: list[object] = []
    stopper = threading.Thread(target=lambda: result.append(server.stop(timeout=0.5)), daemon=True)
    began = time.monotonic()
    stopper.start()
    stopper.join(bound + 3.0)
    took = time.monotonic() - began
    blocking_hook.release.set()
    stopper.join(WAIT)
    assert took < bound + 3.0, (
        f"after {first}(), with a stopped hook blocking: stop(timeout=0.5) had not returned "
        f"{took:.1f}s later (bound {bound:g}s); it returned only once the hook was released"
    )


class _OrderedHooks(_BlockingStoppedHook):
    """The blocking stopped hook, and the order in which the hooks begin and end."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    @hookimpl
    def weft_server_started(self, server: Server, addresses: list[str]) -> None:
        self.events.append("started")

    @hookimpl
    def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        self.events.append("stopped: begins")
        super().weft_server_stopped(server, stats)
        self.events.append("stopped: ends")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("manager", "options"), MANAGERS)
def test_an_on_stop_raising_systemexit_does_not_skip_the_plugins_stopped_hooks(
    register: Callable[[object], str], manager: str, options: dict[str, Any]
) -> None:
    """docs/hooks.md: weft_server_stopped runs "once per run, when the server has
    completely stopped ... after its on_stop callback". An on_stop that ends with
    sys.exit() (a program's cleanup that then exits) makes the stop skip every
    plugin's weft_server_stopped: a metrics plugin's final report is lost. An
    on_stop raising an Exception is logged and the hooks run; SystemExit is not
    caught (Server._call_on_stop catches Exception only)."""
    seen: list[dict[str, Any]] = []

    class FinalReport:
        @hookimpl
        def weft_server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
            seen.append(stats)

    register(FinalReport())

    def on_stop(server: Server) -> None:
        raise SystemExit(3)  # cleanup done: the program should end

    server = Server(
        aecho if is_async(manager) else echo,
        manager=manager,
        manager_options=options,
        on_stop=on_stop,
    )
    server.run()
    raised: BaseException | None = None
    try:
        server.stop(timeout=1)
    except BaseException as exc:  # the SystemExit may reach the caller: that is fine
        raised = exc
    assert len(seen) == 1, (
        f"on_stop raised SystemExit: the plugin's weft_server_stopped ran {len(seen)} times "
        f"(stop() raised {raised!r})"
    )


# -- weft ctl console: the server ends the console while the operator's input is open -----


@pytest.mark.timeout(60)
def test_weft_ctl_console_ended_by_the_server_exits_cleanly(tmp_path: Any) -> None:
    """deployment.md: `weft ctl` "exits 0, 1 when the server cannot be reached or
    refuses". Under --workers, a console asked for before a worker serves is answered
    "weft console: no worker is serving yet" and ended by the server; the client,
    whose stdin (a terminal, a pipe) is still open, then dies of SIGABRT: "Fatal
    Python error: _enter_buffered_busy: could not acquire lock for <stdin> at
    interpreter shutdown" (_ctl_cli._console: the daemon pump thread is inside
    sys.stdin.buffer's read when the main thread returns)."""
    import subprocess
    import sys

    from _serving import LISTENING, Served, environment, weft_serve

    ctl = str(tmp_path / "ctl.sock")
    flag = tmp_path / "workers-may-start"  # until it exists, no worker gets to serve
    env = {**environment(), "SLOW_START_FLAG": str(flag)}
    with Served(
        weft_serve("_operator_slow:handle", "--bind", "127.0.0.1:0", "--control-socket",
                   ctl, "--console", "--workers", "2"),
        cwd=tmp_path, env=env,
    ) as served:  # fmt: skip
        served.wait_for(LISTENING)  # the supervisor answers; no worker serves yet
        client = subprocess.Popen(
            [sys.executable, "-m", "weft_core", "ctl", "--socket", ctl, "console"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=environment(), cwd=tmp_path,
        )  # fmt: skip
        try:
            status = client.wait(WAIT)  # its stdin still open, as a terminal's is
        finally:
            if client.poll() is None:
                client.kill()
            out, err = client.communicate()  # closes the pipes
            flag.write_text("")
        assert b"no worker is serving yet" in out, out
        assert status in (0, 1) and b"Fatal Python error" not in err, (
            f"weft ctl console exited {status}; stdout {out!r}; stderr {err[-300:]!r}"
        )
