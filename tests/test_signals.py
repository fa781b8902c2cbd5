"""Signals to ``weft serve`` (DESIGN section 9), with one process and with ``--workers``.

Real processes on loopback, under load from :class:`_load.Load`; every wait is on
a log line, a reply or a process exit, bounded by a timeout. A reload is proven by
editing the handler's file and waiting for the new version to answer, and its
being harmless by the load's failure count: zero.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
from _load import APP, APP_ASYNC, Load, greeting, wait_for_version, write_app
from _serving import (
    HOLD,
    READY,
    Served,
    connects,
    environment,
    free_port,
    host_port,
    weft_serve,
)

from weft_core import _registry
from weft_core._signals import reopen_log_files
from weft_core.testing._support import wait_until

LISTENING = r"\] weft: listening on (\S+) "
HANDLERS = {"threads": APP, "gevent": APP, "trio": APP_ASYNC}


def start(folder: Path, *extra: str, manager: str = "threads") -> tuple[Served, tuple[str, int]]:
    """``weft serve app:handle`` in ``folder`` (version v1); return it and its address."""
    write_app(folder, "v1")
    served = Served(
        weft_serve(HANDLERS[manager], "--manager", manager, "--bind", "127.0.0.1:0",
                   "--graceful-timeout", "10", *extra),
        cwd=folder,
    )  # fmt: skip
    try:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        wait_for_version(address, "v1")
    except BaseException:
        served.kill()
        raise
    return served, address


SHAPES = {"one-process": (), "workers-3": ("--workers", "3")}


def upgrades_to(folder: Path, served: Served, address: tuple[str, int], version: str) -> None:
    """A USR2 with ``version`` of the handler on disk re-executes, serves it, and stops clean."""
    write_app(folder, version)
    served.signal(signal.SIGUSR2)
    served.wait_for(r"re-executed \(pid \d+\)")
    wait_for_version(address, version)
    served.signal(signal.SIGTERM)
    assert served.finish() == 0, served.text


def reload_under_load(
    folder: Path, served: Served, address: tuple[str, int], signals: list[int]
) -> Load:
    """Send each of ``signals`` under load, a new version of the handler before each."""
    load = Load(address)
    try:
        for n, signum in enumerate(signals, start=2):
            write_app(folder, f"v{n}")
            served.signal(signum)
            try:
                wait_for_version(address, f"v{n}")
            except AssertionError as exc:  # what the server said, for whoever reads CI's log
                raise AssertionError(f"{exc}; the server's log:\n{served.text}") from None
            if signum == signal.SIGUSR2:  # the next one goes to the re-executed image
                served.wait_for(r"re-executed \(pid \d+\)", count=n - 1)
    finally:
        load.stop()
    return load


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2], ids=["HUP", "USR2"])
def test_reload_under_load_refuses_and_cuts_nothing(
    tmp_path: Path, shape: str, signum: int
) -> None:
    """HUP and USR2: the new code answers after each, no client fails, the PID stays."""
    served, address = start(tmp_path, *SHAPES[shape])
    with served:
        load = reload_under_load(tmp_path, served, address, [signum] * 3)
        cmdline = Path(f"/proc/{served.proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert not load.failures, f"{dict(load.failures)}\n{served.text}"
        assert set(load.versions) >= {"v1", "v4"}, load.versions
        assert served.proc.poll() is None, served.text  # the same process serves on
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "Traceback" not in served.text
    if signum == signal.SIGUSR2:
        assert served.text.count(f"re-executed (pid {served.proc.pid})") == 3
        # The operator's command line still, so ps and pgrep -f find the process: it
        # had read like a worker's (--workers=1 --bind=fd:N) after the first USR2.
        given = ["--bind", "127.0.0.1:0", "--graceful-timeout", "10", *SHAPES[shape]]
        assert cmdline[-1 - len(given) : -1] == given, cmdline


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_twenty_seconds_of_reloads_every_few_seconds(tmp_path: Path) -> None:
    """The issue's proof: 20 s of clients, a HUP or USR2 every 2 s, zero failures."""
    served, address = start(tmp_path)
    with served:
        load = Load(address)
        try:
            began = time.monotonic()
            n = 1
            while time.monotonic() - began < 20:
                n += 1
                write_app(tmp_path, f"v{n}")
                served.signal(signal.SIGHUP if n % 2 else signal.SIGUSR2)
                wait_for_version(address, f"v{n}")
                # A reload every 2 s: the pacing of the operator, not a wait for an event.
                time.sleep(max(0.0, began + 2 * (n - 1) - time.monotonic()))
        finally:
            load.stop()
        assert not load.failures, f"{dict(load.failures)}\n{served.text}"
        assert load.served > 100
        assert n >= 6
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("manager", sorted(HANDLERS))
def test_hup_reloads_every_manager(tmp_path: Path, manager: str) -> None:
    """One process on each manager: HUP hands its socket to a worker running new code."""
    if manager not in _registry.available_managers():
        pytest.skip(f"weft-{manager} is not installed")
    served, address = start(tmp_path, manager=manager)
    with served:
        load = reload_under_load(tmp_path, served, address, [signal.SIGHUP])
        assert not load.failures, f"{dict(load.failures)}\n{served.text}"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_hup_lets_a_connection_in_flight_finish_on_the_old_code(tmp_path: Path) -> None:
    """A connection open across HUP is neither cut nor half-closed: its client ends it."""
    served, address = start(tmp_path)
    with served, socket.create_connection(address, timeout=20) as old:
        reader = old.makefile("rb")
        assert reader.readline().startswith(b"v1 ")
        write_app(tmp_path, "v2")
        served.signal(signal.SIGHUP)
        wait_for_version(address, "v2")
        served.wait_for("the in-process server drains now")
        old.sendall(b"still here\n")
        assert reader.readline() == b"still here\n"
        old.shutdown(socket.SHUT_WR)  # the client is done
        assert reader.read() == b""
        served.wait_for("the in-process server has drained")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


