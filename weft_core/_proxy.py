"""HAProxy PROXY protocol receiver (v1 text and v2 binary), sans-IO.

Implements the receiving side of HAProxy's ``proxy-protocol.txt``: a load
balancer prepends one header to a TCP stream announcing the original client and
destination addresses. :func:`parse_proxy_header` is a pure incremental parser;
:func:`read_proxy_header` and :func:`aread_proxy_header` drive it over a
``recv``-like callable without ever asking for a byte past the header.

Parsing is strict: input is rejected as soon as it cannot be the beginning of a
valid header, and nothing is guessed or repaired.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_PAYLOAD",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "aread_proxy_header",
    "build_v1",
    "build_v2",
    "crc32c",
    "parse_proxy_header",
    "read_proxy_header",
]

Address = tuple[str, int] | str | None

# --- v1 (text) -------------------------------------------------------------
#: Every v1 header starts with these six bytes (upper case, one space).
V1_PREFIX = b"PROXY "
#: Longest v1 line a receiver must accept, CRLF included (spec, section 2.1:
#: the worst case "PROXY UNKNOWN" line with two full IPv6 addresses).
MAX_V1_LENGTH = 107
#: Shortest possible header of either version: b"PROXY UNKNOWN\r\n".
_MIN_HEADER_LENGTH = 15

# --- v2 (binary) -----------------------------------------------------------
#: The 12-byte v2 signature; it cannot occur in a v1 line or in HTTP/SMTP etc.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Fixed part of a v2 header: signature, ver/cmd, fam/proto, 16-bit length.
_V2_FIXED = 16
#: Upper bound we accept for the v2 length field (bytes after the fixed part).
#: The format allows 65535, but that would let an unauthenticated peer make us
#: buffer 64 KiB per connection before anything is checked. Real balancers send
#: the address block (at most 216 bytes, AF_UNIX) plus a few TLVs (ALPN,
#: authority, unique id <= 128, SSL info, cloud endpoint ids): well under 1 KiB.
#: 4096 leaves ample room for that and for AF_UNIX + TLVs.
MAX_V2_PAYLOAD = 4096

_V2_VERSION = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1

#: family/protocol byte -> (name, address block size). Any other value is rejected.
_V2_FAMILIES: dict[int, tuple[str, int]] = {
    0x00: ("UNKNOWN", 0),  # AF_UNSPEC, UNSPEC: addresses unknown
    0x11: ("TCP4", 12),  # AF_INET, STREAM
    0x12: ("UDP4", 12),  # AF_INET, DGRAM
    0x21: ("TCP6", 36),  # AF_INET6, STREAM
    0x22: ("UDP6", 36),  # AF_INET6, DGRAM
    0x31: ("UNIX", 216),  # AF_UNIX, STREAM
    0x32: ("UNIX_DGRAM", 216),  # AF_UNIX, DGRAM
}
_UNIX_PATH = 108  # sun_path size used by the v2 AF_UNIX address block

# Registered TLV types (spec, section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03  # 4-byte big-endian CRC32c of the whole header
PP2_TYPE_NOOP = 0x04  # padding: ignored, may repeat, never reported
PP2_TYPE_UNIQUE_ID = 0x05

_DIGITS = frozenset(b"0123456789")
_IPV4_CHARS = _DIGITS | frozenset(b".")
_IPV6_CHARS = _DIGITS | frozenset(b"abcdefABCDEF:.")
_MAX_IPV4_TEXT = 15  # 255.255.255.255
_MAX_IPV6_TEXT = 45  # ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255


class ProxyHeaderError(ValueError):
    """The bytes received are not (the start of) a valid PROXY header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source``/``destination`` are ``(host, port)`` for TCP/UDP, a path for
    AF_UNIX, and ``None`` for LOCAL and UNKNOWN/UNSPEC. ``length`` is the number
    of bytes the header occupied; the stream payload starts right after it.
    ``tlvs`` holds a v2 PROXY header's TLVs (a LOCAL header's block is discarded
    unread, as the spec says).
    """

    version: int
    command: str
    family: str
    source: Address
    destination: Address
    length: int
    tlvs: dict[int, bytes] = field(default_factory=dict)


# --- CRC32c (Castagnoli, reflected polynomial 0x82F63B78) -------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC32c (Castagnoli) checksum of *data*."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- parser -----------------------------------------------------------------


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse a PROXY header at the start of *data*.

    Returns the header (bytes after ``header.length`` are payload), or ``None``
    if *data* is a valid prefix of a header and more bytes are needed. Raises
    :class:`ProxyHeaderError` as soon as *data* cannot start a valid header.
    """
    data = bytes(data)
    if data[:6] == V1_PREFIX:
        return _parse_v1(data)
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data)
    if V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data):
        return None  # includes b"": still undecided
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:MAX_V1_LENGTH]
    end = window.find(b"\r\n")
    if end == -1:
        if len(data) >= MAX_V1_LENGTH or (
            len(data) == MAX_V1_LENGTH - 1 and not data.endswith(b"\r")
        ):
            raise ProxyHeaderError("v1 line too long or missing CRLF")
        rest = data[len(V1_PREFIX) :]
        if rest.endswith(b"\r"):
            # Only a LF may follow: what precedes the CR must be a whole line.
            _parse_v1_line(rest[:-1], len(data) + 1)
        else:
            _check_v1_partial(rest)
        return None
    return _parse_v1_line(data[len(V1_PREFIX) : end], end + 2)


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader:
    """Parse the text between ``PROXY `` and CRLF."""
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # The spec says the receiver must ignore the rest of an UNKNOWN line.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, length)
    fields = line.split(b" ")
    proto = fields[0]
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("v1: unknown protocol")
    if len(fields) != 5:
        raise ProxyHeaderError("v1: expected 4 fields separated by single spaces")
    src = _v1_address(proto, fields[1])
    dst = _v1_address(proto, fields[2])
    sport = _v1_port(fields[3])
    dport = _v1_port(fields[4])
    return ProxyHeader(1, "PROXY", proto.decode(), (src, sport), (dst, dport), length)


