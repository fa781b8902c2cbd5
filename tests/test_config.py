"""Config loading: sources and their order, every key's checks, and the errors' wording."""

from __future__ import annotations

import inspect
import logging
import math
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from weft_core import ConfigError, Server, available_managers
from weft_core._config import CLI_ONLY_KEYS, KEYS, Config, load_config, parse_option_value


def load(
    tmp_path: Path,
    toml: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    name: str = "weft.toml",
) -> Config:
    if toml is not None:
        (tmp_path / name).write_text(toml)
    return load_config(flags, environ=env or {}, cwd=tmp_path)


def error(tmp_path: Path, toml: str | None = None, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **kw)
    return info.value


# -- sources ------------------------------------------------------------------------------


def test_no_source_gives_an_empty_config_with_cli_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.values == {}
    assert config.file is None
    assert config.server_kwargs() == {}
    assert (config.graceful_timeout, config.workers, config.log_level) == (30.0, 1, "INFO")
    assert config.handler is None


def test_weft_toml_in_the_cwd(tmp_path: Path) -> None:
    config = load(tmp_path, 'manager = "threads"\nmax_connections = 10\n')
    assert config.server_kwargs() == {"manager": "threads", "max_connections": 10}
    assert config.file == tmp_path / "weft.toml"
    assert config.origins["manager"] == str(tmp_path / "weft.toml")


def test_tool_weft_in_pyproject(tmp_path: Path) -> None:
    text = '[project]\nname = "x"\n\n[tool.weft]\nmanager = "trio"\n'
    config = load(tmp_path, text, name="pyproject.toml")
    assert config.get("manager") == "trio"
    assert config.origins["manager"] == f"{tmp_path / 'pyproject.toml'} [tool.weft]"


def test_pyproject_without_tool_weft_is_no_config(tmp_path: Path) -> None:
    assert load(tmp_path, '[project]\nname = "x"\n', name="pyproject.toml").values == {}


def test_weft_toml_wins_over_pyproject_and_says_the_other_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.weft]\nmanager = "trio"\n')
    config = load(tmp_path, 'manager = "gevent"\n')
    assert config.get("manager") == "gevent"
    # Settings in [tool.weft] are not read: said once, naming both files.
    assert config.warnings == (
        f"ignoring [tool.weft] in {tmp_path / 'pyproject.toml'}: {tmp_path / 'weft.toml'}"
        " is read instead (only one config file is read); move the settings into one of them",
    )


@pytest.mark.parametrize(
    "pyproject",
    [
        '[project]\nname = "weft-app"\n',  # the word, and no table
        "[tool.weft\n",  # not TOML: it would not have been read either
        "\udcff",  # not UTF-8
    ],
)
def test_a_pyproject_without_tool_weft_beside_weft_toml_is_no_warning(
    tmp_path: Path, pyproject: str
) -> None:
    (tmp_path / "pyproject.toml").write_bytes(pyproject.encode(errors="surrogateescape"))
    config = load(tmp_path, 'manager = "gevent"\n')
    assert (config.get("manager"), config.warnings) == ("gevent", ())


def test_an_explicit_weft_toml_says_nothing_of_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.weft]\nmanager = "trio"\n')
    (tmp_path / "other.toml").write_text('manager = "gevent"\n')
    config = load_config(config_file="other.toml", environ={}, cwd=tmp_path)
    assert (config.get("manager"), config.warnings) == ("gevent", ())


@pytest.mark.parametrize(
    ("written", "hint"),
    [("440", "unix_mode = 0o440"), ("888", "unix_mode = 0o660, 0o600"), ("1023", "0o660")],
)
def test_a_decimal_unix_mode_is_refused_with_a_mode_to_write(
    tmp_path: Path, written: str, hint: str
) -> None:
    """The same digits in octal are offered only where they make a mode: 888 and 1023
    offered 0o888 (no octal number) and 0o1023 (no mode) (the config check's L4)."""
    (tmp_path / "weft.toml").write_text(f"unix_mode = {written}\n")
    with pytest.raises(ConfigError, match="is a decimal number in TOML") as info:
        load(tmp_path)
    assert hint in str(info.value), str(info.value)
    assert "0o888" not in str(info.value) and "0o1023" not in str(info.value)
    assert "(or" not in str(info.value), "the octal is offered once, not twice"


