"""The local address a listener shares with every connection it accepts, read once.

``current_connection().local`` comes from the listener when the listener is bound
to one address; a wildcard or transparent listener's connections each get their own
``getsockname()``. These tests pin down which is which on real sockets.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from weft_core._engine import TRANSPARENT, shared_local_address


@pytest.fixture
def tcp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    yield sock
    sock.close()


def test_a_listener_on_one_address_shares_it(tcp: socket.socket) -> None:
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    assert shared_local_address(tcp) == tcp.getsockname()
    with socket.create_connection(tcp.getsockname()) as client:
        conn, _ = tcp.accept()
        with conn:
            assert conn.getsockname() == shared_local_address(tcp) == client.getpeername()


def test_a_wildcard_listener_shares_nothing(tcp: socket.socket) -> None:
    tcp.bind(("0.0.0.0", 0))
    tcp.listen()
    assert shared_local_address(tcp) is None


def test_a_transparent_listener_shares_nothing(tcp: socket.socket) -> None:
    level, option = TRANSPARENT[socket.AF_INET]
    try:
        tcp.setsockopt(level, option, 1)
    except PermissionError:
        pytest.skip("IP_TRANSPARENT needs CAP_NET_ADMIN")
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    assert shared_local_address(tcp) is None


def test_a_unix_listener_shares_its_path() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="weft-"), "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen()
        assert shared_local_address(sock) == path
    os.unlink(path)
    os.rmdir(os.path.dirname(path))
