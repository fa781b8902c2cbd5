"""``weft ctl console``: a Python REPL inside the running server (LispWorks' listener).

After the control socket answers ``console``, the connection carries plain text both
ways: source lines in, output and prompts out, until the client ends its input. The
REPL runs in the control request's own thread, beside the handlers, so a slow
expression holds that thread only. ``print`` and the values of expressions go to the
client; what code writes to ``sys.stdout`` itself still goes to the server's stdout.

It is off unless config sets ``console = true``, and it is reachable only through the
owner-only control socket: it is the server's own power, handed to its own user.

``exit()``, ``quit()`` and ``raise SystemExit`` end the console, never the server:
the console says so and the control socket logs its end. (``site``'s ``exit()``
closed the server's own ``sys.stdin`` first, and a ``SystemExit`` ended the request's
thread silently, the rest of the input dropped.)
"""

from __future__ import annotations

import builtins
import code
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, BinaryIO

__all__ = ["serve_console"]

BANNER = "weft console: `server` is the running Server; end with Ctrl-D.\n"
# A console line longer than this is not typed by a person.
MAX_LINE = 1024 * 1024

# sys.displayhook is process-wide, so while any console runs code it is _display,
# which shows a value to the console running in this thread or greenlet (a context
# variable: each has its own) and hands anything else to the hook it replaced.
# Consoles never wait for each other: one that held a lock across its code (a slow
# expression, a patched sleep) stalled the next, and under gevent's patching, where
# that lock (made before the patching) is an OS lock and each console a greenlet
# of the hub's thread, the next console's wait blocked the hub, and the server hung.
_current: ContextVar[_SocketConsole | None] = ContextVar("weft console", default=None)
_running = 0
_replaced: Callable[[object], object] = sys.__displayhook__
# Held only to count consoles and swap the hook: nothing under it switches greenlets.
_count_lock = threading.Lock()


def _display(value: object) -> None:
    console = _current.get()
    if console is None:
        _replaced(value)  # code of the application's, outside any console
    else:
        console._show(value)


def _enter() -> None:
    global _running, _replaced
    with _count_lock:
        if _running == 0 and sys.displayhook is not _display:
            _replaced = sys.displayhook
            sys.displayhook = _display
        _running += 1


def _leave() -> None:
    global _running
    with _count_lock:
        _running -= 1
        if _running == 0 and sys.displayhook is _display:
            sys.displayhook = _replaced


class _Quit:
    """``exit`` and ``quit`` in the console: end the console only.

    ``site``'s own close ``sys.stdin`` before they raise SystemExit: the server's.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Use {self.name}() or Ctrl-D (i.e. EOF) to end the console"

    def __call__(self, code: object = None) -> None:
        raise SystemExit(code)


class _SocketConsole(code.InteractiveConsole):
    """An InteractiveConsole whose output (errors, print, shown values) goes to a socket."""

    def __init__(self, conn: socket.socket, namespace: dict[str, Any]) -> None:
        self.conn = conn
        #: The SystemExit that ended the console (``exit()``, ``quit()``, raised).
        self.exited: SystemExit | None = None
        namespace.setdefault("print", self._print)
        namespace.setdefault("exit", _Quit("exit"))
        namespace.setdefault("quit", _Quit("quit"))
        super().__init__(namespace, filename="<weft console>")

    def write(self, data: str) -> None:
        self.conn.sendall(data.encode("utf-8", "backslashreplace"))

    def _print(self, *values: object, sep: str | None = " ", end: str | None = "\n",
               file: Any = None, flush: bool = False) -> None:  # fmt: skip
        if file is not None:  # print(..., file=f) keeps its meaning
            builtins.print(*values, sep=sep, end=end, file=file, flush=flush)
            return
        self.write((sep if sep is not None else " ").join(map(str, values)) + (end or ""))

    def _show(self, value: object) -> None:
        if value is not None:
            self.namespace["_"] = value
            self.write(repr(value) + "\n")

    def showtraceback(self) -> None:
        """Write the error's traceback to the client, whatever ``sys.excepthook`` is.

        ``code.InteractiveInterpreter`` hands it to a replaced ``sys.excepthook``
        instead (exceptiongroup's backport replaces it on Python 3.10, and so may the
        application), which writes to the server's stderr: the client saw nothing.
        """
        kind, value, tb = sys.exc_info()
        sys.last_type, sys.last_value, sys.last_traceback = kind, value, tb
        skip = tb.tb_next if tb is not None else None  # the console's own frame
        self.write("".join(traceback.format_exception(kind, value, skip)))

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        """Write the syntax error to the client, whatever ``sys.excepthook`` is."""
        kind, value, tb = sys.exc_info()
        sys.last_type, sys.last_value, sys.last_traceback = kind, value, tb
        self.write("".join(traceback.format_exception_only(kind, value)))

    def runcode(self, codeobj: Any) -> None:
        token = _current.set(self)
        _enter()
        try:
            super().runcode(codeobj)
        except SystemExit as exc:  # InteractiveInterpreter lets it through
            self.exited = exc
        finally:
            _leave()
            _current.reset(token)

    @property
    def namespace(self) -> dict[str, Any]:
        return self.locals  # always the dict we gave


def serve_console(conn: socket.socket, reader: BinaryIO, namespace: Mapping[str, Any]) -> str:
    """Run a REPL over ``conn`` (input from ``reader``) until the client's input ends.

    Or until its code raises SystemExit (``exit()``): the rest of the input is not
    run, and the client is told. Returns how it ended, for the log.
    """
    console = _SocketConsole(conn, {"__name__": "__console__", **namespace})
    console.write(BANNER)
    more = False
    while True:
        console.write("... " if more else ">>> ")
        line = reader.readline(MAX_LINE)
        if not line:
            console.write("\n")
            return "end of input"
        more = console.push(line.decode("utf-8", "replace").rstrip("\r\n"))
        if console.exited is not None:
            how = f"ended by SystemExit({_exit_code(console.exited)})"
            console.write(f"weft console: {how}; the server serves on\n")
            return how


def _exit_code(exc: SystemExit) -> str:
    return "" if exc.code is None else repr(exc.code)
