"""The PROXY protocol, receiving side (HAProxy's ``doc/proxy-protocol.txt``, versions 1 and 2):
sans-IO, the bytes received so far in, a :class:`ProxyHeader`, ``None`` (a valid beginning:
wait for more) or :class:`ProxyError` out.

Strict, because it is the pre-authentication edge and the address it yields decides relaying:
v1 is one line of at most 107 bytes ended by CRLF only (a bare LF, a stray CR, a double space,
a leading zero in a port or an IPv4 octet, an address of the other family are errors); v2 is
the 12-byte signature, version 2, command LOCAL or PROXY, TCP over IPv4 or IPv6 only (UNIX,
UDP and UNSPEC with PROXY are refused, not guessed at), an address block at least as long as
its family needs, TLVs that tile the rest exactly, and a CRC32c TLV, when there is one, that
matches. The whole header is at most ``V2_MAX_BODY`` + 16 bytes. An IPv4-mapped IPv6 address is
given as IPv4, as the socket layer does for our own peers.

Written by hand rather than taken from PyPI's ``proxy-protocol``: that one accepts leading
zeros and raises bare ``ValueError``/``struct.error`` on malformed input, and this is a few
dozen lines with nothing to configure.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Versions = Literal["v1", "v2", "any"]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's figure)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
V2_MAX_BODY = 4096  # addresses and TLVs; the spec allows 65535, no sender needs a tenth of it
MAX_HEADER = V2_FIXED + V2_MAX_BODY

_LOCAL, _PROXY = 0x0, 0x1
_INET, _INET6 = 0x1, 0x2
_STREAM = 0x1
_ADDRESS_BYTES = {_INET: 12, _INET6: 36}  # two addresses, two ports
_TLV_CRC32C = 0x03

_OCTET = rb"(?:0|[1-9][0-9]{0,2})"
_IPV4 = re.compile(rb"%s(?:\.%s){3}" % (_OCTET, _OCTET))
_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # the characters; ipaddress checks the form
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

Address = tuple[str, int]


class ProxyError(Exception):
    """The header is malformed, or not one this listener takes: close the connection."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    # The client and the address it connected to; None for v2 LOCAL and v1 UNKNOWN (the
    # proxy's own connection, a health check: the socket's own endpoints stand).
    source: Address | None
    destination: Address | None
    size: int  # bytes of the stream the header took; what follows is the client's

    @property
    def local(self) -> bool:
        return self.source is None


def parse(data: bytes, versions: Versions) -> ProxyHeader | None:
    """The header at the start of ``data``, or None while ``data`` is a valid beginning of
    one that has not all arrived. Raises ProxyError for anything else."""
    v1 = versions in ("v1", "any") and _could_be(data, V1_PREFIX)
    v2 = versions in ("v2", "any") and _could_be(data, V2_SIGNATURE)
    if v1:
        return _v1(data)
    if v2:
        return _v2(data)
    wanted = {"v1": "a PROXY v1 line", "v2": "a PROXY v2 header", "any": "a PROXY header"}
    raise ProxyError(f"{wanted[versions]} was expected, got {bytes(data[:16])!r}")


def _could_be(data: bytes, prefix: bytes) -> bool:
    n = min(len(data), len(prefix))
    return data[:n] == prefix[:n]


# -- version 1 ---------------------------------------------------------------------------------
def _v1(data: bytes) -> ProxyHeader | None:
    lf = data.find(b"\n", 0, V1_MAX)
    if lf < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"v1: no CRLF within {V1_MAX} bytes")
        if 0 <= data.find(b"\r") < len(data) - 1:
            raise ProxyError("v1: a CR not followed by LF")
        return None
    if lf == 0 or data[lf - 1] != 0x0D:
        raise ProxyError("v1: a bare LF ends the line (only CRLF may)")
    line = bytes(data[: lf - 1])
    if 13 in line:
        raise ProxyError("v1: a CR not followed by LF")
    size = lf + 1
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, None, None, size)  # the rest of an UNKNOWN line is ignored
    fields = line.split(b" ")
    if len(fields) != 6 or not all(fields):
        raise ProxyError("v1: expected PROXY TCP4|TCP6 src dst sport dport, one space apart")
    _, proto, src, dst, sport, dport = fields
    if proto == b"TCP4":
        family = _INET
    elif proto == b"TCP6":
        family = _INET6
    else:
        raise ProxyError(f"v1: unknown protocol {proto[:8]!r}")
    return ProxyHeader(
        1,
        (_v1_address(src, family), _v1_port(sport)),
        (_v1_address(dst, family), _v1_port(dport)),
        size,
    )


