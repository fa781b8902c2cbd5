"""Configuration: where ``weft serve`` gets its settings, and how they are checked.

Sources, each overriding the one before (DESIGN section 5):

1. a config file: ``--config FILE`` or ``$WEFT_CONFIG`` if given, else ``weft.toml`` in
   the current directory, else the ``[tool.weft]`` table of ``pyproject.toml`` there;
2. ``WEFT_*`` environment variables (``WEFT_MAX_CONNECTIONS=100``,
   ``WEFT_BIND=127.0.0.1:5000,[::1]:5000``, ``WEFT_TLS_CERTFILE=...``,
   ``WEFT_MANAGER_OPTIONS_<NAME>=...``);
3. command-line flags, which ``weft_core._cli`` hands to :func:`load_config` as a dict.

Keys mirror the Server keywords, plus ``handler``, ``graceful_timeout``, ``workers`` and
``log_level`` for the CLI. Every value is checked, and every text value parsed, by the
settings table (``weft_core._settings``) that ``Server(...)`` checks its keywords with,
so that an unknown key, a wrong type or a bad value fails with a
:class:`~weft_core.ConfigError` before anything binds, naming the source, the key, what
was expected, the value given and, for a misspelt key, the closest valid one; the
message is the one ``Server`` gives for the same value. Nothing here imports the
handler or touches the network.

TOML has no null, so "no limit" is written ``false``: ``max_connections = false``,
``idle_timeout = false`` (environment and flags also take ``none``).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._endpoints import with_default_host
from ._errors import ConfigError, UnknownManagerError, WeftError
from ._logsafe import escape_for_log, json_safe
from ._reload import PARENT_ENV
from ._settings import (
    CONTROL_SOCKET_OFF,
    SETTINGS,
    TLS_PARTS,
    Setting,
    check_manager_options,
    check_tls_parts,
    names_a_unix_socket,
    show,
    suggest,
    unknown_tls_key,
    validate,
)

__all__ = [
    "CLI_ONLY_KEYS",
    "DEFAULT",
    "DEFAULTS",
    "KEYS",
    "RESERVED_ENV",
    "Config",
    "load_config",
    "parse_option_value",
    "serve_default_settings",
    "toml_loads",
    "with_source",
]

#: WEFT_* variables that are not config keys: read elsewhere, never "unknown" (the
#: --reload parent's pid is weft's own, set for its child).
RESERVED_ENV = frozenset({"WEFT_CONFIG", "WEFT_LOAD_PLUGINS", PARENT_ENV})

_TABLES = ("tls", "manager_options")

#: Every flat config key, from the settings table. ``tls`` and ``manager_options`` are
#: tables whose parts are checked apart.
KEYS: Mapping[str, Setting] = MappingProxyType(
    {
        name: setting
        for name, setting in SETTINGS.items()
        if setting.config and "." not in name and name not in _TABLES
    }
)

#: Keys used by ``weft serve`` itself and never passed to the Server.
CLI_ONLY_KEYS = frozenset(name for name, setting in KEYS.items() if not setting.server)

#: Defaults of the CLI-only keys; Server keywords keep the Server's own defaults.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {k: KEYS[k].default for k in CLI_ONLY_KEYS if KEYS[k].default is not None}
)

_ALL_KEYS = sorted([*KEYS, *_TABLES])
_ENV_NAMES = sorted(
    [f"WEFT_{k.upper()}" for k in KEYS]
    + [f"WEFT_TLS_{k.upper()}" for k in TLS_PARTS]
    + ["WEFT_MANAGER_OPTIONS_<NAME>"]
)


def parse_option_value(text: str, name: str = "") -> Any:
    """A manager option's value from text: a TOML value if it is one, else the string.

    ``5`` is 5, ``true`` is True, ``[1, 2]`` a list, ``gevent`` the string 'gevent'.
    An option the settings table knows (``limit``) is read by its own parser, as its
    flag would be: ``-o limit=none`` means no limit, as ``--max-connections none`` does.
    """
    known = SETTINGS.get(f"manager_options.{name}") if name else None
    if known is not None and known.kind.parse is not None:
        return known.kind.parse(text)
    if "\n" in text or "\r" in text:
        return text
    try:
        return toml_loads(f"v = {text}")["v"]
    except Exception:  # any TOML error (or no TOML reader at all) means "a plain string"
        return text


def toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML text (tomllib, or tomli on 3.10); ConfigError if no reader is installed."""
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


