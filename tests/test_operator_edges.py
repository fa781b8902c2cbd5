"""An operator's outside check of ``weft serve``: config, signals, workers, metrics.

Each test is a documented promise that did not hold when session 11's outside check
wrote it (the docstrings say what broke), and holds since its fix. Real ``python -m
weft_core serve`` processes on 127.0.0.1; each waits on log lines, replies and
exits, bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import (
    Client,
    Served,
    environment,
    free_port,
    host_port,
    weft_serve,
)

from weft_core import available_managers

LISTENING = r"\] weft: listening on (\S+) \(manager (\S+)\)"
WORKER_READY = r"\[(\d+)\] \[INFO\] weft: worker ready on"
TESTS = Path(__file__).resolve().parent


def need_manager(name: str) -> None:
    if name not in available_managers():
        pytest.skip(f"weft-{name} is not installed")


def run_serve(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        weft_serve(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=40
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- --check-config agrees with weft serve -----------------------------------------------

# Each: extra arguments, extra environment. weft serve refuses each with exit 2 and one
# line before binding; --check-config is documented to exit 2 "for the same mistakes".
CHECK_CASES = {
    "shutdown_secret-without-port": ([], {"WEFT_SHUTDOWN_SECRET": "s3cret"}),
    "shutdown_port-without-secret": ([], {"WEFT_SHUTDOWN_PORT": "0"}),
    "sync-handler-on-trio": (["-k", "trio"], {}),
    "unknown-manager-option": (["-k", "threads", "-o", "bogus=1"], {}),
    "asyncio-loop-option": (["-k", "asyncio", "-o", "loop=nope"], {}),
    "certfile-not-pem": (["--certfile", "NOT_PEM"], {}),
    "pid-file-directory-missing": (["--pid", "MISSING/x.pid"], {}),
    "pid-file-of-a-running-server": (["--pid", "RUNNING.pid"], {}),
    "control-socket-path-too-long": (["--control-socket", "LONG_PATH"], {}),
    # The config probe (session 24): each passed --check-config, then serve failed
    # after binding (exit 1), the stack size in a crash loop under --workers.
    "pid-file-is-a-directory": (["--pid", "DIRECTORY"], {}),
    "control-socket-directory-missing": (["--control-socket", "MISSING/c.sock"], {}),
    "control-socket-is-a-regular-file": (["--control-socket", "NOT_PEM"], {}),
    "stack-size-no-thread-can-map": (["-k", "threads", "-o", "stack_size=68719476736"], {}),
    "handler-module-calls-sys-exit": (["HANDLER", "_exits_on_import:handle"], {}),
    "family-dual-with-an-ipv4-address": (["--family", "dual"], {}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_check_config_exits_2_for_what_serve_refuses(tmp_path: Path, case: str) -> None:
    """docs/deployment.md: --check-config "exits 0, or prints the error and exits 2", and
    exit status 2 is "a mistake in the command, the config ... (--check-config exits 2 for
    the same mistakes)"; _cli._check_config: "status 0 means the same command without
    --check-config gets as far as binding"."""
    extra, extra_env = CHECK_CASES[case]
    if "trio" in extra:
        need_manager("trio")
    if "asyncio" in extra:
        need_manager("asyncio")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    running = tmp_path / "running.pid"
    running.write_text(f"{os.getppid()}\n")  # the test runner's parent: alive throughout
    # 95 bytes: a Unix socket path holds 107, less the 15 its workers' sockets add.
    long_path = str(tmp_path / "c").ljust(95, "c")
    paths = {"NOT_PEM": str(not_pem), "MISSING/x.pid": str(tmp_path / "missing" / "x.pid"),
             "RUNNING.pid": str(running), "LONG_PATH": long_path, "DIRECTORY": str(tmp_path),
             "MISSING/c.sock": str(tmp_path / "missing" / "c.sock")}  # fmt: skip
    extra = [paths.get(a, a) for a in extra]
    handler = "_serving:handle"
    if "HANDLER" in extra:
        at = extra.index("HANDLER")
        handler = extra[at + 1]
        del extra[at : at + 2]
    env = {**environment(), **extra_env}
    control = [] if "--control-socket" in extra else ["--control-socket", "off"]
    base = [handler, "--bind", "127.0.0.1:0", *control, *extra]
    served = run_serve(base, env, tmp_path)
    assert served.returncode == 2, served.stderr  # weft serve itself refuses it
    refusal = last_line(served.stderr)
    checked = run_serve([*base, "--check-config"], env, tmp_path)
    assert checked.returncode == 2, (
        f"--check-config exited {checked.returncode} for a config weft serve refuses with "
        f"exit 2 ({refusal!r}); its stderr: {checked.stderr!r}"
    )
    assert last_line(checked.stderr) == refusal
    assert "Traceback" not in served.stderr + checked.stderr
    assert not list(tmp_path.glob(".*.tmp")), "a half-written file was left behind"