def _v1_address(text: bytes, family: int) -> str:
    if family == _INET:
        if _IPV4.fullmatch(text):
            try:
                return str(ipaddress.IPv4Address(text.decode("ascii")))
            except ValueError:
                pass  # an octet over 255
        raise ProxyError(f"v1: {text[:45]!r} is not an IPv4 address as TCP4 needs")
    if _IPV6.fullmatch(text):
        try:
            return _unmapped(ipaddress.IPv6Address(text.decode("ascii")))
        except ValueError:
            pass
    raise ProxyError(f"v1: {text[:45]!r} is not an IPv6 address as TCP6 needs")


def _v1_port(text: bytes) -> int:
    if _PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    raise ProxyError(f"v1: bad port {text[:8]!r} (0 to 65535, no leading zeros)")


def _unmapped(addr: ipaddress.IPv6Address) -> str:
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


# -- version 2 ---------------------------------------------------------------------------------
def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        raise ProxyError(f"v2: version {version} (only 2 exists)")
    if command not in (_LOCAL, _PROXY):
        raise ProxyError(f"v2: unknown command {command}")
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_BODY:
        raise ProxyError(f"v2: {length} bytes of addresses and TLVs (at most {V2_MAX_BODY})")
    size = V2_FIXED + length
    if len(data) < size:
        return None
    header = bytes(data[:size])
    if command == _LOCAL:
        # The proxy's own connection (a health check): its address block means nothing.
        return ProxyHeader(2, None, None, size)
    family, transport = data[13] >> 4, data[13] & 0xF
    need = _ADDRESS_BYTES.get(family)
    if need is None or transport != _STREAM:
        raise ProxyError(f"v2: family/transport 0x{data[13]:02x} (only TCP over IPv4 or IPv6)")
    if length < need:
        raise ProxyError(f"v2: {length} bytes of addresses, the family needs {need}")
    body = header[V2_FIXED:]
    _check_tlvs(header, need)
    if family == _INET:
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        ports = body[8:12]
    else:
        src = _unmapped(ipaddress.IPv6Address(body[0:16]))
        dst = _unmapped(ipaddress.IPv6Address(body[16:32]))
        ports = body[32:36]
    sport, dport = int.from_bytes(ports[0:2], "big"), int.from_bytes(ports[2:4], "big")
    return ProxyHeader(2, (src, sport), (dst, dport), size)


def _check_tlvs(header: bytes, addresses: int) -> None:
    """The TLVs after the addresses: each type, length, value within the header, exactly to
    its end; a CRC32c one must match the header's checksum (the spec: a receiver that can
    check it must)."""
    pos = V2_FIXED + addresses
    while pos < len(header):
        if len(header) - pos < 3:
            raise ProxyError("v2: a TLV cut short")
        kind, length = header[pos], int.from_bytes(header[pos + 1 : pos + 3], "big")
        value = pos + 3
        if value + length > len(header):
            raise ProxyError(f"v2: TLV 0x{kind:02x} runs past the header")
        if kind == _TLV_CRC32C:
            if length != 4:
                raise ProxyError("v2: a CRC32c TLV is 4 bytes")
            zeroed = header[:value] + b"\0\0\0\0" + header[value + 4 :]
            if crc32c(zeroed) != int.from_bytes(header[value : value + 4], "big"):
                raise ProxyError("v2: CRC32c mismatch")
        pos = value + length


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
