"""The one table of settings: every Server keyword and config key, declared once.

Each :class:`Setting` names a key, its kind (the type, the bounds and the text
parser), its default and a one-line doc. ``Server(...)``, ``weft.toml``,
``[tool.weft]``, ``WEFT_*`` variables and ``weft serve`` flags all check their values
with :func:`validate`, so the same mistake gets the same message wherever it is made
(only the :class:`~weft_core.ConfigError`'s ``source`` differs), and a bad value is
refused when the Server is made, never in ``run()`` or later on a connection.

Python-only keywords (callbacks, a manager instance, an ``ssl.SSLContext``) are in
the table too, with no text parser. :class:`Settings` is what one Server resolved:
typed, checked, ready for the engine.

What does not live here: where config comes from and in what order
(``_config``), how a TLS context is built (``_tls``), how endpoints are parsed
(``_endpoints``).
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

from ._endpoints import (
    Endpoint,
    check_family,
    check_host,
    listen_endpoints,
    parse_endpoint,
    port_from_text,
)
from ._errors import ConfigError
from ._listeners import FAMILIES, Family
from ._proxy import DEFAULT_TRUSTED_PROXIES, ProxyPolicy
from ._shutdown_port import check_allow_no_secret
from ._tls import make_server_context

if TYPE_CHECKING:
    import ssl

    from ._server import Server
    from ._shutdown_port import ShutdownHandler

__all__ = [
    "SETTINGS",
    "TLS_PARTS",
    "Kind",
    "Setting",
    "Settings",
    "check_manager_options",
    "check_tls_parts",
    "tls_context",
    "tls_table",
    "unknown_tls_key",
    "validate",
]

OnFull = Literal["refuse", "backlog"]
ExceptionHandler = Callable[["Server", Any, BaseException], object]
Callback = Callable[["Server"], object]

# Integers end up in C ints (socket.listen's backlog, semaphore counts), so bound them
# there rather than let an OverflowError surface from deep inside the server.
_MAX_INT = 2**31 - 1
# Timeouts end up in lock and select waits, which reject anything above
# threading.TIMEOUT_MAX (about 292 years on Linux); a billion seconds is plenty.
_MAX_SECONDS = 1e9
# The longest value an error message quotes; a 10 MB string must not become a 10 MB line.
_SHOW_MAX = 120

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"none", "false", "off", "no", "unlimited"})
# Bounded digit counts: int() refuses strings over 4300 digits (CVE-2020-10735). Up
# to 4,000 are read as the number they are, so that one too big is refused as such,
# with the same message as from Python or TOML (31 digits were refused as text).
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,4000}")
_NUMBER_TEXT = re.compile(
    r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?"
)
_OCTAL_TEXT = re.compile(r"(0[oO]?)?([0-7]{1,4})")
_MANAGER_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class Invalid(Exception):
    """A value failed its check; a message, if any, replaces 'expected ..., got ...'."""


def show(value: Any) -> str:
    """``repr(value)`` for an error message, cut short, and safe for any object."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (sys.set_int_max_str_digits)
        text = f"an integer of {value.bit_length()} bits"
    except Exception:
        text = f"a {type(value).__name__} object"
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


# -- kinds: the type, the bounds and the text parser of a setting ----------------------


@dataclass(frozen=True)
class Kind:
    """What values a setting takes.

    ``check`` takes a Python value (from a keyword, TOML, or ``parse``) and returns it
    normalised, or raises :class:`Invalid`. ``parse`` turns text (an environment
    variable, a flag) into a value for ``check``, leaving text it cannot read as it
    is so that ``check`` reports it; None means the setting is not settable from text.
    """

    type: str
    expected: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] | None = None
    #: A path, taken relative to the config file that names it.
    path: bool = False
    #: Never quote a string value in an error (passwords, secrets).
    secret: bool = False


def _as_text(text: str) -> Any:
    return text


def _is_none(value: Any, none: str | None) -> bool:
    return none is not None and (value is None or value is False)


def _or_none(expected: str, none: str | None, zero_is_none: bool = False) -> str:
    if none is None:
        return expected
    return f"{expected}, or {'0 or ' if zero_is_none else ''}false for {none}"