def _check_value(key: str, value: Any, source: str, *, text: bool = False) -> Any:
    return validate(key, value, source=source, text=text)


def _check_tls(sub: str, value: Any, source: str, base: Path, *, text: bool = False) -> Any:
    return validate(f"tls.{sub}", value, source=source, text=text, base=base)


def _from_table(table: Mapping[str, Any], source: str, base: Path) -> _Settings:
    """Check a TOML table (a file's, or the CLI's dict of typed values)."""
    out: _Settings = {}
    for key, value in table.items():
        if key == "tls":
            if not isinstance(value, Mapping):
                # Not a table: the table's message (a file cannot hold an SSLContext,
                # which the Python message offers). ``tls = false`` is no TLS from this
                # source, as ``Server(tls=False)`` is.
                if value is False:
                    continue
                raise ConfigError(
                    f"expected a table with certfile and keyfile, got {show(value)}: write"
                    " them under [tls], or tls = false for none",
                    source=source,
                    key=key,
                )
            if not value:
                # [tls] with every line commented out: TLS meant, none said how. Read
                # as nothing, it served plain TCP where Server(tls={}) refuses.
                raise ConfigError(
                    "an empty table: TLS needs certfile (and keyfile, unless the key is in"
                    " the certfile); for no TLS, leave [tls] out or write tls = false",
                    source=source,
                    key=key,
                )
            for sub, subvalue in value.items():
                if sub not in TLS_PARTS:
                    raise unknown_tls_key(sub, source)
                out[f"tls.{sub}"] = _check_tls(sub, subvalue, source, base)
        elif key == "manager_options":
            for sub, subvalue in check_manager_options(value, source).items():
                out[f"manager_options.{sub}"] = subvalue
        elif key in KEYS:
            # A path (pid, log_config, control_socket) is the file's, as tls's parts
            # are: relative to the directory of the file that names it.
            out[key] = validate(key, value, source=source, base=base)
        else:
            hint = (
                "the keys go at the top level of weft.toml; [tool.weft] is for pyproject.toml"
                if key == "tool"
                else suggest(key, _ALL_KEYS)
            )
            raise ConfigError(f"unknown key; {hint}", source=source, key=key)
    return out


#: How config files are read: UTF-8, past a byte order mark. Some Windows editors
#: write one; it is not TOML's, but no reason to refuse the file ("Invalid
#: statement" at line 1, tomllib says).
_ENCODING = "utf-8-sig"


def _from_file(path: Path, *, pyproject: bool, explicit: bool) -> tuple[_Settings, str]:
    source = f"{path} [tool.weft]" if pyproject else str(path)
    try:
        text = path.read_bytes().decode(_ENCODING)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror or exc}", source=str(path)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", source=str(path)) from None
    if path.suffix == ".py":
        # gunicorn's config is Python, and one of bind = "..." lines parses as TOML:
        # it would be used without a word, and the next such file refused as TOML.
        raise ConfigError(
            "weft's config file is TOML (weft.toml), not Python: write the settings as"
            ' TOML (bind = "0.0.0.0:8000", workers = 2)',
            source=str(path),
        )
    try:
        document = toml_loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError; its message has line and column
        raise ConfigError(
            f"invalid TOML: {exc} (weft's config file is TOML)", source=str(path)
        ) from None
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
    _refuse_a_decimal_mode(document, text, source)
    return _from_table(document, source, path.parent), source


