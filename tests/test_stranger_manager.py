"""An outsider's task manager, written from the docs alone, and copies of it broken on purpose.

``weft-test-stranger`` (``tests/plugins/weft-test-stranger``) runs tasks on a
``concurrent.futures.ThreadPoolExecutor``; it was written in session 11's outside
check from docs/writing-a-manager.md and weft_core's public names only, and is
registered through the ``weft`` entry-point group. ``stranger`` passes ``weft
conformance``; ``stranger-FLAW`` is the same manager with one flaw (``FLAWS`` in its
``_manager.py``). Each test failed before its fix: a flawed manager that passed the
suite, or a flaw weft reported or survived worse than it promises. The distribution
is installed into a folder of its own (``_plugin_dists``), seen only by the
subprocesses here, so no other test's registry lists it.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _plugin_dists import PluginDists
from _plugin_dists import plugin_dists as plugin_dists  # the session fixture

REPO = Path(__file__).parent.parent
#: STOP_GRACE as docs/deployment.md states it ("at most --graceful-timeout plus 2 s").
STOP_GRACE = 2.0
#: Slack on a measured bound, for a loaded 2-core machine.
SLACK = 3.0
#: The environment of every subprocess here: the stranger's distribution on the path.
_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def stranger_installed(plugin_dists: PluginDists) -> None:
    """The stranger's distribution, seen by this module's subprocesses only."""
    target = plugin_dists.target("weft-test-stranger")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH")) if p)
    _ENV.clear()
    _ENV.update(env)
    out = subprocess.run(
        [sys.executable, "-m", "weft_core", "managers"],
        capture_output=True, text=True, timeout=30, env=env,
    ).stdout  # fmt: skip
    assert "stranger-stop-raises" in out, f"the stranger plugin is not seen:\n{out}"


def _env() -> dict[str, str]:
    return dict(_ENV)


def _conformance(
    name: str, *pytest_args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft_core", "conformance", name, "-p", "no:cacheprovider", "-q",
         "--timeout=30", *pytest_args],
        capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(REPO), check=False,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_the_strangers_sound_manager_passes_the_suite() -> None:
    """The control: written from the docs alone, the sound manager passes every test."""
    done = _conformance("stranger", timeout=110)
    assert done.returncode == 0, done.stdout[-3000:]


# -- the suite is too weak where a manager cannot preempt -------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "flaw",
    [
        # stop_task(id, timeout) ignores timeout: waits on the task's done for ever.
        "stop-blocks",
        # after the timeout, stop_task returns False without state.interrupt(): the
        # task's on_interrupt callbacks never run.
        "never-interrupts",
        # stop_task returns True although the task had to be interrupted.
        "lies-true",
    ],
)
def test_conformance_rejects_a_stop_task_that_breaks_its_timeout_rules(flaw: str) -> None:
    """A non-preemptive manager whose stop_task breaks the timeout rules must fail the suite.

    docs/writing-a-manager.md, step 3's table: "when timeout runs out, interrupt the
    task | TaskState.interrupt() | test_stop_task_interrupts_after_timeout", each rule
    "checked by the conformance suite"; the checklist: "stop_task flags, waits,
    interrupts, and returns once the task ended ..., or after a short grace once it
    was interrupted"; managers.md: threads' stop_task "flag; after timeout, interrupt
    and wait at most INTERRUPT_GRACE". None of this needs preemption: interrupt()
    runs the task's on_interrupt callbacks (what wakes a thread blocked in I/O) and
    bounds the wait. The suite skipped test_stop_task_interrupts_after_timeout whole
    for preemptive_stop=False, so all three flaws passed ``weft conformance``;
    ``test_stop_task_times_out_into_an_interrupt`` now holds every manager to them.
    """
    done = _conformance(f"stranger-{flaw}", "-k", "stop_task")
    assert done.returncode != 0, (
        f"weft conformance passes stranger-{flaw}, whose stop_task breaks the timeout rules:\n"
        + done.stdout[-1500:]
    )


@pytest.mark.timeout(60)
def test_conformance_rejects_a_runtime_whose_close_keeps_its_threads() -> None:
    """A runtime whose close() releases nothing must fail the suite.

    Checklist of docs/writing-a-manager.md: "runtime.close() releases threads, loops
    or hubs". ``stranger-leaks-threads``' close() does nothing: every Server made by
    name leaves its executor's worker threads (non-daemon, so they also hold the
    interpreter's exit) alive for good. The whole suite passed it; now
    ``test_stop_releases_the_runtimes_threads`` fails it.
    """
    done = _conformance("stranger-leaks-threads", "-k", "releases_the_runtimes")
    assert done.returncode != 0, (
        "weft conformance passes a runtime whose close() keeps its threads:\n"
        + done.stdout[-1500:]
    )


# -- a stop_task that raises: the stop says clean, the listener stays open -------------------

STOP_PROBE = """
import json, os, socket, sys, threading
from weft_core import Server

def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)

server = Server(echo, manager=sys.argv[1], port=0)
server.run()
port = server.port
clean = server.stop(1)
left = server.stats()["left_behind"]
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    accepting = True
except OSError:
    accepting = False
