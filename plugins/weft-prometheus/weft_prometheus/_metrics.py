"""The metrics: what is counted, under which names and labels.

Every metric carries the labels ``manager`` (the server's manager) and ``address``
(the addresses it listens on, comma-separated): one set per server, so the
cardinality is bounded by the servers a process runs. Never the peer. ``how`` and
``reason`` take the few words weft's hooks define.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from weft_core import Server

__all__ = ["DURATION_BUCKETS", "Metrics", "ServerMetrics"]

#: Connection lifetimes, in seconds: from a quick request and reply (5 ms) to a
#: long-lived session (an hour); beyond it the +Inf bucket. The default buckets of
#: prometheus-client stop at 10 s, too short for connections.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
)  # fmt: skip

_LABELS = ("manager", "address")


class ServerMetrics:
    """One server's labelled metrics, bound once so a connection's hook only counts."""

    def __init__(self, metrics: Metrics, manager: str, address: str) -> None:
        self._metrics = metrics
        self._labels = (manager, address)
        self.opened = metrics.opened.labels(manager, address)
        self.open = metrics.open.labels(manager, address)
        self.received = metrics.received.labels(manager, address)
        self.sent = metrics.sent.labels(manager, address)
        self.duration = metrics.duration.labels(manager, address)
        self.errors = metrics.errors.labels(manager, address)
        self._closed: dict[str, Counter] = {}
        self._refused: dict[str, Counter] = {}

    def closed(self, how: str) -> Counter:
        """The closed-connections counter for ``how``."""
        counter = self._closed.get(how)
        if counter is None:
            counter = self._closed[how] = self._metrics.closed.labels(*self._labels, how)
        return counter

    def refused(self, reason: str) -> Counter:
        """The refused-connections counter for ``reason``."""
        counter = self._refused.get(reason)
        if counter is None:
            counter = self._refused[reason] = self._metrics.refused.labels(*self._labels, reason)
        return counter


class Metrics:
    """weft's connection metrics, registered in ``registry`` (None: in no registry).

    In multiprocess mode they are registered nowhere: prometheus-client writes them
    to the shared directory, and a ``MultiProcessCollector`` reads every worker's.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.opened = Counter(
            "weft_connections_opened",
            "Connections accepted and handed to a task.",
            _LABELS,
            registry=registry,
        )
        self.closed = Counter(
            "weft_connections_closed",
            "Connections that ended, by how: closed, error, idle_timeout, stopped,"
            " detached, tls_error, proxy_error.",
            (*_LABELS, "how"),
            registry=registry,
        )
        self.refused = Counter(
            "weft_connections_refused",
            "Connections closed unserved, by reason: full, manager-full, proxy, untrusted, tls.",
            (*_LABELS, "reason"),
            registry=registry,
        )
        self.errors = Counter(
            "weft_handler_errors",
            "Handler calls that raised.",
            _LABELS,
            registry=registry,
        )
        self.open = Gauge(
            "weft_connections_open",
            "Connections open now.",
            _LABELS,
            registry=registry,
            multiprocess_mode="livesum",  # summed over the workers that are alive
        )
        self.received = Counter(
            "weft_received_bytes",
            "Bytes received on connections that ended (the kernel's count).",
            _LABELS,
            registry=registry,
        )
        self.sent = Counter(
            "weft_sent_bytes",
            "Bytes sent and acknowledged on connections that ended (the kernel's count).",
            _LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "weft_connection_duration_seconds",
            "How long connections lasted, from their task's start to their end.",
            _LABELS,
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self._lock = threading.Lock()
        self._servers: weakref.WeakKeyDictionary[Server, ServerMetrics] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, server: Server) -> ServerMetrics:
        """``server``'s labelled metrics (labels read at its first event after a start)."""
        found = self._servers.get(server)
        if found is None:
            with self._lock:
                found = self._servers.get(server)
                if found is None:
                    address = ",".join(server.addresses)
                    found = ServerMetrics(self, server.manager_name, address)
                    self._servers[server] = found
        return found

    def forget(self, server: Server) -> None:
        """Read ``server``'s labels afresh at its next event (it may listen elsewhere now)."""
        with self._lock:
            self._servers.pop(server, None)