def _check_v1_partial(rest: bytes) -> None:
    """Reject an incomplete v1 line (after ``PROXY ``) that cannot become valid.

    Complete fields are validated fully; the field still being received is
    checked for its character set and maximum length.
    """
    if b"UNKNOWN".startswith(rest) or rest.startswith(b"UNKNOWN "):
        return
    if b"TCP4".startswith(rest) or b"TCP6".startswith(rest):
        return
    proto = rest[:4]
    if proto not in (b"TCP4", b"TCP6") or rest[4:5] != b" ":
        raise ProxyHeaderError("v1: unknown protocol")
    fields = rest[5:].split(b" ")
    if len(fields) > 4:
        raise ProxyHeaderError("v1: too many fields")
    *complete, partial = fields
    for i, value in enumerate(complete):
        if i < 2:
            _v1_address(proto, value)
        else:
            _v1_port(value)
    if len(complete) < 2:
        chars, limit = (
            (_IPV4_CHARS, _MAX_IPV4_TEXT) if proto == b"TCP4" else (_IPV6_CHARS, _MAX_IPV6_TEXT)
        )
        if len(partial) > limit or not chars.issuperset(partial):
            raise ProxyHeaderError("v1: invalid address")
    elif partial:
        # A port prefix: digits, no leading zero, at most 5 digits, <= 65535.
        _v1_port(partial)  # every valid prefix of a port is itself a valid port


