"""Where metrics are served: ``WEFT_PROMETHEUS_ADDRESS`` and its parsing."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ADDRESS_ENV", "configured_address", "parse_address"]

#: The one setting: ``HOST:PORT`` to serve ``/metrics`` on. Unset or empty: the
#: plugin implements no hook, so installing it changes nothing until configured.
ADDRESS_ENV = "WEFT_PROMETHEUS_ADDRESS"


def parse_address(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` (``[::1]:9100`` for IPv6).

    Raises ValueError naming the text, what was expected and an example.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: ambiguous without brackets
    # isascii(): str.isdigit() is also true of '²' and other digits int() refuses.
    digits = port_text.isascii() and port_text.isdigit()
    if not sep or not host or not digits or int(port_text) > 65535:
        raise ValueError(
            f"{ADDRESS_ENV}={text!r} is not HOST:PORT; expected e.g. 127.0.0.1:9100 or [::1]:9100"
        )
    return host, int(port_text)


def configured_address(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """The address from ``environ``, or None if unset or empty.

    Raises ValueError for a value that is not ``HOST:PORT``.
    """
    text = environ.get(ADDRESS_ENV, "").strip()
    return parse_address(text) if text else None
