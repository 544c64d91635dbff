#!/usr/bin/env python3
"""atheris target: the sans-IO SMTP server protocol (mailgate.smtp.protocol).

The first 6 bytes of an input choose the limits, which DATA commands the "session" accepts and
where the stream is cut into receive_data() chunks; the rest is the byte stream. Each input
must pass ``check_protocol``: the same events when the stream is not cut, the events the
reference model gives, bounded ``pending_bytes``, no exception. See README.md here.
"""

from __future__ import annotations

import random
import sys

import _setup  # noqa: F401  (sys.path)
import atheris
from atheris.import_hook import instrument_imports

with instrument_imports(include=["mailgate"]):
    import mailgate.reply
    import mailgate.smtp.protocol  # noqa: F401

from tests.reliability.fuzz_support import Limits, check_protocol

COMMAND_LINE = (8, 16, 40, 64, 512)
TEXT_LINE = (0, 2, 5, 12, 40, 1000)  # 0: no limit


HEADER = 6


def decode(data: bytes) -> tuple[bytes, Limits, list[bool], list[int]]:
    """Header bytes: command-line limit, text-line limit, size limit (200+ = none), accept
    bits (the top two: how many DATA decisions repeat), number of cuts, cut seed."""
    h = data[:HEADER].ljust(HEADER, b"\0")
    wire = data[HEADER:]
    lim = Limits(
        COMMAND_LINE[h[0] % len(COMMAND_LINE)],
        TEXT_LINE[h[1] % len(TEXT_LINE)],
        None if h[2] >= 200 else h[2],
    )
    accept = [bool(h[3] >> i & 1) for i in range(1 + (h[3] >> 6))]
    rng = random.Random(h[5])
    cuts = [rng.randrange(1, len(wire)) for _ in range(h[4] % 16)] if len(wire) > 1 else []
    return wire, lim, accept, cuts


def test_one_input(data: bytes) -> None:
    wire, lim, accept, cuts = decode(data)
    check_protocol(wire, lim, accept, cuts)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
