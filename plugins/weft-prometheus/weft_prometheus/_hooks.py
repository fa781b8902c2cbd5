"""The hook implementations, and the process-wide state they count into.

Imported only when ``WEFT_PROMETHEUS_ADDRESS`` is set (see ``_plugin``). The metrics
are made at the first event in the process; the scrape endpoint listens while at
least one server of the process runs.

One process: the metrics sit in a registry of their own. A worker of
``weft serve --workers N``: prometheus-client's multiprocess mode, in a directory
shared by the workers of its supervisor, and every worker binds the metrics address
with ``SO_REUSEPORT``; whichever answers a scrape reads every worker's files, so
each scrape reports the sum over all workers.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import logging
import os
import socket
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from weft_core import hookimpl

from ._address import ADDRESS_ENV, configured_address, parse_address
from ._exporter import Exporter
from ._metrics import Metrics, ServerMetrics
from ._process import forget_dead_workers, shared_directory, supervisor_pid

if TYPE_CHECKING:
    from weft_core import ConnectionInfo, Server

__all__ = [
    "weft_connection_closed",
    "weft_connection_opened",
    "weft_connection_refused",
    "weft_handler_error",
    "weft_server_started",
    "weft_server_stopped",
]

log = logging.getLogger("weft_prometheus")

#: The variable prometheus-client's multiprocess mode reads its directory from.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Process:
    """What this process shares between its servers: the metrics and the endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.directory: Path | None = None
        supervisor = supervisor_pid()
        if supervisor is None:
            self.metrics = Metrics(self.registry)
        else:
            self.directory = _enter_multiprocess(supervisor)
            self.metrics = Metrics(None)  # written to the directory, read by the collector
            _LiveCollector(self.registry, self.directory)
        self.exporter: Exporter | None = None
        #: The servers of this process that run: the endpoint listens while there are
        #: any, and lets go once none accepts any more (see Exporter's retired).
        self.servers: weakref.WeakSet[Server] = weakref.WeakSet()

    def serving(self) -> bool:
        """True while an endpoint is open, or claimed by a server's start and opening."""
        return self.exporter is not None and not self.exporter.closed

    def retired(self) -> bool:
        """True once every running server of this process has closed its listeners.

        Asked from the endpoint's thread, which copies the set under the hooks' lock
        (iterating it while a hook adds or discards raises "changed size during
        iteration") but never waits for it: under gevent's patching that thread is
        a greenlet of the hub, and the lock an OS lock. Taken, a server is starting
        or stopping: not retired yet, asked again at the next check.
        """
        if not _lock.acquire(blocking=False):
            return False
        try:
            servers = list(self.servers)
        finally:
            _lock.release()
        return bool(servers) and all(not server.sockets for server in servers)


def _enter_multiprocess(supervisor: int) -> Path:
    """Switch prometheus-client to multiprocess mode in the workers' shared directory.

    A ``PROMETHEUS_MULTIPROC_DIR`` set by the user wins (keeping it tidy is then
    theirs). The mode must be chosen before the first metric is made; if the
    application imported prometheus-client already, its value class is swapped.
    """
    from prometheus_client import multiprocess, values

    directory = Path(os.environ.get(_MULTIPROC_ENV) or shared_directory(supervisor))
    os.environ[_MULTIPROC_ENV] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _forget_dead_workers(directory)
    # A worker that ends cleanly takes its live gauges out of the sum; counters stay.
    atexit.register(multiprocess.mark_process_dead, os.getpid(), str(directory))
    return directory


def _forget_dead_workers(directory: Path) -> None:
    """:func:`forget_dead_workers`, saying which are gone."""
    for pid in forget_dead_workers(directory):
        log.info("weft-prometheus: worker %d is gone; its open connections no longer count", pid)


class _LiveCollector:
    """prometheus-client's multiprocess collector, after sweeping the workers that are gone.

    A worker killed outright cannot take its live gauges out of the sum, and a new
    worker's start sweeps them (``_enter_multiprocess``); but one killed while it
    drained after a reload has no successor, and its open connections counted for
    good. Each rendering (at most once a second) sweeps first.
    """

    def __init__(self, registry: CollectorRegistry, directory: Path) -> None:
        from prometheus_client import multiprocess

        self._directory = directory
        self._inner = multiprocess.MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
        registry.register(self)

    def collect(self) -> Iterable[Any]:
        """Sweep the live gauges of workers that are gone, then collect every file."""
        _forget_dead_workers(self._directory)
        return self._inner.collect()  # type: ignore[no-untyped-call,no-any-return]


_lock = threading.Lock()
_process: _Process | None = None


def _state() -> _Process:
    global _process
    if _process is None:
        with _lock:
            if _process is None:
                _process = _Process()
    return _process


def _of(server: Server) -> ServerMetrics:
    return _state().metrics.of(server)


