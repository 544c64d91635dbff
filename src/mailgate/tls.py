"""TLS for STARTTLS (RFC 3207): the server context built from the configured certificate, the
client context for opportunistic TLS to next hops, and the Sendmail-style description of a
TLS session for Received: headers and maillog lines."""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Raises OSError (unreadable file) or ssl.SSLError (not a matching PEM pair)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_NONE  # clients are not asked for certificates, as Sendmail
    return ctx


@functools.lru_cache(maxsize=1)
def client_context() -> ssl.SSLContext:
    """Opportunistic TLS (Postfix's ``may``): encrypt when the next hop offers STARTTLS, do not
    verify its certificate (MX hosts rarely have one for the name we look up; RFC 7435).
    One context for all deliveries, as it holds no per-peer state."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Session:
    """What a TLS session was, in the words Sendmail uses for it."""

    version: str
    cipher: str
    bits: int
    verify: str  # NOT: no certificate asked for; NO: not checked (opportunistic client)

    def for_received(self) -> str:
        """``version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256 verify=NOT``"""
        return f"version={self.version} cipher={self.cipher} bits={self.bits} verify={self.verify}"

    def for_maillog(self) -> str:
        """``version=TLSv1.3, verify=NOT, cipher=TLS_AES_256_GCM_SHA384, bits=256/256``"""
        return (
            f"version={self.version}, verify={self.verify}, cipher={self.cipher}, "
            f"bits={self.bits}/{self.bits}"
        )


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, verify: str) -> Session:
    cipher = ssl_object.cipher() if ssl_object is not None else None
    version = (ssl_object.version() if ssl_object is not None else None) or "NONE"
    return Session(version, cipher[0] if cipher else "NONE", cipher[2] if cipher else 0, verify)
