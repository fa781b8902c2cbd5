"""AsyncEngine: the accept loop and connection task for runtimes of ``async def`` handlers.

trio (and any event-loop runtime whose handlers are coroutines) runs this flavour,
which awaits where :mod:`weft_core._engine_sync` calls. Policy is the shared
:class:`~weft_core._engine.Engine`'s.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import socket
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
    close_quietly,
    refuse_unrun,
)
from ._errors import FAILURES, TaskShutdown, is_cancellation, only_task_shutdown
from ._protocol import AsyncRuntime, AsyncSlots
from ._proxy import ProxyHeaderError, aread_proxy_header
from ._tasks import current_task
from ._tls import tls_details

__all__ = ["AsyncEngine"]


class AsyncEngine(Engine[AsyncRuntime]):
    """One run of a server on an async runtime."""

    slots: AsyncSlots | None

    def _slots(self, n: int) -> AsyncSlots:
        return self.runtime.slots(n)

    def _acceptor_thunk(self, lt: ListenerTask) -> Any:
        generation = lt.generation

        async def run_async() -> None:
            await self._accept(lt, generation)

        run_async.__name__ = f"weft acceptor {lt.address}"
        return run_async

    # -- accepting ---------------------------------------------------------------------

    async def _accept(self, lt: ListenerTask, generation: int) -> None:
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
                await rt.sleep(PREDECESSOR_POLL)
            # A pause or a stop ends it (stop_task, or a wake if a manager's failed).
            while not self.closing and not self.paused and lt.generation == generation:
                if backlog_mode and slots is not None:
                    while not slots.acquire_nowait():
                        if self.closing or (state is not None and state.requested):
                            return
                        # A client waits and a stalled preamble holds a slot: it goes
                        # now, not once a poll has passed (see the sync engine's).
                        if self.preambles and policy.pending(listener.fileno()):
                            if self._shed_preamble() and await slots.acquire_within(SHED_WAIT):
                                break
                            continue
                        if await slots.acquire_within(FULL_POLL):
                            break
                elif (
                    slots is not None
                    and (room := self._room_elsewhere(lt)) is not None
                    and not await self._while_full(lt, generation, room, state)
                ):
                    continue  # the acceptor ends
                held = backlog_mode and slots is not None
                try:
                    sock, addr = await listener.accept()
                except OSError as exc:
                    if held and slots is not None:
                        held = False
                        slots.release()
                    pause = self._accept_failed(lt, exc, state)
                    if pause is None:
                        return
                    if pause < 0:
                        shed = await self._shed(lt)
                        await rt.sleep(self._capacity_pause(lt, exc, backoff, shed))
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
                    # The limit was lowered while this acceptor held its slot: see the
                    # sync engine's.
                    held, since = False, math.inf
                    got = await self._slot_by(math.inf)
                    if not got:  # the stop came first
                        accepted = None
                        self._slot_decided(lt, sock, addr, got)
                        continue
                elif not backlog_mode and slots is not None and not slots.acquire_nowait():
                    if self.cfg.full_wait > 0 and self._queue_for_slot(
                        lt, sock, addr, time.monotonic() + self.cfg.full_wait
                    ):
                        accepted = None
                        continue
                    since = time.monotonic()  # a full_wait a pause may leave to a task
                    got = await self._slot_by(since + self.cfg.full_wait)
                    if not got:  # refused once full_wait passed; closed at a stop
                        accepted = None
                        self._slot_decided(lt, sock, addr, got)
                        continue
                held, accepted = False, None
                self._hand_off(lt, sock, addr)
                if self.shortage_pause:  # no task could be started: leave the next a while
                    pause, self.shortage_pause = self.shortage_pause, 0.0
                    await rt.sleep(pause)
                if lt.shared:  # one client per turn; a sibling behind gets the next
                    for pause in self._turn_pauses(lt):
                        await rt.sleep(pause)
        except BaseException as exc:
            self._acceptor_lost(lt, generation, state, exc)
            raise
        finally:
            if held and slots is not None:
                slots.release()
            if accepted is not None:
                self._still_holding(lt, accepted, addr, since)
            self._acceptor_done(lt, generation)

    async def _while_full(
        self, lt: ListenerTask, generation: int, room: dict[int, int] | None, state: Any
    ) -> bool:
        """Full, with ``on_full="refuse"``: accept no client a sibling could serve.

        The policy is :meth:`~weft_core._engine.Engine._full_waits`; this does the waits it yields.
        """
        slots = self.slots
        assert slots is not None
        for step in self._full_waits(lt, generation, room, state):
            if step == "nap":
                await self.runtime.sleep(NAP)
            elif step != "slot":
                return bool(step)
            elif await slots.acquire_within(FULL_POLL):
                slots.release()
                return True
        return True

    def _slot_queue_thunk(self) -> Any:
        async def serve_queue() -> None:
            emptied = False
            try:
                while (head := self._next_in_queue()) is not None:
                    lt, sock, addr, deadline = head
                    got = await self._slot_by(deadline)
                    self._leave_queue()
                    self._slot_decided(lt, sock, addr, got)
                emptied = True
            finally:
                if not emptied:  # cancelled: nobody gives the rest a slot any more
                    for _, sock, _, _ in self._drop_queue():
                        close_quietly(sock)

        serve_queue.__name__ = "weft: clients waiting for a slot (full_wait)"
        return serve_queue

    async def _slot_by(self, deadline: float) -> bool | None:
        """Take a slot by ``deadline``: True, False when it passed, None at a stop.

        A slot freed by dropping the oldest connection stalled in its preamble
        counts first; the wait looks for a stop every ``FULL_POLL``.
        """
        slots = self.slots
        assert slots is not None
        if slots.acquire_nowait():
            return True
        while not self.closing:
            # Each stalled preamble goes in turn while the client waits (see the sync
            # engine's): a slot freed by one may be taken first by a newer client.
            if self._shed_preamble() and await slots.acquire_within(SHED_WAIT):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if await slots.acquire_within(min(left, FULL_POLL)):
                return True
        return None

    async def _shed(self, lt: ListenerTask) -> int:
        shed = 0
        while shed < policy.SHED_BATCH and policy.pending(lt.native.fileno()):
            if not self.spare.release():
                break
            try:
                sock, _ = await lt.native.accept()
                sock.close()
                shed += 1
            except OSError:
                break
            finally:
                self.spare.take()
        return shed

    def _try_take(self) -> bool:
        assert self.slots is not None
        return self.slots.acquire_nowait()

    # -- serving a connection -------------------------------------------------------------

    async def _serve(self, conn: Conn) -> None:
        rt = self.runtime
        handed: Any = None
        info: ConnectionInfo | None = None
        try:
            info = self._begin(conn)
            if info is None:
                return
            if self.preamble:
                handed, serve = await self._preamble(rt, conn, info)
                if not self._preamble_done(conn) or not serve:
                    return  # accounted for, then closed (handed, if any), below
            else:
                handed = self._stream(rt, conn.sock)
            info.conn = handed
            state = conn.state
            token = None
            if state is not None:
                state.connection = info  # publish(), inlined for a task with a state
            else:
                token = publish(info, None)
            try:
                if self.args:
                    returned = await self.handler(handed, *self.args)
                else:
                    returned = await self.handler(handed)
                if returned is not None and inspect.isawaitable(returned):
                    # ``return stream.send_all(reply)``: the reply never sent, and a
                    # "never awaited" warning all that said so.
                    refuse_unrun(self.handler, returned, " without awaiting it: a missing await?")
            except TaskShutdown:
                raise
            except FAILURES as exc:
                self._handler_failed(conn, handed, info, exc)
            except BaseException as exc:
                # A bare GeneratorExit too: the interpreter throws one into a coroutine
                # it closes (a task destroyed pending), which must let it through. One
                # with a message was raised by the handler: its failure, as any.
                if isinstance(exc, GeneratorExit) and not exc.args:
                    raise
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
                    if handed is not None:
                        await rt.aclose(handed)
                    else:
                        close_quietly(conn.sock)
            finally:
                self._finish(conn)

    def _stream(self, rt: AsyncRuntime, sock: Any) -> Any:
        """The runtime's stream over an accepted socket, with the server's nodelay."""
        stream = rt.wrap_connection(sock, self.cfg.idle_timeout)
        if not self.cfg.nodelay and sock.family != socket.AF_UNIX:
            # trio.SocketStream turns TCP_NODELAY on by itself; honour nodelay=False.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        return stream

    async def _preamble(
        self, rt: AsyncRuntime, conn: Conn, info: ConnectionInfo
    ) -> tuple[Any, bool]:
        """PROXY header, stream, TLS handshake: ``(stream, serve)``.

        The stream is None if none was made; ``serve`` False if the connection is to
        be closed unserved (the stream, if any, closed once its bytes are counted).
        """
        cfg = self.cfg
        sock = conn.sock
        if cfg.proxy is not None:  # a stranger was closed by the acceptor (_untrusted)
            try:
                header, leftover = await rt.within(
                    cfg.proxy.header_timeout, lambda: aread_proxy_header(sock.recv)
                )
            except (ProxyHeaderError, OSError) as exc:
                self._proxy_failed(info, exc)
                return None, False
            if not self._proxy_accepted(info, header, leftover):
                return None, False
        stream = self._stream(rt, sock)
        if cfg.tls is not None:
            stream = rt.wrap_tls(stream, cfg.tls)
            failures: tuple[type[BaseException], ...] = (OSError, ValueError, *rt.tls_errors)
            try:
                await rt.within(cfg.tls_handshake_timeout, stream.do_handshake)
                # Within the try: a session the peer broke right after the handshake
                # ends here (Python 3.10's asyncio: "handshake not done yet").
                details = tls_details(stream)
            except failures as exc:
                self._tls_failed(info, exc)
                return stream, False
            info.tls_version, info.tls_cipher, info.tls_peer_certificate = details
            _ack_now(sock)
        return stream, True


def _ack_now(sock: Any) -> None:
    """Acknowledge at once what the client sent last (Linux ``TCP_QUICKACK``).

    In TLS 1.3 the client speaks last in the handshake (its Finished) and often
    first after it, and with Nagle's algorithm (a client's default) its request
    waits for the ACK of its Finished. A server that has nothing to send then (trio's
    ``SSLStream`` sends its session tickets with its first write, not at once, as
    asyncio's does) acknowledges only when its delayed ACK fires: every trio TLS
    client's first reply came 42 ms late, raw trio's as weft's (the hostile-peer
    probe). The ACK due is sent now.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