def boolean() -> Kind:
    """True or False (text: 1/0, true/false, yes/no, on/off)."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid
        return value

    def parse(text: str) -> Any:
        low = text.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else text

    return Kind("bool", "true or false", check, parse)


def integer(
    lo: int,
    hi: int = _MAX_INT,
    *,
    none: str | None = None,
    expected: str = "",
    zero_is_none: bool = False,
) -> Kind:
    """An int in ``lo..hi`` (never a bool); with ``none``, also None/false meaning that.

    ``zero_is_none``: 0 means ``none`` too (gunicorn's spelling of "off").
    """
    if not expected:
        expected = "a positive integer" if lo == 1 and hi == _MAX_INT else f"an integer {lo}-{hi}"

    def check(value: Any) -> int | None:
        if _is_none(value, none) or (zero_is_none and _is_zero(value)):
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            if isinstance(value, int) and not isinstance(value, bool) and value > hi:
                # "a positive integer, got 2147483648" would leave the reader guessing.
                raise Invalid(
                    f"expected {expected}, got {show(value)}, more than the most it can be ({hi})"
                )
            raise Invalid
        return value

    def parse(text: str) -> Any:
        low = text.strip().lower()
        if none is not None and low in _NONE:
            return False
        return int(low) if _INT_TEXT.fullmatch(low) else text

    shown = _or_none(expected, none, zero_is_none)
    return Kind("int" if none is None else "int | None", shown, check, parse)


def _is_zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == 0


def seconds(*, positive: bool, none: str | None = None, zero_is_none: bool = False) -> Kind:
    """A finite number of seconds, > 0 or >= 0; with ``none``, also None/false.

    ``zero_is_none``: 0 means ``none`` too (gunicorn's spelling of "off").
    """
    expected = _or_none(
        "a number of seconds " + ("> 0" if positive else ">= 0"), none, zero_is_none
    )

    def check(value: Any) -> float | None:
        if _is_none(value, none) or (zero_is_none and _is_zero(value)):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid
        if value > _MAX_SECONDS:
            raise Invalid(
                # An int past a float's range has no :g (OverflowError): shown as it is.
                f"expected {expected}, got {show(value) if isinstance(value, int) else f'{value:g}'},"
                " more than the most it can be"
                f" ({_MAX_SECONDS:g} seconds, 31 years)"
            )
        if value < 0 or (positive and value == 0):
            raise Invalid
        return float(value)

    def parse(text: str) -> Any:
        low = text.strip().lower()
        if none is not None and low in _NONE:
            return False
        if _INT_TEXT.fullmatch(low):
            return int(low)
        return float(low) if _NUMBER_TEXT.fullmatch(low) else text

    return Kind("float" if none is None else "float | None", expected, check, parse)


def choice(*choices: str, upper: bool = False, expected: str = "") -> Kind:
    """One of ``choices``, in any case (normalised to lower case, or upper)."""
    quoted = [repr(c) for c in choices]
    expected = expected or f"{', '.join(quoted[:-1])} or {quoted[-1]}"

    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise Invalid
        return value.upper() if upper else value.lower()

    # From text (a variable, a flag) the spaces around go, as around a number.
    return Kind("str", expected, check, str.strip)


def string(expected: str = "a non-empty string", *, secret: bool = False) -> Kind:
    """A string with something in it, on one line; None for none."""

    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise Invalid
        if "\n" in value or "\r" in value:
            raise Invalid(f"expected {expected} on one line; remove the line break")
        return value

    return Kind("str | None", expected, check, _as_text, secret=secret)


def callback(signature: str, *, none: bool = True) -> Kind:
    """A Python callable (never from text)."""

    def check(value: Any) -> Any:
        if (none and value is None) or callable(value):
            return value
        raise Invalid

    return Kind(f"Callable{' | None' if none else ''}", f"a function {signature}", check)


def _check_handler(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid
    module, sep, attr = value.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() for p in parts):
        raise Invalid
    return value


def _check_port(value: Any) -> int:
    if isinstance(value, str):
        try:
            return port_from_text(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise Invalid
    return value


def _check_address(value: Any) -> str:
    """A host, or ``unix:PATH``: checked as a host in ``bind`` is, spaces around it dropped."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid
    text = value.strip()
    if text.startswith("unix:"):
        try:
            parse_endpoint(text)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return text
    host, colon, port = text.rpartition(":")
    if colon and port.isdigit() and (host.startswith("[") or (host and ":" not in host)):
        # HOST:PORT or [V6]:PORT, bind's spelling; a bare IPv6 address has several colons.
        raise Invalid(
            f"{text!r} has a port in it; give the host here and the port as port "
            f"(or write both as bind={text!r})"
        )
    if text.startswith("[") and text.endswith("]"):
        raise Invalid(f"{text!r}: write an IPv6 address here without brackets ({text[1:-1]})")
    try:
        check_host(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return text


def _check_args(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise Invalid
    return tuple(value)


def _text_list(text: str) -> Any:
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_bind(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise Invalid
    if not all(isinstance(i, str) for i in items):
        raise Invalid
    try:
        # A TCP endpoint's missing host stays missing (":5000"): whose default it
        # takes is decided where the setting is used (see _config.load).
        endpoints = [parse_endpoint(item, default_host="") for item in items]
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    twice = _listed_twice(endpoints)
    if twice is not None:
        raise Invalid(f"{twice!r} is listed twice: each place can be listened on once")
    return [str(endpoint) for endpoint in endpoints]


def names_a_unix_socket(bind: Any, address: Any) -> bool:
    """Whether ``bind`` (or, without one, ``address``) names a Unix socket weft makes.

    The one test of whether ``unix_mode`` is used, for a config's values and for a
    Server's settings alike: ``unix:PATH`` (a ``bind`` list holds each place in that
    form once checked).
    """
    endpoints = bind if isinstance(bind, list) else [address]
    return any(isinstance(text, str) and text.startswith("unix:") for text in endpoints)


def _listed_twice(endpoints: list[Endpoint]) -> str | None:
    """The first place ``endpoints`` name twice, or None.

    Port 0 twice is two free ports; anything else twice cannot both be bound.
    """
    seen: set[str] = set()
    for endpoint in endpoints:
        text = str(endpoint)
        if text in seen and not (endpoint.kind == "tcp" and endpoint.port == 0):
            return text
        seen.add(text)
    return None


def _check_manager(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if _MANAGER_NAME.fullmatch(name):
            return name
        raise Invalid
    if hasattr(value, "add_task"):  # an instance; the Server checks the rest of its protocol
        return value
    raise Invalid


def _check_networks(value: Any) -> list[str]:
    # "unix" trusts the clients of Unix listeners (weft_core._proxy.UNIX_PROXIES).
    if not isinstance(value, list | tuple) or not all(isinstance(i, str) for i in value):
        raise Invalid
    try:
        return [
            "unix" if i.strip() == "unix" else str(ipaddress.ip_network(i.strip(), strict=False))
            for i in value
        ]
    except ValueError as exc:
        raise Invalid(
            f"expected a list of networks such as '10.0.0.0/8', or 'unix' for Unix listeners; {exc}"
        ) from None


_UNIX_MODE = (
    "a file mode as an integer from 0 to 0o777, such as 0o660 (in WEFT_UNIX_MODE"
    " or --unix-mode: octal text such as 0660)"
)


def _check_unix_mode(value: Any) -> int | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 7777:
            digits = str(value)
            if set(digits) <= set("01234567") and int(digits, 8) <= 0o777:
                raise Invalid(
                    f"expected {_UNIX_MODE}, got {value} (which is {oct(value)});"
                    f" did you mean 0o{digits}?"
                )
        raise Invalid
    return value


def _text_unix_mode(text: str) -> Any:
    low = text.strip().lower()
    if low in _NONE:
        return False
    match = _OCTAL_TEXT.fullmatch(low)
    return int(match.group(2), 8) if match else text


def _check_file(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise Invalid
    path = os.path.expanduser(value)
    try:
        found = os.path.isfile(path)
    except (OSError, ValueError):
        found = False
    if not found:
        if os.path.isdir(path):
            what = "a directory, not a file"
        elif os.path.exists(path):  # a FIFO, a device: it would block, or never end
            what = "not a regular file (a pipe or a device?)"
        else:
            what = "no such file"
        raise Invalid(f"{what}: {path!r}")
    return path


def _check_table(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise Invalid
    return dict(value)


def _check_tls(value: Any) -> Any:
    if value is None or value is False:
        return None
    if isinstance(value, Mapping):
        return value  # its parts are checked by tls_table, naming each part's key
    ssl = sys.modules.get("ssl")  # an SSLContext exists only once ssl was imported
    if ssl is not None and isinstance(value, ssl.SSLContext):
        return value
    raise Invalid


def _check_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise Invalid
    return os.path.expanduser(value)


#: What ``control_socket`` holds when config turns the control socket off.
CONTROL_SOCKET_OFF = "off"


#: The words that turn the control socket off, whatever route they come by: those
#: that mean "none" for every other setting that has one (``false`` among them,
#: TOML's own off, which as text made a socket file named ``false``), but "unlimited".
_CONTROL_SOCKET_OFF_WORDS = _NONE - {"unlimited"}


def _control_socket_off(value: Any) -> bool:
    return value is False or (
        isinstance(value, str) and value.strip().lower() in _CONTROL_SOCKET_OFF_WORDS
    )


def _check_control_socket(value: Any) -> str | None:
    if _control_socket_off(value):
        return CONTROL_SOCKET_OFF
    return _check_path(value)


def _check_uid(uid: int) -> None:
    """A user id must have a passwd entry: the switch takes its group and groups from it."""
    try:
        import pwd

        pwd.getpwuid(uid)
    except ImportError:
        raise Invalid("switching user needs a POSIX system") from None
    except KeyError:
        raise Invalid(
            f"no user with id {uid} on this system: weft takes the group and the"
            " supplementary groups to switch to from the user's passwd entry; add one,"
            " or name an existing user"
        ) from None


def _check_account(value: Any, database: str) -> str | None:
    """A user or group name that exists here, or a number; checked before anything binds."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT:
        if database == "user":
            _check_uid(value)
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise Invalid
    name = value.strip()
    if name.isascii() and name.isdigit():
        if len(name) > 10 or int(name) > _MAX_INT:
            raise Invalid
        if database == "user":
            _check_uid(int(name))
        return name
    try:
        if database == "user":
            import pwd

            pwd.getpwnam(name)
        else:
            import grp

            grp.getgrnam(name)
    except ImportError:
        raise Invalid(f"switching {database} needs a POSIX system") from None
    except (KeyError, UnicodeEncodeError, ValueError):  # a lone surrogate, a NUL: no name
        raise Invalid(f"no {database} named {show(name)} on this system") from None
    return name


def _check_user(value: Any) -> str | None:
    return _check_account(value, "user")


def _check_group(value: Any) -> str | None:
    return _check_account(value, "group")


_SECONDS_NONE = "none"
_FILE = Kind("str", "a file path", _check_file, _as_text, path=True)

# -- the table ---------------------------------------------------------------------------

#: Where a setting can be given.
Scope = Literal["both", "server", "config"]


@dataclass(frozen=True)
class Setting:
    """One setting: its name, kind (type, bounds, text parser), default and doc.

    ``scope`` says where it can be given: ``"both"`` (a Server keyword and a config
    key), ``"server"`` (a Server keyword only, such as a callback) or ``"config"``
    (read by ``weft serve`` only, or a part of a config table such as ``tls.certfile``).
    """

    name: str
    kind: Kind
    default: Any
    doc: str
    scope: Scope = "both"

    @property
    def server(self) -> bool:
        """True if ``Server`` takes it as a keyword argument."""
        return self.scope in ("both", "server")

    @property
    def config(self) -> bool:
        """True if config files can set it."""
        return self.scope in ("both", "config")

    @property
    def from_text(self) -> bool:
        """True if ``WEFT_*`` variables and flags can set it (it has a text parser)."""
        return self.kind.parse is not None

    @property
    def type(self) -> str:
        """The Python type of the checked value, for docs."""
        return self.kind.type

    @property
    def expected(self) -> str:
        """What a valid value is, as error messages say it."""
        return self.kind.expected


_ROWS = [
    # Where to listen.
    Setting("address", Kind("str", "a host name or IP address", _check_address, _as_text),
            "127.0.0.1", "host name or IP to listen on; 'unix:/path' for a Unix socket"),
    Setting("port", Kind("int", "a port number (0-65535) or a service name", _check_port,
                         str.strip),
            0, "port number or service name (resolved when the Server is made); 0 = any free"),
    Setting("bind", Kind("list[str] | None", "an endpoint string or a list of them",
                         _check_bind, _text_list),
            None, "endpoint strings to listen on, instead of address and port"),
    Setting("unix_mode", Kind("int | None", _UNIX_MODE, _check_unix_mode, _text_unix_mode),
            None, "permissions of a Unix socket file (text is octal: 0660, 660 or 0o660)"),
    Setting("family", choice(*FAMILIES), "auto",
            "'auto', 'ipv4', 'ipv6' (v6 only) or 'dual' (a v6 socket accepting v4)"),
    Setting("backlog", integer(1), 1024, "listen queue length (the kernel caps it)"),
    Setting("nodelay", boolean(), True, "TCP_NODELAY on each connection"),
    Setting("keepalive", boolean(), False, "SO_KEEPALIVE on each connection"),
    Setting("reuse_port", boolean(), False, "SO_REUSEPORT on the listening socket"),
    # Handler and manager.
    Setting("handler", Kind("str", "a handler as 'module:attribute', e.g."
                            " 'examples.echo:handle'", _check_handler, _as_text),
            None, "the handler weft serve imports (Server takes the function itself)",
            "config"),
    Setting("args", Kind("tuple", "a list of handler arguments", _check_args, _text_list),
            (), "extra positional arguments for the handler"),
    Setting("manager", Kind("str | TaskManager | None", "a task manager name such as"
                            " 'threads'", _check_manager, _as_text),
            None, "a manager name, or (from Python) a TaskManager instance; default threads"),
    Setting("manager_options", Kind("dict | None", "a table of manager options",
                                    _check_table),
            None, "keyword options for a manager given by name"),
    Setting("manager_options.limit", integer(1, none="no limit"), None,
            "the manager's own task limit", "config"),
    Setting("stream", boolean(), False, "hand the handler conn.makefile('rwb')"),
    # Limits and timeouts.
    Setting("max_connections", integer(1, none="no limit"), 1024,
            "connections served at once"),
    Setting("full_wait", seconds(positive=False), 0.0,
            "seconds to wait for a free slot before refusing"),
    Setting("on_full", choice("refuse", "backlog"), "refuse",
            "at the limit: refuse new clients, or leave them in the backlog"),
    Setting("idle_timeout", seconds(positive=True, none=_SECONDS_NONE), None,
            "a read or write on a connection that waits this long raises TimeoutError"),
    # TLS.
    Setting("tls", Kind("SSLContext | dict | None", "an ssl.SSLContext or a table with"
                        " certfile and keyfile", _check_tls),
            None, "TLS: an ssl.SSLContext (Python only) or the [tls] table"),
    Setting("tls.certfile", _FILE, None, "certificate chain (PEM)", "config"),
    Setting("tls.keyfile", _FILE, None, "private key (PEM), unless in certfile", "config"),
    Setting("tls.cafile", _FILE, None, "CA that signs client certificates", "config"),
    Setting("tls.require_client_cert", boolean(), False,
            "refuse clients without a certificate (needs cafile)", "config"),
    Setting("tls.password", string(secret=True), None, "the private key's password", "config"),
    Setting("tls.password_file", _FILE, None,
            "a file whose first line is the private key's password", "config"),
    Setting("tls_handshake_timeout", seconds(positive=True), 10.0,
            "seconds a client gets to finish the TLS handshake"),
    # PROXY protocol.
    Setting("proxy_protocol", boolean(), False, "expect a PROXY header (v1 or v2)"),
    Setting("trusted_proxies", Kind("list[str]", "a list of networks such as"
                                    " ['127.0.0.0/8', '10.0.0.0/8'], or 'unix'", _check_networks,
                                    _text_list),
            DEFAULT_TRUSTED_PROXIES, "networks a PROXY header is accepted from"),
    Setting("proxy_header_timeout", seconds(positive=True), 5.0,
            "seconds a proxy gets to send its header"),
    # Shutdown port (Sagittarius).
    Setting("shutdown_port", integer(0, 65535, none="none", expected="a port number"
                                     " (0-65535; 0 picks a free port)"),
            None, "a loopback port whose connection stops the server"),
    Setting("shutdown_secret", string(secret=True), None,
            "what a client must send on the shutdown port"),
    Setting("shutdown_allow_no_secret", boolean(), False,
            "allow a shutdown port without a secret, which any local process may use"),
    # Python only.
    Setting("exception_handler", callback("f(server, conn, exc)"), None,
            "called with errors the handler raises; default: log them", "server"),
    Setting("on_start", callback("f(server)"), None, "called once listening", "server"),
    Setting("on_stop", callback("f(server)"), None, "called once stopped", "server"),
    Setting("shutdown_handler", callback("f(server, conn) -> bool"), None,
            "decides whether a shutdown-port connection stops the server", "server"),
    # Connection metrics (issue 16): the access log.
    Setting("access_log", boolean(), False,
            "log one line per connection on logger weft.access (peer, duration, bytes, how)"),
    # weft serve only.
    Setting("graceful_timeout", seconds(positive=False), 30.0,
            "on SIGTERM/SIGINT, seconds connections get to finish", "config"),
    Setting("workers", integer(1), 1, "worker processes", "config"),
    Setting("log_level", choice("debug", "info", "warning", "error", "critical", upper=True,
                              expected="one of debug, info, warning, error, critical"),
            "INFO", "logging level", "config"),
    # weft serve's conventions for services (issue 19): logging, pid file, privileges, reload.
    Setting("log_config", _FILE, None,
            "logging config file: TOML or JSON (dictConfig) or INI (fileConfig)", "config"),
    Setting("log_format", choice("text", "json"), "text",
            "log lines as text, or one JSON object a line", "config"),
    Setting("pid", Kind("str | None", "a file path", _check_path, _as_text, path=True), None,
            "write the process id here once listening; removed at exit", "config"),
    Setting("user", Kind("str | None", "a user name or number", _check_user, _as_text), None,
            "switch to this user after binding (needs root)", "config"),
    Setting("group", Kind("str | None", "a group name or number", _check_group, _as_text),
            None, "switch to this group after binding (default: the user's)", "config"),
    Setting("reload", boolean(), False,
            "restart when a file under the handler's directory changes (development only)",
            "config"),
    # Zero-downtime operations (issue 18): the watchdog and worker recycling.
    Setting("timeout", seconds(positive=True, none="off", zero_is_none=True), None,
            "replace a worker whose runtime loop is silent this long (seconds)", "config"),
    Setting("max_requests", integer(1, none="off", zero_is_none=True), None,
            "replace a worker after it accepted this many connections", "config"),
    Setting("max_requests_jitter", integer(0), 0,
            "add 0 to N, at random per worker, to max_requests", "config"),
    # Live control (issue 16): weft ctl's socket and the console.
    Setting("control_socket",
            Kind("str | None", "a socket path, or off", _check_control_socket, _as_text,
                 path=True), None,
            "the Unix socket weft ctl talks to (default: $XDG_RUNTIME_DIR/weft/ctl.sock,"
            " /run/weft/ctl.sock as root; off: none)", "config"),
    Setting("console", boolean(), False,
            "allow `weft ctl console`, a Python REPL in the server (owner only)", "config"),
]  # fmt: skip

#: Every setting by name; parts of a table are named ``table.part``.
SETTINGS: Mapping[str, Setting] = MappingProxyType({s.name: s for s in _ROWS})
#: The parts of the ``[tls]`` table, and of ``Server(tls={...})``.
TLS_PARTS = tuple(name[4:] for name in SETTINGS if name.startswith("tls."))


def validate(
    name: str,
    value: Any,
    *,
    source: str | None = None,
    text: bool = False,
    base: Path | None = None,
) -> Any:
    """``value`` for setting ``name``, checked and normalised; ConfigError if it is wrong.

    ``text``: a string is first read by the setting's text parser (environment, flags).
    ``base``: where a relative path is taken from (the config file's directory).
    The message is the same whatever ``source`` says, for the same value.
    """
    kind = SETTINGS[name].kind
    if text and isinstance(value, str) and kind.parse is not None:
        value = kind.parse(value)
    if (
        kind.path
        and base is not None
        and isinstance(value, str)
        and value.strip()  # a blank path is refused as it is, not joined into a name
        and "\0" not in value
        and not (name == "control_socket" and _control_socket_off(value))
    ):
        value = str(base / os.path.expanduser(value))
    try:
        return kind.check(value)
    except Invalid as exc:
        if str(exc):
            message = str(exc)
        elif kind.secret and isinstance(value, str | bytes):
            message = f"expected {kind.expected}, got an empty or unusable {type(value).__name__}"
        else:
            message = f"expected {kind.expected}, got {show(value)}"
        raise ConfigError(message, source=source, key=name) from None


def suggest(word: str, choices: list[str]) -> str:
    """'did you mean X?' for the closest of ``choices``, else the list of them."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(choices)


def unknown_tls_key(part: str, source: str | None = None) -> ConfigError:
    """The error for a ``[tls]`` (or ``tls={...}``) key that does not exist."""
    return ConfigError(
        f"unknown TLS key; {suggest(str(part), sorted(TLS_PARTS))}",
        source=source,
        key=f"tls.{part}",
    )


def check_tls_parts(parts: Mapping[str, Any], source: Callable[[str], str | None]) -> None:
    """The rules between ``[tls]`` parts; ``source(part)`` names where a part was set."""
    if "certfile" not in parts:
        raise ConfigError(
            "TLS needs certfile (and keyfile, unless the key is in the certfile)",
            source=source(next(iter(parts), "certfile")),
            key="tls.certfile",
        )
    if parts.get("require_client_cert") and "cafile" not in parts:
        raise ConfigError(
            "require_client_cert needs cafile, the CA that signs client certificates",
            source=source("require_client_cert"),
            key="tls.cafile",
        )
    if "password" in parts and "password_file" in parts:
        raise ConfigError(
            "give either password or password_file, not both",
            source=source("password"),
            key="tls.password",
        )


def tls_context(tls: Any) -> Any:
    """``tls`` as the Server takes it: a ``[tls]`` table made into its context.

    The table's files are read now; anything else (a context, None) is kept as it is.
    """
    return make_server_context(tls_table(tls)) if isinstance(tls, Mapping) else tls


def tls_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """``Server(tls={...})``'s table checked part by part, with password_file read.

    Returns the table ``make_server_context`` takes: certfile, keyfile, cafile,
    require_client_cert and password.
    """
    parts: dict[str, Any] = {}
    for part, value in table.items():
        if part not in TLS_PARTS:
            raise unknown_tls_key(part)
        parts[part] = validate(f"tls.{part}", value)
    check_tls_parts(parts, lambda part: None)
    password_file = parts.pop("password_file", None)
    if password_file is not None:
        parts["password"] = read_password(password_file)
    return parts


def read_password(path: str) -> str:
    """The first line of ``path``: a private key's password kept out of config files."""
    try:
        with open(path, encoding="utf-8") as file:
            line = file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the password: {exc}", key="tls.password_file") from None
    if not line:
        raise ConfigError(
            f"the first line of {path!r} is empty; it should hold the key's password",
            key="tls.password_file",
        )
    return line


def check_manager_options(options: Any, source: str | None = None) -> dict[str, Any]:
    """A manager's options: a table of identifiers, with the table's own options checked."""
    checked = validate("manager_options", options, source=source) or {}
    for name, value in checked.items():
        key = f"manager_options.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(
                f"a manager option name must be a Python identifier, got {show(name)}",
                source=source,
                key=key,
            )
        if key in SETTINGS:
            checked[name] = validate(key, value, source=source)
    return checked


# -- what one Server resolved -------------------------------------------------------------


@dataclass
class Settings:
    """The checked, typed settings one Server runs with (see the table for each)."""

    handler: Callable[..., Any]
    args: tuple[Any, ...]
    address: str
    port: int
    bind: list[str] | None
    max_connections: int | None
    full_wait: float
    on_full: OnFull
    backlog: int
    nodelay: bool
    keepalive: bool
    reuse_port: bool
    family: Family
    idle_timeout: float | None
    stream: bool
    exception_handler: ExceptionHandler | None
    on_start: Callback | None
    on_stop: Callback | None
    unix_mode: int | None
    tls: ssl.SSLContext | None
    tls_handshake_timeout: float
    proxy: ProxyPolicy | None
    shutdown_port: int | None
    shutdown_secret: str | None
    shutdown_handler: ShutdownHandler | None
    shutdown_allow_no_secret: bool
    access_log: bool

    @classmethod
    def from_keywords(cls, handler: Any, **keywords: Any) -> Settings:
        """Check ``Server(handler, **keywords)``'s settings; ConfigError for the first bad one.

        Keywords left out take the table's defaults. ``manager`` and
        ``manager_options`` are not part of it: the Server resolves the manager.
        """
        if not callable(handler):
            hint = (
                "; a 'module:attribute' string is for weft serve and weft.toml"
                if isinstance(handler, str)
                else ""
            )
            raise ConfigError(
                f"expected a function handler(conn, *args), got {show(handler)}{hint}",
                key="handler",
            )
        values = {
            name: validate(name, keywords.pop(name, SETTINGS[name].default))
            for name in _SERVER_KEYS
        }
        if keywords:
            raise TypeError(f"unexpected settings: {', '.join(sorted(keywords))}")
        args = values["args"]
        form = f"handler(conn, *args) with args={show(args)}" if args else "handler(conn)"
        _check_call("handler", handler, 1 + len(args), form)
        for key, count, form in _CALLBACKS:
            if values[key] is not None:
                _check_call(key, values[key], count, form)
        if values["shutdown_port"] is None:
            for key in ("shutdown_secret", "shutdown_handler"):
                if values[key] is not None:
                    raise ConfigError(
                        "only applies with shutdown_port; set shutdown_port (0 picks a free port)",
                        key=key,
                    )
        check_allow_no_secret(
            values["shutdown_port"],
            values["shutdown_secret"],
            values["shutdown_handler"],
            values["shutdown_allow_no_secret"],
        )
        if values["bind"] and any(
            values[key] != SETTINGS[key].default for key in ("address", "port")
        ):
            # As weft serve and weft.toml refuse both: the port was dropped unsaid.
            raise ConfigError(
                "give either bind or address and port, not both: bind lists every place"
                " to listen, each with its port",
                key="bind",
            )
        endpoints = listen_endpoints(values["bind"], values["address"], values["port"])
        # Again with the default host in: ":5000" and "127.0.0.1:5000" are one place.
        twice = _listed_twice(endpoints)
        if twice is not None:
            raise ConfigError(
                f"{twice!r} is listed twice: each place can be listened on once", key="bind"
            )
        if values["family"] != "auto":  # found when binding otherwise, after a clean check
            check_family(values["family"], [e.host for e in endpoints if e.kind == "tcp"])
        tls = tls_context(values.pop("tls"))
        enabled = values.pop("proxy_protocol")
        trusted = values.pop("trusted_proxies")
        header_timeout = values.pop("proxy_header_timeout")
        if enabled and not trusted:
            raise ConfigError(
                "is empty, and with proxy_protocol every client would be refused (only a"
                " trusted proxy's header is taken); list the balancer's networks, such as"
                " 10.0.0.0/8, or 'unix' for the clients of Unix listeners",
                key="trusted_proxies",
            )
        proxy = ProxyPolicy.from_settings(trusted, header_timeout) if enabled else None
        return cls(
            handler=handler,
            tls=tls,
            proxy=proxy,
            on_full=cast(OnFull, values.pop("on_full")),
            family=cast(Family, values.pop("family")),
            **values,
        )


#: The callbacks whose calls ``from_keywords`` checks: key, positional count, call.
_CALLBACKS = (
    ("exception_handler", 3, "exception_handler(server, conn, exc)"),
    ("on_start", 1, "on_start(server)"),
    ("on_stop", 1, "on_stop(server)"),
    ("shutdown_handler", 2, "shutdown_handler(server, conn)"),
)


def _check_call(key: str, fn: Callable[..., Any], count: int, form: str) -> None:
    """ConfigError now if ``fn`` cannot take ``count`` positional arguments.

    Without it, a handler written for other ``args`` fails only once a client
    connects, as a logged TypeError per connection. A callable whose signature
    Python cannot read (some built-ins) is taken on trust.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(count))
    except TypeError as exc:
        name = getattr(fn, "__qualname__", None) or show(fn)
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        raise ConfigError(
            f"{name}{bare} cannot be called as {form} ({count} positional"
            f" argument{'s' if count != 1 else ''}): {exc}",
            key="args" if key == "handler" and count > 1 else key,
        ) from None


#: What ``Settings.from_keywords`` takes: every Server keyword but the manager's.
_SERVER_KEYS = tuple(
    s.name for s in _ROWS if s.server and s.name not in ("manager", "manager_options")
)
