"""The access log: one line per connection on the logger ``weft.access``.

Written when the ``access_log`` setting is on, as each connection ends, at INFO::

    127.0.0.1:50312 closed 0.012s in=18 out=4096

The line's fields are also on the record as attributes (``extra``): ``peer``,
``duration`` (seconds, float), ``bytes_in`` and ``bytes_out`` (int, or None where
the kernel cannot tell, shown ``-``), and ``how`` (see the ``weft_connection_closed``
hook), so that a JSON formatter emits them as fields of their own. The peer is
escaped (``format_address``): a Unix client's path cannot break the line.
"""

from __future__ import annotations

import logging

__all__ = ["ACCESS_LOGGER", "log_access"]

#: The logger access lines go to; route or silence it with logging's own config.
ACCESS_LOGGER = "weft.access"

log = logging.getLogger(ACCESS_LOGGER)


def log_access(
    peer: str, duration: float, bytes_in: int | None, bytes_out: int | None, how: str
) -> None:
    """Log one connection's line; ``peer`` must already be escaped (``peer_str``)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "%s %s %.3fs in=%s out=%s",
        peer,
        how,
        duration,
        "-" if bytes_in is None else bytes_in,
        "-" if bytes_out is None else bytes_out,
        extra={
            "peer": peer,
            "duration": duration,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "how": how,
        },
    )
