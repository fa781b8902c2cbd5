"""weft serve's log writer at its edges: nothing lost uncounted, nothing cut, JSON all through.

Real ``weft serve`` processes on 127.0.0.1, their stderr read as a log pipeline
would. From a second outside check of the logging; each test failed before its fix
(its docstring says what was seen then).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time

import pytest
from _log_pipes import (
    F_SETPIPE_SZ,
    IDS,
    MANAGERS,
    env,
    non_json,
    read_until,
    stopped_lock_holder,
)
from _serving import connects, free_port, weft_serve

from weft_core import available_managers
from weft_core.testing._support import wait_until

H = "_log_writer_handlers"


def _handler(manager: str, name: str) -> str:
    return f"{H}:{name}_async" if manager in ("trio", "asyncio") else f"{H}:{name}"


def _read_to_eof(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"stderr still open after {timeout}s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return buf
            buf += chunk


def _ask(port: int, request: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(request)
        return client.recv(100)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


# -- 1. stderr a non-blocking pipe (shared with a process that set O_NONBLOCK) -------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_a_non_blocking_stderr_pipe_loses_no_line_uncounted(
    manager: str, extra: tuple[str, ...]
) -> None:
    """stderr is a pipe whose write end is O_NONBLOCK (as when it is shared with a
    parent that set it so: node, an event-loop based supervisor), read slowly: the
    reader waits until the handler's burst of 3,000 lines is logged, then reads all.
    Promise: every line reaches stderr, or the lines dropped are counted and the count
    logged. Seen before: ~450 of 3,000 lines arrived, no "dropped" line: the writer
    took BlockingIOError (pipe full) for "closed, or gone" and cleared every waiting
    line; it now waits for the pipe to take them."""
    port = free_port()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    argv = weft_serve(_handler(manager, "burst"), "-b", f"127.0.0.1:{port}", "-k", manager,
                      *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write_end, env=env(),
                            stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(write_end)
    try:
        head = read_until(read_end, b"listening on", 1, 30)
        # Nobody reads while the burst is logged; then everything is read.
        assert _ask(port, b"3000\n") == b"done\n"
        # The writer thread has time to meet a full pipe (waits on the result, not
        # on the thread: the pipe holds 64 KiB, the burst ~390 KiB).
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        log = (head + _read_to_eof(read_end, 30)).decode("utf-8", "replace")
        proc.wait(20)
    finally:
        _stop(proc)
        os.close(read_end)
    lines = log.splitlines()
    got = sum(1 for line in lines if "app: line " in line)
    dropped = [line for line in lines if "dropped" in line]
    counted = sum(int(line.split("WARNING] weft: ")[1].split()[0]) for line in dropped
                  if "WARNING] weft: " in line)  # fmt: skip
    assert got + counted == 3000, (
        f"stderr a non-blocking pipe read late: {got} of 3000 lines reached it, "
        f"{counted} counted as dropped ({dropped[:2]}); {3000 - got - counted} lost unsaid"
    )


# -- 2. two workers' long lines on one stderr pipe -----------------------------------


def _two_workers_logging_long_lines(
    manager: str, extra: tuple[str, ...]
) -> tuple[int, subprocess.Popen[bytes], int]:
    """``weft serve --workers 2`` whose handler logs long lines: its port, process, stderr."""
    port = free_port()
    argv = weft_serve(_handler(manager, "long_lines"), "-b", f"127.0.0.1:{port}", "-k",
                      manager, "--workers", "2", *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stderr is not None
    return port, proc, proc.stderr.fileno()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_long_lines_of_two_workers_never_interleave_mid_line(
    manager: str, extra: tuple[str, ...]
) -> None:
    """--workers 2, stderr one pipe read as fast as it comes: six clients at once,
    each makes its worker log 10 lines of 200,000 bytes (one letter per process). A
    pipe write larger than PIPE_BUF is not atomic, so the kernel interleaved the two
    workers' bytes (and the supervisor's short lines) until each line was written
    under a lock the processes share: each line whole, of one process."""
    port, proc, fd = _two_workers_logging_long_lines(manager, extra)
    chunks: list[bytes] = []
    try:
        chunks.append(read_until(fd, b"worker ready", 2, 30))
        done = threading.Event()

        def reader() -> None:
            while not done.is_set() or select.select([fd], [], [], 0.2)[0]:
                if select.select([fd], [], [], 0.2)[0]:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        return
                    chunks.append(chunk)

        reading = threading.Thread(target=reader, daemon=True)
        reading.start()
        answers: list[bytes] = []
        clients = [threading.Thread(target=lambda: answers.append(_ask(port, b"10\n")))
                   for _ in range(6)]  # fmt: skip
        for client in clients:
            client.start()
        for client in clients:
            client.join(40)
        assert answers == [b"done\n"] * 6
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        done.set()
        reading.join(10)
    finally:
        _stop(proc)
    long = [line for line in b"".join(chunks).decode("utf-8", "replace").splitlines()
            if len(line) > 1000]  # fmt: skip
    broken = [line for line in long
              if not line.rsplit(" ", 1)[-1].isalpha() or len(set(line.rsplit(" ", 1)[-1])) != 1
              or len(line.rsplit(" ", 1)[-1]) != 200_000]  # fmt: skip
    assert len(long) == 60 and not broken, (
        f"--workers 2, stderr one pipe: {len(long)} long lines (60 logged), {len(broken)} of "
        f"them not one worker's whole line, e.g. {[b[:60] + '...' for b in broken[:2]]}"
    )


def _read_letters(fd: int, count: int, timeout: float) -> int:
    """Read ``fd`` until one letter of long_lines' (A-H) came ``count`` times; how many.

    Counted across lines: lines written without the lock may cut into each other.
    """
    deadline = time.monotonic() + timeout
    seen = dict.fromkeys(b"ABCDEFGH", 0)
    while max(seen.values()) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"not {count} of one letter within {timeout}s: {seen}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 20)
            assert chunk, "EOF before the long line"
            for letter in seen:
                seen[letter] += chunk.count(letter)
    return max(seen.values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS[:2], ids=IDS[:2])  # threads, gevent
def test_a_process_stopped_holding_the_line_lock_stops_no_other_processs_log(
    manager: str, extra: tuple[str, ...]
) -> None:
    """--workers 2. A process takes the lock the service's processes write their
    log lines under, as weft does, and is stopped (SIGSTOP) holding it: a worker a
    debugger stopped in the middle of a line. Promise: everyone else's log goes on:
    the supervisor logs a worker's SIGKILL, and a worker's 200,000-byte line comes
    out, each within a grace. Seen before, in CI: a worker stopped right after its
    "worker ready" line, while it still held the lock, and the supervisor's "exited
    with SIGKILL" line for the other never came (30 s): every line of every process
    waited for the lock forever."""
    port, proc, fd = _two_workers_logging_long_lines(manager, extra)
    try:
        head = read_until(fd, b"worker ready", 2, 30).decode()
        pids = [int(m) for m in re.findall(r"worker (\d+) started", head)]
        with stopped_lock_holder(proc.pid, pids[0]):
            killed = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            read_until(fd, f"worker {pids[0]} exited with SIGKILL".encode(), 1, 10)
            exit_logged = time.monotonic() - killed
            asked = time.monotonic()
            assert _ask(port, b"1\n", 10) == b"done\n"
            letters = _read_letters(fd, 200_000, 10)
            long_logged = time.monotonic() - asked
    finally:
        _stop(proc)
    assert letters >= 200_000
    for what, took in (("the exit line", exit_logged), ("a long line", long_logged)):
        assert took < 4.0, f"{what} took {took:.1f}s past a stopped lock holder"


# -- 3. JSON stays JSON: warnings, logging.lastResort --------------------------------


def _json_serve(handler: str, manager: str, extra: tuple[str, ...]) -> list[str]:
    port = free_port()
    argv = weft_serve(handler, "-b", f"127.0.0.1:{port}", "-k", manager, "--log-format",
                      "json", *extra)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stderr is not None
    try:
        head = read_until(proc.stderr.fileno(), b"listening on", 1, 30)
        assert _ask(port, b"go\n", 10) == b"done\n"
        proc.send_signal(signal.SIGTERM)
        rest = _read_to_eof(proc.stderr.fileno(), 30)
        proc.wait(20)
    finally:
        _stop(proc)
    return non_json((head + rest).decode("utf-8", "replace"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("manager", "extra"), MANAGERS, ids=IDS)
def test_json_log_format_keeps_a_handlers_warning_a_json_line(
    manager: str, extra: tuple[str, ...]
) -> None:
    """A handler calls warnings.warn (as libraries do for deprecations). Under
    --log-format json ("every line weft writes is one JSON object") the warning is
    one JSON line (warnings captured by logging). It was written by
    warnings.showwarning straight to sys.stderr as two raw text lines, past the
    log's own writer thread too."""
    not_json = _json_serve(_handler(manager, "warns"), manager, extra)
    assert not not_json, f"--log-format json: lines that are not JSON: {not_json}"


