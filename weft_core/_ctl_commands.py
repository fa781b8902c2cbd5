"""What ``weft ctl`` commands do in a process that serves (one process, or a worker).

Each command takes the request's args and the asking :class:`~._ctl.Peer` and returns
something JSON can carry. Commands that change how the process runs as a whole
(``reload``, ``workers``) are the same as the signals an operator would send, so a
command and its signal can never disagree: ``reload`` is SIGHUP, ``workers +N`` is N
SIGTTINs. ``drain`` is a graceful stop with its own deadline, through the serve loop.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._ctl import Command, ControlError, Peer, format_stacks

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["connection_record", "server_commands"]

#: ``drain(timeout)``: stop accepting, let connections finish within ``timeout``
#: (None: the configured graceful timeout), then exit.
Drain = Callable[[float | None], None]


def connection_record(item: Any) -> dict[str, Any]:
    """One entry of ``Server.connections()`` as JSON can carry it."""
    info = getattr(item, "info", item)
    record: dict[str, Any] = {
        "task_id": str(getattr(item, "task_id", getattr(info, "task_id", None))),
        "peer": info.peer_str,
    }
    for name in ("age", "bytes_in", "bytes_out", "stop_requested"):
        if hasattr(item, name):
            record[name] = getattr(item, name)
    if getattr(info, "proxy_peer", None) is not None:
        record["proxy_peer"] = str(info.proxy_peer)
    if getattr(info, "tls_version", None):
        record["tls_version"] = info.tls_version
    return record


def server_commands(server: Server, drain: Drain) -> dict[str, Command]:
    """The command table of a process serving ``server``."""

    def status(args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "manager": server.manager_name,
            "addresses": server.addresses,
            "running": server.running,
            "paused": getattr(server, "paused", False),
            "max_connections": getattr(server, "max_connections", None),
            "stats": server.stats(),
        }

    def connections(args: Mapping[str, Any], peer: Peer) -> list[dict[str, Any]]:
        return [connection_record(item) for item in server.connections()]

    def pause(args: Mapping[str, Any], peer: Peer) -> str:
        server.pause_accepting()
        return "paused: the listener stays bound; new clients wait in its backlog"

    def resume(args: Mapping[str, Any], peer: Peer) -> str:
        server.resume_accepting()
        return "accepting"

    def set_(args: Mapping[str, Any], peer: Peer) -> str:
        name, value = args.get("name"), args.get("value")
        if name not in ("max-connections", "max_connections"):
            raise ControlError(f"cannot set {name!r}; settable while running: max-connections")
        if isinstance(value, str) and value.strip().lower() in ("none", "unlimited"):
            value = None
        elif isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ControlError(
                    f"max-connections takes a whole number or 'none', got {value!r}"
                ) from None
        try:
            server.max_connections = value
        except (ValueError, TypeError) as exc:
            raise ControlError(str(exc)) from None
        return f"max-connections {value}"

    def drain_(args: Mapping[str, Any], peer: Peer) -> str:
        timeout = args.get("timeout")
        if timeout is not None and not isinstance(timeout, int | float):
            raise ControlError(f"drain's timeout is a number of seconds, got {timeout!r}")
        drain(None if timeout is None else float(timeout))
        shown = "the graceful timeout" if timeout is None else f"{timeout:g}s"
        return f"draining: no new connections; exiting when idle or after {shown}"

    def reload(args: Mapping[str, Any], peer: Peer) -> str:
        os.kill(os.getpid(), signal.SIGHUP)
        return "reloading (as SIGHUP)"

    def workers(args: Mapping[str, Any], peer: Peer) -> str:
        delta = args.get("delta")
        if not isinstance(delta, int) or delta == 0:
            raise ControlError(f"workers takes +N or -N, got {delta!r}")
        sig = signal.SIGTTIN if delta > 0 else signal.SIGTTOU
        for _ in range(abs(delta)):
            os.kill(os.getpid(), sig)
            time.sleep(0.01)  # signals of one kind sent at once merge into one
        return f"workers {delta:+d} (as {abs(delta)} SIG{sig.name[3:]})"

    def stacks(args: Mapping[str, Any], peer: Peer) -> str:
        return format_stacks()

    return {
        "status": status,
        "connections": connections,
        "pause": pause,
        "resume": resume,
        "set": set_,
        "drain": drain_,
        "reload": reload,
        "workers": workers,
        "stacks": stacks,
    }
