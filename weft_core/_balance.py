"""Accept balance: workers sharing one listening socket take new clients by what they hold.

A listening socket shared by several processes (``weft serve --workers N`` without
``--reuse-port``) gives each new client to whichever process calls ``accept()``
first: the one with the most free CPU at that moment. An event loop's acceptor is
woken with its siblings and takes one client per turn, yet a burst of long-lived
connections still landed 79:21 and 98:2 on two gevent workers, and a keep-alive
connection stays where it landed. The blocking ``accept()`` of the threads manager
is fair by itself: the kernel wakes one waiter at a time, in turn.

So each worker publishes how many connections it holds in a cell of a small map
shared with the supervisor and its siblings (a memfd, mapped by each). An acceptor
that has just taken a client while it holds more than :data:`SLACK` over the
least-loaded sibling naps before its next ``accept()`` until one of the siblings
behind takes a client (the same clients woke them), for at most
``TURN_NAPS * NAP`` (20 ms). A sibling that lets that whole turn pass while clients
wait (stopped, stuck, or without CPU) is not counted for :data:`PASS_OVER` (1 s) or
until it takes one; and whatever the siblings do (one starved of CPU takes a
client in each turn, but late), an acceptor naps at most :data:`TURN_BUDGET` (0.1
s) a second in turns that outlast :data:`PROMPT_NAPS` naps. A worker that does not
keep up costs one that does a tenth of its time at most, never a turn a client. A
turn that a sibling ends within those first naps is not counted: that sibling
keeps up, and the pair takes clients as fast as one alone would. (Counted, they
spent the budget on healthy siblings: a burst of 100 takes some 50 turns, and
bursts coming several a second went 100:0 once it was spent.) Only listeners
every sibling accepts from take turns: with ``--reuse-port`` a TCP socket is the
worker's own, and no sibling can take its clients.

A cell is ``(held, taken)``: the connections its worker holds, ``ABSENT`` while it
does not accept (starting, paused, stopping, gone), and how many it accepted so
far. Each worker writes only its own cell; the supervisor marks a cell absent when
it hands it to a new worker and when it reaps one. Cell 0 holds how many cells
were ever handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Collection
from typing import Any

__all__ = [
    "ABSENT",
    "ENV",
    "NAP",
    "PASS_OVER",
    "PROMPT_NAPS",
    "SLACK",
    "TURN_BUDGET",
    "TURN_NAPS",
    "AcceptBalance",
    "BalanceMap",
    "worker_balance",
]

#: The variable that tells a worker its map and cell: ``FD:CELL``.
ENV = "_WEFT_ACCEPT_BALANCE"
#: How many workers' cells the map holds; workers beyond it go unbalanced.
CELLS = 512
#: A worker holding no more than this over the least-loaded sibling accepts freely.
SLACK = 2
#: An acceptor ahead of a sibling leaves the next client to it for up to TURN_NAPS
#: naps of NAP seconds, looking after each whether the sibling took one.
NAP = 0.001
TURN_NAPS = 20
#: A turn that a sibling ends within this many naps costs nothing of TURN_BUDGET.
PROMPT_NAPS = 2
#: How long a sibling that let a whole turn pass with clients waiting is not counted;
#: and the window in which an acceptor naps TURN_BUDGET at most, whatever its
#: siblings do (one that takes a client in each turn, but slowly, included).
PASS_OVER = 1.0
TURN_BUDGET = 0.1  # a burst on a shared core takes a few turns; three in a second fit
#: ``held`` of a worker that does not accept now.
ABSENT = -1
_SIZE = (2 + 2 * CELLS) * 8


class BalanceMap:
    """The supervisor's side: makes the map, hands out cells, marks them absent."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("weft-accept-balance", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, _SIZE)
            # Its size fixed for good: a process that truncated it (any of this user's,
            # through /proc/PID/fd) would kill every mapper with SIGBUS.
            fcntl.fcntl(
                self.fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
            self._map = mmap.mmap(self.fd, _SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self._cells = memoryview(self._map).cast("q")
        for cell in range(CELLS):
            self.release(cell)

    @classmethod
    def make(cls) -> BalanceMap | None:
        """A new map, or None where none can be made (no memfd): workers go unbalanced."""
        try:
            return cls()
        except (OSError, AttributeError):
            return None

    def claim(self, in_use: set[int]) -> int | None:
        """The lowest cell no worker in ``in_use`` has, marked absent; None if all are taken."""
        cell = next((c for c in range(CELLS) if c not in in_use), None)
        if cell is not None:
            self.release(cell)
            self._cells[0] = max(self._cells[0], cell + 1)
        return cell

    def release(self, cell: int) -> None:
        """Mark ``cell`` absent: its worker is gone, or not accepting yet."""
        self._cells[2 + 2 * cell] = ABSENT

    def environment(self, cell: int, shared: Collection[int]) -> str:
        """The value of :data:`ENV` for the worker given ``cell``.

        ``shared``: the descriptors of its listeners that every sibling accepts from
        too (with ``--reuse-port``, a TCP socket is the worker's own: not shared).
        """
        return f"{self.fd}:{cell}:{','.join(map(str, sorted(shared)))}"


class AcceptBalance:
    """A worker's side: publishes what it holds, and says when to leave a client to others."""

    __slots__ = (
        "_cells",
        "_map",
        "_me",
        "_naps",
        "_passed",
        "_spent",
        "_window",
        "fds",
        "present",
    )

    def __init__(self, fd: int, cell: int, fds: Collection[int] = ()) -> None:
        self._map = mmap.mmap(fd, _SIZE)
        self._cells = memoryview(self._map).cast("q")
        self._me = 2 + 2 * cell
        #: The descriptors of the listeners this worker shares with its siblings.
        self.fds = frozenset(fds)
        #: Nap time spent in the window that began at ``_window`` (monotonic), and
        #: the naps of the turn under way.
        self._spent = 0.0
        self._naps = 0
        self._window = 0.0
        #: Siblings that took no client in a whole turn while clients waited: until
        #: when they are not counted, and the ``taken`` they had (once it changes,
        #: they count again).
        self._passed: dict[int, tuple[float, int]] = {}
        #: Whether this worker accepts now (its cell says what it holds, not ABSENT).
        self.present = False

    @classmethod
    def from_environment(cls) -> AcceptBalance | None:
        """This worker's balance, from :data:`ENV` (taken out of the environment); or None."""
        value = os.environ.pop(ENV, "")
        fd, _, rest = value.partition(":")
        cell, _, shared = rest.partition(":")
        fds = [int(n) for n in shared.split(",") if n.isdigit()]
        if not (fd.isdigit() and cell.isdigit()) or int(cell) >= CELLS:
            return None
        try:
            return cls(int(fd), int(cell), fds)
        except (OSError, ValueError):
            return None
        finally:
            with contextlib.suppress(OSError):
                os.close(int(fd))  # the mapping holds the memory; the descriptor is not needed

    def shares(self, listener: Any) -> bool:
        """True if the siblings accept from ``listener`` too (a socket of the runtime's)."""
        try:
            return int(listener.fileno()) in self.fds
        except (OSError, ValueError, AttributeError):
            return False

    def publish(self, held: int) -> None:
        """Say how many connections this worker holds (while it accepts)."""
        if self.present:
            self._cells[self._me] = held

    def took(self, held: int) -> None:
        """Say this worker accepted a client and now holds ``held``."""
        cells = self._cells
        cells[self._me + 1] += 1
        if self.present:
            cells[self._me] = held

    def accepting(self, held: int | None) -> None:
        """This worker accepts from now on, holding ``held``; None: it stops accepting."""
        self.present = held is not None
        self._cells[self._me] = ABSENT if held is None else held

    def behind(self, held: int) -> dict[int, int]:
        """The accepting siblings that hold more than SLACK fewer than ``held``: their ``taken``.

        Empty when this worker is not ahead: it accepts freely.
        """
        if held <= SLACK:  # ahead of nobody (the common case under churn): no reads
            return {}
        now = time.monotonic()
        if now - self._window >= PASS_OVER:
            self._window, self._spent = now, 0.0
        elif self._spent >= TURN_BUDGET:
            return {}  # this window's naps are spent: accept freely until the next
        self._naps = 0
        return self._holding_under(held - SLACK)

    def with_room(self, limit: int) -> dict[int, int]:
        """The accepting siblings holding fewer than ``limit`` connections: their ``taken``.

        For a worker at its ``max_connections`` (the siblings read the same config):
        those that can still serve the next client it would have to refuse.
        """
        return self._holding_under(limit)

    def _holding_under(self, below: int) -> dict[int, int]:
        """Accepting siblings, not passed over, that hold fewer than ``below``: their ``taken``."""
        cells = self._cells
        count = max(0, min(cells[0], CELLS))
        helds = cells[2 : 2 + 2 * count : 2].tolist()
        passed = self._passed
        under: dict[int, int] = {}
        for index, other in enumerate(helds):
            at = 2 + 2 * index
            if at == self._me or other < 0 or other >= below:
                continue
            taken = cells[at + 1]
            if index in passed:
                until, then = passed[index]
                if then == taken and time.monotonic() < until:
                    continue
                del passed[index]
            under[index] = taken
        return under

    def napped(self) -> bool:
        """Count a nap of :data:`NAP`; False once this window's TURN_BUDGET is spent.

        A turn's first PROMPT_NAPS naps are charged only once it outlasts them.
        """
        self._naps += 1
        if self._naps > PROMPT_NAPS:
            self._spent += NAP * (PROMPT_NAPS + 1 if self._naps == PROMPT_NAPS + 1 else 1)
        return self._spent < TURN_BUDGET

    def took_since(self, behind: dict[int, int]) -> bool:
        """True if one of the siblings ``behind`` (as :meth:`behind` gave them) took a client."""
        cells = self._cells
        return any(cells[3 + 2 * index] != taken for index, taken in behind.items())

    def pass_over(self, behind: dict[int, int]) -> None:
        """The siblings ``behind`` took none of the waiting clients in a whole turn: skip them.

        For :data:`PASS_OVER` seconds, or until they take a client: one that is
        stopped or stuck then costs this worker one turn a while, not one per client.
        """
        until = time.monotonic() + PASS_OVER
        for index, taken in behind.items():
            self._passed[index] = (until, taken)


_worker: AcceptBalance | None = None
_looked = False


def worker_balance() -> AcceptBalance | None:
    """This process's balance if the supervisor gave it a cell (once read, kept); else None."""
    global _worker, _looked
    if not _looked:
        _looked = True
        _worker = AcceptBalance.from_environment()
    return _worker