acceptors = [t.name for t in threading.enumerate() if t.name.startswith("weft acceptor")]
print(json.dumps({"clean": clean, "left": left, "accepting": accepting, "acceptors": acceptors}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.timeout(40)
def test_stop_closes_the_listener_even_when_stop_task_raises() -> None:
    """After ``stop()`` the listener is closed, and a stop that could not say so is not True.

    docs/deployment.md, Stopping: "1. the listeners close, so new clients are
    refused". With a manager whose stop_task raises, Engine.stop_acceptors' loop
    (weft_core/_engine.py, stop_them) was cut at the first listener: every
    listener's close was skipped, and ``stop(1)`` returned True while the acceptor
    still ran and the port still accepted clients. Now each listener is woken and
    closed whatever the manager's stop_task does.
    """
    done = subprocess.run(
        [sys.executable, "-c", STOP_PROBE, "stranger-stop-raises"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
        check=False,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["accepting"], (
        f"the port still accepts clients after stop() returned {report['clean']}: {report}"
    )
    assert report["clean"] is False or report["acceptors"] == [], (
        f"stop() says clean while the acceptor still runs: {report}"
    )


def _serve(manager: str, *extra: str) -> tuple[subprocess.Popen[str], int | None, list[str]]:
    """``weft serve`` on a free port; the process, its port (None if it never listened), output."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weft_core",
            "serve",
            "examples.echo:handle",
            "--manager",
            manager,
            "--bind",
            "127.0.0.1:0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(REPO),
        env=_env(),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    # Read the descriptor itself: select() does not see what a file object's
    # readline() has buffered, so two lines that came in one read stalled the wait.
    fd = proc.stdout.fileno()
    partial = ""
    deadline = time.monotonic() + 15
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536).decode("utf-8", "replace")
        if not chunk:
            break
        *complete, partial = (partial + chunk).split("\n")
        lines += [line + "\n" for line in complete]
        for line in complete:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                return proc, int(found.group(1)), lines
    return proc, None, lines


@pytest.mark.timeout(40)
def test_weft_serve_exits_after_sigterm_when_stop_task_raises() -> None:
    """``weft serve`` stopped by SIGTERM exits within --graceful-timeout + 2 s, whatever the manager.

    docs/deployment.md: "So a stop takes at most --graceful-timeout plus 2 s, however
    the handlers behave ... A task still running then is left behind, and the process
    exits anyway." With ``stranger-stop-raises``, weft logs the traceback and "weft:
    stopped", then the process never exited: the acceptor sat in accept() on a
    listener nobody closed, holding a non-daemon executor thread the interpreter
    waits for at exit.
    """
    graceful = 1.0
    proc, port, lines = _serve("stranger-stop-raises", "--graceful-timeout", str(graceful))
    try:
        assert port is not None, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        try:
            rest, _ = proc.communicate(timeout=graceful + STOP_GRACE + SLACK)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            rest, _ = proc.communicate()
    assert exited, (
        f"weft serve had not exited {took:.1f}s after SIGTERM (bound {graceful} + {STOP_GRACE} s):\n"
        + "".join(lines)
        + (rest or "")
    )


@pytest.mark.timeout(40)
def test_weft_serve_reports_a_manager_whose_add_task_raises_in_one_line() -> None:
    """A manager that fails to start the acceptor gets one line naming it, not a traceback.

    DESIGN section 4 and the CLI's own convention ("weft: cannot import handler ...:
    AttributeError: ..."): errors as one line naming what was wrong and what to do.
    ``weft serve --manager stranger-add-raises`` died with weft's internals in a raw
    traceback, never naming the task manager; ``Server.run`` now raises a
    ServerError that does.
    """
    proc, port, lines = _serve("stranger-add-raises")
    try:
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            rest, _ = proc.communicate()
    output = "".join(lines) + (rest or "")
    assert port is None, output
    assert proc.returncode != 0, output
    assert "Traceback" not in output, f"weft serve prints a traceback:\n{output}"
    assert "stranger-add-raises" in output, f"the failing manager is not named:\n{output}"


PAUSE_PROBE = """
import json, os, socket, sys
from weft_core import Server

def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)

server = Server(echo, manager=sys.argv[1], port=0)
server.run()
server.pause_accepting()
waiting = socket.create_connection(("127.0.0.1", server.port), timeout=5)
waiting.sendall(b"x")
waiting.settimeout(0.5)
try:
    served_while_paused = waiting.recv(1) == b"x"
except TimeoutError:
    served_while_paused = False
server.resume_accepting()
waiting.settimeout(5)
served_after = waiting.recv(1) == b"x"
print(json.dumps({"while_paused": served_while_paused, "after": served_after}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.timeout(40)
def test_a_pause_holds_even_when_stop_task_raises() -> None:
    """pause_accepting() stops accepting whatever the manager's stop_task does.

    docs: "clients that connect meanwhile are queued by the kernel ... and served
    after resume_accepting()". With a stop_task that raises, the pause was only
    logged ("changing the listeners or the limit failed"): the server counted as
    paused while its acceptor went on serving, and a resume started a second one.
    Now the acceptor is woken and, seeing the pause, ends by itself.
    """
    done = subprocess.run(
        [sys.executable, "-c", PAUSE_PROBE, "stranger-stop-raises"],
        capture_output=True, text=True, timeout=30, env=_env(), check=False,
    )  # fmt: skip
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"while_paused": False, "after": True}, (report, done.stderr[-2000:])


@pytest.mark.timeout(40)
def test_weft_serve_refuses_a_manager_whose_add_task_returns_no_id() -> None:
    """An acceptor without a task id could be neither paused nor stopped: said at once.

    The suite catches such a manager only after many per-test timeouts; weft serve
    ran with it, its acceptor beyond the reach of every pause and stop.
    """
    proc, port, lines = _serve("stranger-add-returns-none")
    try:
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            rest, _ = proc.communicate()
    output = "".join(lines) + (rest or "")
    assert port is None and proc.returncode == 1, output
    assert "add_task returned None" in output and "Traceback" not in output, output