@hookimpl
def weft_server_started(server: Server, addresses: list[str]) -> None:
    """Make the metrics if need be, and listen for scrapes while a server runs.

    The hooks' lock only guards the set of running servers and the choice of which
    server's start opens the endpoint. Binding (``getaddrinfo``), starting its
    thread and logging happen after it is released: under gevent's patching each
    may switch greenlets, and the lock, made before the patching, is an OS lock that
    a second server starting in the same hub would then wait on for ever, the hub
    with it.
    """
    state = _state()
    state.metrics.of(server)  # its series exist from now on, at 0, for rate() and alerts
    with _lock:
        state.servers.add(server)
        # None yet, or one that let go of the address once every server of the
        # process stopped accepting (a drain): a server starting now is served anew.
        if state.serving():
            return
        others = _addresses(state.servers)
    try:
        address = configured_address(os.environ)
    except ValueError as exc:  # changed since the plugin loaded
        log.error("weft-prometheus: %s; serving no metrics", exc)
        return
    if address is None:  # unset since the plugin loaded: count, serve nothing
        return
    label = f"{os.environ.get(ADDRESS_ENV, '').strip()} ({ADDRESS_ENV})"
    taken = _served_port(address[0], address[1], [*addresses, *others])
    if taken:
        # Bound beside the server's own listener (SO_REUSEPORT under --workers, a
        # more specific host than its wildcard), the endpoint would take the
        # server's clients and answer them with HTTP.
        log.error(
            "weft-prometheus: cannot serve metrics on %s: the server itself listens "
            "on %s; give the metrics another port; serving without them",
            label,
            taken,
        )
        return
    # Workers share the address (SO_REUSEPORT); one process holds it alone, and
    # workers it hands over to (a reload) bind it once it has stopped accepting.
    workers = state.directory is not None
    exporter = Exporter(
        state.registry,
        *address,
        reuse_port=workers,
        # A worker's siblings share the address and the sums: a draining worker (a
        # reload, a stop) answers as they do, until its server has stopped. One process
        # lets go once it stops accepting, for the workers it may hand over to.
        retired=(lambda: False) if workers else state.retired,
        claims=state.directory,
    )
    with _lock:
        if state.serving():
            return  # a server that started meanwhile opened it
        # Claimed: a server starting while this one binds leaves the endpoint to it.
        # A stop in between closes it, and an exporter closed before it opens lets
        # go of the socket it binds.
        state.exporter = exporter
    try:
        exporter.open()
    except OSError as exc:
        if workers and exc.errno == errno.EADDRINUSE:  # the process handing over?
            exporter.open_when_free(label)
            return
        with _lock:
            if state.exporter is exporter:
                state.exporter = None  # the next server to start tries again
        log.error(
            "weft-prometheus: cannot serve metrics on %s: %s; serving without them",
            label,
            exc.strerror or exc,
        )


def _addresses(servers: weakref.WeakSet[Server]) -> list[str]:
    """The addresses the running servers of this process listen on."""
    found: list[str] = []
    for server in list(servers):
        try:
            found.extend(server.addresses)
        except Exception:
            continue
    return found


def _served_port(host: str, port: int, addresses: list[str]) -> str | None:
    """The first of ``addresses`` (``HOST:PORT``; paths skipped) that ``host:port`` overlaps.

    The same port on a host that could be the same: the same address, a wildcard on
    either side, or a name that resolves to one of the other's. ``127.0.0.2:P`` beside
    a server on ``127.0.0.1:P`` is no overlap (it was refused, the port alone compared).
    """
    if port == 0:
        return None
    for address in addresses:
        try:
            other, other_port = parse_address(str(address))
        except ValueError:  # unix:PATH
            continue
        if other_port == port and _same_host(host, other):
            return str(address)
    return None


#: Hosts that listen on every address of their family (and a dual socket's on both).
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def _same_host(one: str, other: str) -> bool:
    """True unless ``one`` and ``other`` are surely different addresses (resolved)."""
    if one in _WILDCARDS or other in _WILDCARDS:
        return True
    try:
        return bool(_addresses_of(one) & _addresses_of(other))
    except OSError:  # cannot tell: the careful answer
        return True


def _addresses_of(host: str) -> set[str]:
    """The IP addresses ``host`` names, IPv4-mapped IPv6 ones written as IPv4.

    An address is read as it is; only a name is looked up (``localhost``: the hosts
    file), once, as a server starts.
    """
    try:
        texts = [host]
        ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        texts = [str(sockaddr[0]) for *_, sockaddr in infos]
    found = set()
    for text in texts:
        ip = ipaddress.ip_address(text.partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found.add(str(ip))
    return found


@hookimpl
def weft_server_stopped(server: Server, stats: dict[str, Any]) -> None:
    """Remove the server's series; stop listening once the process's last server has stopped.

    The series stay while a running server shares their labels (``manager`` and
    ``address``).
    """
    if server.running:  # late, behind a plugin's hook that blocked: a new run has begun
        return
    state = _state()
    state.metrics.release(server)
    with _lock:  # nothing that may switch greenlets under it (see weft_server_started)
        state.servers.discard(server)
        if state.servers or state.exporter is None:
            return
        exporter, state.exporter = state.exporter, None
    exporter.close()


@hookimpl
def weft_connection_opened(server: Server, connection: ConnectionInfo) -> None:
    """Count the connection as opened and open."""
    metrics = _of(server)
    metrics.opened.inc()
    metrics.open.inc()


@hookimpl
def weft_connection_closed(
    server: Server,
    connection: ConnectionInfo,
    duration: float,
    bytes_in: int | None,
    bytes_out: int | None,
    how: str,
) -> None:
    """Count the connection as closed (by ``how``), with its duration and bytes."""
    metrics = _of(server)
    metrics.duration.observe(duration)
    if bytes_in:
        metrics.received.inc(bytes_in)
    if bytes_out:
        metrics.sent.inc(bytes_out)
    # Last: a scrape that sees the connection closed sees its bytes and duration too.
    metrics.open.dec()
    metrics.closed(how).inc()


@hookimpl
def weft_connection_refused(server: Server, peer: str, reason: str) -> None:
    """Count a connection closed unserved, by ``reason`` (never by peer)."""
    _of(server).refused(reason).inc()


@hookimpl
def weft_handler_error(
    server: Server, connection: ConnectionInfo, exception: BaseException
) -> None:
    """Count a handler that raised."""
    _of(server).errors.inc()
