"""The entry point (``weft: prometheus``): the hooks, only when configured.

With ``WEFT_PROMETHEUS_ADDRESS`` unset (or empty) when weft loads its plugins, this
module holds no hook implementation: the server sees no plugin watching its
connections, makes no per-connection call, and prometheus-client is never
imported. A value that is not ``HOST:PORT`` is one error line, and no hooks; so is
a prometheus-client that cannot be imported (missing, or too old to have what the
hooks import), where the operator asked for metrics and heard nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ._address import ADDRESS_ENV, configured_address

log = logging.getLogger("weft_prometheus")


def _warn_unread(environ: Mapping[str, str]) -> None:
    """Warn of each WEFT_PROMETHEUS_* variable but the one this plugin reads.

    Its namespace, with one setting in it: a misspelt one (``..._ADRESS``) silently
    left the metrics off, weft's own warning for unknown WEFT_* names leaving a
    plugin's be.
    """
    for name in sorted(environ):
        if name.startswith("WEFT_PROMETHEUS_") and name != ADDRESS_ENV:
            log.warning(
                "weft-prometheus: %r is not read: the one setting is %s=HOST:PORT",
                name,
                ADDRESS_ENV,
            )


_warn_unread(os.environ)

try:
    _address = configured_address(os.environ)
except ValueError as exc:
    log.error("weft-prometheus: %s; collecting nothing", exc)
    _address = None

if _address is not None:
    try:
        from ._hooks import (  # noqa: F401 (pluggy finds them as this module's attributes)
            weft_connection_closed,
            weft_connection_opened,
            weft_connection_refused,
            weft_handler_error,
            weft_server_started,
            weft_server_stopped,
        )
    except ImportError as exc:
        log.error(
            "weft-prometheus: %s is set, but prometheus-client cannot be imported (%s); "
            "collecting nothing: pip install 'prometheus-client>=0.20'",
            ADDRESS_ENV,
            exc,
        )
