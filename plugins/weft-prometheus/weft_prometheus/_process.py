"""Which process this is: a worker of ``weft serve --workers N``, or a process of its own.

A worker's metrics go to a directory shared by the workers of one supervisor, for
prometheus-client's multiprocess mode; this module finds that directory and keeps
it tidy. What does not live here: the metrics (``_metrics``), serving them
(``_exporter``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = [
    "claim_endpoint",
    "claimed_by_sibling",
    "forget_dead_workers",
    "shared_directory",
    "supervisor_pid",
]

#: The flag ``weft serve --workers N`` gives each worker it starts (a hidden flag of
#: weft serve's command line): its presence marks this process as a worker, whose
#: parent is the supervisor.
_WORKER_FLAG = "--supervisor-fd"
#: Shared directories are named after the supervisor's pid *and* its start time, so
#: a later supervisor that happens to get a reused pid never adds to old counts.
_PREFIX = "weft-prometheus"
_NAME = re.compile(rf"{_PREFIX}-(\d+)-(\d+)-(\d+)\Z")  # uid, pid, start time
_FILE_PID = re.compile(r"_(\d+)\.db\Z")  # prometheus-client's files end in _PID.db


def supervisor_pid(argv: list[str] | None = None) -> int | None:
    """The pid of the supervisor this process works for, or None if it is no worker."""
    args = sys.argv if argv is None else argv
    if not any(a == _WORKER_FLAG or a.startswith(_WORKER_FLAG + "=") for a in args):
        return None
    parent = os.getppid()
    return parent if parent > 1 else None  # 1: the supervisor is gone already


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux); None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: fields count after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5), starttime


def shared_directory(supervisor: int) -> Path:
    """The directory the workers of ``supervisor`` share, made if need be (mode 0700).

    Under ``$XDG_RUNTIME_DIR`` or the temporary directory; directories of
    supervisors that have ended are removed on the way. Raises OSError if the
    directory exists but belongs to someone else or others may write to it.
    """
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    uid = os.getuid()
    _sweep(base, uid)
    path = base / f"{_PREFIX}-{uid}-{supervisor}-{_start_time(supervisor) or 0}"
    with contextlib.suppress(FileExistsError):  # the other workers race to make it
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != uid or info.st_mode & 0o022:
        raise OSError(f"{path} is not a directory of this user's that only it may write to")
    return path


def _sweep(base: Path, uid: int) -> None:
    """Remove the shared directories of this user's supervisors that have ended."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None or int(match.group(1)) != uid:
            continue
        pid, started = int(match.group(2)), int(match.group(3))
        if started and _start_time(pid) != started:
            shutil.rmtree(entry, ignore_errors=True)


def forget_dead_workers(directory: Path) -> list[int]:
    """Remove the live-gauge files of workers that are gone; return their pids.

    A worker that stops cleanly removes its own (``mark_process_dead``); one killed
    outright cannot, and its open connections would count for ever.
    """
    from prometheus_client import multiprocess

    dead: set[int] = set()
    for path in directory.glob("gauge_live*.db"):
        match = _FILE_PID.search(path.name)
        if match is not None and not _alive(pid := int(match.group(1))):
            dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


def claim_endpoint(directory: Path, port: int) -> Path:
    """Say in ``directory`` that this worker listens for scrapes on ``port``; the claim's file.

    Its siblings join the address's SO_REUSEPORT group only on such a claim
    (:func:`claimed_by_sibling`); the claimant removes the file as it stops
    listening, and a claim whose process is gone counts for nothing.
    """
    path = directory / f"endpoint-{port}-{os.getpid()}"
    path.touch()
    return path


def claimed_by_sibling(directory: Path, port: int) -> bool:
    """True if a live process other than this one claims ``port`` in ``directory``."""
    for path in directory.glob(f"endpoint-{port}-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid
        return False
    return True