def test_check_config_keeps_what_the_handler_prints_at_import_off_stdout(tmp_path: Path) -> None:
    """--check-config prints the settings on stdout for a reader to parse; a module that
    prints as it is imported put its line among them (the config probe's F11)."""
    done = run_serve(
        ["_prints_on_import:handle", "--bind", "127.0.0.1:0", "--control-socket", "off",
         "--check-config"], environment(), tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "HELLO FROM IMPORT" in done.stderr
    assert "HELLO FROM IMPORT" not in done.stdout
    assert all(" = " in line for line in done.stdout.splitlines() if line.strip()), done.stdout


def test_a_handler_module_calling_sys_exit_is_named(tmp_path: Path) -> None:
    """A module that calls sys.exit(3) as it is imported (a script's code without its
    `if __name__ == '__main__':` guard) made weft serve exit 3, saying nothing."""
    done = run_serve(["_exits_on_import:handle", "--bind", "127.0.0.1:0", "--control-socket",
                      "off"], environment(), tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "the module called sys.exit(3) as it was imported" in last_line(done.stderr)


def test_no_handler_is_the_same_line_from_serve_and_check_config(tmp_path: Path) -> None:
    """The two said different things (the config probe's F9)."""
    served = run_serve(["--bind", "127.0.0.1:0", "--control-socket", "off"], environment(),
                       tmp_path)  # fmt: skip
    checked = run_serve(["--bind", "127.0.0.1:0", "--control-socket", "off", "--check-config"],
                        environment(), tmp_path)  # fmt: skip
    assert (served.returncode, checked.returncode) == (2, 2)
    assert last_line(served.stderr) == last_line(checked.stderr)
    assert "no handler" in last_line(served.stderr)


# -- every wrong value names its source ----------------------------------------------------


SOURCED = {
    # case: (weft.toml text, environment, the key, what the line must name)
    "shutdown_secret-in-weft.toml": ('shutdown_secret = "s3cret"\n', {}, "shutdown_secret",
                                     "weft.toml"),
    "WEFT_SHUTDOWN_SECRET": ("", {"WEFT_SHUTDOWN_SECRET": "s3cret"}, "shutdown_secret",
                             "WEFT_SHUTDOWN_SECRET"),
    "WEFT_SHUTDOWN_PORT-without-secret": ("", {"WEFT_SHUTDOWN_PORT": "0"}, "shutdown",
                                          "WEFT_SHUTDOWN_PORT"),
    # a top-level key written below [manager_options], TOML's classic trap
    "key-under-[manager_options]": ("[manager_options]\nlimit = 100\nidle_timeout = 5\n", {},
                                    "idle_timeout", "weft.toml"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(SOURCED))
def test_a_mistake_found_when_the_server_is_made_names_its_source(
    tmp_path: Path, case: str
) -> None:
    """README: a wrong key or value 'fails before anything binds, naming the file, the
    key, what was expected and the closest valid key'; DESIGN 5: the same, 'naming the
    file'. Mistakes the settings table finds do (`/srv/weft.toml, key 'backlog': ...`,
    `environment variable WEFT_WORKERS, key ...`); those found when the Server or its
    manager is made (the shutdown-port rules, a manager's options) are one line with
    no source: an operator with a file, a unit's Environment= and a command line is
    not told which to fix."""
    text, extra_env, key, source = SOURCED[case]
    if text:
        (tmp_path / "weft.toml").write_text(text)
    env = {**environment(), **extra_env}
    done = run_serve(["_serving:handle", "--bind", "127.0.0.1:0", "--control-socket", "off"],
                     env, tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = last_line(done.stderr)
    assert key in line, line
    assert source in line, f"{case}: the error does not say where it was set: {line!r}"


# -- signals before weft serve listens ---------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "asyncio"])
@pytest.mark.parametrize("name", ["USR1", "HUP", "USR2", "TTIN"])
def test_a_signal_during_a_slow_start_does_not_kill_or_suspend_it(
    tmp_path: Path, manager: str, name: str
) -> None:
    """README: 'Signals mean what they mean to gunicorn': HUP reloads, USR1 reopens log
    files, TTIN adds a worker; docs/deployment.md: 'Before, HUP, USR1 and USR2 killed
    weft serve ... and TTIN/TTOU did nothing'. A logrotate USR1 or a `systemctl reload`
    that reaches weft serve while the application still imports must not kill it (nor
    TTIN's default action stop it): gunicorn's arbiter installs its handlers before
    loading the app."""
    need_manager(manager)
    flag = tmp_path / "go"
    env = {**environment(), "SLOW_START_FLAG": str(flag)}
    handler = "_operator_slow:handle_async" if manager == "asyncio" else "_operator_slow:handle"
    with Served(
        weft_serve(handler, "-k", manager, "--bind", "127.0.0.1:0", "--control-socket", "off",
                   "--graceful-timeout", "5"),
        cwd=tmp_path, env=env,
    ) as served:  # fmt: skip
        _until_written(served, Path(str(flag) + ".importing"))
        served.signal(getattr(signal, "SIG" + name))
        time.sleep(0.2)  # the signal is delivered at once; then the import ends
        flag.write_text("go")
        try:
            (match,) = served.wait_for(LISTENING, timeout=15)
        except AssertionError:
            state = _proc_state(served.proc.pid)
            raise AssertionError(
                f"SIG{name} during start-up: weft serve never listened; exit status "
                f"{served.proc.poll()}, process state {state!r}; its log:\n{served.text}"
            ) from None
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"ping\n") == b"ping\n"
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0, served.text


#: A sitecustomize for the test below: it holds the child's import of weft_core._cli
#: (the command line and the rest of weft) until a file appears, saying it waits.
_PAUSE_CLI_IMPORT = """
import importlib.abc, os, sys, time

GATE = os.environ["WEFT_TEST_IMPORT_GATE"]


class PauseCliImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "weft_core._cli":
            sys.meta_path.remove(self)
            with open(GATE + ".waiting", "w") as marker:
                marker.write(str(os.getpid()))
            deadline = time.monotonic() + 20
            while not os.path.exists(GATE) and time.monotonic() < deadline:
                time.sleep(0.01)
        return None


sys.meta_path.insert(0, PauseCliImport())
"""


@contextlib.contextmanager
def _paused_in_weft_import(tmp_path: Path, *extra: str) -> Iterator[tuple[Served, Path]]:
    """``weft serve``, once its import of ``weft_core._cli`` waits (``_PAUSE_CLI_IMPORT``).

    Yields the process and the gate file that lets the import go on.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_PAUSE_CLI_IMPORT)
    gate = tmp_path / "gate"
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["WEFT_TEST_IMPORT_GATE"] = str(gate)
    argv = weft_serve(
        "_serving:handle", "--bind", "127.0.0.1:0", "--control-socket", "off", *extra
    )
    with Served(argv, cwd=tmp_path, env=env) as served:
        _until_written(served, Path(str(gate) + ".waiting"))
        yield served, gate


def _until_written(served: Served, marker: Path) -> None:
    """Wait (30 s at most) for the child to write ``marker``, failing if it exits first."""
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert served.proc.poll() is None, served.text
        assert time.monotonic() < deadline, served.text
        time.sleep(0.01)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["HUP", "USR1", "USR2", "TTIN", "TTOU"])
def test_a_signal_before_weft_has_loaded_is_held_too(tmp_path: Path, name: str) -> None:
    """A signal that arrives while ``python -m weft_core`` still loads weft itself.

    The test above holds the application's import; this one holds the import of
    ``weft_core._cli`` (a sitecustomize in the child pauses it), which by itself
    takes some 50 ms: a HUP in the first tenth of a second of ``weft serve`` killed
    it, a TTIN stopped it for good, before the hold went in ahead of that import
    (an outside check of 2026-12-05, signals sent 50 ms after the start). It is
    held, and logged once the server listens.
    """
    with _paused_in_weft_import(tmp_path) as (served, gate):
        served.signal(getattr(signal, "SIG" + name))
        gate.write_text("go")
        try:
            (match,) = served.wait_for(LISTENING, timeout=15)
        except AssertionError:
            raise AssertionError(
                f"SIG{name} while weft loaded: it never listened; exit status "
                f"{served.proc.poll()}, process state {_proc_state(served.proc.pid)!r}"
            ) from None
        served.wait_for(rf"SIG{name} arrived while starting", timeout=15)
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"ping\n") == b"ping\n"
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["HUP", "USR2"])
def test_a_signal_held_while_a_supervisor_starts_is_logged_too(tmp_path: Path, name: str) -> None:
    """The same under ``--workers 2``: the held signal was neither acted on nor logged
    (only one process's start said it; a signal fuzzer's finding)."""
    with _paused_in_weft_import(tmp_path, "--workers", "2") as (served, gate):
        served.signal(getattr(signal, "SIG" + name))
        gate.write_text("go")
        (match,) = served.wait_for(LISTENING, timeout=15)
        served.wait_for(rf"SIG{name} arrived while starting", timeout=15)
        served.wait_for("worker ready on", count=2, timeout=15)
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"ping\n") == b"ping\n"
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0, served.text


@pytest.mark.timeout(60)
def test_a_quit_before_weft_serves_ends_it_as_term_does(tmp_path: Path) -> None:
    """QUIT while weft still loads: deployment.md, "TERM, INT and QUIT stop it". It did,
    by QUIT's default, which dumps core; it now ends the process as TERM does."""
    with _paused_in_weft_import(tmp_path) as (served, gate):
        served.signal(signal.SIGQUIT)
        gate.write_text("go")
        assert served.finish(15) == -signal.SIGTERM, served.text


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2 :].split()[0]


# -- weft-prometheus ---------------------------------------------------------------------

OPENED = re.compile(r"^weft_connections_opened_total\{[^}]*\} (\S+)$", re.M)


def prometheus_env(metrics: str) -> dict[str, str]:
    pytest.importorskip("weft_prometheus", reason="weft-prometheus is not installed")
    env = {k: v for k, v in environment().items() if not k.startswith("PROMETHEUS_")}
    env["WEFT_PROMETHEUS_ADDRESS"] = metrics
    return env


def scrape(metrics: str, timeout: float = 15) -> str:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=timeout) as reply:
        return str(reply.read().decode())


def opened_total(metrics: str) -> float:
    """weft_connections_opened_total summed; a scrape refused (or, connecting in the
    very instant, reset) while a reload hands the address from the draining process
    to its workers (at most a few tenths of a second: plugins/weft-prometheus/README)
    is tried again, as Prometheus would at its next interval."""
    for _ in range(10):
        try:
            body = scrape(metrics)
            break
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            time.sleep(0.1)
        except ConnectionResetError:  # connected in the very instant of the hand-over
            time.sleep(0.1)
    values = [float(v) for v in OPENED.findall(body)]
    return sum(values)


SYNC = {"threads": "_serving:handle", "gevent": "_serving:handle",
        "trio": "_serving:handle_async", "asyncio": "_serving:handle_async"}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "trio"])
