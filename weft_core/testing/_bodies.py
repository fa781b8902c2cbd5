"""Handler bodies shared by the suites (and weft's own fault tests).

Written once as generators of :class:`~weft_core.testing.Recv`,
:class:`~weft_core.testing.Send` and :class:`~weft_core.testing.Sleep`; an adapter
turns each into a handler of the manager's kind.
"""

from __future__ import annotations

from ._adapters import Body, Recv, Send, Sleep


def echo(greeting: bytes = b"") -> Body:
    """Send ``greeting``, then echo until end of input (or an idle timeout's error)."""
    if greeting:
        yield Send(greeting)
    while True:
        data = yield Recv()
        if not data:
            return
        yield Send(data)


def stubborn() -> Body:
    """Ignore the shutdown flag and end of input: write a byte every 20 ms forever."""
    yield Send(b"<")
    while True:
        yield Sleep(0.02)
        yield Send(b".")