def test_an_empty_config_file_name_says_so(tmp_path: Path) -> None:
    """``-c ""`` was "a directory, not a file", naming the working directory (L12)."""
    with pytest.raises(ConfigError, match="the config file's name is empty"):
        load_config(config_file="", environ={}, cwd=tmp_path)


def test_a_relative_path_in_a_file_is_the_file_s_as_tls_parts_are(tmp_path: Path) -> None:
    """pid, log_config and control_socket were taken from the working directory while
    tls's parts were taken from the file's (the config check's M2): the same file
    named from elsewhere found its logging.ini missing, and wrote its pid file
    wherever it was started. A flag's or a variable's stays the working directory's."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "logging.ini").write_text("[loggers]\nkeys=root\n")
    (conf / "weft.toml").write_text(
        'pid = "app.pid"\nlog_config = "logging.ini"\ncontrol_socket = "ctl.sock"\n'
    )
    config = load_config(config_file="conf/weft.toml", environ={}, cwd=tmp_path)
    assert config.get("pid") == str(conf / "app.pid")
    assert config.get("log_config") == str(conf / "logging.ini")
    assert config.get("control_socket") == str(conf / "ctl.sock")
    flagged = load_config({"pid": "app.pid"}, environ={}, cwd=tmp_path)
    assert flagged.get("pid") == "app.pid"


@pytest.mark.parametrize("name", ["weft.toml", "pyproject.toml"])
def test_a_byte_order_mark_is_read_past(tmp_path: Path, name: str) -> None:
    # Some Windows editors start UTF-8 files with one; tomllib alone says
    # "Invalid statement (at line 1, column 1)".
    text = 'manager = "trio"\n' if name == "weft.toml" else '[tool.weft]\nmanager = "trio"\n'
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load(tmp_path).get("manager") == "trio"


def test_explicit_config_file_and_weft_config(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_text("backlog = 1\n")
    (tmp_path / "other.toml").write_text("backlog = 2\n")
    (tmp_path / "third.toml").write_text("backlog = 3\n")
    assert load_config(config_file="other.toml", environ={}, cwd=tmp_path).get("backlog") == 2
    env = {"WEFT_CONFIG": "third.toml"}
    assert load_config(environ=env, cwd=tmp_path).get("backlog") == 3
    # --config beats WEFT_CONFIG
    cfg = load_config(config_file=tmp_path / "other.toml", environ=env, cwd=tmp_path)
    assert cfg.get("backlog") == 2


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as given:
        load_config(config_file="missing.toml", environ={}, cwd=tmp_path)
    assert (given.value.source, given.value.key) == ("command line --config", "config")
    assert str(given.value).endswith(f"config file not found: {str(tmp_path / 'missing.toml')!r}")
    with pytest.raises(ConfigError) as named:
        load_config(environ={"WEFT_CONFIG": "missing.toml"}, cwd=tmp_path)
    assert (named.value.source, named.value.key) == ("environment variable WEFT_CONFIG", "config")


def test_an_explicit_pyproject_needs_a_tool_weft_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"no \[tool\.weft\] table"):
        load_config(config_file="pyproject.toml", environ={}, cwd=tmp_path)


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    toml = 'manager = "threads"\nmax_connections = 10\nbacklog = 5\n'
    env = {"WEFT_MAX_CONNECTIONS": "20", "WEFT_BACKLOG": "6"}
    config = load(tmp_path, toml, env=env, flags={"backlog": "7", "manager": None})
    assert config.server_kwargs() == {"manager": "threads", "max_connections": 20, "backlog": 7}
    assert config.origins["max_connections"] == "environment variable WEFT_MAX_CONNECTIONS"
    assert config.origins["backlog"] == "command line --backlog"


def test_bind_from_a_later_source_replaces_address_and_port(tmp_path: Path) -> None:
    config = load(tmp_path, 'address = "0.0.0.0"\nport = 80\n', flags={"bind": ["[::1]:0"]})
    assert config.server_kwargs() == {"bind": ["[::1]:0"]}
    config = load(tmp_path, 'bind = "127.0.0.1:1"\n', env={"WEFT_PORT": "8000"})
    assert config.server_kwargs() == {"port": 8000}


def test_bind_and_address_in_one_source_is_an_error(tmp_path: Path) -> None:
    exc = error(tmp_path, 'bind = ":80"\naddress = "0.0.0.0"\n')
    assert exc.key == "bind"
    assert "give either bind or address, not both" in str(exc)


# -- values -------------------------------------------------------------------------------


def test_every_kind_of_value(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("")
    toml = """
