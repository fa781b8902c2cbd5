"""weft's pluggy hook specifications: the whole contract between weft and its plugins.

Plugins register a module of hook implementations under the ``weft`` entry-point
group. Hooks are named ``weft_<what>``; implement any subset of them. The core
calls hooks only through the typed wrappers in ``weft_core._registry.Hooks``.

Manager plugins implement :func:`weft_managers`. Plugins that are not managers
(metrics, logging, access control) implement the lifecycle hooks below; a hook's
exception is logged and never stops the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._connection import ConnectionInfo
    from ._server import Server
    from ._spec import ManagerSpec

__all__ = [
    "hookimpl",
    "hookspec",
    "weft_connection_closed",
    "weft_connection_opened",
    "weft_connection_refused",
    "weft_handler_error",
    "weft_managers",
    "weft_server_started",
    "weft_server_stopped",
]

PROJECT = "weft"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate hook implementations with this (also exported as ``weft_core.hookimpl``).
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration ------------------------------------------------------------


@hookspec
def weft_managers() -> Iterable[ManagerSpec]:
    """Return the task managers this plugin provides.

    Example, in ``my_plugin.py`` registered under the ``weft`` entry-point group::

        from weft_core import ManagerSpec, hookimpl

        @hookimpl
        def weft_managers():
            yield ManagerSpec(
                name="pool",
                factory=PoolManager,          # PoolManager(limit=None, workers=16)
                description="a fixed pool of worker threads fed by a queue",
                handler_kind="sync",
            )
    """
    raise NotImplementedError  # a specification: pluggy never calls this body


# -- server lifecycle ----------------------------------------------------------


@hookspec
def weft_server_started(server: Server, addresses: list[str]) -> None:
    """Called once when ``server`` listens, with every bound address (``HOST:PORT``).

    Example, a plugin that announces where the server listens::

        import logging
        from weft_core import hookimpl

        @hookimpl
        def weft_server_started(server, addresses):
            logging.getLogger("announce").info("up on %s", ", ".join(addresses))
    """


@hookspec
def weft_server_stopped(server: Server, stats: dict[str, Any]) -> None:
    """Called once when ``server`` has completely stopped, with its final ``stats()``.

    Example, a plugin that reports totals::

        from weft_core import hookimpl

        @hookimpl
        def weft_server_stopped(server, stats):
            print(f"served {stats['accepted']} connections")
    """


@hookspec
def weft_connection_refused(server: Server, peer: str, reason: str) -> None:
    """Called when a connection is closed unserved: the limit, the manager full, a bad PROXY header.

    ``peer`` is ``HOST:PORT`` of the client, ``reason`` a short word
    (``"full"``, ``"manager-full"``, ``"proxy"``, ``"untrusted"``, ``"tls"``). Called in the
    acceptor's or the connection's task: keep it quick. Example, a refusal counter::

        import collections
        from weft_core import hookimpl

        REFUSED = collections.Counter()

        @hookimpl
        def weft_connection_refused(server, peer, reason):
            REFUSED[reason] += 1
    """


@hookspec
def weft_handler_error(
    server: Server, connection: ConnectionInfo, exception: BaseException
) -> None:
    """Called when a handler raises, with the connection's metadata and the handler's own exception.

    It runs in addition to the server's ``exception_handler``. Example, an error
    tracker::

        from weft_core import hookimpl

        ERRORS = []

        @hookimpl
        def weft_handler_error(server, connection, exception):
            ERRORS.append((connection.peer, repr(exception)))
    """


# -- connections ---------------------------------------------------------------


@hookspec
def weft_connection_opened(server: Server, connection: ConnectionInfo) -> None:
    """Called when a connection's task begins, before any PROXY header or TLS handshake.

    ``connection`` is its ``ConnectionInfo`` (``peer``, ``local``, ``task_id``; the
    PROXY and TLS fields are filled in later). Called in the connection's own task,
    for every connection, so keep it quick; the server only calls it when some
    plugin implements it. Example, a gauge of open connections::

        from weft_core import hookimpl

        OPEN = set()

        @hookimpl
        def weft_connection_opened(server, connection):
            OPEN.add(connection)  # task ids repeat across servers
    """


@hookspec
def weft_connection_closed(
    server: Server,
    connection: ConnectionInfo,
    duration: float,
    bytes_in: int | None,
    bytes_out: int | None,
    how: str,
) -> None:
    """Called when a connection has ended, once for every connection that was opened.

    ``duration`` is in seconds since it was opened; ``bytes_in`` and ``bytes_out``
    are the kernel's counts (Linux ``TCP_INFO``: received, and sent and acknowledged),
    None where it cannot tell (Unix sockets, other systems). ``how`` is one of
    ``"closed"`` (the handler returned), ``"error"`` (it raised),
    ``"idle_timeout"``, ``"stopped"`` (ended by ``stop()`` or
    ``close_connection()``), ``"detached"``, ``"tls_error"``, ``"proxy_error"``.
    Called in the connection's task just before its socket is closed. Example, bytes
    served per peer::

        import collections
        from weft_core import hookimpl

        SENT = collections.Counter()

        @hookimpl
        def weft_connection_closed(server, connection, duration, bytes_in, bytes_out, how):
            SENT[connection.peer_str] += bytes_out or 0
    """
