"""The metrics: what is counted, under which names and labels.

Every metric carries the labels ``manager`` (the server's manager) and ``address``
(the addresses it listens on, comma-separated): one set per server, removed when
it stops, so the cardinality is bounded by the servers a process runs at once.
Never the peer. ``how`` and ``reason`` take the few words weft's hooks define.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import Counter as Tally
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

#: The ``how`` of ``weft_connection_closed`` and the ``reason`` of
#: ``weft_connection_refused``, as weft_core.hookspecs lists them: each series is
#: bound when the server starts, so it is scraped as 0 before it first counts (an
#: alert on ``rate(weft_connections_refused_total[5m])`` has a series to read).
HOWS = ("closed", "error", "idle_timeout", "stopped", "detached", "tls_error", "proxy_error")
REASONS = ("full", "manager-full", "proxy", "untrusted", "tls")


class ServerMetrics:
    """One server's labelled metrics, bound once so a connection's hook only counts."""

    def __init__(self, metrics: Metrics, manager: str, address: str) -> None:
        self._metrics = metrics
        self._labels = (manager, address)
        #: True from the server's start (Metrics.of) to its stop (Metrics.release).
        self.running = False
        self.opened = metrics.opened.labels(manager, address)
        self.open = metrics.open.labels(manager, address)
        self.received = metrics.received.labels(manager, address)
        self.sent = metrics.sent.labels(manager, address)
        self.duration = metrics.duration.labels(manager, address)
        self.errors = metrics.errors.labels(manager, address)
        self._closed = {how: metrics.closed.labels(manager, address, how) for how in HOWS}
        self._refused = {why: metrics.refused.labels(manager, address, why) for why in REASONS}

    @property
    def labels(self) -> tuple[str, str]:
        """``(manager, address)``: the labels every series of this server carries."""
        return self._labels

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
    There a stopped server's series cannot be removed (prometheus-client's
    multiprocess mode does not implement it); a worker's server keeps its address.
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
        #: How many running servers carry each (manager, address): at 0, removed.
        self._running: Tally[tuple[str, str]] = Tally()
        self._removable = registry is not None and not _multiprocess_environment()

    def of(self, server: Server) -> ServerMetrics:
        """``server``'s labelled metrics, counting it as running from its first call in a run.

        Labels are read then (its start, or an event before the started hook), afresh
        at each run: it may listen elsewhere than at its last. After its stop it gets
        the stopped run's, whose children count unseen (a task left behind ending)
        rather than make its series anew.
        """
        found = self._servers.get(server)
        if found is not None and (found.running or not server.running):
            return found
        with self._lock:
            found = self._servers.get(server)
            if found is None or (not found.running and server.running):
                found = ServerMetrics(self, server.manager_name, ",".join(server.addresses))
                found.running = True
                self._servers[server] = found
                self._running[found.labels] += 1
        return found

    def release(self, server: Server) -> None:
        """Count ``server`` as stopped; remove its series if no running server shares them."""
        with self._lock:
            found = self._servers.get(server)
            if found is None or not found.running:
                return
            found.running = False
            self._running[found.labels] -= 1
            if self._running[found.labels] > 0:
                return
            del self._running[found.labels]
            if self._removable:
                self._remove(*found.labels)

    def _remove(self, manager: str, address: str) -> None:
        """Remove every series labelled ``manager`` and ``address``, whatever its how or reason."""
        for metric in (self.opened, self.open, self.received, self.sent, self.errors):
            metric.remove(manager, address)
        self.duration.remove(manager, address)
        for metric in (self.closed, self.refused):
            for word in _words(metric, manager, address):
                metric.remove(manager, address, word)


def _words(metric: Counter, manager: str, address: str) -> set[str]:
    """The third label's values of ``metric``'s series labelled ``manager`` and ``address``."""
    found: set[str] = set()
    for family in metric.collect():
        for sample in family.samples:
            labels = sample.labels
            if labels.get("manager") == manager and labels.get("address") == address:
                found.update(v for k, v in labels.items() if k not in _LABELS)
    return found


def _multiprocess_environment() -> bool:
    """True if prometheus-client writes to files (it then cannot remove series)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
