r"""Rendering text a peer controls so that it can go into a log line as it is.

A client chooses much of what weft logs about it: the path or abstract name its
Unix socket is bound to, the addresses a PROXY header announces, its TLS server
name and certificate subject, and bytes that end up in exception messages. Written
out raw, a newline in any of them forges a whole log line (``\n2026-12-03 ...
[INFO] weft: stopped``) and an ESC byte drives the terminal of whoever reads the
log. :func:`escape_for_log` is the one place that makes such text inert; every log
call that carries peer-controlled text passes it through here (``format_address``
does so for every address).

What this module does not do: decide what is peer-controlled. Text weft writes
itself (its own messages, configuration values, tracebacks' file names) is logged
as it is.
"""

from __future__ import annotations

import logging
import re
import traceback

__all__ = [
    "MESSAGE_LIMIT",
    "escape_for_log",
    "escape_message",
    "format_untrusted_exception",
    "json_safe",
    "log_untrusted_exception",
]

#: The most characters of one exception message (or note, or a SyntaxError's part)
#: that a log record carries; the rest is counted, not written. A handler's
#: ``ValueError(f"bad line {line!r}")`` over a client's 1 MiB line put the whole line,
#: escaped (up to four times its size), into one record, on every request.
MESSAGE_LIMIT = 2000


def _escapes() -> dict[int, str]:
    r"""The translation table: ASCII controls, DEL and backslash, and surrogate escapes.

    Backslash is escaped so that an escape in the output can only have come from
    here. ``\udc80``-``\udcff`` are how Python decodes undecodable bytes in file
    names (``surrogateescape``, used for Unix socket paths); they are shown as the
    byte they stand for.
    """
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
    table.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\"})
    table.update({0xDC00 + byte: f"\\x{byte:02x}" for byte in range(0x80, 0x100)})
    return table


_ESCAPES = _escapes()


def escape_for_log(value: object) -> str:
    r"""``value`` as text with nothing in it that can break or forge a log line.

    Printable ASCII is kept as it is; every control character, backslash, DEL and
    non-ASCII character is escaped as ``repr`` would (``\n``, ``\x1b``,
    ``\xe9``, ``\u2028``), without quotes. ``bytes`` are shown byte by byte
    (``b"\xff"`` as ``\xff``); anything else is ``str(value)`` escaped, so an
    exception may be passed as it is. The result is plain printable ASCII.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("latin-1")  # one character per byte, escaped below
    else:
        text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case (an IP address, a plain path): no copy
    # Non-ASCII characters the table leaves alone are escaped by backslashreplace,
    # which runs after the table has already doubled every backslash.
    return text.translate(_ESCAPES).encode("ascii", "backslashreplace").decode("ascii")


def log_untrusted_exception(
    log: logging.Logger, level: int, exc: BaseException, msg: str, *args: object
) -> None:
    """Log ``msg % args`` to ``log`` with ``exc``'s traceback, its messages escaped.

    The record keeps ``exc_info`` (a handler may inspect the exception); its
    ``exc_text``, which formatters print instead of formatting the traceback
    themselves, is :func:`format_untrusted_exception`'s.
    """
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(
        log.name, level, __file__, 0, msg, args, (type(exc), exc, exc.__traceback__)
    )
    record.exc_text = format_untrusted_exception(exc)
    log.handle(record)


def format_untrusted_exception(exc: BaseException) -> str:
    """``exc``'s traceback as logging would print it, with every message escaped.

    The frames (file names, source lines) are the program's own; the messages of the
    exception and of those it was caused by are not (nor a SyntaxError's text), so
    each goes through
    :func:`escape_for_log`: a newline in one cannot start a line.
    """
    formatted = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [formatted]
    while pending:
        each = pending.pop()
        if id(each) in seen:
            continue
        seen.add(id(each))
        each._str = escape_message(each._str)  # type: ignore[attr-defined]
        if issubclass(each.exc_type or type, SyntaxError):
            # A SyntaxError prints its own parts (the offending text, its message and
            # file name), and a handler's compile() or ast.literal_eval() of what a
            # client sent puts the client's bytes in all three.
            for part in ("text", "msg", "filename"):
                value = getattr(each, part, None)
                if isinstance(value, str):
                    setattr(each, part, escape_message(value))
        notes = getattr(each, "__notes__", None)
        if notes:
            setattr(each, "__notes__", [escape_message(note) for note in notes])  # noqa: B010
        pending.extend(
            t
            for t in (each.__cause__, each.__context__, *(getattr(each, "exceptions", None) or ()))
            if t is not None
        )
    return "".join(formatted.format()).rstrip("\n")


def escape_message(value: object) -> str:
    """:func:`escape_for_log` of an exception message, cut at ``MESSAGE_LIMIT`` characters.

    What is cut is counted in the line (``[N more characters not logged]``).
    """
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # an exception class of the handler's whose __str__ fails
        return f"<{type(value).__name__} whose str() failed>"
    if len(text) <= MESSAGE_LIMIT:
        return escape_for_log(text)
    cut = len(text) - MESSAGE_LIMIT
    return f"{escape_for_log(text[:MESSAGE_LIMIT])} [{cut} more characters not logged]"


#: What JSON leaves as it is and a terminal or a reader must not get raw: DEL and the
#: C1 controls (U+009B is a one-character terminal escape), the Unicode line breaks,
#: and every format character (Unicode's Cf: bidi marks, overrides and isolates, zero
#: widths, U+FEFF, tags), which reorder or hide what a reader sees.
_NOT_JSON_SAFE = re.compile(
    "[\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e007f]"
)


def json_safe(text: str) -> str:
    r"""JSON text (``json.dumps``, which escapes only C0) with those characters ``\u`` escaped."""
    return _NOT_JSON_SAFE.sub(_u_escape, text)


def _u_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"