SLOW_START = """
import pathlib
import time

from weft_core import _registry, hookimpl


class SlowStart:
    # A server_started hook that takes its time (a service registration, say): the
    # worker accepts meanwhile, and tells its supervisor it is ready only after.
    @hookimpl
    def weft_server_started(self, server, addresses):
        deadline = time.monotonic() + 30
        while not pathlib.Path("gate").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


_registry.register(SlowStart(), name="slow-start")
"""


@pytest.mark.timeout(60)
def test_hup_drains_a_worker_that_serves_before_its_supervisor_knows(tmp_path: Path) -> None:
    """A worker accepts before its READY reaches the supervisor (a slow server_started
    hook here; a busy supervisor in a load test). A HUP then retired it as one that
    never served: SIGTERM, whose stop ended the input of the clients it had taken,
    cut mid-exchange (a reload's load test lost two). Now it drains, as any old worker."""
    write_app(tmp_path, "v1")
    with (tmp_path / "app.py").open("a") as app:
        app.write(SLOW_START)
    port = free_port()  # the supervisor says where it listens once a worker is ready
    address = ("127.0.0.1", port)
    served = Served(
        weft_serve(APP, "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10",
                   "--workers", "2"),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        wait_until(lambda: connects(port), what="the worker to accept")
        with socket.create_connection(address, timeout=20) as old, old.makefile("rb") as reader:
            assert reader.readline().startswith(b"v1 "), "the worker serves before it is ready"
            assert not re.search(READY, served.text)
            write_app(tmp_path, "v2")  # without the slow hook
            served.signal(signal.SIGHUP)
            served.wait_for("received SIGHUP: reloading")
            (tmp_path / "gate").touch()
            wait_for_version(address, "v2")
            old.sendall(b"still here\n")
            assert reader.readline() == b"still here\n", served.text
            old.shutdown(socket.SHUT_WR)
            assert reader.read() == b""
        served.wait_for(r"worker \d+ exited with 0")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "SIGTERM (it was not ready)" not in served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_quit_stops_at_once(tmp_path: Path, shape: str) -> None:
    """QUIT: connections are interrupted at once, not given graceful_timeout (10 s)."""
    served, address = start(tmp_path, *SHAPES[shape])
    with served, socket.create_connection(address, timeout=20):
        began = time.monotonic()
        served.signal(signal.SIGQUIT)
        assert served.finish() == 0, served.text
        assert time.monotonic() - began < 8, served.text
    assert "received SIGQUIT: stopping" in served.text


SLOW_INTERPRETER = """
import os, sys, time
# Every worker but the first spends a while in the interpreter's own start, before
# any of weft's code runs: the window a quick stop's QUIT used to land in.
if any(a.startswith("--supervisor-fd") for a in sys.argv):
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        time.sleep(3)
"""


@pytest.mark.timeout(60)
def test_a_quit_reaches_a_worker_still_in_its_interpreters_start_without_killing_it(
    tmp_path: Path,
) -> None:
    """A quick stop (QUIT) sends QUIT to every worker, ready or not. A worker still
    in the interpreter's start, before weft's first line, took QUIT's default: it
    died dumping core ("worker N exited with SIGQUIT"; under systemd-coredump, a
    crash report per such worker). Started with QUIT blocked, it gets it once its
    start's handlers are in, and ends as a stop ends it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        SLOW_INTERPRETER.format(marker=str(tmp_path / "first-worker"))
    )
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    write_app(tmp_path, "v1")
    served = Served(
        weft_serve(HANDLERS["threads"], "--bind", "127.0.0.1:0", "--workers", "3"),
        cwd=tmp_path,
        env=env,
    )
    with served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        wait_for_version(address, "v1")  # the first worker serves; two are starting
        served.wait_for(READY)
        served.signal(signal.SIGQUIT)
        assert served.finish() == 0, served.text
    assert "exited with SIGQUIT" not in served.text, served.text
    assert served.text.count("exited with SIGTERM") == 2, served.text


@pytest.mark.timeout(60)
def test_a_term_and_a_quit_pending_together_stop_quickly_not_by_death(tmp_path: Path) -> None:
    """A supervisor cutting a stop short sends its workers TERM, then QUIT. Pending
    together (the process held up, here stopped), Python ran their handlers in
    signal-number order: QUIT armed the stop's deadline, and TERM, taken for a second
    stop signal, killed the process (a worker exiting by SIGTERM, its clients cut;
    seen in a fresh-clone run of test_quit_during_a_graceful_stop_cuts_it_short)."""
    served, address = start(tmp_path)
    with served, socket.create_connection(address, timeout=20):
        served.signal(signal.SIGSTOP)
        served.signal(signal.SIGTERM)
        served.signal(signal.SIGQUIT)
        served.signal(signal.SIGCONT)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_usr1_reopens_logs_and_serves_on(tmp_path: Path, shape: str) -> None:
    """USR1 no longer kills weft serve (exit 138 before): it reopens log files."""
    served, address = start(tmp_path, *SHAPES[shape])
    with served:
        if shape == "workers-3":
            served.wait_for(READY, count=3)
        served.signal(signal.SIGUSR1)
        served.wait_for(r"received SIGUSR1: reopened \d+ log file")
        if shape == "workers-3":  # each worker reopens its own
            served.wait_for(r"\[INFO\] weft: received SIGUSR1", count=3)
        assert greeting(address)[0] == "v1"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_usr1_with_a_log_file_that_cannot_be_reopened_serves_on(
    tmp_path: Path, shape: str
) -> None:
    """USR1 after the log file's directory was renamed: one ERROR line naming the file,
    and the service serves on, still logging to the file it had. Reopening raised
    FileNotFoundError out of the signal's handling: the one process exited 1, the
    supervisor too, taking its workers with it (the config probe's F1)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"}
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(logs / "app.log"),
                "formatter": "plain",
            },
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
        },
        "root": {"level": "INFO", "handlers": ["file", "stderr"]},
    }
    (tmp_path / "logging.json").write_text(json.dumps(config))
    served, address = start(tmp_path, "--log-config", "logging.json", *SHAPES[shape])
    with served:
        if shape == "workers-3":
            served.wait_for(READY, count=3)
        logs.rename(tmp_path / "logs.rotated")
        served.signal(signal.SIGUSR1)
        served.wait_for(r"\[ERROR\] weft: cannot reopen log file .*app\.log: No such file")
        if shape == "workers-3":  # each worker tried its own, and serves on
            served.wait_for(r"cannot reopen log file", count=4)
        assert greeting(address)[0] == "v1"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "all workers stopped" in served.text or shape == "one-process"
    assert "received SIGUSR1" in (tmp_path / "logs.rotated" / "app.log").read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", SHAPES)
