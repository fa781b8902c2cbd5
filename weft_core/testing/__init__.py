"""weft's conformance suite for task managers, shipped with weft-core.

A manager author runs the whole suite against their manager with one class::

    # test_conformance.py
    from weft_core.testing import ManagerTests

    class TestPoolManager(ManagerTests):
        manager_name = "pool"        # the name your plugin registers
        preemptive_stop = False      # capabilities your manager lacks

or from the shell: ``weft conformance pool``. Importing this package adds no
fixtures to anybody's pytest run; only subclasses of ManagerTests use them.
"""

from __future__ import annotations

from ._adapters import AsyncAdapter, Body, Recv, Send, Sleep, SyncAdapter, default_adapter
from ._suite_addresses import AddressTests
from ._suite_network import NetworkTests
from ._suite_server import ServerTests
from ._suite_stop import StopTests
from ._suite_tasks import TaskManagerTests

__all__ = [
    "AsyncAdapter",
    "Body",
    "ManagerTests",
    "Recv",
    "Send",
    "Sleep",
    "SyncAdapter",
    "default_adapter",
]


class ManagerTests(TaskManagerTests, ServerTests, StopTests, NetworkTests, AddressTests):
    """Every conformance test; subclass it and set ``manager_name``.

    Capabilities (class attributes): ``preemptive_stop``, ``supports_limit``,
    ``adapter_class``, ``manager_options``; see :class:`~weft_core.testing._base.ManagerTestBase`.
    """
