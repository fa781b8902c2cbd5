from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft_core._proxy import (
    MAX_V1_LENGTH,
    MAX_V2_PAYLOAD,
    PP2_TYPE_ALPN,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    aread_proxy_header,
    build_v1,
    build_v2,
    crc32c,
    parse_proxy_header,
    read_proxy_header,
)

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoints4 = st.tuples(ipv4, ports)
endpoints6 = st.tuples(ipv6, ports)
# Any TLV type except CRC32c (added via checksum=) and NOOP (dropped by the parser).
tlv_maps = st.dictionaries(
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_NOOP)),
    st.binary(max_size=64),
    max_size=6,
)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    if kind == "v1-unknown":
        return build_v1(None, None)
    pair = endpoints4 if kind.endswith("4") else endpoints6
    src, dst = draw(pair), draw(pair)
    if kind.startswith("v1"):
        return build_v1(src, dst)
    command = "LOCAL" if kind == "v2-local" else "PROXY"
    return build_v2(src, dst, command=command, tlvs=draw(tlv_maps), checksum=draw(st.booleans()))


def canon(addr: tuple[str, int]) -> tuple[str, int]:
    """The address as the parser writes it: an IPv4-mapped one as ``::ffff:a.b.c.d``,
    as the socket module writes a peer's (Python 3.11's ``str()`` writes hex)."""
    ip = ipaddress.ip_address(addr[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (str(ip) if mapped is None else f"::ffff:{mapped}"), addr[1]


def test_an_ipv4_mapped_client_reads_as_the_socket_module_writes_it() -> None:
    """A dual-stack balancer's IPv4 client was ``::ffff:7f00:1`` in the handler and the
    logs, where the same client straight to a dual socket is ``::ffff:127.0.0.1``."""
    for raw in (
        b"PROXY TCP6 ::ffff:127.0.0.1 ::1 5000 80\r\n",
        build_v2(("::ffff:127.0.0.1", 5000), ("::1", 80)),
    ):
        h = parse_proxy_header(raw)
        assert h is not None
        assert h.source == ("::ffff:127.0.0.1", 5000)


def expect_error(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


# --- properties --------------------------------------------------------------


@given(st.one_of(st.tuples(endpoints4, endpoints4), st.tuples(endpoints6, endpoints6)))
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    src, dst = pair
    raw = build_v1(src, dst)
    assert len(raw) <= MAX_V1_LENGTH
    h = parse_proxy_header(raw + b"payload")
    assert h is not None
    assert (h.version, h.command, h.length) == (1, "PROXY", len(raw))
    assert h.family == ("TCP4" if "." in src[0] and ":" not in src[0] else "TCP6")
    assert (h.source, h.destination) == (canon(src), canon(dst))


@given(
    st.one_of(st.tuples(endpoints4, endpoints4), st.tuples(endpoints6, endpoints6)),
    tlv_maps,
    st.booleans(),
)
def test_v2_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]], tlvs: dict[int, bytes], checksum: bool
) -> None:
    src, dst = pair
    raw = build_v2(src, dst, tlvs=tlvs, checksum=checksum)
    h = parse_proxy_header(raw + b"\r\n\r\nmore")
    assert h is not None
    assert (h.version, h.command, h.length) == (2, "PROXY", len(raw))
    assert h.family == ("TCP4" if ipaddress.ip_address(src[0]).version == 4 else "TCP6")
    assert (h.source, h.destination) == (canon(src), canon(dst))
    assert {k: v for k, v in h.tlvs.items() if k != PP2_TYPE_CRC32C} == tlvs
    assert (PP2_TYPE_CRC32C in h.tlvs) == checksum


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_error_or_none(data: bytes) -> None:
    with contextlib.suppress(ProxyHeaderError):
        parse_proxy_header(data)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_signatures(tail: bytes) -> None:
    for prefix in (
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        V2_SIGNATURE,
        V2_SIGNATURE + b"\x21",
    ):
        try:
            h = parse_proxy_header(prefix + tail)
        except ProxyHeaderError:
            continue
        if h is not None:
            assert h.length <= len(prefix + tail)


