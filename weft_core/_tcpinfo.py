"""Bytes in and out of a TCP connection, as the kernel counts them (Linux ``TCP_INFO``).

weft never wraps the connection a handler gets (a plain socket, a gevent socket, a
``trio.SocketStream`` stays native and costs nothing per call), so it cannot count
bytes itself. Linux counts them per socket anyway: ``struct tcp_info`` (see
``include/uapi/linux/tcp.h``) carries ``tcpi_bytes_acked`` (bytes sent and
acknowledged by the peer, RFC 4898's ThruOctetsAcked) and ``tcpi_bytes_received``
(RFC 4898's ThruOctetsReceived), both since Linux 4.1. They count sequence
numbers, so a FIN adds one, taken off again here from the connection's state (or,
for a connection reset after its peer's FIN, from there having been no data: a
reset one whose peer sent data, then a FIN, may count one byte more). One
``getsockopt`` reads them, when a connection ends and when ``Server.connections()``
is asked.

Where the kernel cannot tell (a Unix socket, another OS, a kernel before 4.1, a
socket already closed), the counts are None.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

__all__ = ["TCP_INFO_SIZE", "accept_queue_length", "byte_counts", "reset_by_peer"]

#: ``TCP_INFO``'s option number (Linux); None where the platform has none.
_TCP_INFO: int | None = (
    getattr(socket, "TCP_INFO", None) if hasattr(socket, "IPPROTO_TCP") else None
)

#: Offsets in ``struct tcp_info``: eight u8 fields, 24 u32 fields (to
#: tcpi_total_retrans), then u64 tcpi_pacing_rate and tcpi_max_pacing_rate, then the
#: two counts. A shorter answer comes from a kernel without them.
_BYTES_ACKED = 120
_BYTES_RECEIVED = 128
#: The counts' end: a shorter answer comes from a kernel without them (before 4.1).
_COUNTS_END = _BYTES_RECEIVED + 8
#: ``tcpi_data_segs_in`` (Linux 4.6), after u32 segs_out, segs_in, notsent_bytes, min_rtt.
_DATA_SEGS_IN = _COUNTS_END + 16
_DATA_SEGS = struct.Struct("=I")
#: How much of the struct to ask for: up to the end of tcpi_data_segs_in.
TCP_INFO_SIZE = _DATA_SEGS_IN + 4

_COUNTS = struct.Struct("=QQ")

#: ``tcpi_state`` of a connection the peer reset (``TCP_CLOSE``): a RST ends it at once.
_CLOSED = 7
#: ``tcpi_state`` of a listening socket, whose ``tcpi_unacked`` (a u32 after eight u8
#: fields and four u32 ones) is the length of its accept queue.
_LISTEN = 10
_UNACKED = struct.Struct("=I")
_UNACKED_AT = 24

#: A FIN takes a sequence number, and the kernel's counts follow sequence numbers:
#: in these states (``tcpi_state``, the struct's first byte; include/net/tcp_states.h)
#: the peer's FIN is in ``bytes_received``: CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT ...
_PEER_FIN_STATES = frozenset({8, 9, 11, 6})
#: ... and our own, acknowledged, in ``bytes_acked``: FIN_WAIT2, TIME_WAIT.
_OUR_FIN_ACKED_STATES = frozenset({5, 6})


def byte_counts(sock: Any) -> tuple[int | None, int | None]:
    """``(bytes_in, bytes_out)`` of a TCP socket by the kernel's count; None where unknown.

    ``sock`` is anything with ``getsockopt`` (a socket, a gevent or trio socket).
    ``bytes_out`` counts what the peer acknowledged: read as the connection ends, a
    reply still in flight is not in it yet.
    """
    if _TCP_INFO is None:
        return None, None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, TCP_INFO_SIZE)
    except (OSError, ValueError, AttributeError, TypeError):
        return None, None  # a Unix socket (EOPNOTSUPP), or closed already
    if len(info) < _COUNTS_END:
        return None, None
    acked, received = _COUNTS.unpack_from(info, _BYTES_ACKED)
    state = info[0]
    if received and state in _PEER_FIN_STATES:
        received -= 1
    elif (
        received
        and state == _CLOSED
        and len(info) >= TCP_INFO_SIZE
        and not _DATA_SEGS.unpack_from(info, _DATA_SEGS_IN)[0]
    ):
        # Reset: whether a FIN came first the state no longer says. One that came
        # with no data before it (a client that connected and closed, then reset
        # what we sent it) is all there is in the count: no data segment came.
        received = 0
    if acked and state in _OUR_FIN_ACKED_STATES:
        acked -= 1
    return received, acked


def reset_by_peer(sock: Any) -> bool:
    """True if the kernel holds ``sock``'s TCP connection as reset (``TCP_CLOSE``).

    For a TLS socket whose read ended: CPython's ``ssl`` reports a reset met inside
    OpenSSL's read as an end of input (``SSLEOFError``), its ``ECONNRESET`` lost; a
    connection that the peer only half-closed is in ``CLOSE_WAIT`` instead, and one
    whose input a stop ended is still ``ESTABLISHED``. False where the kernel cannot
    tell (a Unix socket, another OS, a closed socket).
    """
    if _TCP_INFO is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)
        if not info or info[0] != _CLOSED:
            return False
        # A reset that came after the peer's FIN leaves EPIPE pending (Linux's
        # tcp_reset() in CLOSE_WAIT), not ECONNRESET: the peer had ended its side,
        # and the reset answered what we sent after (OpenSSL's alert for an end
        # without close_notify, under an application's context without
        # OP_IGNORE_UNEXPECTED_EOF). That is the peer's end of input, not a reset.
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.EPIPE)
    except (OSError, ValueError, TypeError):
        return False


def accept_queue_length(sock: Any) -> int:
    """How many connections wait, completed, in listening TCP socket ``sock``'s accept queue.

    Linux reports it as a listener's ``tcpi_unacked``. 0 where the kernel cannot
    tell (not a TCP listener, another OS).
    """
    if _TCP_INFO is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _UNACKED_AT + 4)
    except (OSError, ValueError, TypeError):
        return 0
    if len(info) < _UNACKED_AT + 4 or info[0] != _LISTEN:
        return 0
    queued: int = _UNACKED.unpack_from(info, _UNACKED_AT)[0]
    return queued