#: ``unix_mode = 440``: a decimal integer literal, as TOML reads it, however the key
#: is spelt: quoted, dotted (``weft.unix_mode`` in pyproject's ``[tool]``), in an
#: inline table; the number signed or not.
_DECIMAL_MODE = re.compile(
    r"""(?:^|[{,])[ \t]*(?:(?:[\w-]+|"[^"\n]*"|'[^'\n]*')[ \t]*\.[ \t]*)*"""
    r"""(?:unix_mode|"unix_mode"|'unix_mode')[ \t]*=[ \t]*\+?([1-9][0-9_]*)[ \t\r]*(?=$|[#,}])""",
    re.M,
)


def _refuse_a_decimal_mode(table: Mapping[str, Any], text: str, source: str) -> None:
    """Refuse ``unix_mode`` written as a decimal number: ``440`` is the mode 0o670.

    TOML reads ``unix_mode = 440`` as four hundred and forty, a looser mode than
    the 0440 the same digits mean in ``WEFT_UNIX_MODE`` or ``--unix-mode``, and a
    valid one, so nothing else would say so. tomllib keeps no trace of how a number
    was written, so the file's text is read for it.
    """
    value = table.get("unix_mode")
    if isinstance(value, bool) or not isinstance(value, int):
        return
    for match in _DECIMAL_MODE.finditer(text):
        digits = match.group(1).replace("_", "")
        if int(digits) == value:
            # The same digits in octal only where they are a mode (0o000-0o777).
            octal = set(digits) <= set("01234567") and int(digits, 8) <= 0o777
            hint = f"0o{match.group(1)}" if octal else "0o660, 0o600, ..."
            raise ConfigError(
                f"unix_mode = {match.group(1)} is a decimal number in TOML, the mode"
                f" {oct(value)}; write a mode in octal: unix_mode = {hint}",
                source=source,
                key="unix_mode",
            )


def _plugin_prefixes() -> tuple[str, ...]:
    """``WEFT_<NAME>_`` for every installed plugin (entry point of the ``weft`` group)."""
    from importlib.metadata import entry_points

    names = {ep.name.upper().replace("-", "_") for ep in entry_points(group="weft")}
    return tuple(f"WEFT_{name}_" for name in sorted(names))


def _from_env(
    environ: Mapping[str, str], base: Path, warnings: list[str]
) -> tuple[_Settings, dict[str, str]]:
    """The WEFT_* variables' settings, and the variable each came from.

    An unknown ``WEFT_*`` variable adds a line to ``warnings``.
    """
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
        elif key.startswith("tls_") and key[4:] in TLS_PARTS:
            out[f"tls.{key[4:]}"] = _check_tls(key[4:], value, source, base, text=True)
            labels[f"tls.{key[4:]}"] = source
        elif key.startswith("manager_options_") and key[16:]:
            option = key[16:]
            options = check_manager_options({option: parse_option_value(value, option)}, source)
            out[f"manager_options.{option}"] = options[option]
            labels[f"manager_options.{option}"] = source
        elif key in ("tls", "manager_options"):
            parts = "TLS_CERTFILE, WEFT_TLS_KEYFILE" if key == "tls" else "MANAGER_OPTIONS_<NAME>"
            raise ConfigError(
                f"{key} is a table: set its parts one by one, as WEFT_{parts}",
                source=source,
                key=key,
            )
        elif (meant := _manager_option_meant(name)) is not None:
            warnings.append(f"ignoring {escape_for_log(name)}: {meant}")
        elif name.startswith(_plugin_prefixes()):
            continue  # WEFT_<PLUGIN>_*: a plugin's own setting, read by the plugin
        else:
            # Environments are shared (CI, containers, other tools' WEFT_ names): an unknown
            # variable is worth a warning, never a refusal to start. Files stay strict.
            shown = escape_for_log(name)  # the environment may hold anything
            warnings.append(f"ignoring {shown}: no weft setting has that name; {_env_hint(name)}")
    _other_servers_variables(environ, warnings)
    return out, labels