@given(valid_headers(), st.data())
def test_mutations_only_error_none_or_header(raw: bytes, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        mutated = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    elif op == "insert":
        mutated = raw[:i] + data.draw(st.binary(min_size=1, max_size=4)) + raw[i:]
    elif op == "delete":
        mutated = raw[:i] + raw[i + 1 :]
    else:
        mutated = raw[:i]
    try:
        h = parse_proxy_header(mutated)
    except ProxyHeaderError:
        return
    if op == "truncate":
        assert h is None
    if h is not None:
        assert isinstance(h, ProxyHeader)
        assert h.length <= len(mutated)


@given(valid_headers())
def test_byte_by_byte(raw: bytes) -> None:
    for i in range(len(raw)):
        assert parse_proxy_header(raw[:i]) is None, i
    h = parse_proxy_header(raw)
    assert h is not None and h.length == len(raw)


# --- crc32c ------------------------------------------------------------------


def test_crc32c_known_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# --- v1 edge cases -----------------------------------------------------------


def test_v1_examples() -> None:
    h = parse_proxy_header(b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\nGET /")
    assert h == ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("10.0.0.2", 443), 43)
    h = parse_proxy_header(b"PROXY TCP6 2001:DB8::1 ::1 0 65535\r\n")
    assert h is not None
    assert (h.source, h.destination) == (("2001:db8::1", 0), ("::1", 65535))


def test_v1_unknown_ignores_rest() -> None:
    h = parse_proxy_header(b"PROXY UNKNOWN\r\n")
    assert h is not None and (h.family, h.source, h.length) == ("UNKNOWN", None, 15)
    line = b"PROXY UNKNOWN whatever  \r junk\r\n"
    h = parse_proxy_header(line + b"x")
    assert h is not None and h.length == len(line) and h.destination is None


def test_v1_max_length() -> None:
    addr = ":".join(["ffff"] * 8)
    ok = f"PROXY UNKNOWN {addr} {addr} 65535 65535\r\n".encode()
    assert len(ok) == MAX_V1_LENGTH
    assert parse_proxy_header(ok) is not None
    too_long = ok[:-2] + b"5\r\n"
    assert len(too_long) == MAX_V1_LENGTH + 1
    expect_error(too_long)
    expect_error(too_long[:-1])  # CR as byte 107: the LF would be byte 108
    expect_error(b"PROXY UNKNOWN " + b"x" * 200)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",  # CR not followed by LF
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # trailing space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # missing port
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 007 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # IPv6 in a TCP4 line
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",  # IPv4 in a TCP6 line
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scope id
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # lower case
        b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    ],
)
def test_v1_rejected(line: bytes) -> None:
    expect_error(line)


@pytest.mark.parametrize(
    "prefix",
    [b"proxy", b"PROXYX", b"PROXY TCP4 1.2.3.4 ::", b"PROXY TCP4 1.2.3.4 5.6.7.8 007",
     b"PROXY TCP4 1.2.3.4 5.6.7.8 70000", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
     b"PROXY TCP6 1:2", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"PROXY TCPX", b"GET / HTTP/1.1"],
)  # fmt: skip
def test_v1_rejected_early(prefix: bytes) -> None:
    if prefix == b"PROXY TCP6 1:2":
        assert parse_proxy_header(prefix) is None  # still a valid prefix
        expect_error(prefix + b"g")
    elif prefix.endswith(b"1 2\r"):
        assert parse_proxy_header(prefix) is None
        expect_error(prefix + b"\r")
    else:
        expect_error(prefix)