def test_prometheus_counter_never_goes_back_and_forth_across_a_hup(
    tmp_path: Path, manager: str
) -> None:
    """plugins/weft-prometheus/README: the single process binds the metrics address with
    SO_REUSEPORT 'so workers that take over from it (a reload) can bind it while it
    drains'. While it drains, scrapes land at random on the draining process (its own
    registry) or on the new worker (a fresh multiprocess registry), so
    weft_connections_opened_total jumps 6, 0, 6, 0: every fall is a counter reset to
    Prometheus, and increase()/rate() count the same connections again each time."""
    need_manager(manager)
    metrics = f"127.0.0.1:{free_port()}"
    with Served(
        weft_serve(SYNC[manager], "-k", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", "off", "--graceful-timeout", "20"),
        cwd=tmp_path, env=prometheus_env(metrics),
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        for _ in range(5):
            with Client(address) as client:
                assert client.echo(b"x") == b"x"
        held = Client(address)  # keeps the old server draining across the scrapes
        held.sock.sendall(b"hold\n")
        assert held.line() == b"holding"
        series = [opened_total(metrics)]
        assert series[0] == 6, series
        served.signal(signal.SIGHUP)
        served.wait_for(WORKER_READY)
        served.wait_for(r"reload done")
        series += [opened_total(metrics) for _ in range(12)]
        held.close()
        falls = sum(1 for a, b in itertools.pairwise(series) if b < a)
        assert falls <= 1, (
            f"weft_connections_opened_total went down {falls} times in 13 scrapes around "
            f"one HUP: {series}"
        )
        served.signal(signal.SIGTERM)
        served.finish(30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
def test_prometheus_idle_connections_do_not_hold_a_scrape_past_scrape_timeout(
    tmp_path: Path, manager: str
) -> None:
    """plugins/weft-prometheus/README: 'It answers one scrape at a time, each within 10 s
    (SCRAPE_TIMEOUT), so a stalled scraper cannot hold it longer.' Two idle connections
    (one local process, any user) hold it 20 s: Prometheus' own scrape (its default
    scrape_timeout is 10 s) fails and the target shows down, for as long as the idle
    connections are renewed."""
    need_manager(manager)
    from weft_prometheus._exporter import SCRAPE_TIMEOUT

    metrics = f"127.0.0.1:{free_port()}"
    with Served(
        weft_serve(SYNC[manager], "-k", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", "off"),
        cwd=tmp_path, env=prometheus_env(metrics),
    ) as served:  # fmt: skip
        served.wait_for(LISTENING)
        assert "weft_connections_opened_total" in scrape(metrics)
        idle = [socket.create_connection(host_port(metrics), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.2)  # both are accepted by the kernel before the real scrape
            started = time.monotonic()
            try:
                body = scrape(metrics, timeout=2 * SCRAPE_TIMEOUT + 5)
            finally:
                took = time.monotonic() - started
            assert "weft_connections_opened_total" in body
            assert took < SCRAPE_TIMEOUT, (
                f"a scrape behind two idle connections took {took:.1f}s "
                f"(SCRAPE_TIMEOUT is {SCRAPE_TIMEOUT:g}s)"
            )
        finally:
            for sock in idle:
                sock.close()
        served.signal(signal.SIGTERM)
        served.finish(30)


# -- manager options from text -------------------------------------------------------------

PATCH_OFF = {
    "flag-patch=no": (["-o", "patch=no"], {}),
    "flag-patch=off": (["-o", "patch=off"], {}),
    "env-PATCH=off": ([], {"WEFT_MANAGER_OPTIONS_PATCH": "off"}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(PATCH_OFF))
def test_gevent_patch_turned_off_in_words_does_not_patch(tmp_path: Path, case: str) -> None:
    """README: '--manager gevent monkey-patches before importing the handler (-o
    patch=false to not)'. Every boolean weft reads from text takes 1/0, true/false,
    yes/no, on/off (weft_core._settings.boolean); -o and WEFT_MANAGER_OPTIONS_* values
    are read as TOML, else kept as text, so 'no' and 'off' arrive as non-empty strings,
    gevent's prepare_process tests them for truth, and the process is patched: the
    opposite of what was asked, silently. Expected: not patched, or exit 2 naming patch."""
    need_manager("gevent")
    extra, extra_env = PATCH_OFF[case]
    env = {**environment(), **extra_env}
    with Served(
        weft_serve("_operator_patch:handle", "-k", "gevent", "--bind", "127.0.0.1:0",
                   "--control-socket", "off", *extra),
        cwd=tmp_path, env=env,
    ) as served:  # fmt: skip
        try:
            (match,) = served.wait_for(LISTENING)
        except AssertionError:
            assert served.finish(10) == 2, served.text  # refused: acceptable
            assert "patch" in last_line(served.text), served.text
            return
        with socket.create_connection(host_port(match.group(1)), timeout=10) as conn:
            answer = conn.makefile("rb").readline()
        assert answer == b"plain\n", f"{case}: the handler's process is {answer!r}"
        served.signal(signal.SIGTERM)
        served.finish(20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["1", "-1", "1.5"])
def test_a_bad_threads_stack_size_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    """README: 'A wrong key, type or value fails before anything binds, naming ... what
    was expected'; exit 2 is 'a mistake in the command, the config ...; nothing was
    bound'. stack_size (plugins/weft-threads/README) is not checked when the manager is
    made: weft serve binds, then dies in run() with a Python traceback from
    threading.stack_size, exit 1 (the status that tells systemd a restart may help)."""
    need_manager("threads")
    done = run_serve(
        ["_serving:handle", "-k", "threads", "--bind", "127.0.0.1:0", "--control-socket",
         "off", "-o", f"stack_size={value}"],
        environment(), tmp_path,
    )  # fmt: skip
    got = (done.returncode, "Traceback" in done.stderr)
    assert got == (2, False), (
        f"stack_size={value}: exit {done.returncode}, traceback: {got[1]}; last line: "
        f"{last_line(done.stderr)!r}"
    )
    assert "stack_size" in last_line(done.stderr), done.stderr


# -- QUIT during a graceful stop ------------------------------------------------------------

IGNORING = {"threads": "_operator_slow:ignore_stop", "gevent": "_operator_slow:ignore_stop",
            "trio": "_operator_slow:ignore_stop_trio",
            "asyncio": "_operator_slow:ignore_stop_asyncio"}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", sorted(IGNORING))
def test_quit_during_a_graceful_stop_stops_at_once(tmp_path: Path, manager: str) -> None:
    """docs/deployment.md, Signals: 'QUIT | quick stop: connections are interrupted at
    once'; DESIGN 9: 'QUIT | quick stop'. An operator whose SIGTERM stop waits on a slow
    connection sends SIGQUIT to finish now (gunicorn's arbiter does). One weft serve
    process ignores it: the stop runs to the end of --graceful-timeout regardless.
    (Under --workers the supervisor does act on it.) Expected: the process exits within
    STOP_GRACE (2 s) plus a margin of the QUIT."""
    need_manager(manager)
    graceful = 12
    with Served(
        weft_serve(IGNORING[manager], "-k", manager, "--bind", "127.0.0.1:0",
                   "--control-socket", "off", "--graceful-timeout", str(graceful)),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        with Client(host_port(match.group(1))) as busy:
            assert busy.line() == b"busy"
            served.signal(signal.SIGTERM)
            served.wait_for(r"received SIGTERM: stopping")
            served.signal(signal.SIGQUIT)
            quit_at = time.monotonic()
            try:
                status = served.finish(graceful + 10)
            finally:
                took = time.monotonic() - quit_at
        assert took < 5, (
            f"exit {served.proc.returncode} {took:.1f}s after SIGQUIT (graceful timeout "
            f"{graceful}s); its log:\n{served.text}"
        )
        assert status in (0, 4), served.text


# -- --pid ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_second_server_leaves_a_running_servers_pid_file_alone(tmp_path: Path) -> None:
    """README/deployment: -p/--pid has gunicorn's meaning: 'written once the server
    listens ... and removed when it exits'. gunicorn refuses to start on a pid file
    that names a live process ('Already running on PID ...'). weft serve overwrites
    it, and on exit removes it: the first server runs on with no pid file, so
    `kill $(cat FILE)`, logrotate's postrotate and monitoring lose it. Expected: the
    second refuses, or at least the file names the first server throughout."""
    pid_file = tmp_path / "weft.pid"
    args = ["_serving:handle", "--bind", "127.0.0.1:0", "--control-socket", "off",
            "--pid", str(pid_file), "--graceful-timeout", "5"]  # fmt: skip
    with Served(weft_serve(*args), cwd=tmp_path) as first:
        first.wait_for(LISTENING)
        assert pid_file.read_text().strip() == str(first.proc.pid)
        with Served(weft_serve(*args), cwd=tmp_path) as second:
            try:
                second.wait_for(LISTENING, timeout=15)
            except AssertionError:
                pass  # it refused to start: fine, if the file is left alone
            else:
                during = pid_file.read_text().strip() if pid_file.exists() else None
                second.signal(signal.SIGTERM)
                second.finish(20)
                assert during == str(first.proc.pid), (
                    f"while a second server ran, the pid file named {during} "
                    f"(first server: {first.proc.pid}, second: {second.proc.pid})"
                )
            second.finish(20)
        assert first.proc.poll() is None, first.text
        assert pid_file.exists(), (
            f"the first server ({first.proc.pid}) still runs, but its pid file is gone"
        )
        assert pid_file.read_text().strip() == str(first.proc.pid)
        first.signal(signal.SIGTERM)
        assert first.finish(20) == 0, first.text


# -- weft ctl drain's number ----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("seconds", ["nan", "-1"])
def test_ctl_drain_refuses_a_number_that_is_not_seconds(
    tmp_path: Path, seconds: str, workers: str
) -> None:
    """docs/deployment.md: `weft ctl drain [SECONDS]` 'stop accepting, exit once the open
    connections have ended, or after SECONDS ... cut what is left'; `weft ctl` exits '2
    for a wrong command line'; every seconds setting is 'a number of seconds >= 0'
    (--graceful-timeout -1 and nan are refused). `drain nan` is sent on: the server's
    drain loop dies in _wakeup.Wakeup.wait (ValueError: cannot convert float NaN to
    integer) with a traceback, exit 1, its connections cut; under --workers the
    supervisor SIGKILLs every worker at once (exit 1); `drain -1` is taken as 'cut
    everything now'. Expected: weft ctl refuses both, and the server serves on."""
    control = tmp_path / "ctl.sock"
    with Served(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--control-socket",
                   str(control), "--graceful-timeout", "10", "--workers", workers),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        if workers != "1":
            served.wait_for(WORKER_READY, count=int(workers))
        address = host_port(match.group(1))
        with Client(address) as held:
            held.sock.sendall(b"hold\n")
            assert held.line() == b"holding"
            done = subprocess.run(
                [sys.executable, "-m", "weft_core", "ctl", "--socket", str(control),
                 "drain", seconds],
                env=environment(), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            try:
                served.proc.wait(1.0)  # a crash, or a drain that ends at once, shows here
            except subprocess.TimeoutExpired:
                pass
            assert done.returncode == 2 and served.proc.poll() is None, (
                f"weft ctl drain {seconds}: ctl exit {done.returncode} "
                f"({(done.stdout + done.stderr).strip()!r}); server exit "
                f"{served.proc.poll()}; its log:\n{served.text[-1500:]}"
            )
            with Client(address) as other:  # still accepting: the drain was refused
                assert other.echo(b"still here\n") == b"still here\n"
        served.signal(signal.SIGTERM)
        assert served.finish(30) == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "trio"])
@pytest.mark.parametrize("workers", ["2"])  # with one process it holds (the control)
def test_ctl_drain_lets_a_client_between_two_requests_go_on(
    tmp_path: Path, workers: str, manager: str
) -> None:
    """docs/deployment.md: `weft ctl drain [SECONDS]`: 'stop accepting, exit once the
    open connections have ended, or after SECONDS ... cut what is left'; a drain lets
    connections 'go on until their clients end them (input is not ended, unlike a stop
    on SIGTERM, so a client between two requests is not cut)'. One process does so.
    Under --workers, drain goes to the supervisor, which stops its workers as on
    SIGTERM (_workers.Supervisor.drain -> _begin_stop): every connection's input is
    ended at once, and a client's next request finds the connection closed."""
    need_manager(manager)
    control = tmp_path / "ctl.sock"
    with Served(
        weft_serve(SYNC[manager], "-k", manager, "--bind", "127.0.0.1:0", "--control-socket",
                   str(control), "--graceful-timeout", "10", "--workers", workers),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        if workers != "1":
            served.wait_for(WORKER_READY, count=int(workers))
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"first\n") == b"first\n"
            done = subprocess.run(
                [sys.executable, "-m", "weft_core", "ctl", "--socket", str(control),
                 "drain", "30"],
                env=environment(), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            served.wait_for(r"drain", timeout=10)
            time.sleep(0.5)  # the drain is under way; the client's next request comes now
            second = client.echo(b"second\n")
            assert second == b"second\n", (
                f"--workers {workers}: after `weft ctl drain 30` the client's next request "
                f"got {second!r}; the log:\n{served.text[-1500:]}"
            )
        assert served.finish(20) == 0, served.text  # idle now: the drain ends


# -- $PORT and $WEB_CONCURRENCY are defaults ----------------------------------------------

OVERRIDDEN = {
    "PORT-under---bind": ({"PORT": "web"}, ["--bind", "127.0.0.1:0"]),
    "WEB_CONCURRENCY-under---workers": ({"WEB_CONCURRENCY": "auto"}, ["--workers", "1"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(OVERRIDDEN))
def test_a_platform_default_that_a_flag_overrides_does_not_stop_the_start(
    tmp_path: Path, case: str
) -> None:
    """docs/deployment.md: '$PORT ... $WEB_CONCURRENCY ... Both are defaults: a bind or
    workers from the config file, a WEFT_* variable or a flag wins.' Yet a value weft
    cannot use in either is exit 2 even when --bind/--workers replaces it (the defaults
    are checked before the sources that override them: _config.serve_default_settings),
    so a shared environment's PORT (another tool's, a platform's) blocks a server that
    was told exactly where to listen."""
    extra_env, extra = OVERRIDDEN[case]
    env = {**environment(), **extra_env}
    with Served(
        weft_serve("_serving:handle", "--control-socket", "off", *extra,
                   *(["--bind", "127.0.0.1:0"] if "--bind" not in extra else [])),
        cwd=tmp_path, env=env,
    ) as served:  # fmt: skip
        try:
            (match,) = served.wait_for(LISTENING, timeout=20)
        except AssertionError:
            raise AssertionError(
                f"{case}: exit {served.finish(10)}: {last_line(served.text)!r}"
            ) from None
        with Client(host_port(match.group(1))) as client:
            assert client.echo(b"x") == b"x"
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0, served.text


# -- a retired worker drains (HUP, TTOU, recycling) ----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["HUP", "TTOU", "max-requests"])
def test_a_retired_gevent_worker_drains_and_exits_by_itself(tmp_path: Path, how: str) -> None:
    """docs/deployment.md, Reloading: HUP 'never refuses or cuts a connection'; a
    retired worker (HUP, TTOU, max_requests) 'drains: it stops accepting, and the
    connections it has go on ... for at most --graceful-timeout; what is left then is
    interrupted'; recycling: 'No connection is refused or cut either way'. On gevent
    it does not: the worker logs 'asked to retire' but never stops accepting and never
    exits; the supervisor SIGKILLs it at graceful-timeout + 5 s ('still running 8s
    after a drain request: killing it'), cutting what it serves (clients see
    ECONNRESET or a cut reply). threads, trio and asyncio drain and exit 0 at once.
    Cause seen: _worker_link.WorkerLink._maybe_drain runs in the link's real OS thread
    (started before gevent's monkey-patching) and starts the drain with
    threading.Thread, patched by then: a greenlet of that thread's own hub, which never
    runs while the thread sits in os.read."""
    need_manager("gevent")
    from _load import APP, Load, wait_for_version, write_app

    write_app(tmp_path, "v1")
    graceful = 3
    extra = ["--max-requests", "40"] if how == "max-requests" else []
    with Served(
        weft_serve(APP, "-k", "gevent", "--bind", "127.0.0.1:0", "--control-socket", "off",
                   "--workers", "2", "--graceful-timeout", str(graceful), *extra),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        served.wait_for(WORKER_READY, count=2)
        address = host_port(match.group(1))
        wait_for_version(address, "v1")
        load = Load(address)
        retired = 1 if how == "TTOU" else 2
        try:
            if how == "HUP":
                write_app(tmp_path, "v2")
                served.signal(signal.SIGHUP)
                wait_for_version(address, "v2")
            elif how == "TTOU":
                served.signal(signal.SIGTTOU)
            served.wait_for(r"asked to retire", count=retired)
            exits = served.wait_for(r"worker (\d+) exited with (\d+)", count=retired,
                                    timeout=graceful + 10)  # fmt: skip
        finally:
            load.stop()
        how_ended = [m.group(0) for m in exits]
        assert "killing it" not in served.text and all(m.group(2) == "0" for m in exits), (
            f"{how}: retired workers: {how_ended}; {served.text.count('killing it')} killed; "
            f"load failures {dict(load.failures)}"
        )
        assert not load.failures, dict(load.failures)
        served.signal(signal.SIGTERM)
        assert served.finish(30) == 0, served.text


@pytest.mark.timeout(60)
def test_user_with_a_pid_file_in_a_root_only_directory(tmp_path: Path) -> None:
    """docs/deployment.md, --user: 'A pid file in a root-only directory cannot be
    removed by the switched process; put it where the user may write, or let the
    service manager clean up' (so it is written: gunicorn's master writes it as root);
    --pid: 'A directory that does not exist or that the user may not write to is a
    usage error (exit 2), said before anything is bound.' Neither held: the check
    passes as root, the sockets are bound, the user switched, and only then does the
    write fail: exit 1 ('cannot write the pid file ... Permission denied')."""
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    pid_file = private / "weft.pid"
    with Served(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--control-socket", "off",
                   "--user", "nobody", "--pid", str(pid_file), "--graceful-timeout", "3"),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        try:
            served.wait_for(LISTENING, timeout=20)
        except AssertionError:
            status = served.finish(10)
            bound = "running as user" in served.text
            assert status == 2 and not bound, (
                f"exit {status} {'after binding and switching user' if bound else ''}: "
                f"{last_line(served.text)!r}"
            )
            return
        assert pid_file.read_text().strip() == str(served.proc.pid)
        served.signal(signal.SIGTERM)
        served.finish(20)


@pytest.mark.timeout(60)
def test_a_retired_worker_that_left_tasks_exits_4(tmp_path: Path) -> None:
    """docs/deployment.md, exit statuses: 4 when a stop 'had to leave tasks running';
    'A worker retired by a reload or a drain that exits 4 is logged the same way'. A
    retired threads worker whose handler ignores the interruption logs '1 task(s) still
    running 2s after they were interrupted; they are left behind' and then exits 0, so
    the supervisor never logs 'exited with 4: it left tasks running'. (Its log also says
    'still open after the graceful timeout (0s)' after waiting the configured 3 s.)"""
    graceful = 3
    with Served(
        weft_serve("_operator_slow:ignore_stop", "--bind", "127.0.0.1:0", "--control-socket",
                   "off", "--workers", "2", "--graceful-timeout", str(graceful)),
        cwd=tmp_path,
    ) as served:  # fmt: skip
        (match,) = served.wait_for(LISTENING)
        served.wait_for(WORKER_READY, count=2)
        with Client(host_port(match.group(1))) as busy:
            assert busy.line() == b"busy"
            served.signal(signal.SIGHUP)
            served.wait_for(r"left behind", timeout=graceful + 15)
            (ended,) = served.wait_for(rf"worker {busy.pid} exited with (\d+)",
                                       timeout=graceful + 15)  # fmt: skip
        assert ended.group(1) == "4", (
            f"the retired worker {busy.pid} left a task behind and exited with {ended.group(1)}"
        )
        served.signal(signal.SIGTERM)
        served.finish(30)
