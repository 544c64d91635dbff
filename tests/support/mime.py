"""Small MIME helpers for tests: a strict quoted-printable decoder and header/body split."""

from __future__ import annotations

import re

_HEX = re.compile(rb"[0-9A-F]{2}")


def qp_decode(data: bytes) -> bytes:
    """RFC 2045 6.7, strictly: every line 7-bit and at most 76 characters, "=" only before two
    upper-case hex digits or as a soft break, no white space before a hard break."""
    out = bytearray()
    lines = data.split(b"\r\n")
    for k, line in enumerate(lines):
        assert len(line) <= 76, line
        assert line.isascii(), line
        soft = line.endswith(b"=")
        if soft:
            line = line[:-1]
        else:
            assert not line.endswith((b" ", b"\t")), line
        i = 0
        while i < len(line):
            c = line[i]
            if c == 0x3D:
                assert _HEX.fullmatch(line[i + 1 : i + 3]), line
                out.append(int(line[i + 1 : i + 3], 16))
                i += 3
            else:
                assert c == 9 or 32 <= c <= 126, line
                out.append(c)
                i += 1
        if not soft and k < len(lines) - 1:
            out += b"\r\n"
    return bytes(out)


def head_body(entity: bytes) -> tuple[bytes, bytes]:
    """An entity's header lines (with their CRLF) and body, at the first empty line."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    i = entity.index(b"\r\n\r\n")
    return entity[: i + 2], entity[i + 4 :]
