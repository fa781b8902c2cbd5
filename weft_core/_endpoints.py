"""Endpoint strings: the one way a listening place is written in config and on the CLI.

Modelled on Twisted's endpoint strings, cut down to what weft listens on::

    127.0.0.1:5000       host and port (IPv4 address or host name)
    [::1]:5000           an IPv6 host goes in brackets
    localhost:http       a service name instead of a port number (resolved here)
    :5000   or  5000     the default host: 127.0.0.1 (never all interfaces unless asked);
                         under ``weft serve`` with ``$PORT`` set, 0.0.0.0, as when
                         nothing says where
    tcp:0.0.0.0:5000     an explicit ``tcp:`` prefix is allowed and dropped
    unix:/run/app.sock   a Unix socket path (``unix:@name``: Linux abstract namespace)
    fd:3                 an inherited, already listening socket (systemd, ``--fd``)

gunicorn's spellings ``unix://PATH``, ``fd://N`` and ``tcp://HOST:PORT`` are read
as ``unix:PATH``, ``fd:N`` and ``HOST:PORT``.

:class:`Endpoint` is weft's one type for "where to listen": config, the Server and
``_listeners.open_listeners`` all use it. This module only parses and formats; it
opens nothing. ``str(endpoint)`` gives back a
string that parses to an equal endpoint.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Literal

from ._errors import ConfigError
from ._logsafe import escape_for_log

__all__ = [
    "Endpoint",
    "EndpointKind",
    "address_endpoint",
    "format_endpoint_host_port",
    "listen_endpoints",
    "parse_endpoint",
]

EndpointKind = Literal["tcp", "unix", "fd"]

#: The most bytes a Unix socket's path (or abstract name, after its ``@``) can have on
#: Linux: ``sun_path`` is 108 bytes, one of them the path's terminating NUL or the
#: abstract name's leading one (written ``@``).
SUN_PATH_MAX = 107

#: What every "bad endpoint" error ends with, so the user sees the forms that work.
ACCEPTED_FORMS = (
    "expected HOST:PORT, [IPV6]:PORT, :PORT, PORT, unix:PATH or fd:N"
    " (for example 127.0.0.1:5000, [::1]:5000, unix:/run/app.sock, fd:3)"
)

# A host name as DNS allows it (letters, digits, '-', '_' for SRV-style names, dots).
# Anything else (spaces, '/', unbracketed ':') is almost always a typo, and the
# resolver's own error for it ("Name or service not known") would come much later.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
# File descriptors are C ints.
_MAX_FD = 2**31 - 1
# Service names in /etc/services: a letter, then letters, digits, '-' (RFC 6335 5.1).
_SERVICE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint string.

    ``kind`` is ``"tcp"`` (``host`` and ``port`` set), ``"unix"`` (``path`` set; a
    leading ``@`` means the Linux abstract namespace) or ``"fd"`` (``fd`` set).
    ``port`` is always a number: service names are resolved when parsing, so a
    wrong one fails before anything binds.
    """

    kind: EndpointKind
    host: str | None = None
    port: int | None = None
    path: str | None = None
    fd: int | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        assert self.host is not None and self.port is not None
        return format_endpoint_host_port(self.host, self.port)

    @property
    def unix_address(self) -> str:
        """The address for ``socket.bind`` on a Unix endpoint (``@x`` becomes NUL + ``x``)."""
        if self.kind != "unix" or self.path is None:
            raise ValueError(f"{self} is not a Unix socket endpoint")
        return "\0" + self.path[1:] if self.path.startswith("@") else self.path


def address_endpoint(address: str, port: int) -> Endpoint:
    """The endpoint of the Server's ``address`` and ``port`` (``unix:PATH`` for a Unix socket)."""
    if address.startswith("unix:"):
        return Endpoint("unix", path=address[len("unix:") :])
    return Endpoint("tcp", host=address, port=port)


def listen_endpoints(bind: list[str] | None, address: str, port: int) -> list[Endpoint]:
    """Where a server listens: each of ``bind`` if given, else ``address`` and ``port``.

    The one rule for the Server and for the ``--workers`` supervisor, which binds
    before its workers start; ``bind`` holds endpoint strings already checked.
    """
    if bind:
        return [parse_endpoint(text) for text in bind]
    return [address_endpoint(address, port)]


