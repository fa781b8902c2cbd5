"""The suite as collected by ``weft conformance NAME`` (``--weft-manager NAME``)."""

from __future__ import annotations

from . import ManagerTests


class TestConformance(ManagerTests):
    """Every conformance test, against the manager given with ``--weft-manager``."""
