"""Opening listening sockets: addresses, families, Unix paths, inherited fds, options.

Everything about *how* a server listens is decided here, before any manager is
involved, so that a bind error surfaces in ``Server.run()`` in the caller's thread
with the address and port it was about.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from ._endpoints import Endpoint, check_dual
from ._errors import BindError, ConfigError
from ._files import clear_stale_socket, set_socket_mode
from ._logsafe import escape_for_log

__all__ = ["Family", "Listener", "handing_over", "open_listeners"]

Family = Literal["auto", "ipv4", "ipv6", "dual"]
FAMILIES: tuple[Family, ...] = ("auto", "ipv4", "ipv6", "dual")


@dataclass
class Listener:
    """A bound, listening stdlib socket and what the server needs to know about it."""

    sock: socket.socket
    unix_path: str | None = None
    #: ``(st_dev, st_ino)`` of the socket file at ``unix_path`` as bound: on close the
    #: file is removed only if the path still names it, not another server's since.
    unix_file: tuple[int, int] | None = None
    #: Inherited (``fd:N``: a supervisor's workers, systemd): other processes may
    #: accept on it too, so the acceptor takes one client per turn of its loop.
    shared: bool = False

    def __post_init__(self) -> None:
        _held_by_this_process(self.sock.fileno())

    @property
    def address(self) -> str:
        """``HOST:PORT`` (IPv6 in brackets) or ``unix:/path``."""
        from ._connection import format_address

        return format_address(self.sock.getsockname())


#: The listening sockets this process holds: descriptor number and socket inode.
_LISTENING: dict[int, int] = {}
#: Taken to change _LISTENING or copy it: two servers starting in two threads changed
#: it under the other's scan (RuntimeError), and even ``list(d.items())`` can let
#: another thread run (a garbage collection it triggers runs finalizers). A forked
#: child, one thread, reads it without: the lock may have been held at the fork.
_LISTENING_LOCK = threading.Lock()


def _held_by_this_process(fd: int) -> None:
    try:
        ino = os.fstat(fd).st_ino
    except OSError:
        return
    with _LISTENING_LOCK:
        _LISTENING[fd] = ino
        held = dict(_LISTENING)
    gone = {old: was for old, was in held.items() if not _still(old, was)}  # closed since
    if gone:
        with _LISTENING_LOCK:
            for old, was in gone.items():
                if _LISTENING.get(old) == was:  # not a socket made since on that number
                    del _LISTENING[old]


def _still(fd: int, ino: int) -> bool:
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISSOCK(info.st_mode) and info.st_ino == ino


#: Above 0 while weft starts a child it hands its listening sockets to (a worker):
#: gevent's ``subprocess`` forks in Python, so the fork hook runs in that child too,
#: and the worker was given /dev/null where its sockets should be. The child reads
#: its copy of this count.
_handing_over = 0


@contextlib.contextmanager
def handing_over() -> Iterator[None]:
    """Around starting a child that is passed the listening sockets (``pass_fds``)."""
    global _handing_over
    _handing_over += 1
    try:
        yield
    finally:
        _handing_over -= 1


def _let_go_in_a_forked_child() -> None:
    """Put /dev/null on each listening socket's number in a child a handler forked.

    (``os.fork``, multiprocessing's "fork".) The child's copies kept the port
    listening after the server stopped: clients connected and hung, with nobody to
    accept them. /dev/null, not a close, so
    the number is not handed to the child's next file while weft's objects there
    still name it. weft's own workers keep what they are passed (:func:`handing_over`);
    a listener an application hands to a child started with a ``preexec_fn``, or
    under gevent's ``subprocess``, arrives as /dev/null.
    """
    if _handing_over:  # a worker weft starts, to be exec'd with its sockets
        return
    for fd, ino in list(_LISTENING.items()):
        if not _still(fd, ino):
            continue
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.dup2(null, fd, inheritable=False)
        except OSError:
            pass
        finally:
            os.close(null)
    _LISTENING.clear()


# subprocess runs the fork hooks in a child it starts with a ``preexec_fn``, which
# weft's own workers need on Python 3.10 (no ``process_group`` there): the sockets
# passed to a worker would go. So from 3.11 on only.
if sys.version_info >= (3, 11) and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_a_forked_child)


def open_listeners(
    targets: Sequence[Endpoint],
    *,
    family: Family = "auto",
    backlog: int = 1024,
    reuse_port: bool = False,
    unix_mode: int | None = None,
) -> list[Listener]:
    """Bind and listen on every target; on any failure close what was opened and raise.

    Raises :class:`BindError` naming the address and port.
    """
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    opened: list[Listener] = []
    try:
        for target in targets:
            if target.kind == "unix":
                assert target.path is not None
                opened.append(_open_unix(target.path, backlog, unix_mode))
            elif target.kind == "fd":
                assert target.fd is not None
                opened.append(_adopt_fd(target.fd, backlog))
            else:
                bound = [listener.sock.getsockname() for listener in opened]
                opened.extend(
                    _open_tcp(target.host, target.port, family, backlog, reuse_port, bound)
                )
    except BaseException:
        for listener in opened:
            close_listener(listener)
        raise
    return opened


def _resolve(host: str | None, port: int | str | None, family: Family) -> list[tuple[int, tuple]]:  # type: ignore[type-arg]
    af = {"auto": socket.AF_UNSPEC, "ipv4": socket.AF_INET}.get(family, socket.AF_INET6)
    if family == "dual":
        check_dual([host])
        if host in (None, "", "0.0.0.0"):
            host = "::"
    try:
        infos = socket.getaddrinfo(
            host or None,
            port if port is not None else 0,
            af,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise BindError(
            exc.errno,
            f"cannot listen on {_where(host, port)}: {exc.strerror} ({family=})"
            f"{_other_family(host, family)}",
        ) from exc
    seen: list[tuple[int, tuple]] = []  # type: ignore[type-arg]
    for af_, _type, _proto, _canon, sockaddr in infos:
        if (af_, sockaddr) not in seen:
            seen.append((af_, sockaddr))
    return seen


def _other_family(host: str | None, family: Family) -> str:
    """Where a name has no address of the family asked for, what it does resolve to."""
    if not host or family == "auto":
        return ""
    try:
        found = sorted(
            {str(info[4][0]) for info in socket.getaddrinfo(host, None, socket.AF_UNSPEC)}
        )
    except (OSError, UnicodeError):
        return ""
    if not found:
        return ""
    return (
        f"; {host} has no {'IPv4' if family == 'ipv4' else 'IPv6'} address (it resolves to "
        f"{', '.join(found)}): give one of those, or family='auto'"
    )


def _ephemeral_hint(port: object) -> str:
    """Where ``port`` is one the kernel hands out to outgoing connections, say so.

    There a connection's own end can hold it, with nothing listening (ss -tan shows
    it): a port chosen from that range is taken now and then, on a busy machine.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as text:
            low, high = (int(x) for x in text.read().split())
    except (OSError, ValueError):
        return ""
    if isinstance(port, int) and low <= port <= high:
        return (
            f", or an outgoing connection's own end: {port} is in the range the kernel"
            f" gives outgoing connections ({low}-{high}, ip_local_port_range)"
        )
    return ""


