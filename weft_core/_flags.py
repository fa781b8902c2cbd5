"""``weft serve``'s setting flags, generated from the settings table.

Every setting that a config file can set and text can express gets a flag, so a
setting is never in config but missing on the command line: ``max_connections`` is
``--max-connections``, ``tls.password_file`` is ``--tls-password-file``. Where
gunicorn has a spelling its users already type, that spelling is the flag
(``-b/--bind``, ``-w/--workers``, ``-k/--manager``, ``--certfile``, ``--ca-certs``,
``-p/--pid``, ``-u/--user``); see :data:`SPELLINGS`. A true-or-false setting gets
``--x`` and ``--no-x``.

The flags hand their values on as text, untouched: ``_config`` parses and checks
them with the same table as ``WEFT_*`` variables, so a mistake gets the same message
whether it was typed in a flag, a variable or a file. :func:`render_flag` turns a
value back into a flag, for the workers of ``--workers N``.

What does not live here: the flags that are not settings (``-c/--config``,
``-o/--manager-option``, ``--fd``, ``--check-config``), which ``_cli`` adds.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._settings import SETTINGS, Setting

__all__ = ["FLAGS", "SPELLINGS", "Flag", "add_setting_flags", "flag_values", "render_flag"]

#: gunicorn's spellings, where gunicorn has the setting: short options, and long ones
#: that differ from the setting's name. The last long option is the one messages use.
SPELLINGS: Mapping[str, tuple[str, ...]] = {
    "bind": ("-b", "--bind"),
    "workers": ("-w", "--workers"),
    "manager": ("-k", "--worker-class", "--manager"),
    "timeout": ("-t", "--timeout"),
    "pid": ("-p", "--pid"),
    "user": ("-u", "--user"),
    "group": ("-g", "--group"),
    "tls.certfile": ("--certfile",),
    "tls.keyfile": ("--keyfile",),
    "tls.cafile": ("--ca-certs",),
}

#: Settings given otherwise on the command line: the handler is the positional
#: argument, and a manager's options (``limit`` among them) go through ``-o KEY=VALUE``.
_NOT_FLAGS = frozenset({"handler"})
_NOT_FLAG_PREFIXES = ("manager_options.",)

#: Placeholders in ``--help`` by the setting's type.
_METAVARS = {"int": "N", "int | None": "N", "float": "SECONDS", "float | None": "SECONDS"}


@dataclass(frozen=True)
class Flag:
    """The flag of one setting: its option strings, the first long one for messages."""

    setting: Setting
    options: tuple[str, ...]

    @property
    def name(self) -> str:
        """The long option that messages and workers use (``--bind``)."""
        return [o for o in self.options if o.startswith("--")][-1]

    @property
    def switch(self) -> bool:
        """True for a true-or-false setting: ``--x`` and ``--no-x``, no value."""
        return self.setting.type == "bool"


def _flag(setting: Setting) -> Flag:
    default = "--" + setting.name.replace(".", "-").replace("_", "-")
    return Flag(setting, SPELLINGS.get(setting.name, (default,)))


#: Every setting flag, by setting name.
FLAGS: Mapping[str, Flag] = {
    name: _flag(setting)
    for name, setting in SETTINGS.items()
    if setting.config
    and setting.from_text
    and name not in _NOT_FLAGS
    and not name.startswith(_NOT_FLAG_PREFIXES)
}


class _Switch(argparse.Action):
    """``--x`` stores True, ``--no-x`` False.

    argparse.BooleanOptionalAction, without the help text it adds (the default again).
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


#: weft serve's own defaults, where they differ from Server's (see _config.serve_default_settings).
_SERVE_DEFAULTS = {
    "address": "127.0.0.1, or 0.0.0.0 when $PORT is set",
    "port": "8000, or $PORT",
    "workers": "1, or $WEB_CONCURRENCY",
}


def _help(flag: Flag) -> str:
    setting = flag.setting
    if setting.kind.secret:  # a command line is visible to every local user (ps, /proc)
        return f"{setting.doc}; visible to other users in ps: prefer WEFT_* or a file"
    if setting.name in _SERVE_DEFAULTS:
        return f"{setting.doc} (default {_SERVE_DEFAULTS[setting.name]})"
    default = setting.default
    if default is None or default == () or (flag.switch and default is False):
        return setting.doc
    if isinstance(default, list | tuple):
        default = ",".join(map(str, default))
    return f"{setting.doc} (default {default})"


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for each setting in :data:`FLAGS` to ``parser`` (``weft serve``'s)."""
    group = parser.add_argument_group("settings (also in weft.toml and WEFT_* variables)")
    for name, flag in FLAGS.items():
        options: list[str] = list(flag.options)
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _help(flag)}
        if flag.switch:
            options += ["--no-" + o[2:] for o in flag.options if o.startswith("--")]
            kwargs.update(action=_Switch, nargs=0)
        else:
            if name in _LISTS:  # -b A -b B; --args X --args Y: each one counts
                kwargs["action"] = "append"
            upper = name.rpartition(".")[2].upper()
            metavar = "FILE" if flag.setting.kind.path else _METAVARS.get(flag.setting.type)
            kwargs["metavar"] = metavar or ("ENDPOINT" if name == "bind" else upper)
        group.add_argument(*options, **kwargs)


def flag_values(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the command line gave, as typed (None: not given), and each one's flag."""
    values = {name: getattr(ns, name, None) for name in FLAGS}
    for name in _LISTS - {"bind"}:  # text, as a variable gives it: items joined by commas
        given: list[str] | None = values.get(name)
        if given is not None:
            values[name] = ",".join(given)
    return values, {name: flag.name for name, flag in FLAGS.items()}


#: The settings that hold lists: a flag given twice adds to it (bind keeps its list).
_LISTS = frozenset({"bind", "args", "trusted_proxies"})


def render_flag(name: str, value: Any) -> str:
    """Setting ``name`` given ``value`` as one command-line argument (``--backlog=64``).

    As ``--flag=VALUE``, so a value that starts with ``-`` stays a value; a list is
    joined with commas, as the table's text parsers read it back.
    """
    flag = FLAGS.get(name)
    option = flag.name if flag is not None else "--" + name.replace("_", "-")
    if value is True or value is False:
        return option if value else "--no-" + option[2:]
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    return f"{option}={value}"
