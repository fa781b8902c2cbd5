"""Files weft makes or reopens in directories that other users may write to.

A pid file in /tmp, a Unix socket in a group's run directory, a log file in the
service user's /var/log/app: another user may plant a link at any name weft uses
there, or swap the file between two calls, and a process running as root would
write or chmod whatever the link points at. So nothing here follows a link at the
last step, names are unpredictable where weft picks them, and a mode is set on the
file weft made, not on whatever the path names a moment later.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import cast

__all__ = ["IN_USE", "clear_stale_socket", "open_log_file", "replace_file", "set_socket_mode"]


def replace_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``path`` whole and atomically, with ``mode`` whatever the umask; OSError.

    The partial file has an unpredictable name and is made with ``O_EXCL``: a link
    planted at a name the writer would use is never written through (a pid file's
    ``.NAME.PID.tmp`` let another user make root overwrite any file).
    """
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="ascii") as file:
            os.fchmod(file.fileno(), mode)
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def set_socket_mode(path: str, mode: int | None) -> os.stat_result:
    """Give the socket file this process just bound at ``path`` ``mode``; its stat.

    Raises OSError if what the path names is not a socket file of this user: another
    user who may write to the directory replaced it (by a link to a file of root's)
    between the bind and now. The mode is set through a handle on the file checked,
    never by path: ``chmod(path)`` after ``bind()`` let that user make root chmod any
    file. Where there is no ``O_PATH`` (not Linux), the window shrinks to between
    the check and a chmod that follows no link.
    """
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:
        info = os.lstat(path)
        _check_own_socket(info)
        if mode is not None:
            follow = os.chmod not in os.supports_follow_symlinks
            os.chmod(path, mode, follow_symlinks=follow)
        return info
    fd = os.open(path, o_path | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _check_own_socket(info)
        if mode is not None:
            try:
                os.chmod(f"/proc/self/fd/{fd}", mode)  # the file held, not the path
            except FileNotFoundError:  # no /proc: checked a moment ago, no link
                os.chmod(path, mode)
        return info
    finally:
        os.close(fd)


def _check_own_socket(info: os.stat_result) -> None:
    # One name: a hard link to another socket of this user's is not the one bound.
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
        raise OSError(
            errno.EEXIST,
            "the socket file was replaced as it was made (another user may write to its"
            " directory: give a path in a directory only this user may write to)",
        )


#: :func:`clear_stale_socket`'s reason when a server accepted its probe.
IN_USE = "another server is listening there"


def _socket_there(path: str, timeout: float = 1.0) -> str | None:
    """Why the socket file at ``path`` is not stale (a phrase), or None if it is.

    Only a refused connection (or a file gone) means stale: one the probe may not
    connect to is another user's and may be live (removing it took over a running
    server's path), and a full queue is a live server too busy to answer.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except (BlockingIOError, TimeoutError):
        return f"{IN_USE} (its queue of clients is full)"
    except PermissionError:
        owner = _owner(path)
        return (
            f"a socket file of {owner} is there, and this user may not connect to it to"
            " see whether a server listens; remove it if it is stale, or give another path"
        )
    except OSError as exc:
        return f"a socket file is there, and probing it failed: {exc.strerror or exc}"
    finally:
        probe.close()
    return IN_USE


def clear_stale_socket(path: str, owner: int) -> tuple[int, str] | None:
    """Remove the socket file at ``path`` (of uid ``owner``) if nobody listens on it.

    None once it is gone; else an errno and why it stays, a phrase to follow
    "cannot listen on ...: ": a live server's, one this user may not probe, or a
    stale one it may not remove (another user's, in a sticky directory such as /tmp:
    a bare ``PermissionError`` named neither the address nor the owner).
    """
    there = _socket_there(path)
    if there is not None:
        return errno.EADDRINUSE, there
    try:
        os.unlink(path)  # stale: left by a server that did not remove it
    except FileNotFoundError:
        pass
    except OSError as exc:
        return exc.errno or errno.EPERM, (
            f"a stale socket file of uid {owner} is there and cannot be removed"
            f" ({exc.strerror}); remove it as that user, or give another path"
        )
    return None


def _owner(path: str) -> str:
    try:
        return f"uid {os.lstat(path).st_uid}"
    except OSError:
        return "another user"


def open_log_file(handler: logging.FileHandler) -> io.TextIOWrapper:
    """Open ``handler``'s file afresh, as its ``_open`` does; as root, through no link.

    A root process (a supervisor that stays root under ``--user``) reopening the
    service user's log file by name would append to, or create, whatever that user
    pointed the name at. As root, a link at the last step (ELOOP) or a file with a
    second name (a hard link to a file of root's) is refused with OSError; a device
    such as /dev/null is taken as it is. A link at a directory above is followed:
    the directories on the way must be root's (said in docs/deployment.md).
    """
    if os.geteuid() != 0:
        return handler._open()
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if "a" in handler.mode:
        flags |= os.O_APPEND  # else truncated below, once the file is checked
    try:
        fd = os.open(handler.baseFilename, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                exc.errno,
                "it is a symbolic link, which weft running as root does not follow (a user"
                " who may write to its directory could point it at any file); make the"
                " directory root's only, or log as the service's user",
            ) from exc
        raise
    try:
        info = os.fstat(fd)
        if info.st_nlink > 1:
            raise OSError(
                errno.EPERM,
                "it is a file with more than one name (a hard link could be to any file"
                " of root's), which weft running as root does not write to",
            )
        if "a" not in handler.mode and stat.S_ISREG(info.st_mode):
            os.ftruncate(fd, 0)
        # The handler keeps the stream (no with); typed as handler._open's is.
        stream = open(fd, handler.mode, encoding=handler.encoding, errors=handler.errors)  # noqa: SIM115
        return cast(io.TextIOWrapper, stream)
    except BaseException:
        os.close(fd)
        raise