handler = "examples.echo:handle"
args = ["hi", 2]
bind = ["127.0.0.1:0", "unix:/tmp/x.sock", "fd:3"]
manager = "Threads"
max_connections = false
full_wait = 1
on_full = "BACKLOG"
backlog = 128
nodelay = false
keepalive = true
reuse_port = true
stream = true
family = "dual"
tls_handshake_timeout = 2.5
idle_timeout = 60
proxy_protocol = true
trusted_proxies = ["10.0.0.1/8", "::1"]
proxy_header_timeout = 1
graceful_timeout = 0
workers = 1
log_level = "debug"
shutdown_port = 9999
shutdown_secret = "s3cret"

[tls]
certfile = "cert.pem"

[manager_options]
limit = 5
name = "x"
nested = { a = [1, 2] }
"""
    config = load(tmp_path, toml)
    assert config.handler == "examples.echo:handle"
    assert config.graceful_timeout == 0.0
    assert config.log_level == "DEBUG"
    assert config.server_kwargs() == {
        "args": ("hi", 2),
        "bind": ["127.0.0.1:0", "unix:/tmp/x.sock", "fd:3"],
        "manager": "threads",
        "max_connections": None,
        "full_wait": 1.0,
        "on_full": "backlog",
        "backlog": 128,
        "nodelay": False,
        "keepalive": True,
        "reuse_port": True,
        "stream": True,
        "family": "dual",
        "tls_handshake_timeout": 2.5,
        "idle_timeout": 60.0,
        "proxy_protocol": True,
        "trusted_proxies": ["10.0.0.0/8", "::1/128"],
        "proxy_header_timeout": 1.0,
        "shutdown_port": 9999,
        "shutdown_secret": "s3cret",
        "tls": {"certfile": str(tmp_path / "cert.pem")},
        "manager_options": {"limit": 5, "name": "x", "nested": {"a": [1, 2]}},
    }


def test_port_takes_a_service_name(tmp_path: Path) -> None:
    http = socket.getservbyname("http", "tcp")
    assert load(tmp_path, 'port = "http"\n').get("port") == http
    assert load(tmp_path, env={"WEFT_PORT": "http"}).get("port") == http
    exc = error(tmp_path, 'port = "no-such-service-x"\n')
    assert "unknown service name 'no-such-service-x'" in str(exc)


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ("max_connections = 0", "max_connections", "a positive integer, or false for no limit"),
        ("max_connections = true", "max_connections", "a positive integer, or false"),
        ("max_connections = 1.5", "max_connections", "a positive integer"),
        ("backlog = 0", "backlog", "a positive integer, got 0"),
        ("backlog = 3000000000", "backlog", "a positive integer"),
        ("workers = '2'", "workers", "a positive integer, got '2'"),
        ("nodelay = 1", "nodelay", "true or false, got 1"),
        ("on_full = 'drop'", "on_full", "'refuse' or 'backlog', got 'drop'"),
        ("family = 'ipv5'", "family", "'auto', 'ipv4', 'ipv6' or 'dual'"),
        ("full_wait = -1", "full_wait", "a number of seconds >= 0, got -1"),
        ("full_wait = nan", "full_wait", "a number of seconds >= 0, got nan"),
        ("full_wait = inf", "full_wait", "got inf"),
        ("graceful_timeout = 1e12", "graceful_timeout", "a number of seconds >= 0"),
        ("tls_handshake_timeout = 0", "tls_handshake_timeout", "a number of seconds > 0"),
        ("idle_timeout = true", "idle_timeout", "> 0, or false for none"),
        ("port = 65536", "port", "a port number (0-65535) or a service name, got 65536"),
        ("bind = []", "bind", "an endpoint string or a list of them, got []"),
        ("bind = [5000]", "bind", "an endpoint string or a list of them"),
        ("bind = '::1:80'", "bind", "put an IPv6 address in brackets, as in [::1]:80"),
        ("manager = 'No Such'", "manager", "a task manager name such as 'threads'"),
        ("handler = 'examples.echo'", "handler", "'module:attribute', e.g. 'examples.echo:h"),
        ("handler = 'a-b:c'", "handler", "'module:attribute'"),
        ("args = 'x'", "args", "a list of handler arguments, got 'x'"),
        ("address = ''", "address", "a host name or IP address, got ''"),
        ("trusted_proxies = '10.0.0.0/8'", "trusted_proxies", "a list of networks"),
        ("trusted_proxies = ['10.0.0.0/33']", "trusted_proxies", "'10.0.0.0/33' does not"),
        ("log_level = 'loud'", "log_level", "one of debug, info, warning, error, critical"),
        ("shutdown_secret = 1", "shutdown_secret", "a non-empty string, got 1"),
        ("tls = 'cert.pem'", "tls", "a table with certfile and keyfile, got 'cert.pem'"),
        ("manager_options = 3", "manager_options", "a table of manager options, got 3"),
    ],
)
def test_bad_values_name_file_key_expectation_and_value(
    tmp_path: Path, line: str, key: str, expected: str
) -> None:
    exc = error(tmp_path, line + "\n")
    assert exc.key == key
    assert exc.source == str(tmp_path / "weft.toml")
    assert str(exc).startswith(f"{tmp_path / 'weft.toml'}, key {key!r}: ")
    assert expected in str(exc)


def test_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    exc = error(tmp_path, "max_conections = 5\n")
    assert exc.key == "max_conections"
    assert str(exc) == (
        f"{tmp_path / 'weft.toml'}, key 'max_conections': unknown key; "
        "did you mean 'max_connections'?"
    )
    exc = error(tmp_path, "[tls]\ncertfle = 'x'\n")
    assert exc.key == "tls.certfle"
    assert "did you mean 'certfile'?" in str(exc)
    assert "valid keys: " in str(error(tmp_path, "zzzzzz = 1\n"))


def test_tool_table_in_weft_toml_gets_a_hint(tmp_path: Path) -> None:
    exc = error(tmp_path, "[tool.weft]\nmanager = 'x'\n")
    assert "[tool.weft] is for pyproject.toml" in str(exc)


def test_pyproject_tool_weft_must_be_a_table(tmp_path: Path) -> None:
    exc = error(tmp_path, "[tool]\nweft = 3\n", name="pyproject.toml")
    assert exc.key == "tool.weft"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    exc = error(tmp_path, 'manager = "threads"\nmax_connections = = 3\n')
    assert exc.source == str(tmp_path / "weft.toml")
    assert "invalid TOML" in str(exc)
    assert "line 2" in str(exc)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_bytes(b'manager = "\xff"\n')
    assert "not UTF-8" in str(error(tmp_path))


# -- TLS ----------------------------------------------------------------------------------


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / "conf" / name).write_text("")
    (tmp_path / "conf" / "weft.toml").write_text(
        '[tls]\ncertfile = "cert.pem"\nkeyfile = "key.pem"\n'
        'cafile = "ca.pem"\nrequire_client_cert = true\n'
    )
    config = load_config(config_file="conf/weft.toml", environ={}, cwd=tmp_path)
    assert config.get("tls") == {
        "certfile": str(tmp_path / "conf" / "cert.pem"),
        "keyfile": str(tmp_path / "conf" / "key.pem"),
        "cafile": str(tmp_path / "conf" / "ca.pem"),
        "require_client_cert": True,
    }


def test_tls_parts_merge_across_sources(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("")
    (tmp_path / "key.pem").write_text("")
    env = {"WEFT_TLS_KEYFILE": "key.pem"}
    config = load(tmp_path, '[tls]\ncertfile = "cert.pem"\n', env=env)
    assert config.get("tls") == {
        "certfile": str(tmp_path / "cert.pem"),
        "keyfile": str(tmp_path / "key.pem"),
    }


def test_tls_errors(tmp_path: Path) -> None:
    exc = error(tmp_path, '[tls]\ncertfile = "nope.pem"\n')
    assert exc.key == "tls.certfile"
    assert "no such file" in str(exc)
    assert "nope.pem" in str(exc)
    (tmp_path / "key.pem").write_text("")
    exc = error(tmp_path, '[tls]\nkeyfile = "key.pem"\n')
    assert exc.key == "tls.certfile"
    assert "TLS needs certfile" in str(exc)
    exc = error(tmp_path, '[tls]\ncertfile = "key.pem"\nrequire_client_cert = true\n')
    assert exc.key == "tls.cafile"
    exc = error(tmp_path, '[tls]\ncertfile = "key.pem"\nrequire_client_cert = "yes"\n')
    assert exc.key == "tls.require_client_cert"


# -- environment --------------------------------------------------------------------------


def test_env_values_are_parsed_by_the_key_type(tmp_path: Path) -> None:
    env = {
        "WEFT_MANAGER": "gevent",
        "WEFT_MAX_CONNECTIONS": "none",
        "WEFT_BIND": "127.0.0.1:5000, [::1]:5000",
        "WEFT_NODELAY": "off",
        "WEFT_KEEPALIVE": "YES",
        "WEFT_FULL_WAIT": "0.5",
        "WEFT_IDLE_TIMEOUT": "false",
        "WEFT_TRUSTED_PROXIES": "10.0.0.0/8,192.168.0.0/16",
        "WEFT_ARGS": "a,b",
        "WEFT_MANAGER_OPTIONS_LIMIT": "7",
        "WEFT_MANAGER_OPTIONS_MODE": "fast",
        "WEFT_LOAD_PLUGINS": "threads",  # reserved: not a config key, not an error
        "WEFT_CONFIG": "",
        "WEFT_PORT": "",  # empty counts as unset
        "OTHER": "ignored",
    }
    assert load(tmp_path, env=env).server_kwargs() == {
        "manager": "gevent",
        "max_connections": None,
        "bind": ["127.0.0.1:5000", "[::1]:5000"],
        "nodelay": False,
        "keepalive": True,
        "full_wait": 0.5,
        "idle_timeout": None,
        "trusted_proxies": ["10.0.0.0/8", "192.168.0.0/16"],
        "args": ("a", "b"),
        "manager_options": {"limit": 7, "mode": "fast"},
    }


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("WEFT_MAX_CONNECTIONS", "lots", "a positive integer, or false for no limit, got 'lots'"),
        ("WEFT_NODELAY", "maybe", "true or false, got 'maybe'"),
        ("WEFT_BACKLOG", "1.5", "a positive integer, got '1.5'"),
        ("WEFT_FULL_WAIT", "soon", "a number of seconds >= 0, got 'soon'"),
        ("WEFT_FULL_WAIT", "none", "a number of seconds >= 0, got 'none'"),
        ("WEFT_WORKERS", "9" * 50, "a positive integer"),
    ],
)
def test_env_errors_name_the_variable(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    exc = error(tmp_path, env={name: value})
    assert exc.source == f"environment variable {name}"
    assert exc.key == name[5:].lower()
    assert expected in str(exc)


def test_unknown_env_var_is_a_warning_suggesting_the_closest(tmp_path: Path) -> None:
    config = load(tmp_path, env={"WEFT_MAX_CONECTIONS": "3", "WEFT_BACKLOG": "7"})
    assert config.get("backlog") == 7
    assert "max_connections" not in config.values
    assert config.warnings == (
        "ignoring WEFT_MAX_CONECTIONS: no weft setting has that name;"
        " did you mean WEFT_MAX_CONNECTIONS?",
    )
    # A table given whole is a known name used wrongly: still an error.
    exc = error(tmp_path, env={"WEFT_TLS": "1"})
    assert "tls is a table: set its parts one by one, as WEFT_TLS_CERTFILE" in str(exc)


def test_unix_mode_with_no_unix_socket_to_make_is_a_warning(tmp_path: Path) -> None:
    """An option that can have no effect was taken silently (an outside check)."""
    config = load(tmp_path, env={"WEFT_UNIX_MODE": "600"})
    assert config.warnings == (
        "unix_mode from environment variable WEFT_UNIX_MODE is not used: neither bind nor"
        " address names a Unix socket (unix:PATH) this server makes",
    )
    for env in (
        {"WEFT_UNIX_MODE": "600", "WEFT_ADDRESS": "unix:/tmp/s.sock"},
        {"WEFT_UNIX_MODE": "600", "WEFT_BIND": "127.0.0.1:0,unix:/tmp/s.sock"},
    ):
        assert load(tmp_path, env=env).warnings == (), env
    # Said once: the Server made from it is not given the unused mode to say it again.
    assert "unix_mode" not in load(tmp_path, env={"WEFT_UNIX_MODE": "600"}).server_kwargs()


def test_unix_mode_with_no_unix_socket_is_said_from_python_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Server(unix_mode=0o600)`` with no Unix endpoint was taken silently, where the
    same setting from a config was warned of."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")

    def _handler(conn: object) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="weft.server"):
        Server(_handler, manager="threads", unix_mode=0o600)
    [said] = [r.getMessage() for r in caplog.records if "unix_mode" in r.getMessage()]
    assert said.startswith("unix_mode=0o600 is not used: neither bind nor address")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weft.server"):
        Server(_handler, manager="threads", unix_mode=0o600, bind=["unix:/tmp/never.sock"])
    assert not [r for r in caplog.records if "unix_mode" in r.getMessage()]


def test_a_plugins_own_env_vars_are_left_to_it(tmp_path: Path) -> None:
    """WEFT_<PLUGIN>_* belongs to an installed plugin (entry point PLUGIN): never unknown."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    config = load_config(environ={"WEFT_THREADS_ANYTHING": "1"}, cwd=tmp_path)
    assert "threads_anything" not in config.values
    assert not config.warnings, "a plugin's own variable is no unknown setting"
    other = load_config(environ={"WEFT_NOPLUGIN_ANYTHING": "1"}, cwd=tmp_path)
    assert [w for w in other.warnings if w.startswith("ignoring WEFT_NOPLUGIN_ANYTHING")]


