"""``weft ctl COMMAND``: the client side of the control socket, for people and scripts.

Results print as JSON (``status``, ``connections``) or as text (acknowledgements,
``stacks``), so ``weft ctl status | jq .stats`` works. Exit status 0 on success, 1
when the server cannot be reached or refuses, 2 for a command line that makes no
sense.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from ._ctl import (
    ControlError,
    check_path_length,
    connect,
    default_path,
    exchange,
    request,
    timeout_seconds,
)
from ._ctl_commands import CLOSE_MAX, CLOSE_TIMEOUT, close_wait
from ._errors import ConfigError
from ._exits import EXIT_RUNTIME, EXIT_USAGE, stdout_gone

__all__ = ["add_parser", "resolve_path"]

#: How long ``weft ctl`` waits for the server's answer, all reads together (for
#: ``console``: for the server to open it); then it gives up with exit 1. ``close``
#: waits longer when its SECONDS ask for it (:func:`answer_wait`).
ANSWER_WAIT = 30.0
#: What ``weft ctl close`` waits beyond the supervisor's own wait for the worker
#: (:func:`~._ctl_commands.close_wait`): the supervisor's look for the connection
#: (each worker asked, WORKER_TIMEOUT) and the answer's way back.
CLOSE_WAIT_MARGIN = 10.0

USAGE = """\
commands:
  status                     stats of the server (per worker, and totals)
  connections                every open connection: peer, age, bytes in and out
  pause | resume             stop or start accepting; the listener stays bound
  set max-connections N      change the limit at once (turning it off needs a restart)
  close [PID:]TASK_ID [SECONDS]  stop one connection (ids from 'connections'; the
                             worker's PID too under --workers)
  drain [SECONDS]            stop accepting; exit when idle or after SECONDS
  reload                     graceful reload (as SIGHUP)
  workers +N | -N            add or remove worker processes
  stacks                     every thread's, greenlet's and task's stack
  console                    a Python REPL in the server (if configured)
"""


def add_parser(commands: Any) -> None:
    """Add ``weft ctl`` to the ``weft`` command's subparsers."""
    ctl = commands.add_parser(
        "ctl",
        help="steer a running `weft serve` through its control socket",
        description="Talk to a running `weft serve` over its Unix control socket.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.set_defaults(command=_ctl)
    ctl.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the control socket (default: control_socket from config, else {default_path()})",
    )
    ctl.add_argument("-c", "--config", metavar="FILE", help="read control_socket from FILE")
    # Both optional to argparse, which would otherwise call ARG required too: a
    # missing command is said by _ctl, in its own words.
    ctl.add_argument("name", nargs="?", metavar="COMMAND")
    ctl.add_argument("args", nargs="*", metavar="ARG")


def resolve_path(socket_flag: str | None, config_file: str | None) -> str | None:
    """The control socket's path: the flag, else config and WEFT_CONTROL_SOCKET, else default.

    None when config turned the control socket off. ValueError for a path no Unix
    socket can have (empty, or too long): a wrong command line, as ``weft serve``
    says of the same path.
    """
    if socket_flag is not None:
        if not socket_flag:
            raise ValueError("--socket takes the control socket's path, got an empty one")
        path: str | None = socket_flag
    else:
        from ._config import load_config

        config = load_config({}, config_file=config_file, flag_names={})
        path = config.control_socket
    if path is not None:
        try:
            check_path_length(path)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
    return path


#: Every command, as USAGE lists them: a typo is a wrong command line (exit 2), said
#: here rather than by the server (or by "no weft serve is running").
COMMANDS = (
    "status", "connections", "pause", "resume", "set", "close", "drain", "reload",
    "workers", "stacks", "console",
)  # fmt: skip


def _parse(name: str | None, args: list[str]) -> tuple[str, dict[str, Any]]:
    """The request for ``weft ctl NAME ARGS...``; ValueError with what is wrong."""
    if name is None:
        raise ValueError(f"a command is required: {', '.join(COMMANDS)} (weft ctl --help)")
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    if name == "set":
        if len(args) != 2:
            raise ValueError("usage: weft ctl set max-connections N")
        if args[0] not in ("max-connections", "max_connections"):
            raise ValueError(f"cannot set {args[0]!r}; settable while running: max-connections")
        number = args[1].isascii() and args[1].isdigit() and int(args[1]) >= 1
        if not number and args[1].strip().lower() not in ("none", "unlimited"):
            raise ValueError(
                f"max-connections takes a whole number, 1 or more, got {args[1]!r}"
                " (a limit is turned on or off only by a restart)"
            )
        return name, {"name": args[0], "value": args[1]}
    if name == "workers":
        sign, digits = (args[0][:1], args[0][1:]) if len(args) == 1 else ("", "")
        if (
            sign not in ("+", "-")
            or not (digits.isascii() and digits.isdigit())
            or not int(digits)
        ):
            raise ValueError("usage: weft ctl workers +N | -N, N at least 1")
        return name, {"delta": int(args[0])}
    if name == "close":
        if not 1 <= len(args) <= 2:
            raise ValueError("usage: weft ctl close [PID:]TASK_ID [SECONDS]")
        worker, colon, task_id = args[0].rpartition(":")  # PID:TASK_ID under --workers
        request: dict[str, Any] = {"task_id": task_id}
        if not task_id or (colon and not (worker.isascii() and worker.isdigit())):
            raise ValueError(f"close takes TASK_ID or PID:TASK_ID, got {args[0]!r}")
        if worker:
            request["worker"] = int(worker)
        if len(args) == 2:
            request["timeout"] = _seconds(args[1], "close")
            if request["timeout"] > CLOSE_MAX:
                raise ValueError(
                    f"close's SECONDS are at most {CLOSE_MAX:g} (an hour), got {args[1]!r}"
                )
        return name, request
    if name == "drain":
        if len(args) > 1:
            raise ValueError("usage: weft ctl drain [SECONDS]")
        return name, {"timeout": _seconds(args[0], "drain")} if args else {}
    if args:
        raise ValueError(f"{name} takes no arguments")
    return name, {}


def _seconds(text: str, command: str) -> float:
    """SECONDS as given on the command line, checked as the server checks it."""
    try:
        value: object = float(text)
    except ValueError:
        value = text
    seconds = timeout_seconds(value, command)  # ControlError: a wrong command line
    assert seconds is not None
    return seconds


def answer_wait(name: str, args: dict[str, Any]) -> float:
    """How long ``weft ctl NAME`` waits for its answer.

    ``close ID SECONDS`` is answered once the connection has ended, which may take
    SECONDS and the interruption's grace: weft ctl gave up at 30 s, exit 1 and "no
    answer", while the close it asked for went on and was done.
    """
    if name != "close":
        return ANSWER_WAIT
    seconds = args.get("timeout")
    wait = close_wait(CLOSE_TIMEOUT if seconds is None else seconds) + CLOSE_WAIT_MARGIN
    return max(ANSWER_WAIT, wait)


def _ctl(ns: argparse.Namespace) -> int:
    try:
        name, args = _parse(ns.name, ns.args)
        path = resolve_path(ns.socket, ns.config)
    except ValueError as exc:
        print(f"weft ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"weft ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if path is None:
        print("weft ctl: the control socket is off in config (control_socket)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if name == "console":
            return _console(path)
        result = request(path, name, args, timeout=answer_wait(name, args))
    except ControlError as exc:
        print(f"weft ctl: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    text = (
        result.rstrip("\n")
        if isinstance(result, str)
        else json.dumps(result, indent=2, default=str)
    )
    return _print_answer(text)


def _print_answer(text: str) -> int:
    """Print the answer; a stdout that cannot take it (a full disk) is one line and exit 1."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # its reader went away (| head -1): quietly, as any Unix tool (_cli.main)
    except OSError as exc:
        stdout_gone()
        print(f"weft ctl: cannot write the answer: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def _console(path: str) -> int:
    """Relay stdin to the server's console and its output to stdout, until either ends."""
    began = time.monotonic()
    sock = connect(path, timeout=ANSWER_WAIT)
    with sock:
        _, early = exchange(sock, path, "console", None, ANSWER_WAIT, began)
        sock.settimeout(None)  # the console itself waits as long as its user types
        reader = sock.makefile("rb")
        out = sys.stdout.buffer
        out.write(early)  # the console's first output, come with its answer
        out.flush()

        def pump() -> None:
            # Plain reads of the descriptor, not sys.stdin's buffer: the server may end
            # the console while this thread waits for input, and the interpreter then
            # exits with it still waiting, which a buffered reader's lock turns into
            # a fatal error (SIGABRT) at shutdown.
            try:
                fd = sys.stdin.fileno()
                while data := os.read(fd, 65536):
                    sock.sendall(data)
            except (OSError, ValueError):  # ValueError: no descriptor (a closed stdin)
                return
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # the console sees the end of its input

        threading.Thread(target=pump, name="weft ctl console input", daemon=True).start()
        # The server may end the console with input of ours unread (a relay that
        # could not reach its worker says why, and closes): a reset, after its words.
        with contextlib.suppress(ConnectionResetError):
            while chunk := reader.read1(65536):
                out.write(chunk)
                out.flush()
    return 0
