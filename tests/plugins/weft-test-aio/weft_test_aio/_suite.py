"""How the conformance suite talks over an AioStream; imported only by the suite."""

from __future__ import annotations

from typing import Any

from weft_core.testing import AsyncAdapter


class AioAdapter(AsyncAdapter):
    """Drives the suite's handlers over :class:`~weft_test_aio._manager.AioStream`."""

    async def recv(self, conn: Any, n: int) -> bytes:  # type: ignore[override]
        """Receive up to ``n`` bytes."""
        data: bytes = await conn.read(n)
        return data

    async def send(self, conn: Any, data: bytes) -> None:  # type: ignore[override]
        """Send all of ``data``."""
        await conn.write(data)