def test_a_managers_option_named_as_its_plugins_variable_is_a_warning(tmp_path: Path) -> None:
    """``WEFT_ASYNCIO_LOOP=uvloop`` and ``WEFT_THREADS_IDLE_THREADS=0`` are the names a
    user guesses for manager options; they lie in the plugin's own namespace, which
    no manager reads, and were ignored unsaid (an outside check of the config
    surfaces). Each is a warning naming the variable to set; a name that is no
    option of the manager stays the plugin's."""
    installed = available_managers()
    cases = {
        "threads": ("WEFT_THREADS_IDLE_THREADS", "idle_threads"),
        "asyncio": ("WEFT_ASYNCIO_LOOP", "loop"),
        "gevent": ("WEFT_GEVENT_PATCH", "patch"),
        "trio": ("WEFT_TRIO_LIMIT", "limit"),
    }
    checked = 0
    for manager, (name, option) in cases.items():
        if manager not in installed:
            continue
        config = load_config(environ={name: "0"}, cwd=tmp_path)
        assert f"manager_options.{option}" not in config.values
        assert config.warnings == (
            f"ignoring {name}: the {manager} manager reads no variable of that name; its option"
            f" {option!r} is set as WEFT_MANAGER_OPTIONS_{option.upper()} (or -o {option}=...)",
        )
        checked += 1
    if not checked:
        pytest.skip("no manager plugin is installed")
    for manager in installed:
        name = f"WEFT_{manager.upper()}_NO_SUCH_OPTION"
        assert load_config(environ={name: "1"}, cwd=tmp_path).warnings == (), name


