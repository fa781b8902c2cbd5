"""Configuration: where ``weft serve`` gets its settings, and how they are checked.

Sources, each overriding the one before (DESIGN section 5):

1. a config file: ``--config FILE`` or ``$WEFT_CONFIG`` if given, else ``weft.toml`` in
   the current directory, else the ``[tool.weft]`` table of ``pyproject.toml`` there;
2. ``WEFT_*`` environment variables (``WEFT_MAX_CONNECTIONS=100``,
   ``WEFT_BIND=127.0.0.1:5000,[::1]:5000``, ``WEFT_TLS_CERTFILE=...``,
   ``WEFT_MANAGER_OPTIONS_<NAME>=...``);
3. command-line flags, which ``weft_core._cli`` hands to :func:`load_config` as a dict.

Keys mirror the Server keywords, plus ``handler``, ``graceful_timeout``, ``workers`` and
``log_level`` for the CLI. Every value is checked here, so that an unknown key, a wrong
type or a bad value fails with a :class:`~weft_core.ConfigError` before anything binds,
naming the source, the key, what was expected, the value given and, for a misspelt key,
the closest valid one. Nothing here imports the handler or touches the network.

TOML has no null, so "no limit" is written ``false``: ``max_connections = false``,
``idle_timeout = false`` (environment and flags also take ``none``).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._endpoints import parse_endpoint
from ._errors import ConfigError

__all__ = [
    "CLI_ONLY_KEYS",
    "DEFAULTS",
    "KEYS",
    "RESERVED_ENV",
    "Config",
    "load_config",
    "parse_option_value",
]

#: WEFT_* variables that are not config keys: read elsewhere, never "unknown".
RESERVED_ENV = frozenset({"WEFT_CONFIG", "WEFT_LOAD_PLUGINS"})

#: Keys used by ``weft serve`` itself and never passed to the Server.
CLI_ONLY_KEYS = frozenset({"handler", "graceful_timeout", "workers", "log_level"})

#: Defaults of the CLI-only keys; Server keywords keep the Server's own defaults.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"graceful_timeout": 30.0, "workers": 1, "log_level": "INFO"}
)

# Integers end up in C ints (socket.listen's backlog, semaphore counts), so bound them
# there rather than let an OverflowError surface from deep inside the server.
_MAX_INT = 2**31 - 1
# Timeouts end up in lock and select waits, which reject anything above
# threading.TIMEOUT_MAX (about 292 years on Linux); a billion seconds is plenty.
_MAX_SECONDS = 1e9

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"none", "false", "off", "no", "unlimited"})
# Bounded digit counts: int() refuses strings over 4300 digits (CVE-2020-10735), and
# nothing weft configures needs more than a handful.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,30}")
_NUMBER_TEXT = re.compile(
    r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?"
)
_SERVICE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_MANAGER_NAME = re.compile(r"[a-z][a-z0-9_-]*")


class _Invalid(Exception):
    """A value failed its check; the message (if any) replaces 'expected ..., got ...'."""


# -- value checks: a TOML (or already typed) value in, the normalised value out --------


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _int_in(lo: int, hi: int = _MAX_INT) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Invalid
        return value

    return check


def _seconds(*, positive: bool, none_ok: bool = False) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        if none_ok and (value is False or value is None):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid
        if isinstance(value, float) and not math.isfinite(value):
            raise _Invalid
        if value > _MAX_SECONDS or value < 0 or (positive and value == 0):
            raise _Invalid
        return float(value)

    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _Invalid
        return value.lower()

    return check


def _check_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid
    return value


def _check_log_level(value: Any) -> str:
    return _choice("debug", "info", "warning", "error", "critical")(value).upper()


def _check_handler(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    module, sep, attr = value.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() for p in parts):
        raise _Invalid
    return value


def _check_port(value: Any) -> int:
    if isinstance(value, str):
        if not _SERVICE.fullmatch(value):
            raise _Invalid
        try:
            return socket.getservbyname(value, "tcp")
        except OSError:
            raise _Invalid(
                f"unknown service name {value!r} (not in the services database);"
                " give a port number"
            ) from None
    return _int_in(0, 65535)(value)


def _check_bind(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise _Invalid
    try:
        return [str(parse_endpoint(item)) for item in items]
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _check_manager(value: Any) -> str:
    if not isinstance(value, str) or not _MANAGER_NAME.fullmatch(value.strip().lower()):
        raise _Invalid
    return value.strip().lower()


def _check_max_connections(value: Any) -> int | None:
    if value is False or value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    return _int_in(1)(value)


def _check_args(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid
    return value


def _check_networks(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise _Invalid
    try:
        return [str(ipaddress.ip_network(i.strip(), strict=False)) for i in value]
    except ValueError as exc:
        raise _Invalid(f"expected a list of networks such as '10.0.0.0/8'; {exc}") from None


# -- text parsers: an environment variable or flag string in, a value to check out -----


def _text_bool(text: str) -> Any:
    low = text.strip().lower()
    return True if low in _TRUE else False if low in _FALSE else text


def _text_int(text: str) -> Any:
    return int(text) if _INT_TEXT.fullmatch(text.strip()) else text


def _text_number(text: str) -> Any:
    low = text.strip().lower()
    if low in _NONE:
        return False
    if _INT_TEXT.fullmatch(low):
        return int(low)
    return float(low) if _NUMBER_TEXT.fullmatch(low) else text


def _text_max_connections(text: str) -> Any:
    return False if text.strip().lower() in _NONE else _text_int(text)


def _text_list(text: str) -> Any:
    return [item.strip() for item in text.split(",") if item.strip()]


def _text_port(text: str) -> Any:
    return _text_int(text) if _INT_TEXT.fullmatch(text.strip()) else text.strip()


def _text_same(text: str) -> Any:
    return text


@dataclass(frozen=True)
class _Key:
    expected: str
    check: Callable[[Any], Any]
    from_text: Callable[[str], Any] = _text_same


_SECONDS = "a number of seconds"
_BOOL = _Key("true or false", _check_bool, _text_bool)

#: Every flat config key with what it expects. ``tls`` and ``manager_options`` are
#: tables, handled apart (see _TLS_KEYS).
KEYS: Mapping[str, _Key] = MappingProxyType(
    {
        "handler": _Key("a handler as 'module:attribute', e.g. 'examples.echo:handle'",
                        _check_handler),
        "args": _Key("a list of handler arguments", _check_args, _text_list),
        "address": _Key("a host name or IP address", _check_text),
        "port": _Key("a port number (0-65535) or a service name", _check_port, _text_port),
        "bind": _Key("an endpoint string or a list of them", _check_bind, _text_list),
        "manager": _Key("a task manager name such as 'threads'", _check_manager),
        "max_connections": _Key("a positive integer, or false for no limit",
                                _check_max_connections, _text_max_connections),
        "full_wait": _Key(f"{_SECONDS} >= 0", _seconds(positive=False), _text_number),
        "on_full": _Key("'refuse' or 'backlog'", _choice("refuse", "backlog")),
        "backlog": _Key("a positive integer", _int_in(1), _text_int),
        "nodelay": _BOOL,
        "keepalive": _BOOL,
        "reuse_port": _BOOL,
        "stream": _BOOL,
        "family": _Key("'auto', 'ipv4', 'ipv6' or 'dual'",
                       _choice("auto", "ipv4", "ipv6", "dual")),
        "tls_handshake_timeout": _Key(f"{_SECONDS} > 0", _seconds(positive=True),
                                      _text_number),
        "idle_timeout": _Key(f"{_SECONDS} > 0, or false for none",
                             _seconds(positive=True, none_ok=True), _text_number),
        "proxy_protocol": _BOOL,
        "trusted_proxies": _Key("a list of networks such as ['127.0.0.0/8', '10.0.0.0/8']",
                                _check_networks, _text_list),
        "proxy_header_timeout": _Key(f"{_SECONDS} > 0", _seconds(positive=True),
                                     _text_number),
        "graceful_timeout": _Key(f"{_SECONDS} >= 0", _seconds(positive=False), _text_number),
        "workers": _Key("a positive integer", _int_in(1), _text_int),
        "log_level": _Key("one of debug, info, warning, error, critical", _check_log_level),
        "shutdown_port": _Key("a port number (0-65535)", _int_in(0, 65535), _text_int),
        "shutdown_secret": _Key("a non-empty string", _check_text),
        "shutdown_allow_no_secret": _BOOL,
    }
)  # fmt: skip

#: The keys of the ``[tls]`` table; the file ones must name existing files.
_TLS_KEYS: Mapping[str, str] = MappingProxyType(
    {"certfile": "file", "keyfile": "file", "cafile": "file", "require_client_cert": "bool"}
)
_TABLES = ("tls", "manager_options")
_ALL_KEYS = sorted([*KEYS, *_TABLES])
_ENV_NAMES = sorted(
    [f"WEFT_{k.upper()}" for k in KEYS]
    + [f"WEFT_TLS_{k.upper()}" for k in _TLS_KEYS]
    + ["WEFT_MANAGER_OPTIONS_<NAME>"]
)


def parse_option_value(text: str) -> Any:
    """A manager option's value from text: a TOML value if it is one, else the string.

    ``5`` is 5, ``true`` is True, ``[1, 2]`` a list, ``gevent`` the string 'gevent'.
    """
    if "\n" in text or "\r" in text:
        return text
    try:
        return _toml_loads(f"v = {text}")["v"]
    except Exception:  # any TOML error (or no TOML reader at all) means "a plain string"
        return text


def _toml_loads(text: str) -> dict[str, Any]:
    # tomllib is 3.11+; on 3.10 use tomli when installed (weft-core declares
    # "tomli; python_version < '3.11'").
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        try:
            import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML on Python 3.10 needs tomli: pip install tomli"
            ) from None
    result: dict[str, Any] = tomllib.loads(text)
    return result


# -- one source at a time -------------------------------------------------------------

# A source's settings: flat key ("port", "tls.certfile", "manager_options.limit") to value.
_Settings = dict[str, Any]


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(choices)


def _check_value(key: str, value: Any, source: str, *, text: bool = False) -> Any:
    spec = KEYS[key]
    given = value
    if text and isinstance(value, str):
        value = spec.from_text(value)
    try:
        return spec.check(value)
    except _Invalid as exc:
        message = str(exc) or f"expected {spec.expected}, got {given!r}"
        raise ConfigError(message, source=source, key=key) from None


def _check_tls(sub: str, value: Any, source: str, base: Path, *, text: bool = False) -> Any:
    key = f"tls.{sub}"
    if _TLS_KEYS[sub] == "bool":
        checked = _text_bool(value) if text and isinstance(value, str) else value
        if not isinstance(checked, bool):
            raise ConfigError(f"expected true or false, got {value!r}", source=source, key=key)
        return checked
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"expected a file path, got {value!r}", source=source, key=key)
    path = base / os.path.expanduser(value)
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"no such file: {str(path)!r}", source=source, key=key)
    return str(path)


def _from_table(table: Mapping[str, Any], source: str, base: Path) -> _Settings:
    """Check a TOML table (a file's, or the CLI's dict of typed values)."""
    out: _Settings = {}
    for key, value in table.items():
        if key == "tls":
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"expected a table with certfile and keyfile, got {value!r}",
                    source=source,
                    key=key,
                )
            for sub, subvalue in value.items():
                if sub not in _TLS_KEYS:
                    raise ConfigError(
                        f"unknown TLS key; {_suggest(sub, sorted(_TLS_KEYS))}",
                        source=source,
                        key=f"tls.{sub}",
                    )
                out[f"tls.{sub}"] = _check_tls(sub, subvalue, source, base)
        elif key == "manager_options":
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"expected a table of manager options, got {value!r}",
                    source=source,
                    key=key,
                )
            for sub, subvalue in value.items():
                out[f"manager_options.{_option_name(sub, source)}"] = subvalue
        elif key in KEYS:
            out[key] = _check_value(key, value, source)
        else:
            hint = (
                "the keys go at the top level of weft.toml; [tool.weft] is for pyproject.toml"
                if key == "tool"
                else _suggest(key, _ALL_KEYS)
            )
            raise ConfigError(f"unknown key; {hint}", source=source, key=key)
    return out


def _option_name(name: str, source: str) -> str:
    if not name.isidentifier():
        raise ConfigError(
            f"a manager option name must be a Python identifier, got {name!r}",
            source=source,
            key=f"manager_options.{name}",
        )
    return name


def _from_file(path: Path, *, pyproject: bool, explicit: bool) -> tuple[_Settings, str]:
    source = f"{path} [tool.weft]" if pyproject else str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", source=str(path)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", source=str(path)) from None
    try:
        document = _toml_loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError; its message has line and column
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from None
    if pyproject:
        tool = document.get("tool")
        table = tool.get("weft") if isinstance(tool, dict) else None
        if table is None:
            if explicit:
                raise ConfigError("no [tool.weft] table", source=str(path))
            return {}, source
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table, got {table!r}", source=str(path), key="tool.weft"
            )
        document = table
    return _from_table(document, source, path.parent), source


def _from_env(environ: Mapping[str, str], base: Path) -> tuple[_Settings, dict[str, str]]:
    """The WEFT_* variables' settings, and the variable each came from."""
    out: _Settings = {}
    labels: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith("WEFT_") or name in RESERVED_ENV:
            continue
        value = environ[name]
        if not value.strip():  # an empty variable counts as unset, as in most shells' tools
            continue
        source = f"environment variable {name}"
        key = name[len("WEFT_") :].lower()
        if key in KEYS:
            out[key] = _check_value(key, value, source, text=True)
            labels[key] = source
        elif key.startswith("tls_") and key[4:] in _TLS_KEYS:
            out[f"tls.{key[4:]}"] = _check_tls(key[4:], value, source, base, text=True)
            labels[f"tls.{key[4:]}"] = source
        elif key.startswith("manager_options_") and key[16:]:
            option = _option_name(key[16:], source)
            out[f"manager_options.{option}"] = parse_option_value(value)
            labels[f"manager_options.{option}"] = source
        elif key in ("tls", "manager_options"):
            parts = "TLS_CERTFILE, WEFT_TLS_KEYFILE" if key == "tls" else "MANAGER_OPTIONS_<NAME>"
            raise ConfigError(
                f"{key} is a table: set its parts one by one, as WEFT_{parts}",
                source=source,
                key=key,
            )
        else:
            close = difflib.get_close_matches(name, _ENV_NAMES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(_ENV_NAMES)
            raise ConfigError(f"unknown weft setting; {hint}", source=source, key=key)
    return out, labels


def _from_cli(
    flags: Mapping[str, Any], names: Mapping[str, str], base: Path
) -> list[tuple[_Settings, str]]:
    # Each flag is its own source, so an error names the flag that was wrong.
    out: list[tuple[_Settings, str]] = []
    for key, value in flags.items():
        if value is None:
            continue
        source = f"command line {names.get(key, '--' + key.replace('_', '-'))}"
        if key in KEYS:
            out.append(({key: _check_value(key, value, source, text=True)}, source))
        else:
            out.append((_from_table({key: value}, source, base), source))
    return out


# -- putting the sources together ------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The checked, merged configuration.

    ``values`` holds only the keys some source set (``tls`` and ``manager_options``
    as dicts); ``origins`` says which source set each. Use :meth:`server_kwargs` for
    the Server's keyword arguments.
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)
    #: The config file that was read, if any.
    file: Path | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, else the CLI default for it, else ``default``."""
        return self.values.get(key, DEFAULTS.get(key, default))

    @property
    def handler(self) -> str | None:
        """The handler as a ``module:attribute`` string, if configured."""
        return self.values.get("handler")

    @property
    def graceful_timeout(self) -> float:
        """Seconds ``weft serve`` gives connections to finish on SIGTERM/SIGINT."""
        return float(self.get("graceful_timeout"))

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return int(self.get("workers"))

    @property
    def log_level(self) -> str:
        """The logging level name, upper case."""
        return str(self.get("log_level"))

    def server_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Server(handler, **kwargs)``: only the keys that were set.

        CLI-only keys (handler, graceful_timeout, workers, log_level) are left out;
        ``args`` is a tuple, ``bind`` a list of endpoint strings, ``tls`` and
        ``manager_options`` dicts.
        """
        kwargs = {k: v for k, v in self.values.items() if k not in CLI_ONLY_KEYS}
        if "args" in kwargs:
            kwargs["args"] = tuple(kwargs["args"])
        return kwargs


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Read, check and merge the config file, ``WEFT_*`` variables and ``flags``.

    ``flags`` maps config keys to values from the command line (None = not given;
    strings are parsed as the environment's are). ``config_file`` overrides
    ``$WEFT_CONFIG``; without either, ``weft.toml`` then ``pyproject.toml`` in ``cwd``
    are tried. ``flag_names`` says how a key was spelt on the command line, for
    messages (default ``--max-connections`` for ``max_connections``).

    Raises ConfigError for anything that cannot be used.
    """
    environ = os.environ if environ is None else environ
    base = Path.cwd() if cwd is None else Path(cwd)
    sources: list[tuple[_Settings, str, Mapping[str, str]]] = []
    file = _find_file(config_file, environ, base)
    if file is not None:
        path, pyproject, explicit = file
        sources.append((*_from_file(path, pyproject=pyproject, explicit=explicit), {}))
    env_settings, env_labels = _from_env(environ, base)
    sources.append((env_settings, "environment", env_labels))
    sources.extend((*each, {}) for each in _from_cli(flags or {}, flag_names or {}, base))

    merged: _Settings = {}
    origins: dict[str, str] = {}
    for settings, source, labels in sources:
        _merge(merged, origins, settings, source, labels)
    return _assemble(merged, origins, None if file is None else file[0])


def _find_file(
    config_file: str | os.PathLike[str] | None, environ: Mapping[str, str], base: Path
) -> tuple[Path, bool, bool] | None:
    named = config_file if config_file is not None else environ.get("WEFT_CONFIG") or None
    if named is not None:
        path = base / os.path.expanduser(named)
        if not path.is_file():
            how = (
                "command line --config"
                if config_file is not None
                else "environment variable WEFT_CONFIG"
            )
            raise ConfigError(f"config file not found: {str(path)!r}", source=how, key="config")
        return path, path.name == "pyproject.toml", True
    for name in ("weft.toml", "pyproject.toml"):
        if (base / name).is_file():
            return base / name, name == "pyproject.toml", False
    return None


def _merge(
    merged: _Settings,
    origins: dict[str, str],
    new: _Settings,
    source: str,
    labels: Mapping[str, str],
) -> None:
    """Lay ``new`` (from ``source``; ``labels`` names each key's own origin) over ``merged``."""
    # bind and address/port are two ways to say where to listen: a source that gives one
    # replaces what earlier sources said with the other, and one source may not give both.
    if "bind" in new and ("address" in new or "port" in new):
        other = "address" if "address" in new else "port"
        raise ConfigError(
            f"give either bind or {other}, not both (bind takes 'HOST:PORT' strings)",
            source=labels.get("bind", source),
            key="bind",
        )
    replaced: tuple[str, ...] = ()
    if "bind" in new:
        replaced = ("address", "port")
    elif "address" in new or "port" in new:
        replaced = ("bind",)
    for key in replaced:
        merged.pop(key, None)
        origins.pop(key, None)
    for key, value in new.items():
        merged[key] = value
        origins[key] = labels.get(key, source)


def _assemble(merged: _Settings, origins: dict[str, str], file: Path | None) -> Config:
    values: dict[str, Any] = {}
    top_origins: dict[str, str] = {}
    for key, value in merged.items():
        table, dot, sub = key.partition(".")
        if dot:
            values.setdefault(table, {})[sub] = value
        else:
            values[key] = value
        top_origins[table] = origins[key]
    tls = values.get("tls")
    if tls is not None:
        if "certfile" not in tls:
            raise ConfigError(
                "TLS needs certfile (and keyfile, unless the key is in the certfile)",
                source=origins[next(f"tls.{k}" for k in tls)],
                key="tls.certfile",
            )
        if tls.get("require_client_cert") and "cafile" not in tls:
            raise ConfigError(
                "require_client_cert needs cafile, the CA that signs client certificates",
                source=origins["tls.require_client_cert"],
                key="tls.cafile",
            )
    return Config(MappingProxyType(values), MappingProxyType(top_origins), file)
