"""SyncEngine: the accept loop and connection task for runtimes of plain functions.

Threads, gevent and thread pools run handlers as plain functions; this flavour
calls where :mod:`weft_core._engine_async` awaits. Policy (limits, errno handling,
back-off, shedding, logging, bookkeeping, the stop) is the shared
:class:`~weft_core._engine.Engine`'s; only the calls into the runtime differ.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

from . import _acceptpolicy as policy
from ._balance import NAP
from ._connection import ConnectionInfo, publish, unpublish
from ._engine import (
    FULL_POLL,
    PREDECESSOR_POLL,
    SHED_WAIT,
    Conn,
    Engine,
    ListenerTask,
    close_now,
    close_quietly,
    refuse_unrun,
)
from ._errors import FAILURES, TaskShutdown, is_cancellation, only_task_shutdown
from ._protocol import SyncRuntime, SyncSlots
from ._proxy import ProxyHeaderError, read_proxy_header
from ._tasks import current_task
from ._tls import tls_details

#: The shortest wait a PROXY header's read is given as its deadline nears (a socket
#: timeout of 0 would make the read non-blocking, not expired).
MIN_WAIT = 0.001

__all__ = ["SyncEngine"]


class SyncEngine(Engine[SyncRuntime]):
    """One run of a server on a sync runtime."""

    slots: SyncSlots | None

    def _slots(self, n: int) -> SyncSlots:
        return self.runtime.slots(n)

    def _acceptor_thunk(self, lt: ListenerTask) -> Any:
        generation = lt.generation

        def run_sync() -> None:
            self._accept(lt, generation)

        run_sync.__name__ = f"weft acceptor {lt.address}"
        return run_sync

    # -- accepting ---------------------------------------------------------------------

    def _accept(self, lt: ListenerTask, generation: int) -> None:
        rt = self.runtime
        state = current_task()
        if state is not None:
            state.on_shutdown(lt.wake_with(rt))
        backoff = policy.Backoff()
        listener = lt.native
        slots = self.slots
        backlog_mode = self.cfg.on_full == "backlog"
        # What the acceptor holds that is not yet a connection's: a slot taken before
        # accept() (on_full="backlog"), a client accepted but not yet handed off. An
        # acceptor killed or cancelled (a pause, a stop) gives them back on its way out.
        held = False
        accepted: Any = None
        addr: Any = None
        since = 0.0
        predecessor = self._acceptor_begins(lt)
        try:
            while predecessor and self._predecessor_runs(lt, generation, state):
                rt.sleep(PREDECESSOR_POLL)
            # A pause or a stop ends it (stop_task, or a wake if a manager's failed).
            while not self.closing and not self.paused and lt.generation == generation:
                if backlog_mode and slots is not None:
                    while not slots.acquire(blocking=False):
                        if self.closing or (state is not None and state.requested):
                            return
                        # A client waits and a stalled preamble holds a slot: it goes
                        # now, not once a poll has passed (one a tenth of a second let
                        # a trickle of silent clients hold real ones back for good).
                        if self.preambles and policy.pending(listener.fileno()):
                            if self._shed_preamble() and slots.acquire(timeout=SHED_WAIT):
                                break
                            continue
                        if slots.acquire(timeout=FULL_POLL):
                            break
                    held = True
                elif (
                    slots is not None
                    and (room := self._room_elsewhere(lt)) is not None
                    and not self._while_full(lt, generation, room, state)
                ):
                    continue  # the acceptor ends
                try:
                    sock, addr = listener.accept()
                except OSError as exc:
                    if held and slots is not None:
                        held = False
                        slots.release()
                    pause = self._accept_failed(lt, exc, state)
                    if pause is None:
                        return
                    if pause < 0:
                        shed = self._shed(lt)
                        rt.sleep(self._capacity_pause(lt, exc, backoff, shed))
                    continue
                accepted = sock
                if backoff.delay:  # descriptors came back: so does the spare, if it was lost
                    backoff.reset()
                    self.spare.take()
                if self._untrusted(sock, addr):
                    accepted = None
                    if held and slots is not None:
                        held = False
                        slots.release()
                    continue
                if held and self._pay_debt():
                    # The limit was lowered while this acceptor held its slot: the slot
                    # is the limit's, and this client waits for a free one, as it would
                    # have in the backlog (however long: since is never past).
                    held, since = False, math.inf
                    got = self._slot_by(math.inf)
                    if not got:  # the stop came first
                        accepted = None
                        self._slot_decided(lt, sock, addr, got)
                        continue
                elif not backlog_mode and slots is not None and not slots.acquire(blocking=False):
                    if self.cfg.full_wait > 0 and self._queue_for_slot(
                        lt, sock, addr, time.monotonic() + self.cfg.full_wait
                    ):
                        accepted = None
                        continue
                    since = time.monotonic()  # a full_wait a pause may leave to a task
                    got = self._slot_by(since + self.cfg.full_wait)
                    if not got:  # refused once full_wait passed; closed at a stop
                        accepted = None
                        self._slot_decided(lt, sock, addr, got)
                        continue
                held, accepted = False, None
                self._hand_off(lt, sock, addr)
                if self.shortage_pause:  # no task could be started: leave the next a while
                    pause, self.shortage_pause = self.shortage_pause, 0.0
                    rt.sleep(pause)
                if lt.shared:  # one client per turn; a sibling behind gets the next
                    for pause in self._turn_pauses(lt):
                        rt.sleep(pause)
        except BaseException as exc:
            self._acceptor_lost(lt, generation, state, exc)
            raise
        finally:
            if held and slots is not None:
                slots.release()
            if accepted is not None:
                self._still_holding(lt, accepted, addr, since)
            self._acceptor_done(lt, generation)

    def _while_full(
        self, lt: ListenerTask, generation: int, room: dict[int, int] | None, state: Any
    ) -> bool:
        """Full, with ``on_full="refuse"``: accept no client a sibling could serve.

        The policy is :meth:`~weft_core._engine.Engine._full_waits`; this does the waits it yields.
        """
        slots = self.slots
        assert slots is not None
        for step in self._full_waits(lt, generation, room, state):
            if step == "nap":
                self.runtime.sleep(NAP)
            elif step != "slot":
                return bool(step)
            elif slots.acquire(timeout=FULL_POLL):
                slots.release()
                return True
        return True

    def _slot_queue_thunk(self) -> Any:
        def serve_queue() -> None:
            emptied = False
            try:
                while (head := self._next_in_queue()) is not None:
                    lt, sock, addr, deadline = head
                    got = self._slot_by(deadline)
                    self._leave_queue()
                    self._slot_decided(lt, sock, addr, got)
                emptied = True
            finally:
                if not emptied:  # cut off: nobody gives the rest a slot any more
                    for _, sock, _, _ in self._drop_queue():
                        close_quietly(sock)

        serve_queue.__name__ = "weft: clients waiting for a slot (full_wait)"
        return serve_queue

    def _slot_by(self, deadline: float) -> bool | None:
        """Take a slot by ``deadline``: True, False when it passed, None at a stop.

        A slot freed by dropping the oldest connection stalled in its preamble
        counts first; the wait looks for a stop every ``FULL_POLL``.
        """
        slots = self.slots
        assert slots is not None
        if slots.acquire(blocking=False):
            return True
        while not self.closing:
            # Each stalled preamble goes in turn while the client waits: a slot freed
            # by one may be taken first by the acceptor, for a client it just accepted.
            if self._shed_preamble() and slots.acquire(timeout=SHED_WAIT):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if slots.acquire(timeout=min(left, FULL_POLL)):
                return True
        return None

    def _shed(self, lt: ListenerTask) -> int:
        shed = 0
        while shed < policy.SHED_BATCH and policy.pending(lt.native.fileno()):
            if not self.spare.release():
                break
            try:
                sock, _ = lt.native.accept()
                close_now(sock)
                shed += 1
            except OSError:
                break
            finally:
                self.spare.take()
        return shed

    def _try_take(self) -> bool:
        assert self.slots is not None
        return bool(self.slots.acquire(blocking=False))

    # -- serving a connection -------------------------------------------------------------

    def _serve(self, conn: Conn) -> None:
        rt = self.runtime
        handed: Any = None
        filed = False  # handed is a file made here (stream=True), holding the socket open
        info: ConnectionInfo | None = None
        try:
            info = self._begin(conn)
            if info is None:
                return
            if self.preamble:
                ready = self._preamble(rt, conn, info)
                if not self._preamble_done(conn) or not ready:
                    return
            handed = rt.wrap_connection(conn.sock)
            if self.cfg.stream:
                filed = True
                handed = handed.makefile("rwb")
            info.conn = handed
            state = conn.state
            token = None
            if state is not None:
                state.connection = info  # publish(), inlined for a task with a state
            else:
                token = publish(info, None)
            try:
                # Without args a plain call: f(*args) would add a C-level frame.
                returned = self.handler(handed, *self.args) if self.args else self.handler(handed)
                if returned is not None:
                    _no_awaitable(self.handler, returned)
            except TaskShutdown:
                raise
            except FAILURES as exc:
                self._handler_failed(conn, handed, info, exc)
            except BaseException as exc:
                if is_cancellation(exc, self.cancellations):
                    if only_task_shutdown(exc):  # a group of them: as one
                        raise TaskShutdown from exc
                    raise
                self._handler_failed(conn, handed, info, exc)
            finally:
                if state is not None:
                    state.connection = None
                else:
                    unpublish(None, token)
        finally:
            if conn.how:
                self._ended(conn)
            try:
                if info is None or not info.detached:
                    if handed is not None and handed is not conn.sock:
                        close_quietly(handed)
                    if info is not None and info.tls_version is not None:
                        _tls_goodbye(conn.sock)
                    try:
                        conn.sock.close()
                    except OSError:
                        pass
                elif filed:
                    # A detached stream (stream=True): the file is the caller's, and
                    # closing it must close the connection. The file holds the socket
                    # open while it is, so this closes it once the file is closed
                    # (now, if the handler closed it already); never before. Not for
                    # a runtime's own object handed as it is (writing-a-manager.md's
                    # Channel), which holds no such count: closing the socket under
                    # it would end the connection the caller now owns.
                    conn.sock.close()
            finally:
                self._finish(conn)

    def _preamble(self, rt: SyncRuntime, conn: Conn, info: ConnectionInfo) -> bool:
        """PROXY header, then TLS handshake; False if the connection is to be closed unserved."""
        cfg = self.cfg
        sock = conn.sock
        if cfg.proxy is not None:  # a stranger was closed by the acceptor (_untrusted)
            deadline = time.monotonic() + cfg.proxy.header_timeout

            def recv(n: int) -> bytes:
                # Each read waits only what is left: a header dripped in pieces, each
                # within the timeout, still ends by the one deadline.
                sock.settimeout(max(deadline - time.monotonic(), MIN_WAIT))
                return sock.recv(n)  # type: ignore[no-any-return]

            try:
                header, leftover = read_proxy_header(
                    recv, deadline_exceeded=lambda: time.monotonic() > deadline
                )
            except (ProxyHeaderError, OSError) as exc:
                return self._proxy_failed(info, exc)
            if not self._proxy_accepted(info, header, leftover):
                return False
            sock.settimeout(cfg.idle_timeout)
        if cfg.tls is not None:
            try:
                # Within the try: wrapping a socket already reset (by the peer, or by
                # the limit's shedding) raises, CPython and gevent checking at wrap time
                # whether it is connected (getpeername, then a recv).
                tls, conn.shut = rt.wrap_tls(sock, cfg.tls)
                conn.sock = tls
                tls.settimeout(cfg.tls_handshake_timeout)
                tls.do_handshake()
                tls.settimeout(cfg.idle_timeout)
                details = tls_details(tls)  # a session already broken ends here too
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                return self._tls_failed(info, exc)
            info.tls_version, info.tls_cipher, info.tls_peer_certificate = details
        return True


def _tls_goodbye(sock: Any) -> None:
    """Send TLS's close_notify, never waiting for the peer's (RFC 8446 section 6.1).

    Without it a client cannot tell a whole reply from one cut short. ``unwrap()``
    on a non-blocking socket sends it, then raises wanting the peer's, which is not
    awaited; a connection already broken or reset raises at once.
    """
    try:
        sock.settimeout(0)
        sock.unwrap()
    except (OSError, ValueError):  # ssl.SSLWantReadError is an OSError
        pass


def _no_awaitable(handler: Any, returned: Any) -> None:
    """Raise if a sync handler returned a coroutine or a generator, which nobody runs.

    ``Server`` refuses an ``async def`` on a sync manager when it is made, but a
    plain decorator (``functools.wraps`` over an ``async def``) hides it; its
    coroutine, never awaited, served nobody while the server looked healthy.
    """
    if inspect.isgenerator(returned):  # a `def` with `yield` behind a plain wrapper
        returned.close()
        raise TypeError(
            f"handler {getattr(handler, '__qualname__', handler)!r} returned a generator:"
            " it is a generator function (a def with yield, maybe behind a decorator),"
            " whose body never ran; drop the yield"
        )
    if inspect.isawaitable(returned):
        refuse_unrun(
            handler,
            returned,
            ": it is an async def behind a plain function (a decorator?); this manager "
            "calls plain functions: make the wrapper async and use an async manager "
            "(trio, asyncio), or make the handler a plain def",
        )
