"""smtp/search.py gives what ``bytes.find`` and ``bytes.count`` give, for the needles the DATA
path and the client use, on text dense in CR, LF and dots, at every length and offset (SIMD
code has separate paths for blocks shorter than a vector and for the tail of a longer one)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.smtp import search

NEEDLES = [b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.", b"\r\n.\r\n"]
# Mostly the bytes the needles are made of, so that near misses are everywhere.
dense = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\x00", b"\xff"]), max_size=600).map(
    b"".join
)


@settings(max_examples=600, deadline=None)
@given(text=dense, needle=st.sampled_from(NEEDLES), start=st.integers(0, 700))
def test_same_as_bytes_methods(text: bytes, needle: bytes, start: int) -> None:
    assert search.count(text, needle) == text.count(needle)
    assert search.find(text, needle) == text.find(needle)
    assert search.find(text, needle, start) == text.find(needle, start)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 4095, 65536, 70001])
def test_long_blocks_every_needle(size: int) -> None:
    rng = random.Random(size)
    line = b"Subject: the quick brown fox jumps over the lazy dog.\r\n"
    text = bytearray((line * (size // len(line) + 1))[:size])
    for _ in range(max(1, size // 500)):  # stray CRs, LFs and dots at random places
        text[rng.randrange(size)] = rng.choice(b"\r\n.")
    block = bytes(text)
    for needle in NEEDLES:
        assert search.count(block, needle) == block.count(needle), needle
        assert search.find(block, needle) == block.find(needle), needle
        at = rng.randrange(size)
        assert search.find(block, needle, at) == block.find(needle, at), (needle, at)
    # A match in the very last bytes, past the last whole vector.
    tail = block[:-3] + b"\r\n."
    assert search.find(tail, b"\r\n.") == tail.find(b"\r\n.")
