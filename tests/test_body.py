"""Line folding on the way out (mailgate.smtp.body): against a slow per-line model, for any
split into blocks, and the properties RFC 5321 4.5.3.1.6 asks for."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.smtp.body import LineFolder, OutgoingContent
from mailgate.smtp.downgrade import plan_for


def reference(data: bytes, limit: int, lead: bytes = b" ") -> bytes:
    """Obvious model: per line (LF-terminated; a CR before the LF is not content), cut after
    ``limit`` octets of the line as sent, back to a UTF-8 lead byte (at most 3 octets, at
    least 2 octets left on the line)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        j = data.find(b"\n", pos)
        end = len(data) if j < 0 else j + 1
        line = data[pos:end]
        if line.endswith(b"\r\n"):
            content, eol = line[:-2], b"\r\n"
        elif line.endswith(b"\n"):
            content, eol = line[:-1], b"\n"
        else:
            content, eol = line, b""
        offset = 0  # octets before content on this output line: the lead of a continuation
        while offset + len(content) > limit:
            at = limit - offset
            floor = max(2 - offset, at - 3)
            back = at
            while back > floor and 0x80 <= content[back] < 0xC0:
                back -= 1
            if back < at and content[back] >= 0xC0:
                at = back
            out.append(content[:at] + b"\r\n" + lead)
            content = content[at:]
            offset = 1
        out.append(content + eol)
        pos = end
    return b"".join(out)


def fold(data: bytes, limit: int, cuts: list[int], lead: bytes = b" ") -> tuple[bytes, int]:
    folder = LineFolder(limit, lead)
    pieces = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        pieces.append(folder.feed(data[prev:c]))
        prev = c
    pieces.append(folder.end())
    return b"".join(pieces), folder.folds


def line_lengths(data: bytes) -> list[int]:
    """Octets per line without its CRLF (lines end at LF, as the folder counts them)."""
    out = []
    for line in data.split(b"\n"):
        out.append(len(line) - (1 if line.endswith(b"\r") else 0))
    return out


def test_short_lines_untouched() -> None:
    data = b"Subject: x\r\n\r\n" + (b"y" * 997 + b"\r\n") * 100 + b"z" * 998 + b"\r\n"
    out, folds = fold(data, 998, [])
    assert out == data and folds == 0


def test_exactly_at_the_limit() -> None:
    assert fold(b"a" * 998 + b"\r\n", 998, [])[0] == b"a" * 998 + b"\r\n"
    assert fold(b"a" * 999 + b"\r\n", 998, [])[0] == b"a" * 998 + b"\r\n a\r\n"
    # 998 octets then a bare CR: the CR is content, the line is 999 octets long.
    assert fold(b"a" * 998 + b"\rb\r\n", 998, [])[0] == b"a" * 998 + b"\r\n \rb\r\n"
    # The same CR split from its LF by a block boundary.
    data = b"a" * 998 + b"\r\n" + b"b" * 5
    assert fold(data, 998, [999])[0] == data


def test_5000_octet_line() -> None:
    data = b"Subject: long\r\n\r\n" + (bytes(range(33, 127)) * 54)[:5000] + b"\r\n"
    for cuts in ([], [1000], list(range(0, len(data), 7))):
        out, folds = fold(data, 998, cuts)
        assert max(line_lengths(out)) <= 998
        assert out.replace(b"\r\n ", b"") == data
        assert folds == 5


def test_header_field_folded_as_continuation() -> None:
    data = b"X-Long: " + b"v" * 2000 + b"\r\nSubject: s\r\n\r\nbody\r\n"
    out, _ = fold(data, 998, [])
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"X-Long: ") and lines[1][:1] == b" " and lines[2][:1] == b" "
    assert lines[3] == b"Subject: s"


def test_never_inside_a_utf8_sequence() -> None:
    text = ("é" * 700).encode()  # 1400 octets of two-octet sequences, odd limit
    out, _ = fold(text + b"\r\n", 999, [])
    for line in out.split(b"\r\n"):
        line.removeprefix(b" ").decode("utf-8")  # every line decodes on its own
    emoji = ("x" + "😀" * 400).encode()
    for cuts in ([], [996], [997], [998], [999], list(range(0, len(emoji), 3))):
        out, _ = fold(emoji, 998, cuts)
        assert out == reference(emoji, 998)
        assert max(line_lengths(out)) <= 998
        for line in out.split(b"\r\n"):
            line.removeprefix(b" ").decode("utf-8")


BYTES = st.sampled_from(
    [b"a", b" ", b"\r", b"\n", b"\r\n", b"\xc3", b"\xa9", b"\xf0\x9f\x98\x80", b"bcdefghij", b"."]
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(BYTES, max_size=120), limit=st.integers(2, 14), seed=st.integers(0, 2**32 - 1)
)
def test_fuzz_against_reference(parts: list[bytes], limit: int, seed: int) -> None:
    data = b"".join(parts)
    rng = random.Random(seed)
    cuts = [rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 12))]
    out, folds = fold(data, limit, cuts)
    assert out == reference(data, limit)
    assert max(line_lengths(out)) <= limit
    # Removing what was inserted gives the original back (a lead byte the data lacks).
    marked, _ = fold(data, limit, cuts, lead=b"\0")
    assert marked.count(b"\r\n\0") == folds
    assert marked.replace(b"\r\n\0", b"") == data


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000), seed=st.integers(0, 2**32 - 1))
def test_arbitrary_bytes(data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    cuts = [rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 8))]
    out, _ = fold(data, 100, cuts)
    assert out == reference(data, 100)
    assert max(line_lengths(out)) <= 100


def test_large_block_cost_is_per_window() -> None:
    # 4 MiB of 70-octet lines: the fast path leaves it as it is (and the same object).
    block = (b"w" * 68 + b"\r\n") * (4 * 1024 * 1024 // 70)
    folder = LineFolder(998)
    assert folder.feed(block) is block


@pytest.mark.parametrize("limit", [0, 998])
def test_outgoing_content_pipeline(limit: int) -> None:
    msg = b"Subject: s\r\n\r\ncaf\xc3\xa9 " + b"x" * 3000 + b"\r\n"
    plain = OutgoingContent(line_limit=limit)
    out = plain.feed(msg) + plain.end()
    assert (out == msg) == (limit == 0)
    assert plain.folds == (0 if limit == 0 else 3)
    converted = OutgoingContent(line_limit=limit, plan=plan_for(msg))
    assert converted.converting
    out = converted.feed(msg) + converted.end()
    assert out.isascii() and b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert max(line_lengths(out)) <= 76