def test_usr1_with_a_log_file_on_a_full_disk_serves_on(tmp_path: Path, shape: str) -> None:
    """USR1 while the log file's disk is full (/dev/full plays it: every write fails
    with ENOSPC), the moment logrotate's postrotate often meets. Closing the old file
    could not flush its last lines, and that OSError ended the process (exit 1, every
    open connection cut), the supervisor too when it had logged since (the log sinks
    check's F3). Now one ERROR line says the lines were lost, and it serves on."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"}},
        "handlers": {
            "full": {"class": "logging.FileHandler", "filename": "/dev/full", "formatter": "plain"},
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
        },
        "root": {"level": "INFO", "handlers": ["full", "stderr"]},
    }  # fmt: skip
    (tmp_path / "logging.json").write_text(json.dumps(config))
    served, address = start(tmp_path, "--log-config", "logging.json", *SHAPES[shape])
    with served:
        if SHAPES[shape]:
            served.wait_for(READY, count=3)
        with (
            socket.create_connection(address, timeout=10) as held,
            held.makefile("rb") as reader,
        ):
            assert reader.readline().startswith(b"v1 ")
            served.signal(signal.SIGUSR1)
            served.wait_for(r"\[ERROR\] weft: reopened log file /dev/full, but the lines")
            held.sendall(b"still\n")
            assert reader.readline() == b"still\n", "the held client is served on"
        assert greeting(address)[0] == "v1"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


def test_reopen_log_files_follows_a_rotation(tmp_path: Path) -> None:
    """After the file is renamed (logrotate), the next record goes to a new file by the name."""
    path = tmp_path / "weft.log"
    logger = logging.getLogger("weft.test.rotation")
    handler = logging.FileHandler(path)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        path.rename(tmp_path / "weft.log.1")
        assert reopen_log_files() >= 1
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "weft.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"
    # As root, the file is made afresh through no link (_files.open_log_file), 0644.
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0


@pytest.mark.timeout(90)
def test_ttin_and_ttou_add_and_remove_a_worker(tmp_path: Path) -> None:
    """TTIN: one worker more; TTOU: one fewer (drained, not killed); never below one."""
    served, address = start(tmp_path, "--workers", "2")
    with served:
        served.wait_for(READY, count=2)
        load = Load(address)
        try:
            served.signal(signal.SIGTTIN)
            served.wait_for(r"received SIGTTIN: 3 worker\(s\) now")
            served.wait_for(READY, count=3)
            served.signal(signal.SIGTTOU)
            served.wait_for(r"retiring it \(fewer workers wanted\)")
            served.wait_for(r"worker \d+ exited with 0")
            served.signal(signal.SIGTTOU)
            served.wait_for(r"received SIGTTOU: 1 worker\(s\) now")
            served.signal(signal.SIGTTOU)
            served.wait_for("one worker is the fewest")
        finally:
            load.stop()
        assert not load.failures, f"{dict(load.failures)}\n{served.text}"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "killing" not in served.text


@pytest.mark.timeout(60)
def test_ttin_makes_one_process_a_supervisor_of_two(tmp_path: Path) -> None:
    """TTIN to a single weft serve: two workers take over its socket, same PID."""
    served, address = start(tmp_path)
    with served:
        served.signal(signal.SIGTTIN)
        pids = {int(m.group(1)) for m in served.wait_for(READY, count=2)}
        assert served.proc.pid not in pids
        served.wait_for("the in-process server has drained")
        assert greeting(address)[1] in pids
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_a_worker_ignores_the_supervisors_signals(tmp_path: Path) -> None:
    """HUP sent to a worker by mistake is logged and ignored: it does not die."""
    served, _ = start(tmp_path, "--workers", "2")
    with served:
        (first, *_) = (int(m.group(1)) for m in served.wait_for(READY, count=2))
        os.kill(first, signal.SIGHUP)
        served.wait_for("received SIGHUP: ignored by a worker; signal the supervisor")
        assert "exited" not in served.text
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_a_broken_reload_keeps_the_old_workers(tmp_path: Path) -> None:
    """A handler that no longer imports: the reload is abandoned, the old code serves on."""
    served, address = start(tmp_path, "--workers", "2")
    with served:
        served.wait_for(READY, count=2)
        (tmp_path / "app.py").write_text("raise RuntimeError('broken on purpose')\n")
        served.signal(signal.SIGHUP)
        served.wait_for("the reload is abandoned and the old workers serve on")
        # The worker's own line, which the supervisor's points to, is a whole log
        # line (time, pid, level) among the others, not a bare "weft: ..." one.
        assert re.search(
            r"^\d{4}-\S+ \[\d+\] \[ERROR\] weft: cannot import handler 'app:handle'",
            served.text,
            re.M,
        ), served.text
        assert greeting(address)[0] == "v1"
        write_app(tmp_path, "v2")
        served.signal(signal.SIGHUP)
        wait_for_version(address, "v2")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_a_broken_reload_keeps_every_old_worker_and_restarts_no_broken_one(
    tmp_path: Path,
) -> None:
    """Three workers, a reload whose code does not import: all three old workers serve
    on. The failed generation's other starts had stayed current: the count retired an
    old, serving worker in their place (2 of 3 left) and restarted the broken code
    for ever, an ERROR each time (an outside check)."""
    served, address = start(tmp_path, "--workers", "3")
    with served:
        ready = [int(m.group(1)) for m in served.wait_for(READY, count=3)]
        (tmp_path / "app.py").write_text("raise RuntimeError('broken on purpose')\n")
        served.signal(signal.SIGHUP)
        served.wait_for("the reload is abandoned and the old workers serve on")
        # What the broken starts left behind has settled once a marker goes through
        # the supervisor's loop: the next signal's line comes after them.
        served.signal(signal.SIGUSR1)
        served.wait_for("received SIGUSR1")
        pids: set[int] = set()
        for _ in range(300):  # the workers take clients in turns: all three soon
            pids.add(greeting(address)[1])
            if len(pids) == 3:
                break
        assert pids == set(ready), (pids, ready, served.text)
        assert "retiring it (fewer workers wanted)" not in served.text, served.text
        # Its siblings retire with it (one may have failed by itself first, which
        # says so at INFO): none is restarted, and one ERROR says what happened.
        assert "starting another" not in served.text, served.text
        assert served.text.count("[ERROR] weft.workers:") == 1, served.text
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(90)
def test_usr2_after_an_abandoned_hand_over_upgrades(tmp_path: Path) -> None:
    """One process: a HUP whose code does not import is abandoned, the in-process
    server serving alone; then the code is fixed and USR2 sent. It upgrades (a worker
    takes over, the process re-executes). It waited for good: "upgrading in place",
    RELOADING=1, then nothing until a later HUP (an outside check)."""
    served, address = start(tmp_path)
    with served:
        (tmp_path / "app.py").write_text("raise RuntimeError('broken on purpose')\n")
        served.signal(signal.SIGHUP)
        served.wait_for("the reload is abandoned")
        upgrades_to(tmp_path, served, address, "v2")


@pytest.mark.timeout(90)
def test_usr2_after_an_abandoned_hand_over_with_the_code_still_broken_says_so(
    tmp_path: Path,
) -> None:
    served, address = start(tmp_path)
    with served:
        (tmp_path / "app.py").write_text("raise RuntimeError('broken on purpose')\n")
        served.signal(signal.SIGHUP)
        served.wait_for("the reload is abandoned")
        served.signal(signal.SIGUSR2)
        served.wait_for("the upgrade is abandoned too: serving on the old code")
        assert greeting(address)[0] == "v1"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_one_process_says_which_signals_its_stop_left_unanswered(tmp_path: Path) -> None:
    """HUP, USR2 and TTIN during a TERM's drain: ignored, as under --workers, where the
    supervisor says so; one process said nothing at all (an outside check)."""
    write_app(tmp_path, "v1")
    served = Served(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--graceful-timeout", "20"),
        cwd=tmp_path,
    )
    with served:
        (match,) = served.wait_for(LISTENING)
        with socket.create_connection(host_port(match.group(1)), timeout=20) as held:
            reader = held.makefile("rb")
            reader.readline()  # its pid
            held.sendall(HOLD)
            assert reader.readline() == b"holding\n"
            served.signal(signal.SIGTERM)
            served.wait_for("received SIGTERM: stopping")
            for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN):
                served.signal(signum)
            # Pending at once; each is caught (its number in the wakeup socket) as
            # soon as any thread of the server runs, long before the stop can end.
            held.shutdown(socket.SHUT_WR)  # the handler's loop ends: the stop can end
            assert reader.readline() == b"done\n"
            reader.close()
        assert served.finish() == 0, served.text
    for name in ("SIGHUP", "SIGUSR2", "SIGTTIN"):
        assert f"received {name} while stopping: ignored" in served.text, served.text
    assert "supervisor" not in served.text


#: A weft_core that fails to import while a file named FAIL is beside it, and is the
#: real one otherwise: an upgrade of weft that broke it, as the new image would find.
SHADOW = """\
import os as _os
import weft_core_real_path as _real

