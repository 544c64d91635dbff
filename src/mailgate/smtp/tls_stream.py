"""Server-side TLS over memory BIOs: ciphertext in, plaintext out, and the reverse, with the
plain transport left to the session.

Why not ``loop.start_tls``: asyncio's (and uvloop's) SSL transport shuts the connection down as
soon as the peer half-closes — TCP FIN or close_notify — whatever ``eof_received()`` returns,
and warns on stderr about it. A client that sends its message and closes its sending side then
never reads the 250, and a client that retries sends the message twice. Here the session sees
the peer's end as the end of its input, like in clear text, and still writes its replies and
its own close_notify before it closes.
"""

from __future__ import annotations

import contextlib
import ssl

__all__ = ["TlsStream"]

_READ_SIZE = 65536


class TlsStream:
    """One TLS session (server side) driven by bytes: :meth:`receive` takes what the peer sent,
    :meth:`send` queues plaintext, :meth:`outgoing` gives the records to write."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshake_done = False
        self.peer_closed = False  # close_notify or EOF: no more input will come

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext (``b""`` at EOF); the plaintext it completes. Raises ssl.SSLError
        when the peer breaks TLS (a failed handshake included); then :meth:`outgoing` may
        hold the alert to send before closing."""
        if not data:
            # A TCP FIN: every complete record was read already. Telling OpenSSL about the EOF
            # would only make it fail the session ("unexpected EOF", an alert, no more writes)
            # while the replies to what was read have still to be sent.
            self.peer_closed = True
            if not self.handshake_done:
                raise ssl.SSLEOFError("connection closed during the TLS handshake")
            return b""
        self._in.write(data)
        if not self.handshake_done:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_done = True
        chunks: list[bytes] = []
        while not self.peer_closed:
            try:
                chunk = self.ssl_object.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # close_notify ends the input only (TLS 1.3 half-close): SMTP decides itself
                # whether what came was complete, and the replies still go out.
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plaintext: bytes) -> None:
        """Queue plaintext; a peer that closed its side still gets it (TLS 1.3 half-close)."""
        if plaintext:
            self.ssl_object.write(plaintext)

    def outgoing(self) -> bytes:
        """The TLS records to write to the transport now."""
        return self._out.read()

    def close(self) -> bytes:
        """Our close_notify; the records to write before closing the transport."""
        # SSLWantReadError: waiting for the peer's close_notify, which we do not need.
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.ssl_object.unwrap()
        return self._out.read()
