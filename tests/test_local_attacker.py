"""A local attacker, or a careless co-tenant, on a shared host.

weft makes files and sockets in directories that other users may write to: the
pid file beside a predictable temporary name, a Unix socket whose mode is set after
its bind, the control socket's directory in /tmp, a log file that a root supervisor
reopens by name. Each test plays the other user's move (a planted link, a file
swapped in the moment after a bind, a squatted directory, a socket of another uid)
and checks that root writes, chmods and removes nothing it should not, and that
the server either starts anyway or says in one line what is in its way.

Moves that need a second user are played in a forked child that switches to
``nobody`` (65534) or to an unnamed uid (``_serving.as_user``). Those tests need root.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _serving import LISTENING, READY, Served, as_user, environment, weft_serve

from weft_core import BindError
from weft_core._ctl import ControlSocket
from weft_core._listeners import _open_unix
from weft_core._process import PidFile
from weft_core._signals import reopen_log_files

NOBODY = 65534
OTHER = 65533  # no account needed: a uid unlike the server's and nobody's

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays two users: needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may write to, outside pytest's root-only tmp tree."""
    path = Path(tempfile.mkdtemp(prefix="weft-shared-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def root_only(path: Path, mode: int = 0o600) -> Path:
    path.write_text("root's own\n")
    path.chmod(mode)
    return path


# -- the pid file ----------------------------------------------------------------------


def test_a_pid_file_is_never_written_through_a_link_planted_at_its_partial_name(
    tmp_path: Path,
) -> None:
    """The partial file's name was ``.NAME.PID.tmp``: a link planted there took the write."""
    victim = root_only(tmp_path / "victim")
    pid_file = tmp_path / "app.pid"
    (tmp_path / f".app.pid.{os.getpid()}.tmp").symlink_to(victim)
    PidFile(str(pid_file)).write()
    assert victim.read_text() == "root's own\n", "the planted link was written through"
    assert not pid_file.is_symlink()
    assert pid_file.read_text() == f"{os.getpid()}\n"


def test_a_pid_file_is_0644_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 000 it was 0666: any user could point it at another process."""
    pid_file = tmp_path / "app.pid"
    old = os.umask(0)
    try:
        PidFile(str(pid_file)).write()
    finally:
        os.umask(old)
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644


# -- a Unix socket's mode, set after its bind --------------------------------------------


@pytest.fixture
def swapped_after_bind(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    """Make a bind at a listed path lose the race another user runs on its directory.

    The moment ``bind`` returns, the socket file it made is renamed away and a link
    to the victim put in its place, as a co-tenant watching the directory does. A
    real race is won about once a second in a loop; this wins it every time.
    """
    swaps: list[tuple[Path, Path]] = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: object) -> None:
        real_bind(self, address)  # type: ignore[arg-type]
        for path, victim in swaps:
            if address == str(path):
                path.rename(path.with_name(path.name + ".moved"))
                path.symlink_to(victim)

    monkeypatch.setattr(socket.socket, "bind", bind)
    return swaps


def test_a_unix_sockets_mode_is_never_set_through_a_link_swapped_in_after_bind(
    tmp_path: Path, swapped_after_bind: list[tuple[Path, Path]]
) -> None:
    victim = root_only(tmp_path / "victim")
    path = tmp_path / "app.sock"
    swapped_after_bind.append((path, victim))
    with pytest.raises(BindError, match=r"unix:.*app\.sock: the socket file was replaced"):
        _open_unix(str(path), 8, 0o666)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, "root chmodded the link's target"


def test_the_control_sockets_mode_is_never_set_through_a_link_swapped_in_after_bind(
    tmp_path: Path, swapped_after_bind: list[tuple[Path, Path]]
) -> None:
    victim = root_only(tmp_path / "victim", 0o644)
    path = tmp_path / "ctl.sock"
    swapped_after_bind.append((path, victim))
    with pytest.raises(BindError, match=r"ctl\.sock: the socket file was replaced"):
        ControlSocket(str(path), {}).open()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644, "root chmodded the link's target"


# -- another user's socket where ours would go -------------------------------------------


@needs_root
def test_a_live_socket_another_user_may_not_probe_is_not_taken_over(shared_dir: Path) -> None:
    """A connect refused with EACCES meant "stale": the running server's file was removed."""
    path = shared_dir / "app.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    path.chmod(0o600)
    live.listen(8)
    before = path.stat().st_ino

    def take_it() -> str:
        try:
            listener = _open_unix(str(path), 8, None)
        except BindError as exc:
            return f"BindError: {exc}"
        listener.sock.close()
        return "bound"

    with live:
        said = as_user(NOBODY, take_it)
        assert said.startswith("BindError"), said
        assert "a socket file of uid 0 is there, and this user may not connect" in said
        assert path.stat().st_ino == before, "the running server's socket file was replaced"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


@needs_root
def test_a_stale_socket_another_user_left_in_a_sticky_directory_is_a_bind_error(
    shared_dir: Path,
) -> None:
    """It was a bare PermissionError, naming neither the address nor whose the file is."""
    shared_dir.chmod(0o1777)
    path = shared_dir / "app.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o777)  # anyone may connect: the probe is refused, so it is stale

    def bind_there() -> str:
        try:
            _open_unix(str(path), 8, None).sock.close()
        except BindError as exc:
            return f"BindError: {exc}"
        return "bound"

    said = as_user(OTHER, bind_there)
    assert said.startswith("BindError: cannot listen on unix:"), said
    assert f"a stale socket file of uid {NOBODY} is there and cannot be removed" in said


@pytest.mark.timeout(30)
def test_a_live_socket_with_a_full_queue_is_in_use_not_a_hang(tmp_path: Path) -> None:
    """The probe's connect had no timeout: a busy server at the path hung run() for good."""
    path = tmp_path / "busy.sock"
    fillers: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(0)
        try:
            for _ in range(64):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                fillers.append(client)
                client.setblocking(False)
                client.connect(str(path))
        except BlockingIOError:
            pass
        else:
            pytest.skip("the queue of a Unix socket never filled")
        try:
            with pytest.raises(BindError, match="another server is listening there"):
                _open_unix(str(path), 8, None)
        finally:
            for client in fillers:
                client.close()
        assert path.exists()


# -- the control socket's default directory -------------------------------------------------


def _served_with_runtime_dir(tmp_path: Path, runtime: Path) -> Served:
    env = environment()
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return Served(
        weft_serve("_serving:handle", "--bind", "127.0.0.1:0"),
        cwd=tmp_path,
        env=env,
    )


@pytest.mark.parametrize("squat", ["a link", pytest.param("another user's", marks=needs_root)])
@pytest.mark.timeout(60)
def test_a_squatted_default_control_directory_costs_the_control_socket_not_the_server(
    tmp_path: Path, squat: str
) -> None:
    """Another user made the default directory first: the server exited 1, or followed
    a link to put its socket where that user chose. It now serves without the socket."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if squat == "a link":
        (runtime / "weft").symlink_to(elsewhere)
    else:
        (runtime / "weft").mkdir(mode=0o700)
        os.chown(runtime / "weft", NOBODY, NOBODY)
    with _served_with_runtime_dir(tmp_path, runtime) as served:
        served.wait_for(LISTENING)
        warning = served.wait_for(r"\[WARNING\] weft\.ctl: this server has no control socket: .*")
        why = "is a symbolic link" if squat == "a link" else f"belongs to uid {NOBODY}"
        assert why in warning[0].group(0)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not (elsewhere / "ctl.sock").exists()


@pytest.mark.timeout(60)
def test_a_control_socket_path_reaches_the_log_escaped(tmp_path: Path) -> None:
    """A newline or escape in the configured path forged a line of the log."""
    short = Path(tempfile.mkdtemp(prefix="w"))
    try:
        path = short / "c\n2026-01-01 FAKE\x1b[31m.sock"
        served = Served(
            weft_serve("_serving:handle", "--bind", "127.0.0.1:0", "--control-socket", str(path)),
            cwd=tmp_path,
        )
        with served:
            served.wait_for(r"control socket for weft ctl at ")
            served.wait_for(LISTENING)
            served.signal(signal.SIGTERM)
            assert served.finish() == 0, served.text
        assert "\x1b" not in served.text
        assert not any(line.startswith("2026-01-01 FAKE") for line in served.lines), served.text
    finally:
        shutil.rmtree(short, ignore_errors=True)


# -- log files reopened by root ---------------------------------------------------------------


@pytest.fixture
def file_logger(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path]]:
    path = tmp_path / "app.log"
    logger = logging.getLogger("weft.test.local_attacker")
    handler = logging.FileHandler(path)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, path
    finally:
        logger.removeHandler(handler)
        handler.close()


@needs_root
@pytest.mark.parametrize("planted", ["a link", "a dangling link", "a hard link"])
def test_root_reopening_a_log_file_writes_through_nothing_another_user_planted(
    tmp_path: Path,
    file_logger: tuple[logging.Logger, Path],
    caplog: pytest.LogCaptureFixture,
    planted: str,
) -> None:
    """USR1 to a root supervisor appended to (or made) the file a link pointed at."""
    logger, path = file_logger
    victim = root_only(tmp_path / "victim")
    logger.warning("before")
    path.rename(tmp_path / "app.log.1")  # the service user "rotates" it
    if planted == "a link":
        path.symlink_to(victim)
    elif planted == "a dangling link":
        path.symlink_to(tmp_path / "made-by-root")
    else:
        os.link(victim, path)
    reopen_log_files()
    logger.warning("after")
    assert victim.read_text() == "root's own\n"
    assert not (tmp_path / "made-by-root").exists()
    assert (tmp_path / "app.log.1").read_text() == "before\nafter\n", "the old file is kept"
    assert "cannot reopen log file" in caplog.text
    why = "more than one name" if planted == "a hard link" else "is a symbolic link"
    assert why in caplog.text


DUMP_WRITER = """
import fcntl, os, stat


def _dump_pipes():
    # The write end of the stack-dump pipe the supervisor reads: write-only, 1 MiB.
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if (stat.S_ISFIFO(os.fstat(fd).st_mode)
                    and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
                    and fcntl.fcntl(fd, 1032) == 1 << 20):  # F_GETPIPE_SZ
                found.append(fd)
        except OSError:
            pass
    return found


def handle(conn):
    (fd,) = _dump_pipes()
    os.set_blocking(fd, True)
    os.write(fd, b"\\n2026-01-01T00:00:00.000+00:00 [1] [CRITICAL] weft: FORGED\\x1b[2J\\n")
    for _ in range(6 * 16):  # 6 MiB
        os.write(fd, b"A" * 65536)
    conn.sendall(b"written\\n")
"""


@pytest.mark.timeout(60)
def test_a_worker_writing_into_its_dump_pipe_forges_nothing_and_is_kept_to_a_bound(
    tmp_path: Path,
) -> None:
    """The worker's stack-dump pipe is writable by its handler (the service user, after
    the switch): the root supervisor kept every byte until the pipe went quiet (300 MB
    took its memory to 336 MB) and logged it raw, a forged line and a terminal escape
    with it (local-attacker check 2, F2). Now one dump is kept to DUMP_MAX, the rest
    read and dropped, and it is escaped and indented: no line of it reads as a record."""
    (tmp_path / "dumper.py").write_text(DUMP_WRITER)
    with Served(
        weft_serve("dumper:handle", "--workers", "2", "--bind", "127.0.0.1:0"), cwd=tmp_path
    ) as served:
        (match,) = served.wait_for(LISTENING)
        host, port = match.group(1).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as client:
            assert client.makefile("rb").readline() == b"written\n"
        served.wait_for(r"more bytes dropped: a dump is kept to \d+ bytes")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    text = served.text
    assert "\x1b" not in text
    assert not any(line.startswith("2026-01-01T00") for line in text.splitlines())
    assert "  2026-01-01T00:00:00.000+00:00 [1] [CRITICAL] weft: FORGED\\x1b[2J" in text
    assert len(text) < 3 << 20, "one dump of at most 1 MiB, two records at most"


APP_AS_WHOM = """
import os

open(f"imported-as-{os.geteuid()}", "w").close()


def handle(conn):
    conn.sendall(b"%d\\n" % os.geteuid())
"""
PLANTED = """
import os

open(f"planted-ran-as-{os.geteuid()}", "w").close()
raise ImportError("planted by another user")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to switch to nobody")
@pytest.mark.skipif(sys.version_info < (3, 11), reason="the operator's own -P is 3.11's")
@pytest.mark.timeout(90)
def test_workers_under_user_run_no_code_or_config_of_the_users_as_root(
    shared_dir: Path,
) -> None:
    """Under --user with --workers, each worker started as root and, before its switch,
    imported the handler, took the working directory first on sys.path (python -m)
    and looked for a config file there: the service user, who may write there and may
    kill its own worker (the supervisor then starts another), got root (local-attacker
    check 2, F1: an edited app.py, a planted module, a planted weft.toml). Now a worker
    imports the handler as the user, starts without the directory on its path, and
    reads only the config file its supervisor read (none here)."""
    (shared_dir / "app.py").write_text(APP_AS_WHOM)
    (shared_dir / "json.py").write_text(PLANTED)  # a module every worker imports early
    argv = [sys.executable, "-P", "-m", "weft_core", "serve", "app:handle",  # the operator's
            "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody",
            "--control-socket", "off"]  # fmt: skip
    with Served(argv, cwd=shared_dir) as served:
        (match,) = served.wait_for(LISTENING)
        served.wait_for(READY, count=2)
        host, port = match.group(1).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as client:
            assert client.makefile("rb").readline() == b"%d\n" % NOBODY
        # The user plants a config (one a worker must not read: it would fail to start)
        # and has the supervisor start a worker anew by killing one of its own.
        (shared_dir / "weft.toml").write_text('backlog = "planted"\n')
        worker = int(served.wait_for(READY)[0].group(1))
        assert as_user(NOBODY, lambda: os.kill(worker, signal.SIGKILL) or "killed") == "killed"
        served.wait_for(READY, count=3)
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    made = sorted(p.name for p in shared_dir.iterdir())
    assert f"imported-as-{NOBODY}" in made and "imported-as-0" not in made, made
    assert not [name for name in made if name.startswith("planted-ran")], made
    assert "exited with 2" not in served.text, served.text