if _os.path.exists(_os.path.join(_os.path.dirname(__file__), "..", "FAIL")):
    raise ImportError("the upgraded weft is broken")
__path__[:] = [_real.PATH]
__file__ = _os.path.join(_real.PATH, "__init__.py")
with open(__file__) as _source:
    exec(compile(_source.read(), __file__, "exec"))
"""


@pytest.mark.timeout(90)
def test_usr2_to_an_image_that_cannot_import_weft_keeps_the_old_one_serving(
    tmp_path: Path,
) -> None:
    """USR2 when the new weft cannot start: the exec left no supervisor, and every
    worker drained and exited, a whole outage (an outside check). The supervisor now
    tries the new image's import first and, if it fails, serves on."""
    import weft_core

    shadow = tmp_path / "shadow"
    (shadow / "weft_core").mkdir(parents=True)
    (shadow / "weft_core" / "__init__.py").write_text(SHADOW)
    real = Path(weft_core.__file__).parent
    (shadow / "weft_core_real_path.py").write_text(f"PATH = {str(real)!r}\n")
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env["PYTHONPATH"]])
    write_app(tmp_path, "v1")
    served = Served(
        weft_serve(APP, "--bind", "127.0.0.1:0", "--workers", "2", "--graceful-timeout", "10"),
        cwd=tmp_path,
        env=env,
    )
    with served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        served.wait_for(READY, count=2)
        (shadow / "FAIL").write_text("")
        served.signal(signal.SIGUSR2)
        served.wait_for(
            r"cannot upgrade: the new image would not start \(ImportError: the upgraded"
            r" weft is broken\); serving on the old code"
        )
        assert greeting(address)[0] == "v1"
        (shadow / "FAIL").unlink()
        upgrades_to(tmp_path, served, address, "v2")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ('max_connections = "many"\n', r"weft\.toml, key 'max_connections': expected"),
        ('manager = "threds"\n', r"no task manager named 'threds'"),
        ('log_config = "missing.ini"\n', r"missing\.ini"),
        (
            'manager = "threads"\n[manager_options]\nlimt = 5\n',
            r"unexpected keyword argument 'limt'",
        ),
    ],
    ids=["wrong-type", "unknown-manager", "missing-log-config", "manager-option-typo"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_usr2_with_a_config_the_new_image_refuses_keeps_the_old_one_serving(
    tmp_path: Path, workers: str, broken: str, said: str
) -> None:
    """A config file edited into a mistake, then USR2: the re-executed image exited 2
    on it, and with no supervisor left every worker drained and exited, a whole
    outage. The supervisor now runs the new command line up to its config, logging
    and manager first and, if that fails, says why and serves on."""
    write_app(tmp_path, "v1")
    config = tmp_path / "weft.toml"
    config.write_text('manager = "threads"\n')
    served = Served(
        weft_serve(APP, "--bind", "127.0.0.1:0", "--workers", workers),
        cwd=tmp_path,
    )
    with served:
        (match,) = served.wait_for(LISTENING)
        address = host_port(match.group(1))
        if workers == "2":
            served.wait_for(READY, count=2)
        config.write_text(broken)
        served.signal(signal.SIGUSR2)
        if workers == "1":  # the worker it hands over to loads the config first
            served.wait_for(said)
            served.wait_for("the upgrade is abandoned too: serving on the old code")
        else:
            (refused,) = served.wait_for(
                r"cannot upgrade: the new image would not start \((.*)\); serving on the"
                r" old code"
            )
            assert re.search(said, refused.group(1)), refused.group(1)
        assert greeting(address)[0] == "v1"
        config.write_text('manager = "threads"\n')
        upgrades_to(tmp_path, served, address, "v2")
    assert "Traceback" not in served.text, served.text


@pytest.mark.timeout(60)
def test_hup_keeps_a_unix_socket_file(tmp_path: Path) -> None:
    """One process on a Unix socket: the file outlives the in-process server's drain,
    new code answers on it, and the supervisor removes it when it stops."""
    write_app(tmp_path, "v1")
    path = tmp_path / "s.sock"
    served = Served(weft_serve(APP, "--bind", f"unix:{path}"), cwd=tmp_path)
    with served:
        served.wait_for(LISTENING)
        write_app(tmp_path, "v2")
        served.signal(signal.SIGHUP)
        served.wait_for("the in-process server has drained")
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            assert client.makefile("rb").readline().startswith(b"v2 ")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not path.exists()


def _in_a_window(folder: Path, window: str, *args: str) -> tuple[Served, Path]:
    """``weft serve app:handle ARGS`` held in ``window`` (``_signal_windows``); and its gate."""
    write_app(folder, "v1")
    gate = folder / "gate"
    served = Served(
        [sys.executable, str(Path(__file__).parent / "_signal_windows.py"), window, "serve",
         APP, "--manager", "threads", "--bind", "127.0.0.1:0", "--graceful-timeout", "30",
         *args],
        cwd=folder,
        env={**environment(), "WEFT_TEST_GATE": str(gate)},
    )  # fmt: skip
    return served, gate


@pytest.mark.timeout(60)
def test_a_term_just_after_a_supervisor_says_listening_stops_it_cleanly(tmp_path: Path) -> None:
    """A supervisor says "listening on" and writes its pid file before its signal
    handlers go in; a TERM there (a service manager stopping a unit as it starts) was
    a death by SIGTERM, exit -15, no line said why. Held there (a slow pid file
    write), the TERM now waits for the handlers and stops the supervisor cleanly."""
    served, gate = _in_a_window(tmp_path, "listening", "--workers", "2",
                                "--pid", str(tmp_path / "weft.pid"))  # fmt: skip
    with served:
        served.wait_for(LISTENING)
        served.wait_for("IN WINDOW")
        served.signal(signal.SIGTERM)
        gate.touch()
        code = served.finish()
        served.wait_closed()
    assert code == 0, served.text
    assert "received SIGTERM" in served.text
    assert not (tmp_path / "weft.pid").exists()


@pytest.mark.timeout(60)
def test_a_term_as_one_process_becomes_a_supervisor_is_not_lost(tmp_path: Path) -> None:
    """HUP makes one process the supervisor of a worker; a TERM landing after the HUP
    was read and before the supervisor's handlers went in was caught by the old
    handlers and never read: the supervisor served on with its new worker (until the
    TERM's deadline ended it, 30 s later, with exit status 4). Held there, the TERM
    is now the supervisor's first signal, and it stops."""
    served, gate = _in_a_window(tmp_path, "hand-over")
    with served:
        served.wait_for(LISTENING)
        served.signal(signal.SIGHUP)
        served.wait_for("IN WINDOW")
        served.signal(signal.SIGTERM)
        gate.touch()
        code = served.finish(15)
        served.wait_closed()
    assert code == 0, served.text
    assert "received SIGTERM" in served.text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_hup_ends_a_reload_whose_new_workers_hang_as_they_start(
    tmp_path: Path, shape: str
) -> None:
    """New code that hangs at import: the reload waited for its workers for good, and
    the HUP sent once the code was fixed was put off "after the reload under way is
    done", which never came (no READY=1 for systemd either; the systemd check's F2).
    Now that HUP, once the workers have been starting for RELOAD_PATIENCE (5 s), stops
    those still starting and the reload starts over."""
    served, address = start(tmp_path, *SHAPES[shape])
    workers = 3 if SHAPES[shape] else 0  # one process: its own server, then 1 worker
    with served:
        if workers:
            served.wait_for(READY, count=workers)
        (tmp_path / "app.py").write_text(
            "import os\nimport time\n\n"
            "open(f'hung-{os.getpid()}', 'w').close()\n"
            "time.sleep(3600)\n"
        )
        served.signal(signal.SIGHUP)
        # Each new worker is in the import that hangs (not yet starting, to import
        # the fixed code written next).
        wait_until(lambda: len(list(tmp_path.glob("hung-*"))) == (workers or 1))
        assert greeting(address)[0] == "v1", "the old code serves on meanwhile"
        write_app(tmp_path, "v2")
        served.signal(signal.SIGHUP)
        served.wait_for("stopping them and reloading again")
        wait_for_version(address, "v2")
        served.wait_for(f"reload done: {workers or 1} new worker")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTTIN, signal.SIGHUP])