def check_dual(hosts: list[str | None]) -> None:
    """ConfigError for an IPv4 address among ``hosts`` of a ``family='dual'`` server.

    A dual socket is an IPv6 one that also takes IPv4 clients: it needs an IPv6
    address. Checked when the Server is made (``--check-config`` too) and again
    when it binds. ``0.0.0.0`` stands for ``::`` there.
    """
    for host in hosts:
        if host and host != "0.0.0.0" and _is_ipv4_literal(host):
            raise ConfigError(
                f"family='dual' listens on an IPv6 socket that also accepts IPv4 clients, so it "
                f"needs an IPv6 address such as '::' or '::1', not {host!r}",
                key="family",
            )


def check_family(family: str, hosts: list[str | None]) -> None:
    """ConfigError for an address of the other family among ``hosts`` (``check_dual`` too).

    ``family='ipv4'`` with ``::1``, or ``'ipv6'`` with ``127.0.0.1``, cannot be bound:
    said when the Server is made (``--check-config`` too), as a mistake, not found
    as a bind failure once the application has been imported. Host names are left
    to the resolver. Under ``'ipv6'`` ``0.0.0.0`` is refused too (only ``'dual'``
    takes it for ``::``); under ``'ipv4'`` an IPv4-mapped address binds as IPv4.
    """
    if family == "dual":
        check_dual(hosts)
        return
    for host in hosts:
        if not host:
            continue
        if family == "ipv4" and _is_ipv6_only(host):
            other, example = "an IPv6", "'127.0.0.1' or '0.0.0.0'"
        elif family == "ipv6" and _is_ipv4_literal(host):
            other, example = "an IPv4", "'::1' or '::'"
        else:
            continue
        raise ConfigError(
            f"family={family!r} listens on {family[:2].upper()}{family[2:]} sockets only, and"
            f" {host!r} is {other} address: give one such as {example}, or drop family",
            key="family",
        )


def _is_ipv6_only(host: str) -> bool:
    """An IPv6 address, not an IPv4 one written as IPv6 (``::ffff:127.0.0.1``, which ``ipv4`` binds)."""
    try:
        return ipaddress.IPv6Address(host).ipv4_mapped is None
    except ValueError:
        return False