#: Variables named after another server's settings, and weft's own for each.
_ENV_MEANT = {
    "WEFT_WORKER_CLASS": "did you mean WEFT_MANAGER?",
    "WEFT_K": "did you mean WEFT_MANAGER?",
    "WEFT_HOST": "did you mean WEFT_ADDRESS (or WEFT_BIND)?",
    "WEFT_CMD_ARGS": "weft takes no command line from the environment: set each setting"
    " as its own WEFT_ variable (WEFT_WORKERS=3)",
    "WEFT_LIMIT_CONCURRENCY": "did you mean WEFT_MAX_CONNECTIONS?",
    "WEFT_WORKER_CONNECTIONS": "did you mean WEFT_MAX_CONNECTIONS?",
    "WEFT_KEEP_ALIVE": "did you mean WEFT_IDLE_TIMEOUT?",
}


def _manager_option_meant(name: str) -> str | None:
    """How to set what ``WEFT_<MANAGER>_<OPTION>`` names, if OPTION is that manager's option.

    The name a user guesses for a manager option (``WEFT_ASYNCIO_LOOP=uvloop``,
    ``WEFT_THREADS_IDLE_THREADS=0``) lies in that manager's plugin's own namespace,
    which weft leaves to the plugin, and no manager reads its options from there:
    it was ignored unsaid. A name that is no option of the manager stays the
    plugin's.
    """
    from . import _registry

    rest = name[len("WEFT_") :]
    try:
        managers = _registry.available_managers()
    except WeftError:
        return None
    for manager, spec in managers.items():
        prefix = manager.upper().replace("-", "_") + "_"
        option = rest[len(prefix) :].lower()
        if rest.startswith(prefix) and option in _registry.option_names(spec):
            return (
                f"the {manager} manager reads no variable of that name; its option {option!r} is"
                f" set as WEFT_MANAGER_OPTIONS_{option.upper()} (or -o {option}=...)"
            )
    return None