def test_a_supervisor_out_of_descriptors_keeps_its_workers(tmp_path: Path, signum: int) -> None:
    """A supervisor with no descriptor free (its limit lowered to what it holds) asked
    for a new worker: the worker's socket pair could not be made, the OSError ended
    the supervisor, exit 1, and its workers were killed, the service gone (the
    supervisor check's F1). Now it says it cannot start a worker, serves on with the
    workers it has, and starts the new one once descriptors are back."""
    import resource

    served, address = start(tmp_path, "--workers", "2")
    with served:
        served.wait_for(READY, count=2)
        pid = served.proc.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        held = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (held, limits[1]))
        try:
            served.signal(signum)
            served.wait_for("cannot start a worker: .*Too many open files; trying again")
            assert greeting(address)[0] == "v1", "the workers it has serve on"
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        served.wait_for(READY, count=3)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


@pytest.mark.timeout(60)
def test_usr2_survives_a_pid_file_another_process_rewrote(tmp_path: Path) -> None:
    """The re-executed supervisor ran weft serve's start-up checks again: a pid file
    naming another running process (rewritten by a user who may write its directory,
    or left by a careless script) made it exit 2, its workers with it (the local-
    attacker check's F3; its F4, a one-process server under --user that may no longer
    write to root's /run, failed the same check). The upgrade keeps its own file."""
    pid_file = tmp_path / "weft.pid"
    served, address = start(tmp_path, "--workers", "2", "--pid", str(pid_file))
    with served:
        served.wait_for(READY, count=2)
        pid_file.write_text("1\n")  # init: always running
        write_app(tmp_path, "v2")
        served.signal(signal.SIGUSR2)
        served.wait_for("re-executed")
        wait_for_version(address, "v2")
        assert served.proc.poll() is None, served.text
        assert pid_file.read_text().strip() == str(served.proc.pid)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not pid_file.exists()


