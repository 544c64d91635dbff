"""sendmail's standard input as the spool holds it (mailgate.sendmail.input): CRLF line ends,
the lone-dot line, and the same result however the input is cut into reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.sendmail.input import LocalInput


def content(data: bytes, *, ignore_dots: bool = False, cuts: list[int] | None = None) -> bytes:
    """What LocalInput makes of ``data`` read in pieces ending at ``cuts``."""
    li = LocalInput(ignore_dots=ignore_dots)
    out = b""
    start = 0
    for end in [*sorted(set(cuts or [])), len(data)]:
        if li.done:
            break
        out += li.feed(data[start:end])
        start = end
    return out + li.end()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (b"Subject: x\n\nhi\n", b"Subject: x\r\n\r\nhi\r\n"),
        (b"crlf\r\nkept\r\n", b"crlf\r\nkept\r\n"),
        (b"bare\rcr\r\n", b"bare\r\ncr\r\n"),
        (b"no line end", b"no line end\r\n"),
        (b"", b""),
        (b"a\n.\nnot read\n", b"a\r\n"),
        (b"a\r\n.\r\nnot read", b"a\r\n"),
        (b".\nnot read", b""),
        (b"a\n.", b"a\r\n"),
        (b"a\n..\nb\n", b"a\r\n..\r\nb\r\n"),  # no dot-stuffing to undo: that is SMTP's
        (b"a\n. \nb\n", b"a\r\n. \r\nb\r\n"),
        (b"a.\n", b"a.\r\n"),
    ],
)
def test_line_ends_and_the_lone_dot(given: bytes, expected: bytes) -> None:
    assert content(given) == expected
    assert content(given, cuts=list(range(1, len(given)))) == expected


def test_with_ignore_dots_a_dot_line_is_content() -> None:
    assert content(b"a\n.\nb\n", ignore_dots=True) == b"a\r\n.\r\nb\r\n"
    assert content(b"a\n.", ignore_dots=True) == b"a\r\n.\r\n"


@settings(max_examples=400, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"xy"]), max_size=40),
    cuts=st.lists(st.integers(1, 80), max_size=10),
    ignore_dots=st.booleans(),
)
def test_the_reads_never_change_the_result(
    data: list[bytes], cuts: list[int], ignore_dots: bool
) -> None:
    text = b"".join(data)
    whole = content(text, ignore_dots=ignore_dots)
    assert content(text, ignore_dots=ignore_dots, cuts=[c for c in cuts if c < len(text)]) == whole
    # What the spool gets has no bare CR or LF, and ends with a line end unless it is empty.
    assert whole.replace(b"\r\n", b"").count(b"\r") == 0
    assert whole.replace(b"\r\n", b"").count(b"\n") == 0
    assert whole == b"" or whole.endswith(b"\r\n")
