"""The one settings table: Server(...), weft.toml, WEFT_* and flags agree on every value.

A value is refused when the Server is made, with the same message (apart from the
ConfigError's source) as config gives for the same mistake; unix_mode and a TLS key
password reach a real socket and a real handshake.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from weft_core import ConfigError, Server, create_manager
from weft_core._config import KEYS, load_config
from weft_core._endpoints import Endpoint, parse_endpoint
from weft_core._listeners import open_listeners
from weft_core._settings import SETTINGS, Settings, validate
from weft_core._tasks import TaskTable

sys.path.insert(0, str(Path(__file__).parent))
from _serving import LISTENING, Served, environment, host_port, weft_serve

trustme = pytest.importorskip("trustme")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")


def handle(conn: Any, *args: Any) -> None:
    """Takes any ``args``: what is compared is the values, not this handler's arity."""
    conn.sendall(b"hi\n")


def verdict(make: Any) -> tuple[str, str | None, Any]:
    """('ok', None, None), or ('error', key, message without the source)."""
    try:
        make()
    except ConfigError as exc:
        return "error", exc.key, exc.message
    return "ok", None, None


# -- the table ------------------------------------------------------------------------------


def test_every_server_keyword_is_in_the_table_with_its_default() -> None:
    """Server's signature and the table declare the same keywords and defaults."""
    parameters = inspect.signature(Server).parameters
    keywords = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords == {name for name, s in SETTINGS.items() if s.server}
    for name in keywords:
        default = parameters[name].default
        assert SETTINGS[name].default == default, name


def test_python_only_settings_have_no_text_parser() -> None:
    """Callbacks are Server keywords only; every config key but the tables reads text."""
    python_only = {n for n, s in SETTINGS.items() if not s.from_text}
    assert python_only == {
        "exception_handler", "on_start", "on_stop", "shutdown_handler", "tls",
        "manager_options",
    }  # fmt: skip
    assert all(SETTINGS[n].from_text for n in KEYS)
    assert all(s.doc and s.expected for s in SETTINGS.values())


def test_settings_keeps_the_field_names_the_engine_uses() -> None:
    fields = set(inspect.signature(Settings).parameters)
    assert fields >= {
        "handler", "args", "address", "port", "bind", "max_connections", "full_wait",
        "on_full", "backlog", "nodelay", "keepalive", "reuse_port", "family",
        "idle_timeout", "stream", "exception_handler", "on_start", "on_stop", "unix_mode",
        "tls", "tls_handshake_timeout", "proxy", "shutdown_port", "shutdown_secret",
        "shutdown_handler",
    }  # fmt: skip


# -- (a) Server and config give the same verdict and message ---------------------------------