# -- command-line flags -----------------------------------------------------------------


def test_flag_errors_name_the_flag(tmp_path: Path) -> None:
    exc = error(tmp_path, flags={"max_connections": "0"})
    assert str(exc).startswith("command line --max-connections, key 'max_connections': ")
    with pytest.raises(ConfigError, match=r"^command line HANDLER, key 'handler'"):
        load_config({"handler": "nocolon"}, flag_names={"handler": "HANDLER"}, environ={},
                    cwd=tmp_path)  # fmt: skip


def test_flags_take_strings_or_typed_values(tmp_path: Path) -> None:
    flags = {"max_connections": "none", "proxy_protocol": True, "graceful_timeout": "2.5"}
    config = load(tmp_path, flags=flags)
    assert config.get("max_connections") is None
    assert config.get("proxy_protocol") is True
    assert config.graceful_timeout == 2.5
    config = load(tmp_path, flags={"manager_options": {"limit": 3}})
    assert config.server_kwargs() == {"manager_options": {"limit": 3}}


def test_manager_option_names_must_be_identifiers(tmp_path: Path) -> None:
    exc = error(tmp_path, '[manager_options]\n"not-ok" = 1\n')
    assert exc.key == "manager_options.not-ok"


def test_parse_option_value() -> None:
    assert parse_option_value("5") == 5
    assert parse_option_value("true") is True
    assert parse_option_value("[1, 'a']") == [1, "a"]
    assert parse_option_value("gevent") == "gevent"
    assert parse_option_value("") == ""
    assert parse_option_value("1\nx = 2") == "1\nx = 2"


