"""weft serve's logging at its edges, as an operator and an attacker read it.

Real ``weft serve`` processes on 127.0.0.1, their stderr read as a log pipeline
would (``json.loads`` per line) or not read at all (a full pipe): a stalled reader
stops neither the serving nor the stop; JSON stays JSON (the watchdog's dump, the
stop deadline's report, a failure to start); peer bytes never reach a line raw; the
access log's byte counts are the client's; --check-config refuses the log configs
serve refuses. From an outside check (each failed before its fix).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _log_pipes import F_SETPIPE_SZ, IDS, MANAGERS, env, non_json, read_until
from _serving import free_port, weft_serve


def _handler(manager: str) -> str:
    return "_serving:handle_async" if manager in ("trio", "asyncio") else "_serving:handle"


# -- 1. a logging call that blocks (stderr a full pipe nobody reads) -----------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_a_full_stderr_pipe_neither_stops_the_service_nor_its_bounded_stop(
    manager: str, extra: tuple[str, ...]
) -> None:
    """stderr is a pipe (4 KiB) that nobody reads once the server listens, as with a
    stalled log collector: the server goes on serving, and SIGTERM ends it within
    --graceful-timeout (2 s, plus slack). Before the log's own writer thread, it
    served ~42 clients then hung (gevent, trio, asyncio, uvloop), and on no manager
    did the stop end at all."""
    port = free_port()
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    argv = weft_serve(_handler(manager), "-b", f"127.0.0.1:{port}", "-k", manager,
                      "--access-log", "--graceful-timeout", "2", *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write_end, env=env(),
                            stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(write_end)
    try:
        read_until(read_end, b"listening on")
        # From here on, nobody reads the pipe.
        served = 0
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                    client.settimeout(2)
                    client.recv(100)  # the pid line
                    client.sendall(b"ping\n")
                    if client.recv(100) == b"ping\n":
                        served += 1
            except OSError:
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(8)
            took: float | None = time.monotonic() - started
        except subprocess.TimeoutExpired:
            took = None
        assert served == 100 and took is not None and took < 5, (
            f"with stderr a full pipe: served {served} of 100 clients; SIGTERM with "
            f"--graceful-timeout 2 "
            + ("did not end it within 8 s" if took is None else f"ended it in {took:.1f} s")
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)


# -- 2. --check-config and --log-config -----------------------------------------------


BAD_LOG_CONFIGS = {
    "missing-class.toml": '[handlers.h]\nclass = "nosuch.Handler"\n[root]\nhandlers = ["h"]\n',
    "unwritable.json": json.dumps(
        {
            "handlers": {"f": {"class": "logging.FileHandler", "filename": "/proc/none/x.log"}},
            "root": {"handlers": ["f"]},
        }
    ),
    "wrong.ini": "[x]\ny=1\n",
    "broken.toml": "not toml [",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD_LOG_CONFIGS))
def test_check_config_exits_2_for_a_log_config_that_serve_refuses(
    tmp_path: Path, name: str
) -> None:
    """docs/deployment.md: exit 2 is 'a mistake in ... the log config ...; nothing was
    bound or served (`--check-config` exits 2 for the same mistakes)'. `weft serve`
    exits 2 for each of these files, and so does `--check-config` (it said 0, having
    returned before the log config was applied)."""
    path = tmp_path / name
    path.write_text(BAD_LOG_CONFIGS[name])
    base = ["_serving:handle", "-b", "127.0.0.1:0", "--log-config", str(path)]
    serve = subprocess.run(weft_serve(*base), env=env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    assert serve.returncode == 2, serve.stderr  # weft serve refuses it
    check = subprocess.run(weft_serve(*base, "--check-config"), env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert check.returncode == 2, (
        f"--check-config exited {check.returncode} for a log config `weft serve` refuses "
        f"with: {serve.stderr.strip()}"
    )


# -- 3. JSON lines: every line of stderr is a JSON object ------------------------------


@pytest.mark.timeout(60)
def test_json_log_format_keeps_a_handler_import_error_a_json_line(tmp_path: Path) -> None:
    """--log-format json: 'one JSON object a line'. Logging is set up before the handler
    is imported, so the import error (exit 2) is a JSON line too (it was plain text)."""
    run = subprocess.run(weft_serve("nosuchmodule:handle", "-b", "127.0.0.1:0",
                                    "--log-format", "json"),
                         env=env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip(), "nothing said"
    assert non_json(run.stderr) == [], f"non-JSON lines: {non_json(run.stderr)}"


@pytest.mark.parametrize(
    ("args", "variables"),
    [
        (["--backlog", "0", "--log-format", "json"], {}),
        (["--bind", "nonsense:::", "--log-format", "JSON"], {}),
        (["--backlog", "0"], {"WEFT_LOG_FORMAT": "json"}),
        (["--check-config"], {"WEFT_LOG_FORMAT": "json", "WEFT_NO_SUCH_SETTING": "1"}),
    ],
    ids=["flag", "bind", "variable", "check-config-warning"],
)
def test_json_log_format_keeps_the_configs_own_errors_json(
    tmp_path: Path, args: list[str], variables: dict[str, str]
) -> None:
    """deployment.md: with --log-format json 'every line weft writes is one JSON object:
    a failure to start ...'. A mistake in the config itself was found before the log
    format was known and said as plain text (the config probe's F5); the flag, or
    WEFT_LOG_FORMAT, now decides the format of those lines too."""
    run = subprocess.run(weft_serve("nosuchmodule:handle", "--control-socket", "off", *args),
                         env={**env(), **variables}, cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert run.stderr.strip(), "nothing said"
    assert non_json(run.stderr) == [], f"non-JSON lines: {non_json(run.stderr)}"
    assert run.returncode == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS[1:], ids=IDS[1:])
def test_json_log_format_keeps_the_watchdogs_stack_dump_json(
    tmp_path: Path, manager: str, extra: tuple[str, ...]
) -> None:
    """docs/deployment.md (--timeout): a worker whose loop is blocked is 'dumping its
    stacks to the log and replacing it'. With --log-format json, the dump is one JSON
    line (``stacks``), not faulthandler's raw 'Thread 0x...' and '  File ...' lines,
    which a JSON pipeline cannot parse."""
    from _serving import Served

    handler = ("_stuck_handlers:stuck_async" if manager in ("trio", "asyncio")
               else "_stuck_handlers:stuck")  # fmt: skip
    port = free_port()
    argv = weft_serve(handler, "-b", f"127.0.0.1:{port}", "-k", manager, "-w", "1",
                      "--timeout", "2", "--graceful-timeout", "1", "--log-format", "json",
                      *extra)  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env()) as served:
        served.wait_for("worker ready", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(1) == b"+"
            served.wait_for("replacing it", 1, timeout=20)
            served.wait_for("worker ready", 2, timeout=20)
            # The dump's own line before the stop: a SIGTERM racing it ends the stuck
            # worker by the stop's bound, and on a loaded host the line could be lost
            # with it (a fresh-clone run of the parallel suite, once); the subject
            # here is what the line is, not that race.
            served.wait_for('"stacks": "', 1, timeout=20)
        served.signal(signal.SIGTERM)
        served.finish(20)
        served.wait_closed(10)
        bad = non_json(served.text)
    assert bad == [], f"{len(bad)} non-JSON line(s) on stderr, e.g. {bad[:3]}"
    records = [json.loads(line) for line in served.text.splitlines() if line.strip()]
    dumps = [r["stacks"] for r in records if "stacks" in r]
    assert dumps and "most recent call first" in dumps[0], "the stacks are not in the log"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["gevent", "asyncio"])
def test_a_stuck_worker_busy_with_the_gil_is_dumped_as_json_then_killed(
    tmp_path: Path, manager: str
) -> None:
    """Under --log-format json the dump was written by a thread of the stuck worker,
    which needed the GIL: on a loaded host (here: a handler spinning in Python that
    lets other threads run every 0.4 s) it came late or was lost with the worker
    (CI's xdist run saw it once). The supervisor now reads faulthandler's text from
    the worker's dump pipe and logs the JSON line itself, then kills the worker at
    once, well within DUMP_GRACE."""
    from _serving import Served

    from weft_core._workers import DUMP_GRACE

    handler = "_stuck_handlers:spinning" + ("_async" if manager == "asyncio" else "")
    port = free_port()
    argv = weft_serve(handler, "-b", f"127.0.0.1:{port}", "-k", manager, "-w", "1",
                      "--timeout", "2", "--graceful-timeout", "1", "--log-format", "json")  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env()) as served:
        served.wait_for("worker ready", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(1) == b"+"
            served.wait_for("replacing it", 1, timeout=20)
            served.wait_for('"stacks": "', 1, timeout=DUMP_GRACE + 10)
            served.wait_for("exited with SIGKILL", 1, timeout=DUMP_GRACE + 10)
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0, served.text
    records = [json.loads(line) for line in served.text.splitlines() if line.strip()]
    dumps = [r["stacks"] for r in records if "stacks" in r]
    assert dumps and "in spinning" in dumps[0], dumps


# -- 4. the access log's byte counts ----------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_access_log_counts_no_byte_in_for_a_client_that_sent_none(
    tmp_path: Path, manager: str, extra: tuple[str, ...]
) -> None:
    """A client that connects and closes at once (a connect-only health check, a port
    scan) sent 0 bytes, and the access log says in=0. The server's greeting meets the
    closed peer, whose RST moves the socket to TCP_CLOSE, where the state no longer
    says that the FIN counted by tcpi_bytes_received came (it said in=1)."""
    from _serving import Served

    port = free_port()
    argv = weft_serve(_handler(manager), "-b", f"127.0.0.1:{port}", "-k", manager,
                      "--access-log", "--log-format", "json", *extra)  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env()) as served:
        served.wait_for("listening on", 1)
        for _ in range(10):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        served.wait_for(r'"logger": "weft.access"', 10, timeout=20)
        served.signal(signal.SIGTERM)
        served.finish(20)
        records = [json.loads(line) for line in served.lines]
    access = [r for r in records if r["logger"] == "weft.access"]
    assert len(access) == 10
    wrong = [r["message"] for r in access if r["bytes_in"] not in (0, None)]
    assert wrong == [], f"{len(wrong)} of 10 clients that sent nothing logged as: {wrong[:3]}"


# -- 5. peer bytes reaching a text log unescaped ----------------------------------------

HOSTILE = b"X\r\n2026-12-05T00:00:00.000+00:00 [1] [INFO] weft: stopped\n\x1b]0;pwned\x07\x1b[2J"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "trio", "asyncio"])
def test_a_failing_exception_handler_does_not_log_the_peers_bytes_raw(manager: str) -> None:
    """docs/networking.md 'Untrusted text in logs': a handler's exception message
    carrying a client's bytes is logged escaped, also when the application's
    exception_handler itself raises: the 'During handling of the above exception'
    part of that traceback printed the client's CR/LF (a forged line) and ESC bytes
    (a terminal title, a screen clear) raw."""
    import io
    import logging

    import _log_edges_handlers as h

    from weft_core import Server
    from weft_core._logging import TextFormatter

    out = io.StringIO()
    capture = logging.StreamHandler(out)
    capture.setFormatter(TextFormatter())
    weft_log = logging.getLogger("weft")
    weft_log.addHandler(capture)
    handler = h.raise_what_was_sent if manager == "threads" else h.raise_what_was_sent_async
    server = Server(handler, manager=manager, exception_handler=h.failing_exception_handler)
    try:
        server.run()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
            client.sendall(HOSTILE)
            client.settimeout(5)
            try:
                client.recv(10)  # the server closes it after the handler failed
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while "exception_handler" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        server.stop(timeout=5)
        weft_log.removeHandler(capture)
    text = out.getvalue()
    assert "exception_handler" in text, text
    forged = [line for line in text.splitlines() if line.startswith("2026-12-05T00:00:00")]
    assert "\x1b" not in text and "\r" not in text and forged == [], (
        f"peer bytes raw in the log: ESC {text.count(chr(27))}x, CR {text.count(chr(13))}x, "
        f"forged lines {forged}:\n{text!r}"
    )


# -- 6. a stop that a blocked loop cuts short: what reaches the log ---------------------


def _stuck_stop(tmp_path: Path, manager: str) -> tuple[int, list[str]]:
    """Serve the stuck handler with JSON logs, hold one client, SIGTERM (graceful 1 s)."""
    from _serving import Served

    handler = ("_stuck_handlers:stuck_async" if manager in ("trio", "asyncio")
               else "_stuck_handlers:stuck")  # fmt: skip
    port = free_port()
    argv = weft_serve(handler, "-b", f"127.0.0.1:{port}", "-k", manager, "--log-format",
                      "json", "--graceful-timeout", "1")  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env()) as served:
        served.wait_for("listening on", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(1) == b"+"
            if manager == "gevent":
                served.wait_for("weft.gevent", 1, timeout=20)  # the blocked-hub report
            served.signal(signal.SIGTERM)
            status = served.finish(30)
        served.wait_closed(10)
        return status, list(served.lines)


@pytest.mark.timeout(60)
def test_json_log_format_keeps_the_stop_deadlines_report_json(tmp_path: Path) -> None:
    """gevent, a handler blocking the hub, SIGTERM with --graceful-timeout 1: the
    documented exit 4, and its report ('received SIGTERM and the stop did not end
    within 1s plus 2.5s ...' and every thread's stack) one JSON line under
    --log-format json (it was a plain line and a raw faulthandler dump)."""
    status, lines = _stuck_stop(tmp_path, "gevent")
    assert status == 4
    bad = non_json("".join(lines))
    assert bad == [], f"{len(bad)} non-JSON line(s), e.g. {bad[:3]}"


@pytest.mark.timeout(60)
def test_trio_stop_with_a_blocked_loop_logs_no_traceback_of_weft_s_own(tmp_path: Path) -> None:
    """trio, a handler blocking the loop, SIGTERM with --graceful-timeout 1: exit 4 and
    the documented 'N task(s) ignored it and are abandoned', and no traceback of weft's
    own: closing the listener from the stop's thread, off the trio thread, failed
    with 'RuntimeError: must be called from async context', logged at ERROR."""
    status, lines = _stuck_stop(tmp_path, "trio")
    assert status == 4
    records = [json.loads(line) for line in lines]
    tracebacks = [f"{r['message']}: {r['exc_info'].splitlines()[-1]}"
                  for r in records if r.get("exc_info")]  # fmt: skip
    assert tracebacks == [], f"weft's own failures logged with a traceback: {tracebacks}"


@pytest.mark.timeout(60)
def test_access_log_counts_the_bytes_of_a_tls_refused_client_on_trio(tmp_path: Path) -> None:
    """A plain-text client on a TLS port (18 bytes) and a stalled ClientHello (3 bytes)
    are refused, each with an access line 'how=tls_error' and in=18 and in=3, as on
    every manager; trio logged in=- out=- (the count read after its stream had closed
    the socket), the value the docs keep for 'where the kernel cannot tell'."""
    from _serving import Served, server_certs

    certs = server_certs(tmp_path)
    port = free_port()
    argv = weft_serve("_serving:handle_async", "-b", f"127.0.0.1:{port}", "-k", "trio",
                      "--log-format", "json", "--access-log", "--certfile", certs["cert"],
                      "--keyfile", certs["key"], "--tls-handshake-timeout", "1")  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env()) as served:
        served.wait_for("listening on", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                client.recv(100)
            except OSError:
                pass
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"\x16\x03\x01")
            served.wait_for(r'"logger": "weft.access"', 2, timeout=10)
        served.signal(signal.SIGTERM)
        served.finish(20)
        records = [json.loads(line) for line in served.lines]
    access = sorted((r["bytes_in"] or -1, r["how"], r["message"])
                    for r in records if r["logger"] == "weft.access")  # fmt: skip
    assert [(n, how) for n, how, _ in access] == [(3, "tls_error"), (18, "tls_error")], access


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_a_stuck_handler_and_a_full_stderr_pipe_still_exit_by_the_bound(
    manager: str, extra: tuple[str, ...]
) -> None:
    """The same unread pipe, and a handler that ignores the stop: SIGTERM must end the
    process by its bound, exit 4. Seen (the log sinks check's F2): it never exited on
    threads, trio, asyncio and uvloop. Its exit flush waited for the pipe while the
    deadline's thread fired, which then could not run once the interpreter was
    finalizing; faulthandler's backstop blocked writing to the full pipe, and the
    finalizing main thread waited for it: a process refusing clients, for good."""
    port = free_port()
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    handler = "_stuck_handlers:stuck_on_go" + ("_async" if manager in ("trio", "asyncio") else "")
    argv = weft_serve(handler, "-b", f"127.0.0.1:{port}", "-k", manager, "--access-log",
                      "--graceful-timeout", "1", *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write_end, env=env(),
                            stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(write_end)
    try:
        read_until(read_end, b"listening on")
        for n in range(100):  # access lines, far more than the pipe holds
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"%d\n" % n)
                assert client.recv(100) == b"%d\n" % n
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stuck:
            stuck.sendall(b"go\n")
            assert stuck.recv(1) == b"+"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - started
        # The bound: --graceful-timeout, STOP_GRACE (2 s), then a second more for the
        # exit with a stderr that takes nothing; a second of slack on a loaded host.
        # Exit 4, not 1: faulthandler's backstop did not have to end it.
        assert code == 4 and took < 1 + 2 + 1 + 1, (
            f"exit {code} after {took:.1f}s (bound 4 s, exit 4)"
            if code is not None
            else "still running 10 s after SIGTERM"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_a_failing_log_config_handler_neither_floods_nor_stalls(
    tmp_path: Path, manager: str, extra: tuple[str, ...]
) -> None:
    """--log-config with a file handler on a full disk (/dev/full: ENOSPC for every
    record), stderr a pipe nobody reads after "listening on". logging's own
    handleError wrote each failure, tracebacks and all, to stderr as it came: a flood
    (6 MB for 600 connections) and, stderr full, a blocked caller for every record:
    gevent, trio, asyncio and uvloop served 34-48 clients, then none (the log sinks
    check's F4). Now one line, counting what was lost, and every client served."""
    config = {
        "version": 1,
        "handlers": {"full": {"class": "logging.FileHandler", "filename": "/dev/full"}},
        "root": {"level": "INFO", "handlers": ["full"]},
    }
    (tmp_path / "logging.json").write_text(json.dumps(config))
    port = free_port()
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    argv = weft_serve(_handler(manager), "-b", f"127.0.0.1:{port}", "-k", manager,
                      "--access-log", "--log-config", str(tmp_path / "logging.json"),
                      *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write_end, env=env(),
                            stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    os.close(write_end)
    try:
        head = read_until(read_end, b"log handler <FileHandler /dev/full (NOTSET)> failed")
        served = 0
        for _ in range(100):  # nobody reads stderr from here on
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.settimeout(5)
                client.recv(100)  # the pid line
                client.sendall(b"ping\n")
                served += client.recv(100) == b"ping\n"
        assert served == 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        os.set_blocking(read_end, False)
        with contextlib.suppress(BlockingIOError):
            head += os.read(read_end, 1 << 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
    text = head.decode("utf-8", "replace")
    assert "--- Logging error ---" not in text
    # One line as it began, one at the exit for the rest: every record counted.
    said = re.findall(
        r"log handler <FileHandler /dev/full \(NOTSET\)> failed: .*?; (\d+) record", text
    )
    assert len(said) == 2 and sum(map(int, said)) >= 100, text