@pytest.mark.timeout(60)
def test_json_log_format_keeps_logging_last_resort_a_json_line() -> None:
    """A library's logger that does not propagate and has no handler of its own
    falls to logging.lastResort, which writes the bare message (no time, no level,
    no JSON) to sys.stderr, straight, past the writer thread: under --log-format json
    it is now a JSON line (logging.lastResort forwards to weft's own handler)."""
    not_json = _json_serve(f"{H}:last_resort", "threads", ())
    assert not not_json, f"--log-format json: lines that are not JSON: {not_json}"


@pytest.mark.timeout(60)
def test_json_log_format_keeps_a_failing_helper_threads_traceback_json() -> None:
    """A handler's helper thread raises: threading.excepthook writes `Exception in
    thread ...` and the traceback as raw text lines straight to sys.stderr (~6 lines
    that were not JSON); weft's threading.excepthook now logs it as one JSON line
    with exc_info."""
    not_json = _json_serve(f"{H}:thread_raises", "threads", ())
    assert not not_json, f"--log-format json: lines that are not JSON: {not_json}"


# -- 4. a failure to start with stderr a full pipe nobody reads ----------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_failure_to_start_with_a_stalled_stderr_still_exits(log_format: str) -> None:
    """stderr is a pipe already full (a stalled collector, as across a restart loop);
    `weft serve nosuchmod:handler` must fail to start. Promise ("a log reader that
    stalls stops nothing"; a failure to start is exit 2): it exits 2, within a bound
    (its line dropped or cut short, as the stop deadline's report is). It never
    exited (still running after 10 s) while _fail print()ed to sys.stderr; its line
    now goes through the log's writer, whose wait at exit is bounded."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(1000):
            os.write(write_end, b"x" * 512)
    os.set_blocking(write_end, True)
    argv = weft_serve("nosuchmod_probe_logs2:handler", "-b", f"127.0.0.1:{free_port()}",
                      "--log-format", log_format)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=write_end, env=env(),
                            stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(write_end)
    try:
        try:
            status: int | None = proc.wait(10)
        except subprocess.TimeoutExpired:
            status = None
        assert status == 2, "a failure to start with stderr a full pipe: " + (
            "still running after 10 s" if status is None else f"exit {status}"
        )
    finally:
        _stop(proc)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)


# -- 6. stderr that refuses every line: full, or its reader gone -----------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", ["threads", "gevent"])
@pytest.mark.parametrize("sink", ["full", "reader-gone"])
def test_a_stderr_that_refuses_every_line_costs_no_cpu(manager: str, sink: str) -> None:
    """stderr on a full disk (/dev/full: ENOSPC) or a pipe whose reader has gone
    (EPIPE): every line is refused. The writer counted each as dropped, reported the
    count as a line as soon as none waited, which was refused and counted in turn,
    for ever: a core spinning as long as the process ran, idle or not, and every
    handler slowed by the GIL (the log sinks check's F1). Now the lines are lost
    without a spin, and the server serves and stops as ever."""
    if manager not in available_managers():
        pytest.skip(f"weft-{manager} is not installed")
    port = free_port()
    argv = weft_serve(_handler(manager, "burst"), "-b", f"127.0.0.1:{port}", "-k", manager)
    if sink == "full":
        stderr = os.open("/dev/full", os.O_WRONLY)
    else:
        read_end, stderr = os.pipe()
        os.close(read_end)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env(),
                            stdin=subprocess.DEVNULL)  # fmt: skip
    os.close(stderr)
    try:
        wait_until(lambda: connects(port), timeout=30)
        assert _ask(port, b"200\n") == b"done\n"  # 200 lines logged, each refused
        began, cpu = time.monotonic(), _cpu_seconds(proc.pid)
        assert _ask(port, b"1\n") == b"done\n"  # served on
        finished = threading.Event()
        finished.wait(1.5)  # a window of idle time, measured: no event ends it sooner
        used = _cpu_seconds(proc.pid) - cpu
        assert used < 0.4, (
            f"{used:.2f}s of CPU in {time.monotonic() - began:.2f}s idle: the log writer spins"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        _stop(proc)
