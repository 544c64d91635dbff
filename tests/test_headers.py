"""The header section as the session holds it (HeaderScanner): where it ends and the size
limit, the same whatever the segmentation of the bytes."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.smtp.headers import (
    MAX_HEADER_BYTES,
    HeaderScanner,
    StampFacts,
    drop_fields,
    rfc2822_date,
    stamp,
)


def scan(content: bytes, cuts: list[int]) -> tuple[bytes | None, bytes, bool]:
    """(header section or None, what followed it, too large) after feeding ``content`` cut at
    ``cuts``; the remainder is what the scanner still holds when the section never ended."""
    points = sorted({c for c in cuts if 0 < c < len(content)})
    scanner = HeaderScanner()
    head: bytes | None = None
    rest = b""
    for a, b in itertools.pairwise([0, *points, len(content)]):
        piece = content[a:b]
        if head is not None:
            rest += piece
            continue
        head = scanner.feed(piece)
        if head is not None:
            rest = scanner.rest
    if head is None:
        rest = bytes(scanner.buf)
    return head, rest, scanner.too_large


def fields(total: int) -> bytes:
    lines = []
    n = 0
    while sum(map(len, lines)) < total:
        lines.append(f"X-Filler-{n}: {'v' * 70}\r\n".encode())
        n += 1
    return b"".join(lines)


@pytest.mark.parametrize("piece", [None, 4096, 1000, 7])
def test_a_46k_header_section_is_too_large_however_it_arrives(piece: int | None) -> None:
    content = b"Subject: big\r\n" + fields(46_000) + b"\r\nbody\r\n"
    cuts = [] if piece is None else list(range(piece, len(content), piece))
    head, _, too_large = scan(content, cuts)
    assert too_large and head is None


@pytest.mark.parametrize("piece", [None, 4096, 1000, 7])
def test_a_30k_header_section_is_kept_however_it_arrives(piece: int | None) -> None:
    section = b"Subject: fits\r\n" + fields(30_000)
    content = section + b"\r\nbody\r\n"
    cuts = [] if piece is None else list(range(piece, len(content), piece))
    assert scan(content, cuts) == (section + b"\r\n", b"body\r\n", False)


def test_the_limit_is_exact() -> None:
    line = b"X: " + b"v" * (MAX_HEADER_BYTES - 5) + b"\r\n"
    assert len(line) == MAX_HEADER_BYTES
    assert scan(line + b"\r\nbody", [])[2] is False
    assert scan(b"Y" + line + b"\r\nbody", [])[2] is True
    assert scan(b"Y" + line + b"\r\nbody", [100, 32_768])[2] is True


def test_the_section_ends_at_the_first_non_field_line() -> None:
    content = b"Subject: x\r\nthis is body text\r\nmore\r\n"
    assert scan(content, [3, 20]) == (b"Subject: x\r\nthis is body text\r\n", b"more\r\n", False)
    assert scan(b"no header at all\r\n", [5]) == (b"", b"no header at all\r\n", False)
    assert scan(b"\r\nbody\r\n", [1]) == (b"\r\n", b"body\r\n", False)


_LINES = st.sampled_from(
    [
        b"Subject: hello\r\n",
        b"X-Long: " + b"y" * 900 + b"\r\n",
        b"\tcontinued\r\n",
        b"\r\n",
        b"body text line\r\n",
        b"Name : spaced colon\r\n",
        b"no-colon-word\r\n",
        b"Received: from a by b\r\n",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_LINES, max_size=80), repeat=st.integers(1, 40), seed=st.integers(0, 2**32 - 1)
)
def test_segmentation_never_changes_the_result(lines: list[bytes], repeat: int, seed: int) -> None:
    content = b"".join(lines) * repeat
    rng = random.Random(seed)
    cuts = [rng.randrange(1, max(2, len(content))) for _ in range(rng.randrange(0, 30))]
    whole = scan(content, [])
    assert scan(content, cuts) == whole
    assert scan(content, list(range(1, len(content), 4096))) == whole


def local_facts(**changes: object) -> StampFacts:
    facts = StampFacts(
        hostname="gw.example.com",
        qid="kB2AbCd0012345",
        arrival=1_796_000_000.0,
        sender="joe@gw.example.com",
        recipients=("bob@example.net",),
        client_ip="127.0.0.1",
        client_name=None,
        client_verified=None,
        client_is_loopback=True,
        helo=None,
        esmtp=False,
        smtputf8=False,
        tls=None,
        authwarnings=True,
        submitter="joe",
    )
    return replace(facts, **changes)


def test_a_local_submission_is_stamped_as_sendmails_submit() -> None:
    date = rfc2822_date(1_796_000_000.0)
    stamped = stamp(b"Subject: hi\r\n\r\nbody\r\n", local_facts(sender_name="Joe Q. Public"))
    assert stamped.data == (
        b"Received: (from joe@localhost)\r\n"
        b"\tby gw.example.com (mailgate/Submit) id kB2AbCd0012345\r\n"
        b"\tfor <bob@example.net>; " + date.encode() + b"\r\n"
        b"Subject: hi\r\n"
        b"Message-Id: <202611300053.kB2AbCd0012345@gw.example.com>\r\n"
        b"Date: " + date.encode() + b"\r\n"
        b'From: "Joe Q. Public" <joe@gw.example.com>\r\n'
        b"\r\nbody\r\n"
    )
    assert stamped.warning is None  # no -f: nothing to warn of, and no HELO to miss


def test_an_untrusted_f_gets_sendmails_warning() -> None:
    facts = local_facts(sender="ceo@example.com", untrusted_from=True)
    stamped = stamp(b"From: ceo@example.com\r\n\r\nx\r\n", facts)
    assert stamped.warning == "joe set sender to ceo@example.com using -f"
    assert (
        b"X-Authentication-Warning: gw.example.com: joe set sender to ceo@example.com using -f"
        b"\r\n" in stamped.data
    )
    null = stamp(b"\r\nx\r\n", replace(facts, sender="")).warning
    assert null == "joe set sender to <> using -f"
    assert stamp(b"\r\nx\r\n", replace(facts, authwarnings=False)).warning is None


def test_drop_fields_removes_each_with_its_continuation_lines() -> None:
    head = (
        b"To: a@x\r\nBcc: b@x,\r\n c@x\r\nSubject: s\r\nbcc: d@x\r\n"
        b"X-Bcc: kept\r\n\r\nBcc: in the body\r\n"
    )
    assert drop_fields(head, frozenset({"bcc"})) == (
        b"To: a@x\r\nSubject: s\r\nX-Bcc: kept\r\n\r\nBcc: in the body\r\n"
    )
    assert drop_fields(b"Subject: s\r\n", frozenset({"bcc"})) == b"Subject: s\r\n"