@pytest.mark.timeout(60)
def test_usr2_survives_a_pid_file_that_cannot_be_rewritten(tmp_path: Path) -> None:
    """USR2 re-executes the supervisor, the same PID, which wrote its pid file again
    and, that failing (a full disk), exited 2, its workers with it: the service gone,
    a stale pid file left (the supervisor check's F6). The file already names that
    PID: it is kept. Here its rewrite cannot happen (a directory sits where the new
    file would be made)."""
    pid_file = tmp_path / "weft.pid"
    served, address = start(tmp_path, "--workers", "2", "--pid", str(pid_file))
    with served:
        served.wait_for(READY, count=2)
        assert pid_file.read_text().strip() == str(served.proc.pid)
        (tmp_path / f".weft.pid.{served.proc.pid}.tmp").mkdir()  # where it would write
        write_app(tmp_path, "v2")
        served.signal(signal.SIGUSR2)
        served.wait_for("re-executed")
        wait_for_version(address, "v2")
        assert pid_file.read_text().strip() == str(served.proc.pid)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not pid_file.exists()


SLOW_REPLY = """
import time


def handle(conn):
    conn.recv(64)
    conn.sendall(b"+")
    time.sleep(1.5)
    conn.sendall(b"the whole reply\\n")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", ["one-process", "workers-2"])
def test_a_stop_signal_sent_twice_at_once_is_one_request(tmp_path: Path, shape: str) -> None:
    """coreutils' `timeout` sends TERM to its child and then to its process group,
    the child included, within a millisecond. The second was taken as "quit at
    once": the reply in progress was cut, and the process died by the signal with
    no line about it (2 runs in 8, the conventions check). A repeat within
    STOP_REPEAT_WINDOW (0.1 s) of the first is the same request; a later one still
    quits at once (test_bounded_stop.py's second SIGTERM)."""
    (tmp_path / "slow.py").write_text(SLOW_REPLY)
    workers = ("--workers", "2") if shape == "workers-2" else ()
    port = free_port()
    served = Served(
        weft_serve("slow:handle", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10",
                   *workers),
        cwd=tmp_path,
    )  # fmt: skip
    with served:
        wait_until(lambda: connects(port), what="the server to accept")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as client,
            client.makefile("rb") as reader,
        ):
            client.sendall(b"ask\n")
            assert reader.read(1) == b"+", "the handler holds the connection"
            served.signal(signal.SIGTERM)
            time.sleep(0.02)  # two sent together are one pending signal: apart, but close
            served.signal(signal.SIGTERM)
            assert reader.readline() == b"the whole reply\n", served.text
        assert served.finish() == 0, served.text
    assert "received SIGTERM again" not in served.text, served.text
