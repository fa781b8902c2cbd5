"""weft's conformance suite, run against the ``pool`` manager."""

from weft_core.testing import ManagerTests


class TestPool(ManagerTests):
    manager_name = "pool"
    preemptive_stop = False  # a thread cannot be interrupted while it ignores its flag
