"""Server-side TLS contexts with safe defaults; ``ssl`` is imported only when TLS is used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ConfigError

if TYPE_CHECKING:
    import ssl

__all__ = ["TLS_KEYS", "make_server_context", "tls_details"]

#: What a ``tls`` table may hold once checked (``password_file`` is read into ``password``).
TLS_KEYS = ("certfile", "keyfile", "cafile", "require_client_cert", "password")


def make_server_context(tls: Any) -> ssl.SSLContext:
    """An ``SSLContext`` for ``Server(tls=...)``: one given as is, or built from files.

    ``tls`` is a context, or a table checked by the settings table (certfile,
    keyfile, cafile, require_client_cert, password or password_file). Built contexts
    use ``Purpose.CLIENT_AUTH`` (server side) and accept TLS 1.2 at the least. With
    ``cafile``, client certificates are asked for and verified (required with
    ``require_client_cert``). An encrypted key without a password is a ConfigError,
    never a prompt on the terminal.
    """
    import ssl

    from ._settings import tls_table, validate

    if isinstance(tls, ssl.SSLContext):
        return tls
    validate("tls", tls)  # neither a context nor a table: the table's message
    parts = tls_table(tls)
    password = parts.get("password")

    def no_password() -> str:
        # OpenSSL's default is to prompt on the terminal, which hangs a service.
        raise ConfigError(
            "the private key is encrypted: set tls.password or tls.password_file",
            key="tls.password",
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            parts["certfile"], parts.get("keyfile"), no_password if password is None else password
        )
        if parts.get("cafile"):
            context.load_verify_locations(parts["cafile"])
            context.verify_mode = (
                ssl.CERT_REQUIRED if parts.get("require_client_cert") else ssl.CERT_OPTIONAL
            )
    except (ssl.SSLError, OSError) as exc:
        hint = " (is the password right?)" if password is not None else ""
        raise ConfigError(f"cannot load the certificate or key{hint}: {exc}", key="tls") from exc
    return context


def tls_details(tls: Any) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(version, cipher name, peer certificate) of a handshaken TLS socket or stream."""
    cipher = tls.cipher()
    return tls.version(), cipher[0] if cipher else None, tls.getpeercert() or None
