"""``weft serve --workers N`` run from a terminal, as an operator runs it.

Each worker runs in a process group of its own inside the supervisor's session
(``_workers.WORKER_GROUP``): in the supervisor's CPU autogroup, where the kernel
groups by session, and out of the terminal's foreground group, so a Ctrl-C reaches
the supervisor alone. Sharing the terminal from the background, a worker must
ignore TTOU (``_signals.WORKER_IGNORED``), or with ``stty tostop`` every line it
logs is refused. Here the terminal is a real pseudo-terminal, the supervisor its
session's leader and foreground group, as a shell's job would be.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from _serving import LISTENING, READY, STARTED, Client, environment, host_port, weft_serve
from test_serve_process_edges import GRACEFUL, SLOW_GOODBYE

#: How long a worker's graceful stop may take here, beyond the handler's own pause.
PROMPT = 10.0
CTRL_C = b"\x03"


class OnTerminal:
    """``weft serve`` on a pseudo-terminal of its own: its controlling terminal."""

    def __init__(self, argv: list[str], cwd: Path, *, tostop: bool = False) -> None:
        master, slave = pty.openpty()
        if tostop:
            attrs = termios.tcgetattr(slave)
            attrs[3] |= termios.TOSTOP
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.master = master
        self._out = bytearray()
        self._closed = False
        self._changed = threading.Condition()
        try:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=environment(), stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True,  # a session leader, then the terminal is its own
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )  # fmt: skip
        finally:
            os.close(slave)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError as exc:  # EIO: every process holding the terminal is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            with self._changed:
                if not data:
                    self._closed = True
                    self._changed.notify_all()
                    return
                self._out += data
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._out.decode(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                text = self._out.decode(errors="replace")
                found = list(regex.finditer(text))
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the terminal closed" if self._closed else f"{timeout}s passed"
                    raise AssertionError(f"{why} before {count} match(es) of {pattern!r}:\n{text}")
                self._changed.wait(left)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for pid in self._workers_left():
            os.kill(pid, 9)
        os.close(self.master)

    def _workers_left(self) -> list[int]:
        """Workers the supervisor started, ready or not (one stuck writing never is)."""
        text = self.text
        pids = {int(m[1]) for pattern in (READY, STARTED) for m in re.finditer(pattern, text)}
        return [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_on_terminal(tmp_path: Path, *, tostop: bool = False) -> tuple[OnTerminal, list[int]]:
    """Two threads workers serving SLOW_GOODBYE from a terminal; the workers' pids."""
    (tmp_path / "slow_goodbye.py").write_text(SLOW_GOODBYE)
    argv = weft_serve("slow_goodbye:handle", "-b", "127.0.0.1:0", "--workers", "2",
                      "--control-socket", "off", "--graceful-timeout", str(GRACEFUL))  # fmt: skip
    term = OnTerminal(argv, tmp_path, tostop=tostop)
    try:
        term.wait_for(LISTENING)
        pids = [int(m[1]) for m in term.wait_for(READY, count=2)]
    except BaseException:
        term.close()
        raise
    return term, pids


@pytest.mark.timeout(60)
def test_workers_share_the_supervisors_session_and_cpu_group_not_its_process_group(
    tmp_path: Path,
) -> None:
    """In sessions of their own, two threads workers on one core served half of what
    one worker serves (each session is a CPU autogroup: the workers preempted each
    other mid-request, and the preempted thread held its GIL). In the terminal's
    foreground group, a Ctrl-C would reach each worker besides the supervisor's
    forwarded SIGTERM: a second signal, quit at once."""
    term, pids = serve_on_terminal(tmp_path)
    try:
        supervisor = term.proc.pid
        foreground = os.tcgetpgrp(term.master)
        assert foreground == os.getpgid(supervisor)
        for pid in pids:
            assert os.getsid(pid) == os.getsid(supervisor), "a worker in a session of its own"
            assert os.getpgid(pid) == pid, "a worker in another's process group"
            assert os.getpgid(pid) != foreground
            mine, theirs = Path(f"/proc/{pid}/autogroup"), Path(f"/proc/{supervisor}/autogroup")
            if mine.exists():  # the kernel groups by session (CONFIG_SCHED_AUTOGROUP)
                group = mine.read_text().split()[0]
                assert group == theirs.read_text().split()[0], (pid, group)
    finally:
        term.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tostop", [False, True], ids=["plain", "tostop"])
def test_ctrl_c_on_the_terminal_drains_each_worker_once(tmp_path: Path, tostop: bool) -> None:
    """Ctrl-C goes to the terminal's foreground group: the supervisor alone, which
    sends each worker one SIGTERM, so an exchange in flight finishes and the service
    exits 0. With ``stty tostop`` the workers share the terminal from the background
    and must still log (a worker that did not ignore TTOU retried each line for
    ever: no 'worker ready', no drain)."""
    term, pids = serve_on_terminal(tmp_path, tostop=tostop)
    try:
        address = host_port(term.wait_for(LISTENING)[0][1])
        client = Client(address)
        with client.sock:
            client.sock.settimeout(PROMPT)
            client.sock.sendall(b"hold\n")
            assert client.line() == b"holding"
            assert client.pid in pids
            term.type(CTRL_C)
            assert client.sock.recv(100) == b"done\n", term.text
        assert term.proc.wait(GRACEFUL + PROMPT) == 0, term.text
        for pid in pids:
            deadline = time.monotonic() + PROMPT
            while _alive(pid) and time.monotonic() < deadline:
                threading.Event().wait(0.05)
            assert not _alive(pid), f"worker {pid} still runs after the supervisor exited"
        text = term.text
        # The supervisor took the Ctrl-C, each worker one SIGTERM, and nothing more.
        assert text.count("received SIGINT") == 1, text
        assert text.count("received SIGTERM") == 2, text
        assert not re.search(r"received SIG\w+ again", text), text
    finally:
        term.close()
