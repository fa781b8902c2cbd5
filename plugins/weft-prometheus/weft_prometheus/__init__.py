"""weft-prometheus: connection metrics of weft servers, exposed for Prometheus to scrape.

A plugin that registers no manager: it implements weft's connection hooks, counts
into prometheus-client metrics and serves them on ``WEFT_PROMETHEUS_ADDRESS``
(``HOST:PORT``). Unset, it registers no hook at all and costs nothing. Under
``weft serve --workers N`` every worker answers scrapes on that one address with the
sum over all of them.
"""

from __future__ import annotations

from ._address import ADDRESS_ENV, parse_address

__all__ = ["ADDRESS_ENV", "parse_address"]
