"""``weft serve --workers N`` run from a terminal, as an operator runs it.

Each worker runs in a process group of its own inside the supervisor's session
(``_jobcontrol.OWN_PROCESS_GROUP``): in the supervisor's CPU autogroup, where the kernel
groups by session, and out of the terminal's foreground group, so a Ctrl-C reaches
the supervisor alone. It leaves the terminal at its first line, started with TTIN
and TTOU blocked until then (``_jobcontrol.leave_terminal``, ``JOB_STOPS``), so the
terminal's job control reaches neither it nor its handler's children. Here the
terminal is a real pseudo-terminal, the supervisor its session's leader and
foreground group, as a shell's job would be, or a job of a real interactive bash.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import shlex
import shutil
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

    def __init__(
        self,
        argv: list[str],
        cwd: Path,
        *,
        tostop: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
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
                argv, cwd=cwd, env={**environment(), **(env or {})},
                stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True,  # a session leader, then the terminal is its own
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )  # fmt: skip
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError as exc:  # EIO: every process holding the terminal is gone
                if exc.errno not in (errno.EIO, errno.EBADF):
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

    def close(self, *others: int) -> None:
        """Kill what is left (``others`` too), then close the terminal once nobody holds it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for pid in [*others, *self._workers_left()]:
            if _alive(pid):
                os.kill(pid, 9)
        self._reader.join(10)  # EIO once every holder is gone; the descriptor is its till then
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


def workers_argv(tmp_path: Path, workers: int, module: str = "slow_goodbye",
                 source: str = SLOW_GOODBYE) -> list[str]:  # fmt: skip
    """``weft serve MODULE:handle --workers N`` on a port of its own, ``source`` written out."""
    (tmp_path / f"{module}.py").write_text(source)
    return weft_serve(f"{module}:handle", "-b", "127.0.0.1:0", "--workers", str(workers),
                      "--control-socket", "off", "--graceful-timeout", str(GRACEFUL))  # fmt: skip


def serve_on_terminal(tmp_path: Path, *, tostop: bool = False) -> tuple[OnTerminal, list[int]]:
    """Two threads workers serving SLOW_GOODBYE from a terminal; the workers' pids."""
    term = OnTerminal(workers_argv(tmp_path, 2), tmp_path, tostop=tostop)
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


@pytest.mark.timeout(60)
def test_a_worker_writing_before_its_first_line_is_not_stopped_by_tostop(tmp_path: Path) -> None:
    """Until its first line of Python a worker is still on the terminal: with `stty
    tostop` a write there (here the interpreter's own import timings; a warning would
    do) stopped it for good, never ready, the supervisor waiting on it for ever."""
    argv = workers_argv(tmp_path, 2)
    term = OnTerminal(argv, tmp_path, tostop=True, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        address = host_port(term.wait_for(LISTENING)[0][1])
        pids = {int(m[1]) for m in term.wait_for(READY, count=2)}
        with Client(address) as client:
            assert client.pid in pids
        term.type(CTRL_C)
        assert term.proc.wait(GRACEFUL + PROMPT) == 0, term.text
    finally:
        term.close()


#: A handler that runs a child as a handler might (a tool it shells out to): the child
#: sets TTOU back to its default (node does at start), writes to its stderr (the
#: terminal), and looks for a terminal to prompt on (ssh and git do for a passphrase).
AT_THE_TERMINAL = """\
import os, subprocess, sys

CHILD = '''
import os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_DFL)
sys.stderr.write("the child writes to the terminal\\\\n")
sys.stderr.flush()
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
except OSError:
    print("no terminal to prompt on")
else:
    print("the operator's terminal")
'''

def handle(conn):
    conn.sendall(b"%d\\n" % os.getpid())
    try:
        done = subprocess.run([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=8)
        conn.sendall(done.stdout.strip() + b" (exit %d)\\n" % done.returncode)
    except subprocess.TimeoutExpired:
        conn.sendall(b"the child still ran after 8 s\\n")
"""


@pytest.mark.timeout(60)
def test_a_handlers_child_is_under_no_terminals_job_control(tmp_path: Path) -> None:
    """A worker on the terminal from the background put its handler's children there
    too: under `stty tostop` a child with TTOU at its default stopped at its first
    write (the request hung), and a child prompting on /dev/tty took the operator's
    terminal (ssh-keygen spun on SIGTTIN with echo off). Expected: the child finishes
    and finds no terminal, as when each worker led a session of its own."""
    argv = workers_argv(tmp_path, 2, "at_the_terminal", AT_THE_TERMINAL)
    term = OnTerminal(argv, tmp_path, tostop=True)
    try:
        address = host_port(term.wait_for(LISTENING)[0][1])
        term.wait_for(READY, count=2)
        with Client(address) as client:
            assert client.line() == b"no terminal to prompt on (exit 0)", term.text
        term.wait_for("the child writes to the terminal")
        term.type(CTRL_C)
        assert term.proc.wait(GRACEFUL + PROMPT) == 0, term.text
    finally:
        term.close()


@pytest.mark.timeout(60)
def test_weft_serve_in_the_background_of_a_tostop_terminal_keeps_its_workers(
    tmp_path: Path,
) -> None:
    """`weft serve --workers 3 &` from an interactive bash whose terminal has `stty
    tostop`: each line the supervisor wrote drew a TTOU from the kernel, refused the
    write, and was taken as "one worker fewer"; it fell to one worker, spinning, and
    wrote not one line. Expected: its lines written, its three workers kept, and a
    SIGTERM ends it with 0."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    argv = workers_argv(tmp_path, 3)
    shell = [bash, "--norc", "--noprofile", "--noediting", "-i"]
    term = OnTerminal(shell, tmp_path, env={"PS1": "$ ", "PROMPT_COMMAND": "", "TERM": "dumb"})
    supervisor = 0
    try:
        term.wait_for(r"\$ ")
        term.type(f"stty tostop; {shlex.join(argv)} & echo SUPERVISOR=$!\n".encode())
        supervisor = int(term.wait_for(r"SUPERVISOR=(\d+)")[0][1])
        assert os.tcgetpgrp(term.master) != os.getpgid(supervisor)  # a background job
        address = host_port(term.wait_for(LISTENING)[0][1])
        pids = {int(m[1]) for m in term.wait_for(READY, count=3)}
        with Client(address) as client:
            assert client.pid in pids
        assert "received SIGTTOU" not in term.text, term.text
        term.type(f"kill -TERM {supervisor}; wait {supervisor}; echo STATUS=$?\n".encode())
        assert term.wait_for(r"STATUS=(\d+)", timeout=GRACEFUL + PROMPT)[0][1] == "0", term.text
        assert "received SIGTTOU" not in term.text, term.text
    finally:
        term.close(*([supervisor] if supervisor else []))