def _env_hint(name: str) -> str:
    """What an unknown ``WEFT_*`` variable was most likely meant to be: by meaning, then spelling."""
    meant = _ENV_MEANT.get(name)
    if meant is not None:
        return meant
    close = difflib.get_close_matches(name, _ENV_NAMES, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else "see weft serve --check-config"


def _other_servers_variables(environ: Mapping[str, str], warnings: list[str]) -> None:
    """A warning for gunicorn's or uvicorn's variables, which a migrated service keeps."""
    names = sorted(
        name
        for name in environ
        if (name == "GUNICORN_CMD_ARGS" or name.startswith("UVICORN_")) and environ[name].strip()
    )
    if names:
        shown = ", ".join(escape_for_log(name) for name in names)
        warnings.append(
            f"ignoring {shown}: weft reads no other server's variables; set each setting as"
            " its own WEFT_ variable (weft serve --check-config lists them)"
        )


def _from_cli(
    flags: Mapping[str, Any], names: Mapping[str, str], base: Path
) -> list[tuple[_Settings, str]]:
    # Each flag is its own source, so an error names the flag that was wrong.
    out: list[tuple[_Settings, str]] = []
    given = [k for k in ("address", "port") if flags.get(k) is not None]
    if flags.get("bind") is not None and given and names.get("bind") != "LISTEN_FDS":
        # One command line, as one file, says where to listen one way: a later flag
        # replacing an earlier one's place would drop one without a word.
        flag = names.get(given[0], "--" + given[0])
        raise ConfigError(
            f"give either {names.get('bind', '--bind')} or {flag}, not both"
            " (bind takes 'HOST:PORT' strings)",
            source=f"command line {flag}",
            key=given[0],
        )
    for key, value in flags.items():
        if value is None:
            continue
        source = f"command line {names.get(key, '--' + key.replace('_', '-'))}"
        if key in KEYS:
            out.append(({key: _check_value(key, value, source, text=True)}, source))
        elif key.startswith("tls.") and key[4:] in TLS_PARTS:
            out.append(({key: _check_tls(key[4:], value, source, base, text=True)}, source))
        else:
            out.append((_from_table({key: value}, source, base), source))
    return out


#: The origin of a setting no source set.
DEFAULT = "default"
#: Where ``weft serve`` listens when nothing says: gunicorn's default, loopback only.
SERVE_ADDRESS = "127.0.0.1"
SERVE_PORT = 8000
#: Where it listens when the platform sets ``$PORT`` (Heroku, Cloud Run, Render, Fly):
#: every interface, since the platform's router connects from outside the container.
PORT_ADDRESS = "0.0.0.0"


def serve_default_settings(environ: Mapping[str, str]) -> tuple[_Settings, dict[str, str]]:
    """``weft serve``'s defaults, under every other source, and where each came from.

    It listens on 127.0.0.1:8000, or on 0.0.0.0:$PORT when ``$PORT`` is set, and runs
    ``$WEB_CONCURRENCY`` workers when that is set (the platform conventions gunicorn
    and uvicorn follow). ``Server(...)`` keeps port 0 (any free port).
    """
    out: _Settings = {"address": SERVE_ADDRESS, "port": SERVE_PORT}
    labels = {"address": DEFAULT, "port": DEFAULT}
    port = environ.get("PORT", "").strip()
    if port:
        source = "environment variable PORT"
        out["port"] = _platform_default("port", port, source)
        labels["port"] = source
        if not isinstance(out["port"], _Unusable):
            # Every interface only for a port the platform really gave: an unusable
            # $PORT that a --port replaces must not widen where the server listens.
            out["address"] = PORT_ADDRESS
            labels["address"] = source
    workers = environ.get("WEB_CONCURRENCY", "").strip()
    if workers:
        source = "environment variable WEB_CONCURRENCY"
        out["workers"] = _platform_default("workers", workers, source)
        labels["workers"] = source
    return out, labels


@dataclass(frozen=True)
class _Unusable:
    """A platform default that failed its check: an error only if nothing replaces it."""

    error: ConfigError


def _platform_default(key: str, text: str, source: str) -> Any:
    """``$PORT`` or ``$WEB_CONCURRENCY`` checked, its error kept for later.

    They are defaults: a --bind or --workers flag (or the file) wins over them, and
    then an unusable value in the platform's environment must not stop the start.
    """
    try:
        return _check_value(key, text, source, text=True)
    except ConfigError as exc:
        return _Unusable(exc)


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
    #: Where each setting came from, by flat key (``tls.certfile``, ``manager_options.limit``).
    sources: Mapping[str, str] = field(default_factory=dict)
    #: What the user should hear about but that does not stop weft (unknown WEFT_* names).
    warnings: tuple[str, ...] = ()

    @property
    def where(self) -> Mapping[str, str]:
        """Where each setting came from: by flat key (``tls.certfile``) where it has one."""
        return {**self.origins, **self.sources}

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
    def control_socket(self) -> str | None:
        """The control socket's path for ``weft ctl`` (the default if unset); None if off."""
        value = self.values.get("control_socket")
        if value == CONTROL_SOCKET_OFF:
            return None
        if value is None:
            from ._ctl import default_path

            return default_path()
        return str(value)

    @property
    def console(self) -> bool:
        """True if ``weft ctl console`` may open a REPL in the server."""
        return bool(self.get("console"))

    @property
    def log_level(self) -> str:
        """The logging level name, upper case."""
        return str(self.get("log_level"))

    def describe(self, defaults: Mapping[str, Any] | None = None) -> list[str]:
        """Each effective setting as ``key = VALUE  # where it came from``, for --check-config.

        Every config key is listed, set or not; a secret's value is shown as ``"***"``.
        Values are JSON (TOML but for ``null``, which means none). ``defaults``: what
        the caller uses for a key no source set where the table says none (``weft
        serve``'s manager and control socket), so that the listing shows what is used.
        """
        defaults = defaults or {}
        lines = []
        keys = [k for k in SETTINGS if SETTINGS[k].config and k not in _TABLES]
        keys += [f"manager_options.{k}" for k in self.values.get("manager_options", {})]
        for key in dict.fromkeys(keys):
            table, dot, part = key.partition(".")
            holder = self.values.get(table, {}) if dot else self.values
            given = (part if dot else key) in holder
            # A manager's own options are never in the table, and always given.
            value = holder[part if dot else key] if given else SETTINGS[key].default
            if not given and value is None:
                value = defaults.get(key)
            setting = SETTINGS.get(key)
            if setting is not None and setting.kind.secret and value is not None:
                value = "***"
            origin = self.sources.get(key, DEFAULT) if given else DEFAULT
            where = _origin_kind(origin, self.file)
            if key in ("address", "port") and self.values.get("bind"):
                where += "; not used: bind says where to listen"
            if key in _REPLACED_BY_LOG_CONFIG and self.values.get("log_config"):
                where += "; not used: log_config says how to log"
            if key == "unix_mode" and isinstance(value, int):
                where += f" ({oct(value)})"  # JSON has no octal; modes are read in it
            lines.append(f"{key} = {json_value(value)}  # {where}")
        return lines

    def server_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Server(handler, **kwargs)``: only the keys that were set.

        CLI-only keys (handler, graceful_timeout, workers, log_level) are left out;
        ``args`` is a tuple, ``bind`` a list of endpoint strings, ``tls`` and
        ``manager_options`` dicts.
        """
        kwargs = {k: v for k, v in self.values.items() if k not in CLI_ONLY_KEYS}
        if "unix_mode" in kwargs and not names_a_unix_socket(
            self.values.get("bind"), self.values.get("address")
        ):
            del kwargs["unix_mode"]  # warned of when read; the Server would say it again
        if "args" in kwargs:
            kwargs["args"] = tuple(kwargs["args"])
        return kwargs


def json_value(value: Any) -> str:
    r"""A value as --check-config shows it: JSON, tuples as lists, non-ASCII kept.

    As the JSON log lines do, DEL, the C1 controls (U+009B is a one-character
    terminal escape), the Unicode line breaks and the invisible and
    direction-changing marks are ``\u`` escapes (JSON escapes only C0): a value
    from a variable or a flag is shown as inert as its error would be.
    """
    import json

    if isinstance(value, tuple):
        value = list(value)
    return json_safe(json.dumps(value, default=str, ensure_ascii=False))


def _origin_kind(origin: str, file: Path | None) -> str:
    """'default', 'file PATH', 'env NAME' or 'flag --NAME': where a value came from."""
    if origin.startswith("environment variable "):
        return "env " + origin[len("environment variable ") :]
    if origin.startswith("command line "):
        return "flag " + origin[len("command line ") :]
    if origin == DEFAULT:
        return DEFAULT
    return f"file {origin}"


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    flag_names: Mapping[str, str] | None = None,
    serve_defaults: bool = False,
    discover: bool = True,
) -> Config:
    """Read, check and merge the config file, ``WEFT_*`` variables and ``flags``.

    ``flags`` maps config keys to values from the command line (None = not given;
    strings are parsed as the environment's are). ``config_file`` overrides
    ``$WEFT_CONFIG``; without either, ``weft.toml`` then ``pyproject.toml`` in ``cwd``
    are tried. ``flag_names`` says how a key was spelt on the command line, for
    messages (default ``--max-connections`` for ``max_connections``).

    ``serve_defaults``: start from ``weft serve``'s own defaults (:func:`serve_defaults`:
    where to listen, ``$PORT`` and ``$WEB_CONCURRENCY``), under every other source.
    ``discover=False``: no file unless one is named (a worker whose supervisor read none).

    Raises ConfigError for anything that cannot be used.
    """
    environ = os.environ if environ is None else environ
    base = Path.cwd() if cwd is None else Path(cwd)
    sources: list[tuple[_Settings, str, Mapping[str, str]]] = []
    if serve_defaults:
        defaults, default_labels = serve_default_settings(environ)
        sources.append((defaults, DEFAULT, default_labels))
    warnings: list[str] = []
    file = _find_file(config_file, environ, base, discover)
    if file is not None:
        path, pyproject, explicit = file
        sources.append((*_from_file(path, pyproject=pyproject, explicit=explicit), {}))
        if not pyproject and not explicit:
            _unread_pyproject(base, warnings)
    env_settings, env_labels = _from_env(environ, base, warnings)
    sources.append((env_settings, "environment", env_labels))
    sources.extend((*each, {}) for each in _from_cli(flags or {}, flag_names or {}, base))

    merged: _Settings = {}
    origins: dict[str, str] = {}
    for settings, source, labels in sources:
        _merge(merged, origins, settings, source, labels, warnings)
    if serve_defaults and "bind" not in merged:
        # A bind replaced by only an address (or a port) took weft serve's default
        # for the other half with it: the default comes back, as with no bind at all.
        for key in ("address", "port"):
            if key not in merged:
                merged[key] = defaults[key]
                origins[key] = default_labels[key]
    elif serve_defaults and isinstance(merged["bind"], list):
        # A bind that names no host (":$PORT", gunicorn's spelling for every
        # interface) listens where weft serve does when nothing says: 0.0.0.0 under
        # $PORT, where the platform's router connects from outside, else 127.0.0.1.
        host = defaults["address"]
        merged["bind"] = [with_default_host(text, host) for text in merged["bind"]]
    for value in merged.values():
        if isinstance(value, _Unusable):  # a platform default nothing replaced
            raise value.error
    if "unix_mode" in merged and not names_a_unix_socket(
        merged.get("bind"), merged.get("address")
    ):
        warnings.append(
            f"unix_mode from {origins['unix_mode']} is not used: neither bind nor address"
            " names a Unix socket (unix:PATH) this server makes"
        )
    if "log_config" in merged:
        for key in _REPLACED_BY_LOG_CONFIG:
            if key in merged:
                warnings.append(
                    f"{key} from {origins[key]} is not used: log_config"
                    f" ({origins['log_config']}) says how to log"
                )
    return _assemble(merged, origins, None if file is None else file[0], warnings)


def _unread_pyproject(base: Path, warnings: list[str]) -> None:
    """Warn of a ``[tool.weft]`` table that a ``weft.toml`` beside it keeps from being read.

    Only one file is read, ``weft.toml`` first; settings a user put in both would
    otherwise be ignored without a word.
    """
    path = base / "pyproject.toml"
    try:
        text = path.read_bytes().decode(_ENCODING)
        if "weft" not in text:
            return
        tool = toml_loads(text).get("tool")
    except (OSError, ValueError, ConfigError):  # unreadable, not UTF-8 or TOML, no reader:
        return  # it would not have been read either way
    if isinstance(tool, dict) and "weft" in tool:
        warnings.append(
            f"ignoring [tool.weft] in {escape_for_log(path)}: {escape_for_log(base / 'weft.toml')}"
            " is read instead (only one config file is read); move the settings into"
            " one of them"
        )


def _find_file(
    config_file: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    base: Path,
    discover: bool = True,
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
            if not str(named).strip():
                raise ConfigError(
                    "the config file's name is empty: give the path of a TOML file",
                    source=how,
                    key="config",
                )
            what = (
                "a directory, not a file"
                if path.is_dir()
                else "not a regular file"
                if path.exists()
                else "not found"
            )
            raise ConfigError(f"config file {what}: {str(path)!r}", source=how, key="config")
        return path, path.name == "pyproject.toml", True
    for name in ("weft.toml", "pyproject.toml") if discover else ():
        path = base / name
        if path.is_file():
            return path, name == "pyproject.toml", False
        if name == "weft.toml" and path.exists():  # skipped, it would look like an empty config
            raise ConfigError(
                f"{str(path)!r} is not a regular file (a directory?); a config file must be"
                " one: move it, or give the config with --config",
                source="the current directory",
                key="config",
            )
    return None


def _merge(
    merged: _Settings,
    origins: dict[str, str],
    new: _Settings,
    source: str,
    labels: Mapping[str, str],
    warnings: list[str],
) -> None:
    """Lay ``new`` (from ``source``; ``labels`` names each key's own origin) over ``merged``."""
    # bind and address/port are two ways to say where to listen, and tls.password and
    # tls.password_file two ways to give a password: a source that gives one replaces
    # what earlier sources said with the other, and one source may not give both.
    for one, others in _ALTERNATIVES:
        given = [key for key in others if key in new]
        if one in new and given:
            raise ConfigError(
                f"give either {_short(one)} or {_short(given[0])}, not both"
                + (" (bind takes 'HOST:PORT' strings)" if one == "bind" else ""),
                source=labels.get(one, source),
                key=one,
            )
        replaced = others if one in new else (one,) if given else ()
        if one == "bind" and given and one not in new and one in merged:
            # A port alone (a flag over a file's bind, say) takes the bind's host too.
            warnings.append(
                f"{labels.get(given[0], source)} replaces bind ="
                f" {json_value(merged[one])} from {origins[one]}: weft listens on address"
                " and port now, the one not given at its default (to keep the bind's host,"
                " change the bind instead)"
            )
        for key in replaced:
            merged.pop(key, None)
            origins.pop(key, None)
    for key, value in new.items():
        merged[key] = value
        origins[key] = labels.get(key, source)


#: What a log_config replaces: its handlers and formatters say how, and where, to log.
_REPLACED_BY_LOG_CONFIG = ("log_level", "log_format")

#: Pairs of ways to say one thing: (key, the keys it replaces and that replace it).
_ALTERNATIVES = (
    ("bind", ("address", "port")),
    ("tls.password", ("tls.password_file",)),
)


def _short(key: str) -> str:
    return key.rpartition(".")[2]


def _assemble(
    merged: _Settings, origins: dict[str, str], file: Path | None, warnings: list[str]
) -> Config:
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
        check_tls_parts(tls, lambda part: origins.get(f"tls.{part}"))
    return Config(
        MappingProxyType(values),
        MappingProxyType(top_origins),
        file,
        MappingProxyType(dict(origins)),
        tuple(warnings),
    )


def with_source(exc: WeftError, origins: Mapping[str, str]) -> WeftError:
    """``exc``, raised by a Server made from config, naming the source that set its key.

    A ConfigError without a source gets its key's origin (a file, a variable, a
    flag); an UnknownManagerError, a manager name that came from one of them,
    becomes a ConfigError of key ``manager``. Anything else is ``exc`` itself.
    """
    if isinstance(exc, ConfigError) and exc.source is None and exc.key is not None:
        # A table's part (tls.certfile) by its table's origin when not its own.
        source = origins.get(exc.key) or origins.get(exc.key.partition(".")[0])
        message = exc.message
        parts = {k: v for k, v in origins.items() if k.startswith(f"{exc.key}.")}
        if len(set(parts.values())) > 1:
            # A table given by several sources (a file's [manager_options] and -o):
            # which part came from where, since the error may be another's than the last.
            said = "; ".join(f"{k.partition('.')[2]} from {v}" for k, v in sorted(parts.items()))
            message = f"{message} ({said})"
        manager = origins.get("manager")
        if (
            exc.key == "manager_options"
            and manager
            and source
            and manager != source
            and not (manager.startswith("command line") and source.startswith("command line"))
        ):
            # -k over a file's manager keeps the file's options, meant for that one.
            message = f"{message}; the manager was chosen by {manager}, the options by {source}"
        return ConfigError(message, source=source, key=exc.key)
    if isinstance(exc, UnknownManagerError):
        return ConfigError(str(exc), source=origins.get("manager"), key="manager")
    return exc