def _where(host: str | None, port: int | str | None) -> str:
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open_tcp(
    host: str | None,
    port: int | str | None,
    family: Family,
    backlog: int,
    reuse_port: bool,
    bound: Sequence[object] = (),
) -> list[Listener]:
    """Bind every address ``host`` resolves to, all on one port.

    A name that resolves to several addresses (``localhost`` to 127.0.0.1 and ::1)
    gets a socket for each, as trio's ``open_tcp_listeners`` does; with port 0 the
    first socket's port is reused for the rest so the server has one port.
    ``bound``: the addresses this server's earlier binds took, so that one taken
    twice is not blamed on another process.
    """
    addresses = _resolve(host, port, family)
    chosen_port: int | None = None
    result: list[Listener] = []
    try:
        for af, sockaddr in addresses:
            if chosen_port is not None and sockaddr[1] == 0:
                sockaddr = (sockaddr[0], chosen_port, *sockaddr[2:])
            sock = socket.socket(af, socket.SOCK_STREAM)
            try:
                # Rebinding right after a restart must not fail on connections in TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if af == socket.AF_INET6:
                    # Only "dual" accepts IPv4 clients on an IPv6 socket; otherwise a
                    # v6 socket must not take the v4 port from a v4 socket beside it.
                    sock.setsockopt(
                        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if family == "dual" else 1
                    )
                sock.bind(sockaddr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                hint = ""
                if exc.errno == errno.EADDRINUSE:
                    hint = (
                        "; another of this server's binds already listens there (a name"
                        " such as localhost resolves to an address given too): give it once"
                        if sockaddr in bound
                        else "; another socket is listening there (another process's, or one"
                        " this program opened itself)"
                        + _ephemeral_hint(sockaddr[1])
                        + ": stop it or pick another port"
                    )
                elif exc.errno == errno.EINVAL and str(sockaddr[0]).lower().startswith("::ffff:"):
                    hint = (
                        f"; {sockaddr[0]} is an IPv4 address written as IPv6, which an IPv6"
                        f" socket listens on only with family='dual' and host '::': give"
                        f" {str(sockaddr[0])[7:]} instead"
                    )
                raise BindError(
                    exc.errno,
                    f"cannot listen on {_where(str(sockaddr[0]), sockaddr[1])}: "
                    f"{exc.strerror}{hint}",
                ) from exc
            chosen_port = sock.getsockname()[1]
            result.append(Listener(sock))
    except BaseException:
        for listener in result:
            listener.sock.close()
        raise
    return result


def _open_unix(path: str, backlog: int, mode: int | None) -> Listener:
    """Bind a Unix socket at ``path``, replacing a stale socket file left by a dead server.

    ``@name`` is Linux's abstract namespace (no file), as in ``unix:@name`` endpoints.
    """
    shown = escape_for_log(path)  # a path may hold anything but NUL: never raw in a message
    if path.startswith("@"):
        path = "\0" + path[1:]
    if not path.startswith("\0"):
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)  # a link is never followed, nor replaced
            if stat.S_ISLNK(st.st_mode):
                raise BindError(errno.EEXIST, f"cannot listen on unix:{shown}: {_link(path)}")
            if not stat.S_ISSOCK(st.st_mode):
                raise BindError(
                    errno.EEXIST,
                    f"cannot listen on unix:{shown}: a file that is not a socket is there",
                )
            refused = clear_stale_socket(path, st.st_uid)
            if refused is not None:
                raise BindError(refused[0], f"cannot listen on unix:{shown}: {refused[1]}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    made: os.stat_result | None = None
    try:
        sock.bind(path)
        bound = not path.startswith("\0")
        if bound:
            made = set_socket_mode(path, mode)
        sock.listen(backlog)
    except BaseException as exc:
        sock.close()
        if bound:  # a failed start leaves no socket file behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            why = exc.strerror or str(exc)
            raise BindError(exc.errno, f"cannot listen on unix:{shown}: {why}") from exc
        raise
    if made is None:
        return Listener(sock)
    # Absolute: a chdir() before the stop must not make it remove (or miss) another path.
    return Listener(sock, unix_path=os.path.abspath(path), unix_file=(made.st_dev, made.st_ino))


def _link(path: str) -> str:
    """Why a symbolic link at a socket's path is not used, dangling or not."""
    target = escape_for_log(os.readlink(path))
    if not os.path.exists(path):
        return (
            f"a symbolic link to {target}, which does not exist, is there: "
            "remove the link, or listen on the path it names"
        )
    return (
        f"a symbolic link to {target} is there, and weft does not replace links: "
        "remove it, or listen on the path it names"
    )


def _adopt_fd(fd: int, backlog: int) -> Listener:
    """Take over an inherited listening socket (``fd:N``, systemd's LISTEN_FDS).

    One passed as a standard stream (``--fd 0``: inetd's and ``StandardInput=socket``'s
    way) is moved above them, and /dev/null put in its place: a worker is started
    with its own stdin, which replaced the socket passed to it by that number, and
    every worker failed ("Socket operation on non-socket"), restarted for ever.
    """
    number = fd
    try:
        if fd <= 2:  # a copy above the standard streams; fd itself is let go below
            fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if fd != number:
            os.close(fd)
        raise BindError(exc.errno, f"cannot listen on fd:{number}: {exc.strerror}") from exc
    try:
        return _adopt_socket(sock, number, backlog)
    except BindError:
        if fd != number:
            os.close(fd)  # the copy (detached by _not_adopted); the original stays
        raise
    finally:
        if fd != number and sock.fileno() != -1:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, number)  # stdin stays a descriptor, /dev/null
            os.close(null)


