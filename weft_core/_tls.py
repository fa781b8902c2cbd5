"""Server-side TLS contexts with safe defaults; ``ssl`` is imported only when TLS is used."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._logsafe import escape_for_log

if TYPE_CHECKING:
    import ssl

__all__ = ["TLS_KEYS", "make_server_context", "tls_details"]

#: What a ``tls`` table may hold once checked (``password_file`` is read into ``password``).
TLS_KEYS = ("certfile", "keyfile", "cafile", "require_client_cert", "password")


def make_server_context(parts: Mapping[str, Any]) -> ssl.SSLContext:
    """An ``SSLContext`` for ``Server(tls={...})``, built from files.

    ``parts`` is a ``tls`` table already checked by the settings table
    (``_settings.tls_table``: certfile, keyfile, cafile, require_client_cert,
    password). Built contexts
    use ``Purpose.CLIENT_AUTH`` (server side), accept TLS 1.2 at the least, and take
    a client's end of input without close_notify as the end of its input. With
    ``cafile``, client certificates are asked for and verified (required with
    ``require_client_cert``). An encrypted key without a password is a ConfigError,
    never a prompt on the terminal.
    """
    import ssl

    password = parts.get("password")
    keyfile = parts.get("keyfile") or parts["certfile"]

    def no_password() -> str:
        # OpenSSL's default is to prompt on the terminal, which hangs a service.
        raise ConfigError(
            f"the private key in {keyfile} is encrypted and no password was given: "
            "set tls.password or tls.password_file",
            key="tls.password",
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The end of a client's input without close_notify (a stop's phase 2 ends every
    # connection's input; a client half-closes) is the end of its input, not a broken
    # session: OpenSSL 3 would otherwise refuse to encrypt the reply still owed.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        context.load_cert_chain(
            parts["certfile"], parts.get("keyfile"), no_password if password is None else password
        )
    except (ssl.SSLError, OSError) as exc:
        raise _chain_error(exc, parts["certfile"], parts.get("keyfile"), password) from None
    if parts.get("cafile"):
        try:
            context.load_verify_locations(parts["cafile"])
        except (ssl.SSLError, OSError) as exc:
            raise _file_error(exc, parts["cafile"], "tls.cafile", "a PEM CA certificate") from None
        context.verify_mode = (
            ssl.CERT_REQUIRED if parts.get("require_client_cert") else ssl.CERT_OPTIONAL
        )
    return context


# -- one line for what OpenSSL reports as "[SSL] PEM lib (_ssl.c:3926)" -----------------

#: How much of a certificate or key file is read to explain a load error: PEM
#: certificate chains and keys are a few KiB; a file far larger is not one anyway.
_DIAGNOSE_BYTES = 1 << 20
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
#: "BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE KEY", "BEGIN EC PRIVATE KEY",
#: "BEGIN ENCRYPTED PRIVATE KEY" all end so.
_PEM_KEY_END = b"PRIVATE KEY-----"
#: A PKCS#8 encrypted key, and the Proc-Type header of an old-style (PKCS#1) one.
_ENCRYPTED = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")
#: The label of each PEM block in a file, to say what a wrong file holds instead.
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
#: A DER file starts with an ASN.1 SEQUENCE tag; PEM is text.
_DER_SEQUENCE = 0x30


def _chain_error(
    exc: BaseException, certfile: str, keyfile: str | None, password: object
) -> ConfigError:
    """One line for a failed ``load_cert_chain``: which file, and what is wrong with it.

    OpenSSL says "PEM lib" for a file that is not PEM, a key that cannot be
    decrypted and more, naming no file; the files are read here to tell which.
    """
    keyfile_key = "tls.keyfile" if keyfile else "tls.certfile"
    keyfile = keyfile or certfile
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return ConfigError(
            f"the private key in {keyfile} does not match the certificate in {certfile}: "
            "give the key the certificate was issued for",
            key=keyfile_key,
        )
    cert_text = _read(certfile)
    key_text = _read(keyfile)
    if isinstance(cert_text, OSError):
        return ConfigError(f"cannot read {certfile}: {cert_text.strerror}", key="tls.certfile")
    if isinstance(key_text, OSError):
        return ConfigError(f"cannot read {keyfile}: {key_text.strerror}", key=keyfile_key)
    if _PEM_CERTIFICATE not in cert_text:
        return _not_pem(certfile, cert_text, "tls.certfile", "a PEM certificate")
    if _PEM_KEY_END not in key_text:
        if keyfile == certfile:
            return ConfigError(
                f"{certfile} holds a certificate but no PEM private key: set tls.keyfile "
                "to the file holding the key",
                key="tls.keyfile",
            )
        return _not_pem(keyfile, key_text, keyfile_key, "a PEM private key")
    if any(marker in key_text for marker in _ENCRYPTED):
        if password is None:
            return ConfigError(
                f"the private key in {keyfile} is encrypted and no password was given: "
                "set tls.password or tls.password_file",
                key="tls.password",
            )
        return ConfigError(
            f"cannot decrypt the private key in {keyfile} with the password given: "
            "check tls.password",
            key="tls.password",
        )
    return ConfigError(
        f"cannot load the certificate {certfile} with the key {keyfile}: {exc}", key="tls"
    )


def _file_error(exc: BaseException, path: str, key: str, what: str) -> ConfigError:
    """One line for a file that ``ssl`` could not load as ``what``."""
    text = _read(path)
    if isinstance(text, OSError):
        return ConfigError(f"cannot read {path}: {text.strerror}", key=key)
    if _PEM_CERTIFICATE not in text:
        return _not_pem(path, text, key, what)
    return ConfigError(f"cannot load {path} as {what}: {exc}", key=key)


def _not_pem(path: str, text: bytes, key: str, what: str) -> ConfigError:
    blocks = _PEM_BEGIN.findall(text)
    if not text.strip():
        why = "it is empty"
    elif blocks:
        labels = ", ".join(sorted({b.decode("ascii") for b in blocks}))
        why = f"it holds PEM blocks of other kinds: {labels}"
    elif text[0] == _DER_SEQUENCE:
        kind = "x509" if "certificate" in what else "pkey"
        why = (
            "it looks like DER: convert it with "
            f"`openssl {kind} -inform der -in {escape_for_log(path)} -out"
            f" {escape_for_log(path)}.pem`"
        )
    else:
        why = "it has no -----BEGIN ...----- line"
    return ConfigError(f"{escape_for_log(path)} is not {what} ({why})", key=key)


def _read(path: str) -> bytes | OSError:
    try:
        with open(path, "rb") as file:
            return file.read(_DIAGNOSE_BYTES)
    except OSError as exc:
        return exc


def tls_details(tls: Any) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(version, cipher name, peer certificate) of a handshaken TLS socket or stream."""
    cipher = tls.cipher()
    return tls.version(), cipher[0] if cipher else None, tls.getpeercert() or None
