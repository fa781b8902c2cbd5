"""What a failed bind says: the cause and what to do, in the user's own terms.

An outside check (2026-12-07) found three messages that named the wrong cause:
``localhost`` with ``family="ipv6"`` said "Name or service not known" (the name is
known; it has no IPv6 address here), ``::ffff:127.0.0.1`` said only "Invalid
argument", and a port this same program held was blamed on "another process".
"""

from __future__ import annotations

import socket

import pytest

from weft_core import BindError, Server


def _bind_error(**options: object) -> str:
    server = Server(lambda conn: None, **{"port": 0, **options})  # type: ignore[arg-type]
    with pytest.raises(BindError) as caught:
        server.run()
    return str(caught.value)


def _addresses(host: str, family: int) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, family)}
    except OSError:
        return set()


@pytest.mark.skipif(
    bool(_addresses("localhost", socket.AF_INET6)), reason="localhost has an IPv6 address here"
)
def test_a_name_with_no_address_of_the_family_says_what_it_resolves_to() -> None:
    message = _bind_error(address="localhost", family="ipv6")
    ipv4 = sorted(_addresses("localhost", socket.AF_INET))[0]
    assert "localhost has no IPv6 address" in message, message
    assert ipv4 in message
    assert "family='auto'" in message


def test_an_ipv4_mapped_address_names_the_ipv4_address_to_give() -> None:
    message = _bind_error(address="::ffff:127.0.0.1")
    assert "an IPv4 address written as IPv6" in message, message
    assert "give 127.0.0.1 instead" in message


def test_a_port_this_program_holds_is_not_blamed_on_another_process() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        message = _bind_error(address="127.0.0.1", port=port)
    assert "Address already in use" in message
    assert "one this program opened itself" in message, message
    # A port the kernel picked (port 0) is in its range for outgoing connections,
    # whose own ends can hold a port with nothing listening: said too.
    assert "ip_local_port_range" in message, message


def test_a_port_outside_the_ephemeral_range_names_no_outgoing_connection() -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for port in range(5990, 6010):
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        else:
            pytest.skip("no free port in 5990-6009")
        holder.listen()
        message = _bind_error(address="127.0.0.1", port=port)
    assert "ip_local_port_range" not in message, message