def _adopt_socket(sock: socket.socket, fd: int, backlog: int) -> Listener:
    """:func:`_adopt_fd` once ``sock`` is made: check it, listen, take it over."""
    if sock.type != socket.SOCK_STREAM:
        raise _not_adopted(sock, fd, errno.ENOTSOCK, "not a stream socket")
    if not _is_bound(sock):  # listen() would bind it itself: every interface, a random port
        raise _not_adopted(
            sock,
            fd,
            errno.EINVAL,
            "the socket is not bound to an address; bind it before passing it, or give "
            "weft the address to bind (--bind HOST:PORT)",
        )
    try:
        sock.listen(backlog)
    except OSError as exc:  # a connected socket (EINVAL), ...
        hint = "; is it a connected socket?" if exc.errno == errno.EINVAL else ""
        raise _not_adopted(sock, fd, exc.errno or errno.EINVAL, f"{exc.strerror}{hint}") from exc
    # Inherited, it came inheritable; weft's own hand-overs (pass_fds to a worker, the
    # re-executed supervisor) mark what they pass. Anything else a handler starts
    # with close_fds=False (os.system, a shell's &) would keep the port listening
    # after weft exits, its clients queued for ever and the next bind refused.
    os.set_inheritable(sock.fileno(), False)
    return Listener(sock, shared=True)


