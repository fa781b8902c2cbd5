"""The conformance suite, run against every installed manager."""

from __future__ import annotations

from weft_core import available_managers
from weft_core.testing import ManagerTests

#: What our own managers declare: threads cannot interrupt a thread that ignores its flag.
CAPABILITIES = {"threads": {"preemptive_stop": False}, "pool": {"preemptive_stop": False}}

for _name in available_managers():
    _cls = type(
        f"TestConformance_{_name}",
        (ManagerTests,),
        {"manager_name": _name, **CAPABILITIES.get(_name, {})},
    )
    globals()[_cls.__name__] = _cls
