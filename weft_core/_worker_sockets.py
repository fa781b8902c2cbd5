"""Which listening sockets each supervised worker inherits (``weft serve --workers N``).

By default every worker inherits the supervisor's sockets, and whichever worker
wakes first takes the next client. That keeps every queued client across restarts
and shrinks, but the spread is the workers' race: a worker starved of CPU (on a
core it shares with the load, or paused) gets few clients or none.

With ``reuse_port`` each worker slot has sockets of its own: for every TCP socket
the first slot holds (which has ``SO_REUSEPORT``), slot k holds a twin bound to the
same address with ``SO_REUSEPORT``, and the kernel spreads new connections over
the slots by a hash of each connection's addresses, whoever is awake. The
supervisor keeps every slot's sockets open, so a worker's replacement inherits
the clients queued while it was away. A slot past the worker count (``TTOU``,
``workers -N``) is closed as its worker retires; the kernel resets the clients
queued on it then (Linux moves them to a sibling instead if the sysctl
``net.ipv4.tcp_migrate_req`` is 1). Unix sockets, sockets opened without
``SO_REUSEPORT`` and sockets weft did not open (``--bind fd:N``, systemd's) stay
shared by every slot.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection, Sequence

__all__ = ["WorkerSockets"]

log = logging.getLogger("weft.workers")


class WorkerSockets:
    """The sockets of each worker slot: slot 0 is the supervisor's own; see the module.

    ``spread`` is the ``reuse_port`` setting; ``backlog`` the listen queue of each
    twin; ``foreign`` says, per base socket, that weft did not open it (it is
    never twinned: its owner decides who listens on its port). ``adopted`` are
    the twins of slots 1.. that a supervisor re-executed on USR2 inherits
    (:meth:`state`). Used by the supervisor's loop alone.
    """

    def __init__(
        self,
        base: Sequence[socket.socket],
        *,
        spread: bool,
        backlog: int,
        foreign: Sequence[bool] = (),
        adopted: Sequence[Sequence[int]] = (),
    ) -> None:
        self._base = list(base)
        foreign = [*foreign, *[False] * (len(self._base) - len(foreign))]
        #: The base sockets that get a twin per slot.
        self._twinned = {
            id(sock) for sock, theirs in zip(self._base, foreign, strict=True)
            if spread and not theirs and _reuses_port(sock)
        }  # fmt: skip
        self._spread = bool(self._twinned)
        self._backlog = backlog
        #: Slot k >= 1: its sockets, each a twin of a base socket or that socket itself.
        self._slots: dict[int, list[socket.socket]] = {}
        for slot, fds in enumerate(adopted, start=1):
            if fds and len(fds) == len(self._base):
                self._slots[slot] = [
                    base if fd < 0 else _adopt(fd)
                    for base, fd in zip(self._base, fds, strict=True)
                ]
        self._warned = False

    @property
    def spread(self) -> bool:
        """True if slots other than 0 get sockets of their own."""
        return self._spread

    def shared(self, sockets: Sequence[socket.socket]) -> list[int]:
        """The descriptors among ``sockets`` (a slot's) that every slot accepts from."""
        every = {id(base) for base in self._base if id(base) not in self._twinned}
        return [sock.fileno() for sock in sockets if id(sock) in every]

    def base(self) -> list[socket.socket]:
        """Slot 0's sockets: the supervisor's, named on the command line of a re-exec."""
        return list(self._base)

    def of(self, slot: int) -> list[socket.socket]:
        """The sockets a worker in ``slot`` inherits, twins bound now if it has none yet.

        A twin that cannot be bound (the port's other sockets belong to another
        user, say) is logged once and replaced by the shared socket: the worker
        serves, with no spread of its own.
        """
        if slot == 0 or not self._spread:
            return list(self._base)
        sockets = self._slots.get(slot)
        if sockets is None:
            sockets = self._slots[slot] = [self._twin(sock, slot) for sock in self._base]
        return list(sockets)

    def trim(self, count: int, in_use: Collection[int] = ()) -> None:
        """Close the twins of slots ``count`` and beyond, but those ``in_use``.

        A retiring worker keeps its own copy: once it closes that, the socket
        leaves the port's group and the kernel sends new clients to the others.
        """
        for slot in [s for s in self._slots if s >= count and s not in in_use]:
            self._close(self._slots.pop(slot))

    def close(self) -> None:
        """Close every twin; slot 0's sockets are their opener's to close."""
        self.trim(1)

    def every(self) -> list[socket.socket]:
        """Every open socket of every slot, each once."""
        seen = {id(sock): sock for sock in self._base}
        for sockets in self._slots.values():
            seen.update((id(sock), sock) for sock in sockets)
        return list(seen.values())

    def state(self) -> list[list[int]]:
        """Slots 1..'s descriptors, made inheritable, for a re-executed supervisor.

        One list per slot, a descriptor per base socket (-1: the base socket itself,
        shared); an empty list for a slot with no sockets yet.
        """
        slots: list[list[int]] = []
        for slot in range(1, max(self._slots, default=0) + 1):
            fds = []
            for base, sock in zip(self._base, self._slots.get(slot, ()), strict=False):
                if sock is base:
                    fds.append(-1)
                else:
                    os.set_inheritable(sock.fileno(), True)
                    fds.append(sock.fileno())
            slots.append(fds)
        return slots

    def _twin(self, sock: socket.socket, slot: int) -> socket.socket:
        if id(sock) not in self._twinned:
            return sock
        twin = socket.socket(sock.family, sock.type)
        try:
            twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                twin.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            twin.bind(sock.getsockname())
            twin.listen(self._backlog)
        except OSError as exc:
            twin.close()
            if not self._warned:
                self._warned = True
                log.warning(
                    "reuse_port: cannot open a socket of its own for worker slot %d (%s);"
                    " it shares the first worker's sockets, so the kernel does not spread"
                    " clients to it",
                    slot,
                    exc.strerror or exc,
                )
            return sock
        return twin

    def _close(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            if all(sock is not mine for mine in self._base):
                sock.close()


def _reuses_port(sock: socket.socket) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.fileno() == -1:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except OSError:
        return False


def _adopt(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock
