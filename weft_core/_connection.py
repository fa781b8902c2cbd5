"""Per-connection metadata: ``current_connection()`` and ``detach()``.

The connection object a handler receives is native to its manager (a socket, a
gevent socket, a ``trio.SocketStream``); what that object cannot carry lives in a
:class:`ConnectionInfo` published through a context variable for the duration of
the handler.
"""

from __future__ import annotations

import contextvars
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ._logsafe import escape_for_log
from ._tasks import TaskState, current_task

__all__ = ["ConnectionInfo", "current_connection", "detach", "format_address"]


def format_address(address: Any) -> str:
    """``HOST:PORT`` for an address tuple, IPv6 hosts in brackets; ``unix:PATH`` for a path.

    For logs and display: a Unix client chooses its own path or abstract name, so
    every part but the frame is passed through :func:`escape_for_log` and the result
    is always one line of printable ASCII, whatever the peer bound to.
    """
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = escape_for_log(address[0]), address[1]
        if type(port) is not int:  # a port number's digits need no escaping
            port = escape_for_log(port)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, bytes | bytearray):
        # Linux gives an abstract name as bytes; decoded as Python decodes paths.
        address = bytes(address).decode(errors="surrogateescape")
    if isinstance(address, str) and address.startswith("\0"):
        return f"unix:@{escape_for_log(address[1:])}"  # Linux's abstract namespace
    return f"unix:{escape_for_log(address)}" if address else "unix:(unnamed)"


@dataclass(slots=True, repr=False, eq=False)
class ConnectionInfo:
    """What weft knows about the connection a handler is serving.

    ``peer`` is the client's address (the one a trusted PROXY header announced,
    when there is one) and ``proxy_peer`` the balancer's own; ``local`` is the
    address the client connected to. TLS fields are None on plain connections.
    Compared by identity: each connection has one.
    """

    peer: Any
    local: Any
    task_id: Hashable | None = None
    proxy_peer: Any = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_peer_certificate: dict[str, Any] | None = None
    detached: bool = False
    #: The object handed to the handler; ``detach()`` compares against it.
    conn: Any = None

    def __repr__(self) -> str:
        shown = ("peer", "local", "task_id", "proxy_peer", "tls_version", "tls_cipher")
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"ConnectionInfo({fields})"

    @property
    def peer_str(self) -> str:
        """The peer as ``HOST:PORT`` (or ``unix:PATH``), escaped for logs: see ``format_address``."""
        return format_address(self.peer)


_current: contextvars.ContextVar[ConnectionInfo | None] = contextvars.ContextVar(
    "weft_current_connection", default=None
)


def publish(info: ConnectionInfo, state: TaskState | None) -> contextvars.Token[Any] | None:
    """Make ``info`` what ``current_connection()`` returns in the calling task.

    On the task's state when it has one (an attribute costs nothing; a context
    variable set per connection costs a node and a token), else in a context
    variable. Undo with :func:`unpublish`.
    """
    if state is not None:
        state.connection = info
        return None
    return _current.set(info)


def unpublish(state: TaskState | None, token: contextvars.Token[Any] | None) -> None:
    """Undo :func:`publish`."""
    if token is not None:
        _current.reset(token)
    elif state is not None:
        state.connection = None


def _lookup() -> ConnectionInfo | None:
    state = current_task()
    if state is not None and state.connection is not None:
        return state.connection  # type: ignore[no-any-return]
    return _current.get()


def current_connection() -> ConnectionInfo:
    """The metadata of the connection the calling handler serves.

    Raises LookupError outside a handler.
    """
    info = _lookup()
    if info is None:
        raise LookupError("current_connection() was called outside a weft connection handler")
    return info


def detach(conn: Any) -> None:
    """Take ``conn`` away from the server: it is not closed when the handler returns.

    The caller then owns it and must close it (Sagittarius' socket detaching). Only
    the handler serving ``conn`` may detach it.
    """
    info = _lookup()
    if info is None or info.conn is not conn:
        raise ValueError(
            "detach() takes the connection the calling handler was given, from inside that handler"
        )
    info.detached = True