def test_v1_needs_more() -> None:
    for partial in (b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"):
        assert parse_proxy_header(partial) is None


# --- v2 edge cases -----------------------------------------------------------


def test_v2_examples() -> None:
    raw = build_v2(("10.1.2.3", 1234), ("10.0.0.1", 80), tlvs={PP2_TYPE_ALPN: b"h2"})
    assert raw[:16] == V2_SIGNATURE + b"\x21\x11\x00\x11"
    h = parse_proxy_header(raw)
    assert h == ProxyHeader(
        2, "PROXY", "TCP4", ("10.1.2.3", 1234), ("10.0.0.1", 80), 33, {PP2_TYPE_ALPN: b"h2"}
    )


def test_v2_local() -> None:
    raw = build_v2(None, None, command="LOCAL")
    assert raw == V2_SIGNATURE + b"\x20\x00\x00\x00"
    h = parse_proxy_header(raw + b"data")
    assert h is not None
    assert (h.command, h.family, h.source, h.destination, h.length) == (
        "LOCAL",
        "UNKNOWN",
        None,
        None,
        16,
    )
    # LOCAL with an address block: addresses are discarded.
    raw = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    h = parse_proxy_header(raw)
    assert h is not None and (h.command, h.source) == ("LOCAL", None)


def test_v2_local_discards_its_block_whatever_it_holds() -> None:
    """The spec (2.2): a LOCAL header's receiver "must accept this connection as valid
    and ... discard the protocol block including the family which is ignored". A
    health check with a family but no addresses, an unknown family, or a block of
    garbage, a TLV running past the end or a wrong CRC32c was refused (HAProxy takes
    each: an outside check)."""
    headers = [
        _v2(0x20, 0x11, b""),  # TCP4, no addresses
        _v2(0x20, 0x21, bytes(12)),  # TCP6, too short for it
        _v2(0x20, 0x13, b""),  # an unknown protocol
        _v2(0x20, 0xFF, b"junk"),  # an unknown family, stray bytes
        _v2(0x20, 0x00, b"\x01\x00\x09ab"),  # a TLV running past the end
        _v2(0x20, 0x11, bytes(12) + b"\x03\x00\x04" + bytes(4)),  # a wrong CRC32c
        _v2(0x20, 0x11, bytes(12) + b"\x01\x00\x01a\x01\x00\x01b"),  # a TLV twice
    ]
    for raw in headers:
        h = parse_proxy_header(raw + b"payload")
        assert h is not None, raw
        assert (h.command, h.source, h.destination, h.length, h.tlvs) == (
            "LOCAL", None, None, len(raw), {}
        ), raw  # fmt: skip
        for i in range(len(raw)):
            assert parse_proxy_header(raw[:i]) is None, (raw, i)
    expect_error(_v2(0x20, 0x11, b"", length=MAX_V2_PAYLOAD + 1))  # still bounded
    expect_error(_v2(0x22, 0xFF, b""))  # an unknown command is still refused


def test_v2_unix() -> None:
    block = b"/run/src.sock".ljust(108, b"\x00") + b"\x00abstract".ljust(108, b"\x00")
    raw = V2_SIGNATURE + b"\x21\x31" + len(block).to_bytes(2, "big") + block
    h = parse_proxy_header(raw)
    assert h is not None
    assert (h.family, h.source, h.destination) == ("UNIX", "/run/src.sock", "\x00abstract")


def test_v2_noop_ignored() -> None:
    tlv = bytes([PP2_TYPE_NOOP]) + b"\x00\x02ab"
    block = bytes(12) + tlv + tlv
    raw = V2_SIGNATURE + b"\x21\x11" + len(block).to_bytes(2, "big") + block
    h = parse_proxy_header(raw)
    assert h is not None and h.tlvs == {}


def _v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    n = len(block) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + n.to_bytes(2, "big") + block


@pytest.mark.parametrize(
    "raw",
    [
        b"\r\n\r\n\x00\r\nQUIX\n",  # bad signature
        _v2(0x11, 0x11, bytes(12)),  # version 1 nibble
        _v2(0x31, 0x11, bytes(12)),  # version 3
        _v2(0x22, 0x11, bytes(12)),  # unknown command
        _v2(0x2F, 0x11, bytes(12)),
        _v2(0x21, 0x13, bytes(12)),  # unknown protocol
        _v2(0x21, 0x41, bytes(12)),  # unknown family
        _v2(0x21, 0x01, b""),  # UNSPEC family with STREAM: undefined
        _v2(0x21, 0x11, bytes(11)),  # too short for IPv4
        _v2(0x21, 0x21, bytes(35)),  # too short for IPv6
        _v2(0x21, 0x31, bytes(215)),  # too short for AF_UNIX
        _v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD + 1),  # absurd length
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00"),  # truncated TLV header
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00\x05abcd"),  # TLV overruns
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00\x01a\x01\x00\x01b"),  # duplicate TLV
        _v2(0x21, 0x11, bytes(12) + b"\x03\x00\x03abc"),  # CRC32c TLV of wrong size
    ],
)
def test_v2_rejected(raw: bytes) -> None:
    expect_error(raw)


def test_v2_rejects_as_soon_as_possible() -> None:
    expect_error(V2_SIGNATURE + b"\x10")
    expect_error(V2_SIGNATURE + b"\x23")
    expect_error(V2_SIGNATURE + b"\x21\x99")
    expect_error(V2_SIGNATURE + b"\x21\x11\xff\xff")  # without waiting for 64 KiB
    expect_error(b"\r\n\r\nX")