@pytest.mark.parametrize("text", ["none", "off", "false", " unlimited "])
def test_the_limit_option_reads_none_from_text_as_its_flag_does(tmp_path: Path, text: str) -> None:
    """``--max-connections none`` was no limit while ``-o limit=none`` and
    ``WEFT_MANAGER_OPTIONS_LIMIT=none`` were refused: the table's own parser of the
    ``limit`` option was never used for text, TOML's was."""
    from weft_core._cli import _manager_option

    assert _manager_option(f"limit={text}") == ("limit", False)
    env = {"WEFT_MANAGER_OPTIONS_LIMIT": text}
    assert load(tmp_path, env=env).server_kwargs()["manager_options"] == {"limit": None}
    assert _manager_option("limit=12") == ("limit", 12)
    with pytest.raises(ConfigError, match="or false for no limit, got 'lots'"):
        load(tmp_path, env={"WEFT_MANAGER_OPTIONS_LIMIT": "lots"})


def test_tls_false_in_a_file_is_no_tls_as_the_keyword_is(tmp_path: Path) -> None:
    """``Server(tls=False)`` is no TLS; ``tls = false`` in a file was refused with a
    message of its own (an unbounded repr), not the table's."""
    assert "tls" not in load(tmp_path, "tls = false\n").server_kwargs()
    exc = error(tmp_path, "tls = 5\n")
    assert exc.key == "tls"
    assert "a table with certfile and keyfile, got 5" in str(exc)