#: Keys settable both from Python and from text whose check needs nothing else.
#: manager is left out (config checks a name's form; only the Server knows which
#: managers are installed), and so are the tables (tls, manager_options).
BOTH_WAYS = sorted(
    name
    for name, s in SETTINGS.items()
    if s.server and s.config and s.from_text and name not in ("manager",)
)
#: What a key needs beside it for the Server to look at it at all.
COMPANIONS: dict[str, dict[str, Any]] = {
    "shutdown_secret": {"shutdown_port": 0},
    "shutdown_port": {"shutdown_allow_no_secret": True},
    "family": {"address": "::"},  # 'dual' needs an IPv6 host: the Server says so when made
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if c < " " or c in '"\\\x7f' else c
                             for c in value) + '"'  # fmt: skip
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def as_text(value: Any) -> str:
    """How someone would write ``value`` in an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(as_text(v) for v in value)
    return value if isinstance(value, str) else repr(value)


_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 80, 0o660, 660, 511, 512, 65535, 65536, 2**31 - 1, 2**31]),
    st.floats(),
    st.sampled_from([0.0, -0.0, -1.5, 0.5, 1e9, 1e10]),
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=10),
    st.sampled_from(
        ["", " ", "0", "5", "-1", "1.5", "nan", "inf", "none", "false", "true", "abc", "http",
         "nosuchservice", "0660", "660", "0o660", "0o1777", "refuse", "BACKLOG", "dual", "ipv5",
         "127.0.0.1:0", "[::1]:0", "unix:/tmp/s", "::1:80", "10.0.0.0/8", "10.0.0.0/33",
         "s3cret", "a\nb"]
    ),
)  # fmt: skip
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3))


def server_verdict(key: str, value: Any) -> tuple[str, str | None, Any]:
    return verdict(lambda: Server(handle, **{key: value}, **COMPANIONS.get(key, {})))


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(BOTH_WAYS), _values)
@example("idle_timeout", 0)
@example("idle_timeout", False)
@example("proxy_header_timeout", 0)
@example("tls_handshake_timeout", -1)
@example("full_wait", 0)
@example("backlog", True)
@example("max_connections", True)
@example("port", "abc")
@example("port", "nosuchservice")
@example("port", "http")
@example("unix_mode", "0660")
@example("unix_mode", 0o660)
@example("full_wait", math.nan)
@example("backlog", 2**63 - 1)
def test_server_and_weft_toml_agree(key: str, value: Any) -> None:
    """Server(key=value) and ``key = value`` in weft.toml: same verdict, same message."""
    companions = "".join(f"{k} = {toml_value(v)}\n" for k, v in COMPANIONS.get(key, {}).items())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weft.toml"
        written = toml_value(value)
        if key == "unix_mode" and type(value) is int and value > 0:
            written = f"0o{value:o}"  # a mode in decimal is refused in weft.toml alone
        path.write_text(f"{key} = {written}\n{companions}", encoding="utf-8")
        from_file = verdict(lambda: load_config(environ={}, cwd=tmp))
    assert from_file == server_verdict(key, value)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(BOTH_WAYS), _values)
@example("idle_timeout", "0")
@example("idle_timeout", "none")
@example("backlog", "true")
@example("max_connections", "lots")
@example("unix_mode", "0660")
@example("unix_mode", "0o1777")
@example("full_wait", "nan")
@example("port", "nosuchservice")
def test_server_and_weft_env_and_flags_agree(key: str, value: Any) -> None:
    """WEFT_KEY=text and --key text are read by the table's parser, then judged as Server judges.

    When the text reads back as the value it was written from, the message is
    Server(key=value)'s too.
    """
    text = as_text(value)
    if not text.strip():
        return  # an empty variable is unset
    parsed = SETTINGS[key].kind.parse(text)  # type: ignore[misc]
    expected = server_verdict(key, parsed)
    env = {f"WEFT_{key.upper()}": text}
    env.update({f"WEFT_{k.upper()}": as_text(v) for k, v in COMPANIONS.get(key, {}).items()})
    assert verdict(lambda: load_config(environ=env, cwd=tempfile.gettempdir())) == expected
    flags = {key: text, **COMPANIONS.get(key, {})}
    assert verdict(lambda: load_config(flags, environ={}, cwd=tempfile.gettempdir())) == expected
    if type(parsed) is type(value) and parsed == value:
        assert expected == server_verdict(key, value)


# -- (b) the mistakes that used to get through ------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "key", "says"),
    [
        ({"idle_timeout": 0}, "idle_timeout", "expected a number of seconds > 0, or false for"
                                              " none, got 0"),
        ({"idle_timeout": -5}, "idle_timeout", "got -5"),
        ({"proxy_header_timeout": 0}, "proxy_header_timeout", "seconds > 0, got 0"),
        ({"tls_handshake_timeout": 0}, "tls_handshake_timeout", "seconds > 0, got 0"),
        ({"full_wait": -0.5}, "full_wait", "seconds >= 0, got -0.5"),
        ({"backlog": True}, "backlog", "expected a positive integer, got True"),
        ({"max_connections": 10**5000}, "max_connections", "an integer of 16610 bits"),
        ({"port": "abc"}, "port", "unknown service name 'abc' (not in the services database)"),
        ({"port": "nosuchservice"}, "port", "unknown service name 'nosuchservice'"),
        ({"port": True}, "port", "a port number (0-65535) or a service name, got True"),
        ({"port": 70000}, "port", "got 70000"),
        ({"unix_mode": "0660"}, "unix_mode", "such as 0o660"),
        ({"unix_mode": 660}, "unix_mode", "did you mean 0o660?"),
        ({"unix_mode": True}, "unix_mode", "got True"),
        ({"address": ""}, "address", "a host name or IP address, got ''"),
        ({"args": "x"}, "args", "a list of handler arguments, got 'x'"),
        ({"bind": "nope:nope:1"}, "bind", "more than one ':' and not an IPv6 address"),
        ({"bind": "::1:80"}, "bind", "put an IPv6 address in brackets"),
        ({"family": "ipv6", "address": "127.0.0.1"}, "family", "'127.0.0.1' is an IPv4 address"),
        ({"bind": "127.0.0.1:1", "port": 2}, "bind", "give either bind or address and port"),
        ({"bind": "127.0.0.1:1", "address": "::1"}, "bind", "give either bind or address"),
        ({"bind": [":5000", "127.0.0.1:5000"]}, "bind", "'127.0.0.1:5000' is listed twice"),
        ({"family": "ipv4", "bind": "[::1]:0"}, "family", "'::1' is an IPv6 address"),
        ({"family": "ipv6", "address": "0.0.0.0"}, "family", "'0.0.0.0' is an IPv4 address"),
        ({"on_full": "drop"}, "on_full", "'refuse' or 'backlog', got 'drop'"),
        ({"shutdown_secret": "x"}, "shutdown_secret", "only applies with shutdown_port"),
        ({"shutdown_port": 0, "shutdown_secret": "a\nb"}, "shutdown_secret", "one line"),
        ({"on_start": 3}, "on_start", "expected a function f(server), got 3"),
        ({"tls": "cert.pem"}, "tls", "a table with certfile and keyfile, got 'cert.pem'"),
        ({"tls": {"certfle": "x"}}, "tls.certfle", "did you mean 'certfile'?"),
        ({"tls": {"keyfile": "x"}}, "tls.keyfile", "no such file: 'x'"),
        ({"manager_options": {"limit": True}}, "manager_options.limit", "got True"),
        ({"manager_options": 3}, "manager_options", "a table of manager options, got 3"),
        ({"manager": 3}, "manager", "a task manager name such as 'threads'"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_when_the_server_is_made(
    keywords: dict[str, Any], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Server(handle, **keywords)
    assert info.value.key == key
    assert says in info.value.message
    assert str(info.value).endswith(f"key {key!r}: {info.value.message}")


def test_a_secret_is_never_quoted() -> None:
    with pytest.raises(ConfigError) as info:
        Server(handle, shutdown_port=0, shutdown_secret=" ")
    assert "' '" not in str(info.value)
    assert "a non-empty string" in str(info.value)


def test_none_and_false_mean_no_idle_timeout_and_no_limit() -> None:
    for none in (None, False):
        server = Server(handle, idle_timeout=none, max_connections=none, unix_mode=none)
        assert server._cfg.idle_timeout is None
        assert server._cfg.max_connections is None
        assert server._cfg.unix_mode is None


def test_a_service_name_is_resolved_when_the_server_is_made() -> None:
    server = Server(handle, port="http")
    assert server.port == socket.getservbyname("http", "tcp")
    with pytest.raises(ConfigError) as info:
        server.port = "nosuchservice"
    assert info.value.key == "port"
    with pytest.raises(ConfigError) as info:
        server.address = ""
    assert info.value.key == "address"


@pytest.mark.parametrize(
    "text", ["0000080", "080", "99999", "1" + "0" * 30, "no such", "nosuchservice", "http"]
)
def test_port_text_reads_the_same_in_bind_and_in_the_port_setting(text: str) -> None:
    """One reading of a port as text: ``--port 0000080`` was refused where ``--bind
    127.0.0.1:0000080`` was port 80 (an outside check's L2). Each text gives the same
    port, or the same reason, from both."""
    try:
        bound = parse_endpoint(f"127.0.0.1:{text}")
    except ValueError as exc:
        why = str(exc).split(": ", 1)[1].rsplit("; expected ", 1)[0]
        with pytest.raises(ConfigError) as info:
            validate("port", text)
        assert why in str(info.value), (why, str(info.value))
    else:
        assert validate("port", text) == bound.port


def test_create_manager_refuses_a_bool_limit() -> None:
    with pytest.raises(ConfigError) as info:
        create_manager("threads", limit=True)
    assert info.value.key == "manager_options.limit"
    assert str(info.value) == (
        "task manager 'threads', key 'manager_options.limit': "
        "expected a positive integer, or false for no limit, got True"
    )
    assert create_manager("threads", limit=False).limit is None
    assert create_manager("threads", limit=2).limit == 2


def test_task_table_refuses_a_bool_limit() -> None:
    with pytest.raises(ValueError, match="positive integer or None, not True"):
        TaskTable(True, "mine")


def test_manager_limit_in_config_is_checked_by_the_table(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_text("[manager_options]\nlimit = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, cwd=tmp_path)
    assert info.value.key == "manager_options.limit"
    assert info.value.source == str(tmp_path / "weft.toml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as env:
        load_config(environ={"WEFT_MANAGER_OPTIONS_LIMIT": "0"}, cwd=tmp_path / "empty")
    assert env.value.message == info.value.message.replace("True", "0")


def test_tls_table_is_checked_the_same_from_server_and_config(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("")
    cases: list[dict[str, Any]] = [
        {"certfle": "cert.pem"},
        {"keyfile": "cert.pem"},
        {"certfile": "cert.pem", "require_client_cert": True},
        {"certfile": "cert.pem", "require_client_cert": "yes"},
        {"certfile": "cert.pem", "password": ""},
        {"certfile": "cert.pem", "password": "a", "password_file": "cert.pem"},
    ]
    for table in cases:
        toml = "[tls]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
        (tmp_path / "weft.toml").write_text(toml)
        from_file = verdict(lambda: load_config(environ={}, cwd=tmp_path))
        absolute = {k: str(tmp_path / v) if v == "cert.pem" else v for k, v in table.items()}
        from_server = verdict(lambda: Server(handle, tls=absolute))  # noqa: B023
        assert from_file == from_server, table


# -- (c) real sockets ----------------------------------------------------------------------


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    server.run()
    try:
        yield server
    finally:
        assert server.stop(timeout=5)


@pytest.mark.parametrize(
    ("toml", "env", "mode"),
    [
        ("unix_mode = 0o640\n", {}, 0o640),
        ("", {"WEFT_UNIX_MODE": "0600"}, 0o600),
        ("unix_mode = 0o777\n", {"WEFT_UNIX_MODE": "620"}, 0o620),
        ("", {"WEFT_UNIX_MODE": "0o604"}, 0o604),
    ],
)
def test_unix_mode_from_config_reaches_the_socket_file(
    tmp_path: Path, toml: str, env: dict[str, str], mode: int
) -> None:
    path = tmp_path / "s.sock"
    (tmp_path / "weft.toml").write_text(f'bind = "unix:{path}"\n{toml}')
    config = load_config(environ=env, cwd=tmp_path)
    server = Server(handle, **config.server_kwargs())
    with serving(server):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            assert client.recv(16) == b"hi\n"
    assert not path.exists()


def test_a_unix_socket_file_is_removed_when_listening_fails(tmp_path: Path) -> None:
    """A start that fails after bind() leaves no socket file behind."""
    path = tmp_path / "s.sock"
    with pytest.raises(TypeError):  # what Server(unix_mode="0660") used to hand it
        open_listeners([Endpoint("unix", path=str(path))], unix_mode="0660")  # type: ignore[arg-type]
    assert not path.exists()


@pytest.fixture(scope="module")
def encrypted_key() -> Iterator[tuple[Path, Any]]:
    """A certificate and its private key encrypted with 's3cret', and the CA to trust."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        issued.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
        (where / "key.pem").write_bytes(encrypted)
        (where / "password.txt").write_text("s3cret\nignored second line\n")
        yield where, ca


def test_an_encrypted_key_without_a_password_is_a_config_error(
    encrypted_key: tuple[Path, Any],
) -> None:
    """No password: a ConfigError naming tls.password, never a prompt on the terminal."""
    where, _ = encrypted_key
    tls = {"certfile": str(where / "cert.pem"), "keyfile": str(where / "key.pem")}
    with pytest.raises(ConfigError) as info:
        Server(handle, tls=tls)
    assert info.value.key == "tls.password"
    assert f"the private key in {where / 'key.pem'} is encrypted" in str(info.value)
    with pytest.raises(ConfigError) as wrong:
        Server(handle, tls={**tls, "password": "nope"})
    assert wrong.value.key == "tls.password"
    assert "cannot decrypt the private key" in str(wrong.value)


def _handshake(ca: Any, host: str, port: int) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        return tls.recv(16)


def test_server_takes_a_password_file(encrypted_key: tuple[Path, Any]) -> None:
    where, ca = encrypted_key
    tls = {
        "certfile": str(where / "cert.pem"),
        "keyfile": str(where / "key.pem"),
        "password_file": str(where / "password.txt"),
    }
    server = Server(handle, tls=tls)
    with serving(server):
        assert _handshake(ca, "127.0.0.1", int(server.port)) == b"hi\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["password", "password_file"])
def test_weft_serve_with_a_password_protected_key(
    tmp_path: Path, encrypted_key: tuple[Path, Any], how: str
) -> None:
    """weft serve reads tls.password (or password_file) from weft.toml: no prompt, a handshake."""
    where, ca = encrypted_key
    secret = (
        'password = "s3cret"' if how == "password" else f'password_file = "{where}/password.txt"'
    )
    (tmp_path / "weft.toml").write_text(
        'bind = "127.0.0.1:0"\n'
        f'[tls]\ncertfile = "{where}/cert.pem"\nkeyfile = "{where}/key.pem"\n{secret}\n'
    )
    # A new session has no controlling terminal: a prompt could not be answered.
    with Served(weft_serve("_serving:handle"), cwd=tmp_path, start_new_session=True) as served:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        host, port = host_port(address)
        assert _handshake(ca, host, port).strip() == str(served.proc.pid).encode()
        served.signal(15)
        assert served.finish() == 0


def test_weft_serve_refuses_an_encrypted_key_without_a_password(
    tmp_path: Path, encrypted_key: tuple[Path, Any]
) -> None:
    where, _ = encrypted_key
    (tmp_path / "weft.toml").write_text(
        f'bind = "127.0.0.1:0"\n[tls]\ncertfile = "{where}/cert.pem"\nkeyfile = "{where}/key.pem"\n'
    )
    result = subprocess.run(
        weft_serve("_serving:handle"),
        cwd=tmp_path,
        env=environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert result.returncode == 2, result.stderr
    assert f"key 'tls.password': the private key in {where}/key.pem is encrypted" in result.stderr


def test_validate_is_the_one_entry_point() -> None:
    """The same function answers for a keyword and for text; only the source differs."""
    with pytest.raises(ConfigError) as python:
        validate("backlog", 0)
    with pytest.raises(ConfigError) as text:
        validate("backlog", "0", text=True, source="environment variable WEFT_BACKLOG")
    assert python.value.message == text.value.message
    assert (python.value.source, text.value.source) == (None, "environment variable WEFT_BACKLOG")
    assert validate("unix_mode", "660", text=True) == 0o660
    assert validate("unix_mode", "0o660", text=True) == 0o660


@pytest.mark.parametrize(
    ("written", "refused"),
    [("440", True), ("600", True), ("4_40", True), ("0o440", False), ("0o660", False),
     ("0", False), ("0x1a0", False)],
)  # fmt: skip
def test_a_decimal_unix_mode_in_weft_toml_is_refused(
    tmp_path: Path, written: str, refused: bool
) -> None:
    """TOML reads ``unix_mode = 440`` as 440, the mode 0o670: a looser mode than the 0440
    the same digits give in WEFT_UNIX_MODE or --unix-mode, taken without a word (the
    config probe's F3). A mode written in decimal is refused, naming the octal it means."""
    path = tmp_path / "weft.toml"
    path.write_text(f"unix_mode = {written}  # the socket's mode\n")
    if refused:
        with pytest.raises(ConfigError, match=r"decimal number in TOML, the mode 0o\d+") as info:
            load_config({}, config_file=str(path))
        assert f"unix_mode = 0o{written}" in str(info.value)
    else:
        config = load_config({}, config_file=str(path))
        assert config.get("unix_mode") == int(written, 0)
        (line,) = [x for x in config.describe() if x.startswith("unix_mode")]
        assert line.endswith(f"({oct(int(written, 0))})")


@pytest.mark.parametrize(
    ("key", "value", "most"),
    [("backlog", 2**31, "(2147483647)"), ("max_connections", 10**20, "(2147483647)"),
     ("idle_timeout", 1e10, "(1e+09 seconds, 31 years)"), ("full_wait", 2e9, "(1e+09 seconds")],
)  # fmt: skip
def test_a_value_past_the_most_a_setting_takes_names_that_most(
    key: str, value: Any, most: str
) -> None:
    """'expected a positive integer, got 2147483648' left the reader guessing what was
    wrong with a positive integer (the config probe's F7): the bound is named."""
    with pytest.raises(ConfigError, match="more than the most it can be") as info:
        Server(handle, **{key: value})
    assert most in str(info.value)


def test_an_unusable_user_name_is_a_config_error() -> None:
    """A user name that cannot be looked up at all (a lone surrogate, as a non-UTF-8
    WEFT_USER decodes to) raised UnicodeEncodeError from pwd, not a ConfigError."""
    with pytest.raises(ConfigError, match="no user named"):
        load_config(environ={"WEFT_USER": "\ud800"})


def test_family_dual_with_an_ipv4_address_is_refused_when_the_server_is_made() -> None:
    """It passed --check-config and failed only at run(), after the config looked clean
    (the config probe's F16); 0.0.0.0 stands for :: there and is taken."""
    for kwargs in ({}, {"address": "10.1.2.3"}, {"bind": ["[::1]:0", "127.0.0.1:0"]}):
        with pytest.raises(ConfigError, match=r"family='dual' .* needs an IPv6 address"):
            Server(handle, family="dual", **kwargs)
    Server(handle, family="dual", address="0.0.0.0")
    Server(handle, family="dual", bind=["[::]:0", "unix:/tmp/x.sock"])


def test_proxy_protocol_with_no_trusted_proxy_is_refused() -> None:
    """`--proxy-protocol --trusted-proxies ""` started a server that refused every client
    (only a trusted proxy's header is taken) without a word (the config probe's F15)."""
    with pytest.raises(ConfigError, match=r"trusted_proxies.*every client would be refused"):
        Server(handle, proxy_protocol=True, trusted_proxies=[])
    Server(handle, trusted_proxies=[])  # nothing is refused without proxy_protocol


def test_an_ipv4_mapped_address_is_taken_under_family_ipv4() -> None:
    """``::ffff:127.0.0.1`` binds as IPv4 under family='ipv4': not refused as IPv6."""
    Server(handle, family="ipv4", bind="[::ffff:127.0.0.1]:0")