def test_v2_needs_more() -> None:
    raw = build_v2(("::1", 1), ("::2", 2), tlvs={0xE0: b"x" * 100})
    for i in (0, 1, 12, 13, 14, 15, 16, 40, len(raw) - 1):
        assert parse_proxy_header(raw[:i]) is None


def test_v2_crc32c() -> None:
    good = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs={PP2_TYPE_ALPN: b"h2"}, checksum=True)
    h = parse_proxy_header(good)
    assert h is not None
    crc = int.from_bytes(h.tlvs[PP2_TYPE_CRC32C], "big")
    assert crc == crc32c(good[:-4] + bytes(4))
    expect_error(good[:-1] + bytes([good[-1] ^ 1]))  # checksum mismatch
    expect_error(good[:20] + bytes([good[20] ^ 1]) + good[21:])  # corrupted address
    # An explicit checksum TLV built by hand is accepted too.
    manual = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs={PP2_TYPE_CRC32C: bytes(4)})
    manual = manual[:-4] + crc32c(manual).to_bytes(4, "big")
    assert parse_proxy_header(manual) is not None


def test_max_payload_accepted() -> None:
    value = b"v" * (MAX_V2_PAYLOAD - 12 - 3)
    raw = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs={0xE1: value})
    h = parse_proxy_header(raw)
    assert h is not None and h.tlvs[0xE1] == value


def test_builders_validate() -> None:
    with pytest.raises(ValueError):
        build_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        build_v2(("1.2.3.4", 70000), ("1.2.3.4", 2))
    with pytest.raises(ValueError):
        build_v2(None, None, command="BOGUS")
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"


# --- read_proxy_header over real sockets --------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        build_v1(("192.0.2.1", 4000), ("198.51.100.2", 443)),
        build_v1(None, None),
        build_v2(("2001:db8::1", 5), ("2001:db8::2", 6), tlvs={1: b"h2"}, checksum=True),
        build_v2(None, None, command="LOCAL"),
    ],
)
def test_read_proxy_header_socketpair(header: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        payload = b"\r\nhello PROXY \r\n\r\n\x00 payload"
        a.sendall(header + payload)
        h, leftover = read_proxy_header(b.recv)
        assert h == parse_proxy_header(header)
        a.close()
        rest = leftover
        while chunk := b.recv(1024):
            rest += chunk
        assert rest == payload


def test_read_proxy_header_slow_sender_and_errors() -> None:
    header = build_v1(("10.0.0.1", 1), ("10.0.0.2", 2))
    stream = bytearray(header + b"tail")

    def recv(n: int) -> bytes:  # a slow peer: at most 3 bytes per read
        chunk = bytes(stream[: min(n, 3)])
        del stream[: len(chunk)]
        return chunk

    h, leftover = read_proxy_header(recv)
    assert h.source == ("10.0.0.1", 1) and leftover == b""
    assert stream == b"tail"

    with pytest.raises(ProxyHeaderError, match="closed"):
        read_proxy_header(_feeder([b"PROXY ", b""]))
    with pytest.raises(ProxyHeaderError):
        read_proxy_header(_feeder([b"GET / HTTP/1.1\r\n"]))


def test_read_proxy_header_deadline() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(b"PROXY TCP4 1.2.3.4 ")
        calls = 0

        def exceeded() -> bool:
            nonlocal calls
            calls += 1
            return calls > 2

        with pytest.raises(ProxyHeaderError, match="timed out"):
            read_proxy_header(b.recv, deadline_exceeded=exceeded)
    # A recv timeout is the caller's business and propagates unchanged.
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"PROXY TCP4 1.2.3.4 ")
        b.settimeout(0.05)
        with pytest.raises(TimeoutError):
            read_proxy_header(b.recv)


def _feeder(chunks: list[bytes]) -> Callable[[int], bytes]:
    it = iter(chunks)
    return lambda n: next(it)


def test_aread_proxy_header() -> None:
    header = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs={2: b"example.com"})

    async def main() -> tuple[ProxyHeader, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(header + b"payload")
        reader.feed_eof()
        result = await aread_proxy_header(reader.read)
        assert await reader.read() == b"payload"
        return result

    h, leftover = asyncio.run(main())
    assert h.tlvs == {2: b"example.com"} and leftover == b""

    async def eof() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(header[:20])
        reader.feed_eof()
        await aread_proxy_header(reader.read)

    with pytest.raises(ProxyHeaderError, match="closed"):
        asyncio.run(eof())