# -- against the Server -------------------------------------------------------------------


def test_server_kwargs_are_server_keywords() -> None:
    """Every key server_kwargs() can return is a keyword the Server accepts.

    Fails while the Server lacks tls/proxy/shutdown keywords that config already takes.
    """
    accepted = set(inspect.signature(Server).parameters)
    produced = (set(KEYS) - CLI_ONLY_KEYS) | {"tls", "manager_options"}
    assert sorted(produced - accepted) == []


# -- properties: any document or environment loads, or fails as a ConfigError on a key ---

_bare_key = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    def escape(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return '"' + "".join(escape(ch) for ch in text) + '"'


def _toml_key(key: str) -> str:
    return key if _bare_key.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def dump_toml(document: Mapping[str, Any]) -> str:
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in document.items())


_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        ["127.0.0.1:0", "[::1]:0", "unix:/tmp/s", "fd:3", "refuse", "dual", "threads",
         "http", "examples.echo:handle", "10.0.0.0/8", "info", "none"]
    ),
)  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_keys = st.one_of(
    st.sampled_from([*KEYS, "tls", "manager_options"]),
    st.text(min_size=1, max_size=12),
)
_tls_tables = st.dictionaries(
    st.sampled_from(["certfile", "keyfile", "cafile", "require_client_cert", "other"]),
    st.one_of(st.booleans(), st.sampled_from(["weft.toml", "missing.pem", ""])),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6), st.none() | _tls_tables)
def test_any_toml_document_loads_or_raises_config_error_naming_a_key(
    document: dict[str, Any], tls: dict[str, Any] | None
) -> None:
    if tls is not None:
        document["tls"] = tls
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weft.toml"
        path.write_text(dump_toml(document), encoding="utf-8")
        try:
            config = load_config(environ={}, cwd=tmp)
        except ConfigError as exc:
            assert exc.key, exc
            assert exc.source == str(path)
        else:
            kwargs = config.server_kwargs()
            assert set(kwargs) <= set(KEYS) | {"tls", "manager_options"}
            assert not set(kwargs) & CLI_ONLY_KEYS


