"""Endpoint strings: what parses, what each part means, and the errors for what doesn't."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft_core._endpoints import Endpoint, format_endpoint_host_port, parse_endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000", Endpoint("tcp", host="127.0.0.1", port=5000)),
        ("[::1]:5000", Endpoint("tcp", host="::1", port=5000)),
        ("[fe80::1%eth0]:80", Endpoint("tcp", host="fe80::1%eth0", port=80)),
        ("localhost:0", Endpoint("tcp", host="localhost", port=0)),
        ("example.com:65535", Endpoint("tcp", host="example.com", port=65535)),
        (":5000", Endpoint("tcp", host="127.0.0.1", port=5000)),
        ("5000", Endpoint("tcp", host="127.0.0.1", port=5000)),
        ("  5000\n", Endpoint("tcp", host="127.0.0.1", port=5000)),
        ("tcp:0.0.0.0:5000", Endpoint("tcp", host="0.0.0.0", port=5000)),
        ("tcp:[::]:5000", Endpoint("tcp", host="::", port=5000)),
        ("unix:/run/app.sock", Endpoint("unix", path="/run/app.sock")),
        ("unix:relative.sock", Endpoint("unix", path="relative.sock")),
        ("unix:@abstract", Endpoint("unix", path="@abstract")),
        ("fd:3", Endpoint("fd", fd=3)),
        ("fd:0", Endpoint("fd", fd=0)),
    ],
)
def test_accepted_forms(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


def test_service_names_resolve_to_their_port() -> None:
    http = socket.getservbyname("http", "tcp")
    assert parse_endpoint("localhost:http") == Endpoint("tcp", host="localhost", port=http)
    assert parse_endpoint("http").port == http


def test_default_host_is_used_for_a_bare_port() -> None:
    assert parse_endpoint(":80", default_host="0.0.0.0").host == "0.0.0.0"
    assert str(parse_endpoint("80", default_host="::")) == "[::]:80"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty endpoint"),
        ("   ", "empty endpoint"),
        ("::1:5000", "put an IPv6 address in brackets, as in [::1]:5000"),
        ("::1", "an IPv6 address needs brackets and a port, as in [::1]:5000"),
        ("fe80::1", "an IPv6 address needs brackets and a port, as in [fe80::1]:5000"),
        ("[::1]", "must be followed by :PORT"),
        ("[::1:5000", "without a closing ']'"),
        ("[nothost]:5000", "'nothost' in brackets is not an IPv6 address"),
        ("127.0.0.1:", "the port is missing"),
        ("127.0.0.1:65536", "port '65536' is out of range"),
        ("127.0.0.1:99999999999999999999", "port '99999999999999999999' is out of range"),
        ("127.0.0.1:" + "9" * 50, "port '" + "9" * 40 + "'... is out of range"),
        ("127.0.0.1:-1", "neither a port number nor a service name"),
        ("host name:80", "'host name' is not an IP address or host name"),
        ("localhost:no-such-service-here", "unknown service name 'no-such-service-here'"),
        ("localhost", "neither a port number nor a service name"),
        ("unix:", "needs a path"),
        ("unix:@", "needs a path"),
        ("fd:", "file descriptor number"),
        ("fd:x", "file descriptor number"),
        ("fd:-1", "file descriptor number"),
        ("fd:99999999999", "out of range"),
    ],
)
def test_bad_strings_say_why_and_list_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    message = str(info.value)
    assert why in message
    assert "expected HOST:PORT, [IPV6]:PORT, :PORT, PORT, unix:PATH or fd:N" in message


def test_a_non_string_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="must be a string, not int"):
        parse_endpoint(5000)  # type: ignore[arg-type]


def test_unix_address_maps_abstract_names_to_a_leading_nul() -> None:
    assert parse_endpoint("unix:@weft").unix_address == "\0weft"
    assert parse_endpoint("unix:/tmp/x.sock").unix_address == "/tmp/x.sock"
    with pytest.raises(ValueError, match="not a Unix socket endpoint"):
        _ = parse_endpoint("fd:3").unix_address


def test_format_endpoint_host_port_brackets_ipv6() -> None:
    assert format_endpoint_host_port("127.0.0.1", 80) == "127.0.0.1:80"
    assert format_endpoint_host_port("::1", 80) == "[::1]:80"
    assert format_endpoint_host_port("localhost", "http") == "localhost:http"


# -- properties -------------------------------------------------------------------------

_hostnames = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9_])?", fullmatch=True)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_ports = st.integers(0, 65535)
_tcp = st.builds(
    lambda host, port: Endpoint("tcp", host=host, port=port),
    st.one_of(_hostnames, _ipv4, _ipv6),
    _ports,
)


def _kernel_path(path: str) -> bool:
    """A path the kernel can hold: encodable (a lone surrogate outside
    surrogateescape's range is not), and within sun_path's 107 bytes."""
    try:
        return path != "@" and path.strip() == path and len(os.fsencode(path)) <= 107
    except UnicodeEncodeError:
        return False


_unix = st.builds(
    lambda path: Endpoint("unix", path=path),
    st.text(st.characters(blacklist_characters="\0"), min_size=1).filter(_kernel_path),
)
_fd = st.builds(lambda fd: Endpoint("fd", fd=fd), st.integers(0, 2**31 - 1))


@given(st.one_of(_tcp, _unix, _fd))
def test_str_round_trips(endpoint: Endpoint) -> None:
    assert parse_endpoint(str(endpoint)) == endpoint


@given(_ipv6, _ports)
def test_ipv6_hosts_are_bracketed(host: str, port: int) -> None:
    text = str(Endpoint("tcp", host=host, port=port))
    assert text == f"[{host}]:{port}"
    assert ipaddress.ip_address(parse_endpoint(text).host or "") == ipaddress.ip_address(host)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except ValueError as exc:
        assert "expected HOST:PORT" in str(exc)
    else:
        assert parse_endpoint(str(endpoint)) == endpoint


@given(st.from_regex(r"(tcp:|unix:|fd:)?\[?[0-9a-f:.]{0,12}\]?:?[0-9a-z]{0,6}", fullmatch=True))
def test_endpoint_like_text_parses_or_raises_value_error(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except ValueError:
        return
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("path", "fits"),
    [
        ("/" + "a" * 106, True),  # 107 bytes and the NUL: sun_path's 108
        ("/" + "a" * 107, False),
        ("@" + "a" * 107, True),  # the abstract name's leading NUL is the @
        ("@" + "a" * 108, False),
        ("/" + "é" * 53, True),  # bytes, not characters: 107
        ("/" + "é" * 54, False),
    ],
)
def test_a_unix_path_longer_than_sun_path_is_refused_as_too_long(path: str, fits: bool) -> None:
    """A path the kernel cannot hold is refused when parsed, saying so, not when bound."""
    if fits:
        assert parse_endpoint(f"unix:{path}").path == path
    else:
        with pytest.raises(ValueError, match="too long"):
            parse_endpoint(f"unix:{path}")
