"""How ``weft serve`` sets up logging: text or JSON lines, or the user's own config file.

- ``--log-format text`` (the default): ``TIME [PID] [LEVEL] LOGGER: MESSAGE``, the
  time in ISO 8601 with its zone offset (``2026-12-03T23:39:20.123+00:00``), so
  lines from hosts in different zones, or read after a DST change, sort and compare.
- ``--log-format json``: one JSON object a line, with ``time``, ``level``,
  ``logger``, ``pid`` and ``message``, plus every ``extra`` field the record carries
  (the access log's ``peer``, ``duration``, ``bytes_in``, ``bytes_out``, ``how``) and
  ``exc_info`` as text. JSON escapes every control character, so nothing a peer sent
  can forge a line.
- ``--log-config FILE``: the user's own config, read by the standard library:
  ``logging.config.dictConfig`` for ``.toml`` and ``.json``, ``fileConfig`` for INI
  (``.ini``, ``.conf``, ``.cfg``). It replaces the two above and ``--log-level``.

What does not live here: what is logged (each module's own logger), escaping of
peer data in text lines (``_logsafe``).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from ._config import toml_loads
from ._errors import ConfigError

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"

#: A LogRecord's own attributes; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

#: Suffixes read as dictConfig documents; anything else is an INI file for fileConfig.
_DICT_SUFFIXES = (".toml", ".json")


def _iso_time(record: logging.LogRecord) -> str:
    """The record's time in local time with its offset, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(record.created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """weft's text lines, with ISO 8601 times that carry their zone offset."""

    def __init__(self, fmt: str = _TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 with the zone, ignoring ``datefmt``."""
        return _iso_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the record's fields and every ``extra`` it carries."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (no newline inside it, whatever the message holds)."""
        out: dict[str, Any] = {
            "time": _iso_time(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        # JSON escapes the C0 controls; DEL and the C1 controls (U+009B is a
        # one-character terminal escape) and the Unicode line breaks are escaped too.
        return _NOT_JSON_SAFE.sub(_u_escape, json.dumps(out, default=str, ensure_ascii=False))


_NOT_JSON_SAFE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _u_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def setup_logging(level: str, log_format: str = "text", config_file: str | None = None) -> None:
    """Configure logging for ``weft serve``; ConfigError if ``config_file`` is unusable.

    Without ``config_file``, one stderr handler on the root logger at ``level``,
    unless the root logger already has handlers (an embedding program's, pytest's):
    then only the ``weft`` logger's level is set.
    """
    if config_file is not None:
        _apply_file(Path(config_file))
        return
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("weft").setLevel(level)


def _apply_file(path: Path) -> None:
    import logging.config  # imports socketserver and more: only when a file is given

    source = f"log config {path}"
    try:
        if path.suffix.lower() in _DICT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            json_file = path.suffix.lower() == ".json"
            document = json.loads(text) if json_file else toml_loads(text)
            if not isinstance(document, dict):
                raise ValueError("expected a dictConfig table at the top level")
            document.setdefault("version", 1)
            document.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(document)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except ConfigError:
        raise
    except Exception as exc:  # json, TOML, configparser and dictConfig errors alike
        # dictConfig says which part failed, and chains the reason.
        why = f"{exc}: {exc.__cause__}" if exc.__cause__ is not None else str(exc)
        raise ConfigError(
            f"cannot use it: {type(exc).__name__}: {why}; see the logging.config docs"
            " (dictConfig for .toml and .json, fileConfig for INI)",
            source=source,
            key="log_config",
        ) from None