_env_names = st.one_of(
    st.sampled_from([f"WEFT_{k.upper()}" for k in KEYS]
                    + ["WEFT_TLS_CERTFILE", "WEFT_TLS_REQUIRE_CLIENT_CERT",
                       "WEFT_MANAGER_OPTIONS_LIMIT", "WEFT_MANAGER_OPTIONS_", "WEFT_LOAD_PLUGINS"]),
    st.text(min_size=1, max_size=10).map(lambda s: "WEFT_" + s.upper()),
)  # fmt: skip
_env_values = st.one_of(
    st.text(st.characters(blacklist_characters="\0"), max_size=12),
    st.sampled_from(["1", "0", "true", "none", "5", "-1", "0.5", "127.0.0.1:0,[::1]:1", "http"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_env_names, _env_values, max_size=5))
@example({"WEFT_CONFIG": "0"})  # found by hypothesis: a config file that is not there
def test_any_environment_loads_or_raises_config_error_naming_a_key(env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            load_config(environ=env, cwd=tmp)
        except ConfigError as exc:
            assert exc.key, exc
            assert exc.source is not None
            assert exc.source.startswith("environment variable WEFT_")


# -- the config probe (session 24) ---------------------------------------------------------


@pytest.mark.parametrize("other", ["address", "port"])
def test_bind_and_address_on_one_command_line_are_refused(other: str) -> None:
    """`--bind 127.0.0.1:1 --address 127.0.0.3`: the address was dropped without a word
    and --check-config listed it as the default (the config probe's F12). One command
    line, as one file, gives either."""
    flags = {"bind": ["127.0.0.1:1"], other: "127.0.0.3" if other == "address" else "9"}
    with pytest.raises(ConfigError, match=f"give either --bind or --{other}, not both"):
        load_config(flags, environ={})


def test_check_config_says_address_and_port_are_not_used_beside_bind() -> None:
    config = load_config({"bind": ["127.0.0.1:1"]}, environ={})
    listed = [line for line in config.describe() if line.startswith(("address =", "port ="))]
    assert len(listed) == 2
    assert all(line.endswith("not used: bind says where to listen") for line in listed)


def test_a_weft_toml_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """A folder named weft.toml in the current directory was skipped as if there were no
    config (and a pyproject.toml beside it read instead); -c with it is refused (F13)."""
    (tmp_path / "weft.toml").mkdir()
    (tmp_path / "pyproject.toml").write_text("[tool.weft]\nbacklog = 7\n")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(environ={}, cwd=tmp_path)


def test_spaces_around_a_choice_from_the_environment_go_as_around_a_number(
    tmp_path: Path,
) -> None:
    """``WEFT_ON_FULL=" refuse"`` was refused where ``WEFT_BACKLOG=" 64"`` was taken (the
    config check's L6): text from a variable or a flag is stripped for every kind."""
    env = {"WEFT_ON_FULL": " refuse", "WEFT_LOG_LEVEL": "debug ", "WEFT_BACKLOG": " 64"}
    config = load_config(environ=env, cwd=tmp_path)
    assert (config.get("on_full"), config.get("log_level"), config.get("backlog")) == (
        "refuse",
        "DEBUG",
        64,
    )


def test_gunicorn_s_zero_for_off_is_off(tmp_path: Path) -> None:
    """``--max-requests 0`` and ``--timeout 0`` are gunicorn's "off"; weft refused them
    (the config check's L14). They are off here too, from any source."""
    flagged = load_config({"max_requests": "0", "timeout": "0"}, environ={}, cwd=tmp_path)
    assert (flagged.get("max_requests"), flagged.get("timeout")) == (None, None)
    (tmp_path / "weft.toml").write_text("max_requests = 0\ntimeout = 0.0\n")
    filed = load(tmp_path)
    assert (filed.get("max_requests"), filed.get("timeout")) == (None, None)
    with pytest.raises(ConfigError, match="a positive integer, or 0 or false for off, got -1"):
        load_config({"max_requests": "-1"}, environ={}, cwd=tmp_path)
