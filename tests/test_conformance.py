"""The conformance suite, run against every installed manager (one class each)."""

from __future__ import annotations

from weft_core import available_managers
from weft_core.testing import ManagerTests

for _name in available_managers():
    _cls = type(f"TestConformance_{_name}", (ManagerTests,), {"manager_name": _name})
    globals()[_cls.__name__] = _cls
