"""weft's conformance suite for task managers, shipped with weft-core.

A manager author runs the whole suite against their manager with one class::

    # test_conformance.py
    from weft_core.testing import ManagerTests

    class TestPoolManager(ManagerTests):
        manager_name = "pool"        # the name your plugin registers

or from the shell: ``weft conformance pool``. What the suite needs to know about
the manager (capabilities, its adapter, how to read a task's name) comes from the
plugin's ``ManagerSpec``; a class attribute of the same name overrides it.
Importing this package adds no fixtures to anybody's pytest run; only subclasses
of ManagerTests use them. It needs pytest (``pip install weft-core[testing]``).
"""

from __future__ import annotations

try:
    import pytest
except ImportError as exc:  # said in one line, with what to install
    raise ImportError(
        "weft_core.testing (the conformance suite) runs on pytest: "
        "pip install 'weft-core[testing]'"
    ) from exc

# Before the suite's modules are imported: pytest rewrites their asserts, so that a
# failure shows the values compared as well as the rule its message names. (Inside
# a pytest run only; elsewhere this does nothing.)
pytest.register_assert_rewrite(
    "weft_core.testing._adapters",
    "weft_core.testing._base",
    "weft_core.testing._bodies",
    "weft_core.testing._suite_addresses",
    "weft_core.testing._suite_control",
    "weft_core.testing._suite_network",
    "weft_core.testing._suite_server",
    "weft_core.testing._suite_stop",
    "weft_core.testing._suite_submit",
    "weft_core.testing._suite_tasks",
    "weft_core.testing._support",
)

# The bounds the suite holds a manager to: stop_task returns at most INTERRUPT_GRACE
# after its timeout, and Server.stop(timeout) at most STOP_GRACE after its own.
from .._engine import STOP_GRACE  # noqa: E402  (after the rewrite registration, on purpose)
from .._tasks import INTERRUPT_GRACE  # noqa: E402
from ._adapters import (  # noqa: E402
    AsyncAdapter,
    Body,
    Recv,
    Send,
    Sleep,
    SyncAdapter,
    default_adapter,
)
from ._suite_addresses import AddressTests  # noqa: E402
from ._suite_control import ControlTests  # noqa: E402
from ._suite_network import NetworkTests  # noqa: E402
from ._suite_server import ServerTests  # noqa: E402
from ._suite_stop import StopTests  # noqa: E402
from ._suite_submit import SubmitTests  # noqa: E402
from ._suite_tasks import TaskManagerTests  # noqa: E402
from ._support import WAIT, wait_until  # noqa: E402

__all__ = [
    "INTERRUPT_GRACE",
    "STOP_GRACE",
    "WAIT",
    "AsyncAdapter",
    "Body",
    "ManagerTests",
    "Recv",
    "Send",
    "Sleep",
    "SyncAdapter",
    "default_adapter",
    "wait_until",
]


# pytest collects a class's inherited tests base by base in reverse MRO order: the last
# base listed here runs first. So the protocol's own rules (add_task, stop_task, the
# runtime) come first, and a failure of theirs is the first a manager's author reads
# (and the one ``-x`` stops at), before the serving rules that rest on them.
class ManagerTests(
    SubmitTests,
    ControlTests,
    StopTests,
    AddressTests,
    NetworkTests,
    ServerTests,
    TaskManagerTests,
):
    """Every conformance test; subclass it and set ``manager_name``.

    Capabilities and settings (class attributes, each None by default, meaning "as
    the ManagerSpec declares"): ``preemptive_stop``, ``supports_limit``,
    ``names_tasks``, ``adapter_class``, ``manager_options``; and the method
    ``current_task_name()``. See ``weft_core.Conformance``.
    """
