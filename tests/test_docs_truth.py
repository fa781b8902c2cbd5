"""An outside check of the docs: what README.md, docs/*.md and the CLI's own help
promise, checked against what the code does when run for real.

Each test quotes the doc line it holds the code (or the doc) to, with its file:line;
each failed when session 11's check wrote it (the docstrings say how) and passes
since the code, or the text, was mended. A user who believes the docs literally is
misled either way.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import LISTENING, Served, environment, weft_serve

from weft_core import HandlerKindError, Server, available_managers

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.timeout(60)


def _weft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft_core", *args],
        capture_output=True,
        text=True,
        timeout=40,
        env=environment(),
        cwd=cwd,
    )


@pytest.fixture
def served_ctl(tmp_path: Path) -> Iterator[Path]:
    """One `weft serve` (threads) with its own control socket; yields the socket path."""
    control = tmp_path / "ctl.sock"
    served = Served(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--control-socket",
                   str(control), "--graceful-timeout", "5"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        served.wait_for(LISTENING)
        yield control


# -- weft ctl ---------------------------------------------------------------------------


def test_ctl_help_does_not_offer_none_that_a_running_server_refuses(served_ctl: Path) -> None:
    """docs/deployment.md:404: "`weft ctl set max-connections N` | the limit, at once,
    up or down; ... A limit is turned on or off (`none`) only by a restart: a running
    server refuses it, saying so".

    The server does refuse it (the doc is right), but `weft ctl --help` still says
    "set max-connections N  change the limit at once ('none' for no limit)", and the
    error for a bad value says "takes a whole number or 'none'": both send the user to
    a value that is then refused (weft_core/_ctl_cli.py, weft_core/_ctl_commands.py).
    """
    refused = _weft("ctl", "--socket", str(served_ctl), "set", "max-connections", "none")
    assert refused.returncode == 1, refused  # what the doc says: refused while running
    assert "while running" in refused.stderr

    helptext = _weft("ctl", "--help").stdout
    bad = _weft("ctl", "--socket", str(served_ctl), "set", "max-connections", "abc").stderr
    offers = [line.strip() for line in (helptext + bad).splitlines() if "'none'" in line]
    assert not offers, f"weft ctl offers 'none' for a running server, which refuses it: {offers}"


@pytest.mark.parametrize(
    "args",
    [("bogus",), ("set", "foo", "3"), ("set", "max-connections", "abc")],
    ids=["unknown-command", "unknown-setting", "not-a-number"],
)
def test_ctl_wrong_command_line_exits_2_without_a_server(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """docs/deployment.md:412-413: "`weft ctl` exits 0, 1 when the server cannot be
    reached or refuses, 2 for a wrong command line."

    `weft ctl bogus` (no such command), `weft ctl set foo 3`, `weft ctl set
    max-connections abc` are mistakes in the command line; weft ctl does not check
    them itself (as it does for `drain abc` and `status extra`, exit 2), so with no
    server it says "no weft serve is running ..." and exits 1: the user is sent to
    start a server for a typo.
    """
    done = _weft("ctl", "--socket", str(tmp_path / "none.sock"), *args)
    assert done.returncode == 2, (
        f"weft ctl {' '.join(args)}: exit {done.returncode}, {done.stderr.strip()!r}"
    )


def test_ctl_wrong_command_line_exits_2_with_a_server(served_ctl: Path) -> None:
    """docs/deployment.md:412-413: "`weft ctl` exits 0, 1 when the server cannot be
    reached or refuses, 2 for a wrong command line."

    With a server running, the same typos come back from the server and exit 1, like
    a refusal; while `weft ctl drain abc` exits 2. A script cannot tell "fix the
    command" from "the server said no".
    """
    got = {}
    for args in (("bogus",), ("set", "foo", "3"), ("set", "max-connections", "abc"),
                 ("drain", "abc")):  # fmt: skip
        done = _weft("ctl", "--socket", str(served_ctl), *args)
        got[" ".join(args)] = (done.returncode, done.stderr.strip())
    wrong = {k: v for k, v in got.items() if v[0] != 2}
    assert not wrong, f"wrong command lines that did not exit 2: {wrong}"


# -- the handler-kind message --------------------------------------------------------------


@pytest.mark.parametrize(
    "manager", [m for m in ("threads", "gevent") if m in available_managers()]
)
def test_handler_kind_error_names_every_installed_async_manager(manager: str) -> None:
    """README.md:86-87: "A handler of the wrong kind (an `async def` on `threads`, a
    plain function on `trio`) is refused when the `Server` is made, with a message
    saying what to do."

    The message for an `async def` on a sync manager says "choose a manager that runs
    async handlers (trio)", hard-coded (weft_core/_server.py:Server._check_kind),
    though `asyncio` is installed and runs exactly that handler (README.md:71-79:
    `async def echo_asyncio(stream)` on `manager="asyncio"`).
    """
    if "asyncio" not in available_managers():
        pytest.skip("weft-asyncio is not installed")

    async def echo(stream):  # type: ignore[no-untyped-def]
        while data := await stream.read(65536):
            stream.write(data)
            await stream.drain()

    Server(echo, manager="asyncio")  # it runs there
    with pytest.raises(HandlerKindError) as refused:
        Server(echo, manager=manager)
    hint = str(refused.value).partition("handlers:")[2]  # what to do, not the name
    assert hint, refused.value
    assert "asyncio" in hint, (
        f"the hint names no asyncio, where this handler runs: {refused.value}"
    )


# -- --check-config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manager", "option"),
    [("threads", "idle_threads"), ("threads", "idle_expiry"), ("asyncio", "loop")],
)
def test_check_config_shows_the_managers_options(
    tmp_path: Path, manager: str, option: str
) -> None:
    """docs/deployment.md:51-53: "`--check-config` prints every setting, its effective
    value and where it came from, then imports the handler and makes the Server as
    `weft serve` would (the manager and its options, ...)"; README.md:110: "each
    setting, its value and where it came from".

    It prints `manager_options.limit = null  # default` for every manager, but not the
    options the manager's own README documents with their defaults
    (plugins/weft-threads/README.md: `idle_threads` 64, `idle_expiry` 10.0;
    docs/managers.md: asyncio's `loop="asyncio"` (default) or `"uvloop"`), unless a
    flag sets them: an operator cannot see which loop or thread cache is in effect.
    """
    if manager not in available_managers():
        pytest.skip(f"{manager} is not installed")
    handler = "_serving:handle_async" if manager == "asyncio" else "_serving:handle"
    done = _weft("serve", handler, "--check-config", "-k", manager, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^manager_options\.limit = ", done.stdout, re.M)  # shown
    assert re.search(rf"^manager_options\.{option} = .*# default", done.stdout, re.M), (
        f"--check-config -k {manager} does not show manager_options.{option}:\n"
        + "\n".join(line for line in done.stdout.splitlines() if "manager" in line)
    )


# -- weft-prometheus, as docs/hooks.md describes it ---------------------------------------


def test_hooks_doc_describes_the_prometheus_endpoint_as_it_answers() -> None:
    """docs/hooks.md:517-519: "The endpoint (`weft_prometheus._exporter`) is a small
    HTTP server in a daemon thread answering `GET /metrics` ..., one request at a
    time, each bounded by `SCRAPE_TIMEOUT` (10 s), so a stalled scraper holds it for
    at most that long".

    The code answers each scrape in a thread of its own (MAX_SCRAPES = 8), so a
    stalled connection holds nobody (plugins/weft-prometheus/README.md says so, and
    that is what happens below). The worked example in docs/hooks.md is stale.
    """
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from weft_prometheus._exporter import MAX_SCRAPES, SCRAPE_TIMEOUT, Exporter

    exporter = Exporter(CollectorRegistry(), "127.0.0.1", 0, reuse_port=False)
    exporter.open()
    try:
        port = exporter.port
        assert port
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5),  # stalls
            socket.create_connection(("127.0.0.1", port), timeout=5) as scraper,
        ):
            began = time.monotonic()
            scraper.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := scraper.recv(65536):
                reply += chunk
            took = time.monotonic() - began
        assert reply.startswith(b"HTTP/1."), reply[:100]
        assert took < SCRAPE_TIMEOUT / 2, f"the scrape waited {took:.1f}s behind a stalled one"
    finally:
        exporter.close()
    assert MAX_SCRAPES > 1

    text = (ROOT / "docs" / "hooks.md").read_text()
    stale = re.search(r"one\s+request\s+at\s+a\s+time", text)
    assert stale is None, (
        "docs/hooks.md says the metrics endpoint answers one request at a time, "
        f"but it answers up to {MAX_SCRAPES} at once and a stalled one holds nobody"
    )


def test_ctl_without_a_command_does_not_require_an_argument() -> None:
    """docs/deployment.md:400-411 (the `weft ctl` table): `status`, `pause`, `reload`,
    `stacks` take no argument. `weft ctl` alone says "the following arguments are
    required: COMMAND, ARG": ARG is not required (`weft ctl status` has none)."""
    done = _weft("ctl")
    assert done.returncode == 2, done
    assert "ARG" not in done.stderr.splitlines()[-1], done.stderr.strip()


def test_ctl_unknown_command_lists_every_documented_command(served_ctl: Path) -> None:
    """docs/deployment.md:411: "`weft ctl console` | a Python REPL inside the server".

    The server's answer to an unknown command lists the known ones: close,
    connections, drain, pause, reload, resume, set, stacks, status, workers; no
    `console` (weft_core/_ctl.py, the dispatch that answers "unknown command")."""
    done = _weft("ctl", "--socket", str(served_ctl), "bogus")
    known = done.stderr.partition("known:")[2]
    assert known, done.stderr
    assert "console" in known, done.stderr.strip()