def _v1_address(proto: bytes, value: bytes) -> str:
    if proto == b"TCP4":
        if not value or not _IPV4_CHARS.issuperset(value):
            raise ProxyHeaderError("v1: invalid IPv4 address")
        try:
            return str(ipaddress.IPv4Address(value.decode("ascii")))
        except ValueError:
            raise ProxyHeaderError("v1: invalid IPv4 address") from None
    # IPv6: the character check also excludes scope ids ("%eth0").
    if not value or not _IPV6_CHARS.issuperset(value):
        raise ProxyHeaderError("v1: invalid IPv6 address")
    try:
        return _ipv6_text(ipaddress.IPv6Address(value.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError("v1: invalid IPv6 address") from None


def _ipv6_text(address: ipaddress.IPv6Address) -> str:
    """An IPv6 address as the socket module writes a peer's (``::ffff:127.0.0.1``).

    For an IPv4-mapped one Python 3.11's ``str()`` gives ``::ffff:7f00:1``. A client a dual-stack balancer announces then reads as the same client would
    connecting straight to a ``dual`` socket, with the IPv4 address an operator
    greps the logs for.
    """
    mapped = address.ipv4_mapped
    return str(address) if mapped is None else f"::ffff:{mapped}"


def _plain(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 one it means.

    A mapped peer is compared as its IPv4 address, so the network it was written
    in never matched: the balancer was refused as untrusted.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _v1_port(value: bytes) -> int:
    if (
        not value
        or len(value) > 5
        or not _DIGITS.issuperset(value)
        or (value[:1] == b"0" and len(value) > 1)
    ):
        raise ProxyHeaderError("v1: invalid port")
    port = int(value)
    if port > 0xFFFF:
        raise ProxyHeaderError("v1: invalid port")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 13:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != _V2_VERSION:
        raise ProxyHeaderError("v2: unsupported version")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError("v2: unknown command")
    if len(data) < 14:
        return None
    fam = _V2_FAMILIES.get(data[13])
    if fam is None and command == _CMD_PROXY:
        raise ProxyHeaderError("v2: unknown address family/protocol")
    family, addr_size = fam or ("UNKNOWN", 0)
    if len(data) < _V2_FIXED:
        return None
    payload_len = int.from_bytes(data[14:16], "big")
    if payload_len > MAX_V2_PAYLOAD:
        raise ProxyHeaderError("v2: header length exceeds limit")
    total = _V2_FIXED + payload_len
    if command == _CMD_LOCAL:
        # The spec (2.2): for LOCAL (a balancer's own health check) the receiver
        # "must accept this connection as valid and must use the real connection
        # endpoints and discard the protocol block including the family which is
        # ignored": whatever family, length and TLVs it holds, unread.
        if len(data) < total:
            return None
        return ProxyHeader(2, "LOCAL", family, None, None, total)
    if payload_len < addr_size:
        raise ProxyHeaderError("v2: header too short for address family")
    if len(data) < total:
        return None
    header = data[:total]
    tlvs = _parse_tlvs(header, _V2_FIXED + addr_size)
    src: Address
    dst: Address
    block = header[_V2_FIXED : _V2_FIXED + addr_size]
    if addr_size == 12:
        src = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        dst = (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
    elif addr_size == 36:
        src = (_ipv6_text(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        dst = (
            _ipv6_text(ipaddress.IPv6Address(block[16:32])),
            int.from_bytes(block[34:36], "big"),
        )
    elif addr_size == 216:
        src = _unix_path(block[:_UNIX_PATH])
        dst = _unix_path(block[_UNIX_PATH:])
    else:
        src = dst = None
    return ProxyHeader(2, "PROXY", family, src, dst, total, tlvs)


def _unix_path(raw: bytes) -> str:
    """Decode a NUL-padded sun_path; a leading NUL marks a Linux abstract name."""
    if raw[:1] == b"\x00":
        return "\x00" + raw[1:].rstrip(b"\x00").decode("utf-8", "surrogateescape")
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _parse_tlvs(header: bytes, pos: int) -> dict[int, bytes]:
    """Parse the TLVs in ``header[pos:]``; verify a CRC32c TLV if present.

    NOOP TLVs are skipped. Any other type appearing twice is rejected: a
    dictionary cannot represent it and picking one would be guessing.
    """
    tlvs: dict[int, bytes] = {}
    end = len(header)
    while pos < end:
        if end - pos < 3:
            raise ProxyHeaderError("v2: truncated TLV")
        kind = header[pos]
        size = int.from_bytes(header[pos + 1 : pos + 3], "big")
        start = pos + 3
        pos = start + size
        if pos > end:
            raise ProxyHeaderError("v2: TLV overruns header")
        if kind == PP2_TYPE_NOOP:
            continue
        if kind in tlvs:
            raise ProxyHeaderError("v2: duplicate TLV")
        value = header[start:pos]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyHeaderError("v2: bad CRC32c TLV length")
            zeroed = header[:start] + b"\x00\x00\x00\x00" + header[pos:]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyHeaderError("v2: CRC32c mismatch")
        tlvs[kind] = value
    return tlvs


# --- builders ---------------------------------------------------------------


def _ip_pair(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[
    ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address
]:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be the same IP version")
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
    return src, dst


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """Build a v1 header; ``None`` addresses give ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _ip_pair(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    command: str = "PROXY",
    tlvs: Mapping[int, bytes] | None = None,
    checksum: bool = False,
) -> bytes:
    """Build a v2 header for TCP over IPv4/IPv6, or a LOCAL/UNSPEC one.

    With ``command="LOCAL"`` or ``None`` addresses the family is AF_UNSPEC and
    no address block is sent. ``checksum=True`` appends a valid CRC32c TLV.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"unknown command: {command!r}")
    cmd = _CMD_PROXY if command == "PROXY" else _CMD_LOCAL
    block = b""
    fam = 0x00
    if command == "PROXY" and source is not None and destination is not None:
        src, dst = _ip_pair(source, destination)
        fam = 0x11 if src.version == 4 else 0x21
        ports = source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
        block = src.packed + dst.packed + ports
    for kind, value in (tlvs or {}).items():
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"invalid TLV {kind}")
        if checksum and kind == PP2_TYPE_CRC32C:
            raise ValueError("pass checksum=True or a CRC32c TLV, not both")
        block += bytes([kind]) + len(value).to_bytes(2, "big") + bytes(value)
    if checksum:
        block += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\x00\x00\x00\x00"
    if len(block) > 0xFFFF:
        raise ValueError("v2 header too long")
    head = V2_SIGNATURE + bytes([_V2_VERSION << 4 | cmd, fam]) + len(block).to_bytes(2, "big")
    header = head + block
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


# --- driving the parser over a connection -----------------------------------


class _HeaderReader:
    """Sans-IO driver: says how much is safe to read, then parses the buffer.

    "Safe" means no read ever extends past the header, so the payload stays in
    the socket for the handler. v2 is read in at most three reads (fixed part,
    then the exact announced length); v1 is read a byte or two at a time once
    past the 15-byte minimum, since only the CRLF marks its end.
    """

    def __init__(self) -> None:
        self.buffer = b""

    def wanted(self) -> int:
        buf = self.buffer
        if len(buf) < _MIN_HEADER_LENGTH:
            return _MIN_HEADER_LENGTH - len(buf)
        if buf.startswith(V2_SIGNATURE):
            if len(buf) < _V2_FIXED:
                return _V2_FIXED - len(buf)
            return _V2_FIXED + int.from_bytes(buf[14:16], "big") - len(buf)
        return 1 if buf.endswith(b"\r") else 2  # v1: at least the CRLF is missing

    def feed(self, chunk: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not chunk:
            raise ProxyHeaderError("connection closed before PROXY header was complete")
        self.buffer += chunk
        header = parse_proxy_header(self.buffer)
        if header is None:
            return None
        return header, self.buffer[header.length :]


def read_proxy_header(
    recv: Callable[[int], bytes],
    *,
    deadline_exceeded: Callable[[], bool] | None = None,
) -> tuple[ProxyHeader, bytes]:
    """Read and parse a PROXY header using ``recv(n)`` (e.g. ``sock.recv``).

    Returns ``(header, leftover)``; ``leftover`` holds any bytes ``recv`` gave
    beyond the header (normally empty, since reads never ask past it). Raises
    :class:`ProxyHeaderError` on EOF, malformed input, or when
    ``deadline_exceeded()`` (checked before each read) returns true. A blocking
    ``recv`` should itself have a timeout; its exceptions propagate unchanged.
    """
    reader = _HeaderReader()
    while True:
        if deadline_exceeded is not None and deadline_exceeded():
            raise ProxyHeaderError(HEADER_TIMED_OUT)
        result = reader.feed(recv(reader.wanted()))
        if result is not None:
            return result


async def aread_proxy_header(
    receive: Callable[[int], Awaitable[bytes]],
    *,
    deadline_exceeded: Callable[[], bool] | None = None,
) -> tuple[ProxyHeader, bytes]:
    """Async twin of :func:`read_proxy_header` over ``await receive(n)``."""
    reader = _HeaderReader()
    while True:
        if deadline_exceeded is not None and deadline_exceeded():
            raise ProxyHeaderError(HEADER_TIMED_OUT)
        result = reader.feed(await receive(reader.wanted()))
        if result is not None:
            return result


#: What :func:`read_proxy_header` raises once ``deadline_exceeded()``.
HEADER_TIMED_OUT = "timed out waiting for PROXY header"

#: Loopback only: a balancer elsewhere must be listed on purpose. Never ``"unix"``.
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")
#: The ``trusted_proxies`` entry that trusts every client of a Unix listener. A Unix
#: peer has no address worth checking (it binds whatever path or abstract name it
#: likes, or none), so trust there is all or nothing, and given only when listed:
#: then the socket file's permissions (``unix_mode``) decide who may announce clients.
UNIX_PROXIES = "unix"


@dataclass(frozen=True)
class ProxyPolicy:
    """Who may send a PROXY header, and how long they have to send it.

    Trust is explicit for every family: a TCP peer must be inside one of
    ``trusted``, a Unix peer is trusted only when ``unix`` is set (the ``"unix"``
    entry of ``trusted_proxies``), and any other peer never.
    """

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    header_timeout: float
    unix: bool = False

    @classmethod
    def from_settings(cls, trusted: Iterable[str], header_timeout: float) -> ProxyPolicy:
        """Parse network strings and ``"unix"``; a bad one is a ValueError naming it."""
        networks = []
        unix = False
        for text in trusted:
            if text.strip() == UNIX_PROXIES:
                unix = True
                continue
            try:
                networks.append(_plain(ipaddress.ip_network(text, strict=False)))
            except ValueError as exc:
                raise ValueError(
                    f"not a network: {text!r} ({exc}); expected a network such as "
                    f"'10.0.0.0/8', or {UNIX_PROXIES!r} to trust the clients of Unix listeners"
                ) from None
        return cls(tuple(networks), header_timeout, unix)

    def trusts(self, peer: object) -> bool:
        """True if ``peer``, an address as ``accept()`` returns it, is a trusted proxy.

        A tuple is a TCP peer; a ``str`` or ``bytes`` (a path, an abstract name, or
        ``""`` for an unbound client) is a Unix peer, whatever it says.
        """
        if isinstance(peer, str | bytes):
            return self.unix
        if not isinstance(peer, tuple) or not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted)
