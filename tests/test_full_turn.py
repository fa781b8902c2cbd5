"""A full worker's wait for a sibling with room (``_while_full``), its clock alone.

A worker at ``max_connections`` (``on_full="refuse"``, ``--workers``, one shared
socket) leaves a waiting client to its siblings with room, and takes it (to refuse
it) only once that client has waited ``FULL_TURN`` untaken. The clock must be each
client's: a sibling that keeps taking clients is never passed over. The real
siblings cannot take a client on demand at the instant that matters (between the
engine's check and its next read of their counts), so here a fake sibling does:
the engine's own ``_while_full`` runs against a real listening socket with a client
waiting, and a sibling that takes one client as each read of its count begins.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from weft_core._engine import FULL_TURN, Engine
from weft_core._engine_async import AsyncEngine
from weft_core._engine_sync import SyncEngine

#: How long the wait is watched: well past FULL_TURN (and, for a sibling that takes
#: nothing, long enough that a stall of this process cannot end the watch first).
WATCH = 3 * FULL_TURN
LONG_WATCH = 40 * FULL_TURN


class Sibling:
    """One sibling with room; ``takes``: it takes a client as each read of it begins."""

    def __init__(self, takes: bool) -> None:
        self.takes = takes
        self.taken = 0
        self.passed_over = False

    # The balance's side the engine reads.
    def took_since(self, behind: dict[int, int]) -> bool:
        return self.taken != behind[0]

    def pass_over(self, behind: dict[int, int]) -> None:
        self.passed_over = True

    # The engine's read of the siblings with room.
    def room(self, lt: object) -> dict[int, int]:
        if self.takes:
            self.taken += 1  # a take landing just before the read
        return {0: self.taken}


@pytest.fixture
def waiting_listener() -> Iterator[socket.socket]:
    """A listening socket with one client waiting in its queue, never accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()):
        yield listener


def fake_engine(sibling: Sibling, sleep: Any, watch: float) -> SimpleNamespace:
    """What ``_while_full`` uses of its engine; the acceptor ends after ``watch`` seconds."""
    ends = time.monotonic() + watch
    fake = SimpleNamespace(
        slots=object(),  # a client always waits: no slot is waited for
        runtime=SimpleNamespace(sleep=sleep),
        balance=sibling,
        _acceptor_ends=lambda *_: time.monotonic() >= ends,
        _room_elsewhere=sibling.room,
    )
    fake._full_waits = Engine._full_waits.__get__(fake)
    fake._untaken = Engine._untaken.__get__(fake)
    fake._turn_missed = Engine._turn_missed.__get__(fake)
    return fake


def run_sync(sibling: Sibling, listener: socket.socket, watch: float) -> tuple[bool, float]:
    fake = fake_engine(sibling, time.sleep, watch)
    lt = SimpleNamespace(native=listener)
    began = time.monotonic()
    took = SyncEngine._while_full(fake, lt, 0, sibling.room(lt), None)
    return took, time.monotonic() - began


def run_async(sibling: Sibling, listener: socket.socket, watch: float) -> tuple[bool, float]:
    fake = fake_engine(sibling, asyncio.sleep, watch)
    lt = SimpleNamespace(native=listener)

    async def main() -> bool:
        return await AsyncEngine._while_full(fake, lt, 0, sibling.room(lt), None)

    began = time.monotonic()
    took = asyncio.run(main())
    return took, time.monotonic() - began


ENGINES = {"sync": run_sync, "async": run_async}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_sibling_that_keeps_taking_clients_is_never_passed_over(
    waiting_listener: socket.socket, engine: str
) -> None:
    """Promise (docs/deployment.md, on_full with --workers): a full worker leaves each
    waiting client ``FULL_TURN`` to a sibling with room. Seen: a take that landed
    between the check and the next read of the siblings' counts went unseen, and the
    clock ran on from the client before: a sibling taking a client every
    millisecond was passed over after 0.25 s, and the next client refused."""
    sibling = Sibling(takes=True)
    took, _ = ENGINES[engine](sibling, waiting_listener, WATCH)
    assert (took, sibling.passed_over) == (False, False), (
        f"a sibling that took {sibling.taken} clients was passed over"
    )


@pytest.mark.timeout(20)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_sibling_that_takes_nothing_is_passed_over_after_a_full_turn(
    waiting_listener: socket.socket, engine: str
) -> None:
    """The other side of the same promise: a sibling that takes none (stopped,
    stuck) costs the waiting client ``FULL_TURN``, then the full worker takes it."""
    sibling = Sibling(takes=False)
    took, waited = ENGINES[engine](sibling, waiting_listener, LONG_WATCH)
    assert (took, sibling.passed_over) == (True, True)
    assert FULL_TURN <= waited < LONG_WATCH, waited
