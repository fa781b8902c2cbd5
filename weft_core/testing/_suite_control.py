"""Conformance tests of live control (ranch's suspend/resume; docs/deployment.md, weft ctl).

``pause_accepting()`` / ``resume_accepting()`` keep the listener bound while new
clients wait in the kernel's backlog; ``max_connections`` changes while running,
at once, in both directions, never cutting a served connection; ``connections()``
is a snapshot of every open connection; ``close_connection(task_id, timeout)``
stops one connection in the phases of ``stop()``. Each is also run under load:
clients keep connecting while the operation happens, and none is lost.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from .._errors import ConfigError, ServerError
from .._server import Server
from ._adapters import Body, Recv, Send
from ._base import ManagerTestBase
from ._bodies import echo, stubborn
from ._support import (
    ACCEPTOR_STILL_ACCEPTS,
    WAIT,
    connect,
    recv_exactly,
    recv_until_closed,
    wait_until,
)

__all__ = ["ControlTests"]

MakeServer = Callable[..., Server]

#: How long a test watches for something that must not happen (a client served while
#: paused, or past the limit). A negative can only be checked for a while; long
#: enough that an acceptor that was not really stopped would have served the client.
QUIET = 0.3


def _served(client: socket.socket, within: float) -> bool:
    """True if ``client`` gets a byte (or end of input) within ``within`` seconds."""
    readable, _, _ = select.select([client], [], [], within)
    return bool(readable)


def _round_trip(client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    return recv_exactly(client, len(data))


def _controls(holder: list[Server]) -> Body:
    """Echo, and pause (on b"p") or resume (on b"r") the server from inside the handler."""
    while True:
        data = yield Recv()
        if not data:
            return
        if data == b"p":
            holder[0].pause_accepting()
        elif data == b"r":
            holder[0].resume_accepting()
        yield Send(data)


class _Load:
    """Clients that keep connecting, each doing one echo round trip, until stopped.

    Counts round trips that completed and connections that failed, so that a test
    can run an operation "under load" and check that no client was lost.
    """

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.done = 0
        self.failures: list[BaseException] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with connect(self.port) as client:
                    if _round_trip(client, b"ping") != b"ping":
                        raise AssertionError("a client got a wrong echo")
            except BaseException as exc:
                with self.lock:
                    self.failures.append(exc)
                return
            with self.lock:
                self.done += 1

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def wait_for(self, more: int) -> None:
        """Wait until ``more`` round trips beyond those done now have completed."""
        target = self.done + more
        wait_until(lambda: self.done >= target or self.failures, what=f"{more} round trips")

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(WAIT)


class ControlTests(ManagerTestBase):
    """Live control, from any thread, on every manager."""

    @pytest.fixture
    def clients(self) -> Iterator[list[socket.socket]]:
        """Client sockets a test opened; closed after it."""
        opened: list[socket.socket] = []
        yield opened
        for client in opened:
            client.close()

    # -- pause and resume --------------------------------------------------------------

    @pytest.mark.parametrize("on_full", ["refuse", "backlog"])
    def test_pause_then_resume_serves_the_clients_that_waited(
        self, make_server: MakeServer, clients: list[socket.socket], on_full: str
    ) -> None:
        """Rule: pause_accepting() keeps the listener bound; clients wait, and resume serves them.

        A connection open before the pause goes on being served; clients that
        connect while paused are not served (nor refused) until resume_accepting().
        """
        server = make_server(echo, args=(b"+",), on_full=on_full, max_connections=4)
        first = connect(server.port)
        clients.append(first)
        assert recv_exactly(first, 1) == b"+", "a client before the pause is served"
        server.pause_accepting()
        state = (server.paused, server.socket is not None)
        assert state == (True, True), (
            "rule 'pause_accepting() keeps the listener bound': paused True, server.socket set"
        )
        waiting = [connect(server.port) for _ in range(2)]  # the kernel queues them
        clients.extend(waiting)
        assert _round_trip(first, b"still") == b"still", (
            "rule 'a pause cuts no served connection': the first client is still echoed"
        )
        assert not _served(waiting[0], QUIET), (
            "rule 'while paused new clients wait in the backlog': a client was served"
            + ACCEPTOR_STILL_ACCEPTS
        )
        server.resume_accepting()
        assert not server.paused, "rule 'paused is False after resume_accepting()'"
        for client in waiting:
            assert recv_exactly(client, 1) == b"+", (
                "rule 'resume_accepting() serves the clients that waited in the backlog'"
            )
            assert _round_trip(client, b"ok") == b"ok", "a resumed client is echoed"
        assert server.stats()["refused"] == 0, "no client was refused by the pause"

    def test_pause_and_resume_twice_and_from_a_handler(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: pause/resume may be repeated, and called from any thread, a handler included."""
        holder: list[Server] = []
        server = make_server(lambda: _controls(holder), args=(), start=False)
        holder.append(server)
        server.run()
        remote = connect(server.port)
        clients.append(remote)
        assert _round_trip(remote, b"p") == b"p", "the handler called pause_accepting()"
        wait_until(lambda: server.paused, what="a pause called from a handler")
        late = connect(server.port)
        clients.append(late)
        assert not _served(late, QUIET), (
            "rule 'paused from a handler: no client is served'" + ACCEPTOR_STILL_ACCEPTS
        )
        assert _round_trip(remote, b"r") == b"r", "the handler called resume_accepting()"
        assert _round_trip(late, b"x") == b"x", (
            "rule 'resume_accepting() from a handler serves the client that waited'"
        )
        server.stop(timeout=WAIT)
        server = make_server(echo, args=(b"+",))
        for _ in range(2):
            server.pause_accepting()
            server.pause_accepting()  # twice: no effect
            late = connect(server.port)
            clients.append(late)
            assert not _served(late, QUIET), (
                "rule 'paused: no client is served'" + ACCEPTOR_STILL_ACCEPTS
            )
            server.resume_accepting()
            assert recv_exactly(late, 1) == b"+", "rule 'resume serves the client that waited'"
        caller = threading.Thread(target=server.pause_accepting)
        caller.start()
        caller.join(WAIT)
        wait_until(lambda: server.paused, what="a pause from another thread")
        server.resume_accepting()
        again = connect(server.port)
        clients.append(again)
        assert recv_exactly(again, 1) == b"+", "served after a pause from another thread"

    def test_stop_while_paused(self, make_server: MakeServer) -> None:
        """Rule: stop() while paused closes the listener; a client that waited is closed, not hung."""
        server = make_server(echo, args=(b"+",))
        server.pause_accepting()
        with connect(server.port) as waiting:
            assert server.stop(timeout=WAIT) is True, "a stop while paused is clean"
            assert server.socket is None, "the listener is closed by the stop"
            assert _served(waiting, WAIT), (
                "rule 'stop() while paused': a client left in the backlog sees its "
                "connection closed (EOF or reset), it does not hang"
            )
        assert server.stopped, "the server is stopped"

    def test_pause_and_resume_under_load_lose_no_client(self, make_server: MakeServer) -> None:
        """Rule: pause then resume under load: every client that connected is served.

        At a limit, with ``on_full="backlog"``: a client beyond it waits for a slot,
        so any client lost is the pause's or the resume's doing. (With the default,
        "refuse", three clients reconnecting as fast as they can may find every
        slot held by connections they have closed but the server has not yet seen
        end: a refusal then says how fast the manager serves, not whether pausing
        loses clients.)
        """
        server = make_server(echo, max_connections=8, on_full="backlog")
        with _Load(int(server.port)) as load:
            load.wait_for(10)
            for _ in range(3):
                server.pause_accepting()
                server.resume_accepting()
                load.wait_for(5)
        assert not load.failures, f"rule 'pause and resume lose no client': {load.failures[:1]!r}"

    # -- max_connections while running ---------------------------------------------

    @pytest.mark.parametrize("on_full", ["refuse", "backlog"])
    def test_lowering_the_limit_cuts_no_connection(
        self, make_server: MakeServer, clients: list[socket.socket], on_full: str
    ) -> None:
        """Rule: max_connections lowered below the count open cuts nobody; new clients wait or are refused.

        Three clients are served under max_connections=3; the limit drops to 1.
        All three go on being served. A new client is refused (on_full="refuse")
        or waits (on_full="backlog") until the count is below the new limit.
        """
        server = make_server(echo, args=(b"+",), max_connections=3, on_full=on_full)
        held = [connect(server.port) for _ in range(3)]
        clients.extend(held)
        for client in held:
            assert recv_exactly(client, 1) == b"+", "three clients are served"
        server.max_connections = 1
        assert server.max_connections == 1, "the new limit reads back"
        for client in held:
            assert _round_trip(client, b"x") == b"x", (
                "rule 'lowering max_connections never cuts a served connection'"
            )
        newcomer = connect(server.port)
        clients.append(newcomer)
        if on_full == "refuse":
            assert recv_until_closed(newcomer) == b"", (
                "rule 'at the lowered limit, on_full=refuse refuses a new client'"
            )
            return
        assert not _served(newcomer, QUIET), "rule 'at the lowered limit a new client waits'"
        held[0].close()
        held[1].close()
        assert not _served(newcomer, QUIET), (
            "rule 'the lowered limit holds': one open of max 1, the newcomer still waits"
        )
        held[2].close()
        assert recv_exactly(newcomer, 1) == b"+", (
            "rule 'once the count drops below the lowered limit, a waiting client is served'"
        )

    def test_raising_the_limit_lets_waiting_clients_in_at_once(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: max_connections raised while running: clients waiting for a slot get in at once."""
        server = make_server(echo, args=(b"+",), max_connections=1, on_full="backlog")
        first = connect(server.port)
        clients.append(first)
        assert recv_exactly(first, 1) == b"+", "the first client is served"
        waiting = [connect(server.port) for _ in range(2)]
        clients.extend(waiting)
        assert not _served(waiting[0], QUIET), "at the limit, a new client waits"
        server.max_connections = 3
        for client in waiting:
            assert recv_exactly(client, 1) == b"+", (
                "rule 'raising max_connections lets waiting clients in at once'"
            )

    def test_limit_changes_under_load_lose_no_client(self, make_server: MakeServer) -> None:
        """Rule: max_connections raised and lowered under load: no client is lost."""
        server = make_server(echo, max_connections=4, on_full="backlog")
        with _Load(int(server.port), clients=4) as load:
            load.wait_for(10)
            for limit in (1, 6, 2, 4):
                server.max_connections = limit
                load.wait_for(5)
        assert not load.failures, (
            f"rule 'limit changes lose no client (on_full=backlog)': {load.failures[:1]!r}"
        )

    def test_max_connections_is_validated_as_the_keyword_is(self, make_server: MakeServer) -> None:
        """Rule: a bad max_connections set live fails with the keyword's message; None only while stopped."""
        server = make_server(echo)
        with pytest.raises(ConfigError) as live:
            server.max_connections = 0
        with pytest.raises(ConfigError) as keyword:
            Server(server.connection_handler, manager=self._name(), max_connections=0)
        assert str(live.value) == str(keyword.value), (
            "rule 'one settings table': the same mistake gives the same message"
        )
        with pytest.raises(ServerError, match="while stopped"):
            server.max_connections = None
        assert server.max_connections == 1024, "a refused change leaves the limit as it was"

    # -- connections() and close_connection() --------------------------------------

    def test_connections_is_a_snapshot_of_every_connection(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: connections() lists each open connection with its task id, age and bytes."""
        server = make_server(echo, args=(b"+",))
        assert server.connections() == [], "no connection yet: an empty list"
        opened = [connect(server.port) for _ in range(2)]
        clients.extend(opened)
        for client in opened:
            assert _round_trip(client, b"abc")[:1] == b"+", "both clients are served"
        wait_until(lambda: len(server.connections()) == 2, what="two connections listed")
        snapshot = server.connections()
        peers = {info.peer for info in snapshot}
        assert peers == {c.getsockname() for c in opened}, (
            "rule 'connections() lists every open connection': peers must match the clients"
        )
        ids = [info.task_id for info in snapshot]
        assert None not in ids and len(set(ids)) == 2, "each has its own task id"
        for info in snapshot:
            assert info.age >= 0 and not info.stop_requested, "age, and no stop requested yet"
            if info.bytes_in is not None:
                assert info.bytes_in >= 3, "bytes_in counts what the client sent"
        opened[0].close()
        wait_until(lambda: len(server.connections()) == 1, what="a closed connection to go")

    def test_close_connection_stops_one_and_spares_the_others(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: close_connection(task_id) ends that connection (phase 2: end of input); others go on."""
        server = make_server(echo, args=(b"+",))
        one, other = connect(server.port), connect(server.port)
        clients.extend([one, other])
        assert recv_exactly(one, 1) == recv_exactly(other, 1) == b"+", "both are served"
        wait_until(lambda: len(server.connections()) == 2, what="two connections")
        [target] = [c for c in server.connections() if c.peer == one.getsockname()]
        assert server.close_connection(target.task_id, timeout=WAIT) is True, (
            "rule 'close_connection returns True when the handler ended in phase 2'"
        )
        assert recv_until_closed(one) == b"", "the closed client sees end of input"
        assert _round_trip(other, b"alive") == b"alive", (
            "rule 'close_connection stops one connection': the other is still served"
        )
        with pytest.raises(LookupError):
            server.close_connection(target.task_id)

    def test_close_connection_interrupts_a_stubborn_handler(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: close_connection(id, timeout) interrupts a handler ignoring shutdown once timeout runs out."""
        server = make_server(stubborn)
        client = connect(server.port)
        clients.append(client)
        assert recv_exactly(client, 1) == b"<", "the stubborn handler runs"
        wait_until(lambda: len(server.connections()) == 1, what="the connection")
        [info] = server.connections()
        assert server.close_connection(info.task_id, timeout=0.1) is False, (
            "rule 'close_connection returns False when it had to interrupt'"
        )
        recv_until_closed(client)
        wait_until(lambda: server.stats()["active"] == 0, what="the connection to end")

    def test_close_connection_under_load_loses_no_other_client(
        self, make_server: MakeServer, clients: list[socket.socket]
    ) -> None:
        """Rule: closing one connection by id under load loses no other client.

        ``on_full="backlog"``, as in the pause test above: a client beyond the
        limit waits, so a client lost is the close's doing, not a refusal at a
        limit that fast reconnecting clients can reach.
        """
        server = make_server(echo, max_connections=8, on_full="backlog")
        victim = connect(server.port)
        clients.append(victim)
        assert _round_trip(victim, b"v") == b"v", "the victim is served"
        with _Load(int(server.port)) as load:
            load.wait_for(5)
            [info] = [c for c in server.connections() if c.peer == victim.getsockname()]
            assert server.close_connection(info.task_id, timeout=WAIT), "closed in phase 2"
            load.wait_for(5)
        assert not load.failures, (
            f"rule 'close_connection ends only its own connection': {load.failures[:1]!r}"
        )