def _is_ipv4_literal(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def format_endpoint_host_port(host: str, port: int | str) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets (``[::1]:5000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str, *, default_host: str = "127.0.0.1") -> Endpoint:
    """Parse an endpoint string (see the module docstring for the forms).

    Raises ValueError saying what was wrong and which forms are accepted.
    """
    if not isinstance(text, str):
        raise ValueError(f"endpoint must be a string, not {type(text).__name__}; {ACCEPTED_FORMS}")
    spec = text.strip()
    if not spec:
        raise ValueError(f"empty endpoint; {ACCEPTED_FORMS}")
    # gunicorn's URL spellings (unix://PATH, fd://N, tcp://HOST:PORT) mean the same as
    # the short ones; as in gunicorn, unix:///run/a.sock is absolute, unix://a.sock not.
    for scheme in ("unix", "fd", "tcp"):
        if spec.startswith(f"{scheme}://"):
            spec = f"{scheme}:{spec[len(scheme) + 3 :]}"
    if spec.startswith("unix:"):
        return _parse_unix(text, spec[len("unix:") :])
    if spec.startswith("fd:"):
        return _parse_fd(text, spec[len("fd:") :])
    if spec.startswith("tcp:"):
        spec = spec[len("tcp:") :]
    return _parse_tcp(text, spec, default_host)


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad endpoint {text!r}: {why}; {ACCEPTED_FORMS}")


def _colons_hint(spec: str, host: str, port_text: str) -> str:
    """What to write instead of a TCP endpoint with more than one colon."""
    if "," in spec:
        return "one endpoint per string: give a list, or --bind once for each"
    if "://" in spec:
        scheme = escape_for_log(spec.split("://", 1)[0])
        return f"{scheme}:// is not an endpoint scheme (tcp://, unix:// and fd:// are)"
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        try:  # the whole of it an IPv6 address with no port (::1)
            ipaddress.IPv6Address(spec)
        except ValueError:
            return "more than one ':' and not an IPv6 address"
        return f"an IPv6 address needs brackets and a port, as in [{spec}]:5000"
    return f"put an IPv6 address in brackets, as in [{host}]:{port_text}"


def _parse_unix(text: str, path: str) -> Endpoint:
    if not path or path == "@":
        raise _bad(text, "a unix: endpoint needs a path")
    if "\0" in path:
        raise _bad(text, "a Unix socket path cannot contain NUL (write unix:@name for abstract)")
    length = len(os.fsencode(path))
    most = SUN_PATH_MAX + 1 if path.startswith("@") else SUN_PATH_MAX  # @ is the NUL
    if length > most:
        raise _bad(
            text,
            f"too long: a Unix socket's path holds at most {most} bytes, and this one has"
            f" {length}: choose a shorter one",
        )
    return Endpoint("unix", path=path)


def _parse_fd(text: str, number: str) -> Endpoint:
    if not (number.isascii() and number.isdigit()):
        raise _bad(text, "fd: takes a file descriptor number, such as fd:3")
    if len(number) > 10 or int(number) > _MAX_FD:
        raise _bad(text, f"file descriptor {number} is out of range")
    return Endpoint("fd", fd=int(number))


def _parse_tcp(text: str, spec: str, default_host: str) -> Endpoint:
    if spec.startswith("["):
        close = spec.find("]")
        if close == -1:
            raise _bad(text, "'[' without a closing ']'")
        host, rest = spec[1:close], spec[close + 1 :]
        if not rest.startswith(":"):
            raise _bad(text, "an IPv6 address in brackets must be followed by :PORT")
        port_text = rest[1:]
        _check_ipv6(text, host)
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:
            raise _bad(text, _colons_hint(spec, host, port_text))
        host = host or default_host
        if host:  # empty only when the caller asked to keep it so (see check_bind)
            try:
                check_host(host)
            except ValueError as exc:
                raise _bad(text, str(exc)) from None
    else:
        try:
            return Endpoint("tcp", host=default_host, port=_parse_port(text, spec))
        except ValueError:
            if spec.isdigit():
                raise
            # A bare word is read as a port or service; most likely a host was meant.
            raise _bad(
                text,
                f"{spec!r} is neither a port number nor a service name (for a host, "
                f"write {escape_for_log(spec)}:PORT)",
            ) from None
    return Endpoint("tcp", host=host, port=_parse_port(text, port_text))


def check_host(host: str) -> None:
    """ValueError unless ``host`` is an IP address or a host name (no port, no brackets).

    The one check of a host to listen on, for ``bind``'s endpoints and ``address``.
    """
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        return
    if not _HOSTNAME.fullmatch(host):
        hint = (
            " (for every interface write 0.0.0.0, or :: for IPv6)"
            if host.strip() in ("*", "")
            else ""
        )
        raise ValueError(f"{host!r} is not an IP address or host name{hint}")


def with_default_host(text: str, host: str) -> str:
    """Endpoint ``text`` with ``host`` where it names none (``:5000``); else as it is.

    ``text`` is one :func:`parse_endpoint` gave back with ``default_host=""``.
    """
    if text.startswith(":"):
        return format_endpoint_host_port(host, text[1:])
    return text


def _check_ipv6(text: str, host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise _bad(text, f"{host!r} in brackets is not an IPv6 address") from None


def _parse_port(text: str, port_text: str) -> int:
    if not port_text:
        raise _bad(text, "the port is missing")
    try:
        return port_from_text(port_text)
    except ValueError as exc:
        raise _bad(text, str(exc)) from None


def port_from_text(text: str) -> int:
    """A port number or a TCP service name, as text, to its number.

    One reading for ``bind``'s endpoints and the ``port`` setting (``--port``,
    ``WEFT_PORT``, ``port = "http"``), which had two that disagreed (``0000080``
    was port 80 in one, refused by the other). ValueError with the reason: a number
    past 65535, text that is neither, a service name the services database lacks.
    """
    shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}..."
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        port = int(digits) if len(digits) <= 5 else 65536  # no huge int() of text
        if port > 65535:
            raise ValueError(f"port {shown} is out of range (0-65535; 0 picks a free port)")
        return port
    if not _SERVICE.fullmatch(text):
        raise ValueError(f"{shown} is neither a port number nor a service name")
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ValueError(
            f"unknown service name {shown} (not in the services database); give a port number"
        ) from None
