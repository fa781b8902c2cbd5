"""Server-side TLS contexts with safe defaults; ``ssl`` is imported only when TLS is used."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError

if TYPE_CHECKING:
    import ssl

__all__ = ["TLS_KEYS", "make_server_context", "tls_details"]

TLS_KEYS = ("certfile", "keyfile", "cafile", "require_client_cert", "password")


def make_server_context(tls: Any) -> ssl.SSLContext:
    """An ``SSLContext`` for ``Server(tls=...)``: one given as is, or built from files.

    Built contexts use ``Purpose.CLIENT_AUTH`` (server side) and accept TLS 1.2 at
    the least. With ``cafile``, client certificates are asked for and verified
    (required with ``require_client_cert``).
    """
    import ssl

    if isinstance(tls, ssl.SSLContext):
        return tls
    if not isinstance(tls, dict):
        raise ConfigError(
            f"expected an ssl.SSLContext or a table with certfile and keyfile, got {tls!r}",
            key="tls",
        )
    unknown = set(tls) - set(TLS_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown TLS setting(s) {', '.join(sorted(unknown))}; expected {', '.join(TLS_KEYS)}",
            key="tls",
        )
    certfile = tls.get("certfile")
    if not certfile:
        raise ConfigError(
            "a certfile is required (and a keyfile unless the certfile holds the key)",
            key="tls.certfile",
        )
    for key in ("certfile", "keyfile", "cafile"):
        path = tls.get(key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"no such file: {path}", key=f"tls.{key}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, tls.get("keyfile"), tls.get("password"))
        if tls.get("cafile"):
            context.load_verify_locations(tls["cafile"])
            context.verify_mode = (
                ssl.CERT_REQUIRED if tls.get("require_client_cert") else ssl.CERT_OPTIONAL
            )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the certificate or key: {exc}", key="tls") from exc
    return context


def tls_details(tls: Any) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(version, cipher name, peer certificate) of a handshaken TLS socket or stream."""
    cipher = tls.cipher()
    return tls.version(), cipher[0] if cipher else None, tls.getpeercert() or None
