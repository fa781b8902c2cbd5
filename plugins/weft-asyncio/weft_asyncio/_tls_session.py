"""TLSSession: a server-side TLS session over memory buffers, under weft's own stream.

asyncio's SSL transport (and uvloop's) closes the whole connection when its input
ends: a protocol's ``eof_received`` returning True "has no effect when using ssl"
(and says so in a WARNING per connection). A stop's phase 2 ends every
connection's input, and a client may half-close while its reply is being written;
over TLS both cut the reply short. So the stream runs TLS itself, as trio's
``SSLStream`` does: an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``, fed the
bytes a plain transport receives, its output written to that transport. The end
of the peer's input (close_notify, or the TCP FIN alone, which the other managers'
TLS sockets take as the end too) is the end of the stream's input, and writing goes
on until the handler closes. The FIN itself is never fed to the session: OpenSSL 3
takes an end without close_notify as fatal, and would refuse to encrypt the rest.
"""

from __future__ import annotations

import ssl

__all__ = ["TLSSession"]

#: Plaintext taken out of the session per ``SSLObject.read`` call.
READ_SIZE = 2**16


class TLSSession:
    """One connection's TLS state: handshake, decrypt what arrives, encrypt what is sent.

    Nothing here blocks or touches a socket: the stream feeds it received bytes
    (:meth:`feed`) and sends what :meth:`outgoing` returns.
    """

    __slots__ = ("_incoming", "_outgoing", "_unsent", "handshaken", "obj")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.handshaken = False
        #: Plaintext a renegotiation held back (``SSLObject.write`` wanting to read).
        self._unsent: list[bytes] = []

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes received from the peer."""
        self._incoming.write(data)

    def step(self, plaintext: bytearray) -> bool:
        """Advance the handshake, then decrypt what was fed into ``plaintext``.

        Returns True once the peer's input has ended (its close_notify). Raises ``ssl.SSLError`` for a failed handshake
        or a broken record.
        """
        if not self.handshaken:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.handshaken = True
        self._retry()
        obj = self.obj
        while True:
            try:
                chunk = obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLZeroReturnError:
                return True
            if not chunk:
                return True
            plaintext += chunk

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` for sending (held back while a renegotiation needs the peer)."""
        if self._unsent or not self.handshaken:
            self._unsent.append(bytes(data))
            return
        self._write(memoryview(data))

    def _write(self, view: memoryview) -> None:
        while view:
            try:
                sent = self.obj.write(view)
            except ssl.SSLWantReadError:
                self._unsent.append(bytes(view))
                return
            view = view[sent:]

    def _retry(self) -> None:
        unsent, self._unsent = self._unsent, []
        for data in unsent:
            if self._unsent:
                self._unsent.append(data)
            else:
                self._write(memoryview(data))

    def outgoing(self) -> bytes:
        """What the session has to send now (handshake records, encrypted data, alerts)."""
        return self._outgoing.read()

    def goodbye(self) -> None:
        """Say close_notify, if the session got that far; never waits for the peer's."""
        if not self.handshaken:
            return
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # the peer's close_notify is not awaited; or the session is broken