def _not_adopted(sock: socket.socket, fd: int, err: int, why: str) -> BindError:
    """The error for inherited descriptor ``fd``, which stays open: it is its owner's."""
    sock.detach()
    return BindError(err, f"cannot listen on fd:{fd}: {why}")


def _is_bound(sock: socket.socket) -> bool:
    """Whether ``sock`` has a local address (an IP port, a Unix path or abstract name)."""
    try:
        name = sock.getsockname()
    except OSError:
        return False
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return bool(name[1])
    return bool(name)


def close_listener(listener: Listener) -> None:
    """Close the socket and remove its Unix socket file, if the path still names that file.

    Another server may have bound the path since (after the file was removed, or
    on a restart that overlaps this stop); its file is left alone. The check and
    the unlink are two calls, so a file replaced in between is still removed: a
    window of microseconds, against one as long as the server ran.
    """
    listener.sock.close()
    remove_socket_file(listener)


def remove_socket_file(listener: Listener) -> None:
    """Remove the listener's Unix socket file, if the path still names that file.

    New clients then get ``ENOENT`` at once, whatever the socket itself does: a
    stop removes it first, before it waits for a runtime's loop to close the socket.
    """
    if listener.unix_path:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(listener.unix_path)
            if (st.st_dev, st.st_ino) == listener.unix_file:
                os.unlink(listener.unix_path)
