"""The content as the SMTP client sends it after DATA: streaming, sans-IO transforms.

The spool keeps every message byte for byte as received; what a next hop can take is decided
here, block by block as the client reads the spool file, so no message is ever held in memory:

1. to a hop that does not offer 8BITMIME, 8-bit MIME parts become quoted-printable
   (``smtp/downgrade.py``, RFC 6152 section 3);
2. lines longer than ``[delivery] line_length_limit`` (998 octets, RFC 5321 4.5.3.1.6) are
   broken by inserting CRLF SPACE, as Postfix's ``smtp_line_length_limit`` does;
3. dot-stuffing, which stays in the client (``SmtpClient._send_body``).

Bytes in, bytes out: each transform takes blocks of any size, split anywhere, and gives the
same output as for the whole message at once.
"""

from __future__ import annotations

from mailgate.smtp.downgrade import Downgrader, Plan

__all__ = ["LineFolder", "OutgoingContent"]

_CR = 13
_LF = 10


class LineFolder:
    """Breaks every line longer than ``limit`` octets (its CRLF not counted) after ``limit``
    octets by inserting CRLF and ``lead`` (a space), so that no line sent is longer.

    Why CRLF SPACE, as Postfix: in the header section a line that starts with a space is the
    continuation of the field above (RFC 5322 2.2.3), so a long field stays one field; in a
    text body the reader sees a wrapped line. Removing the inserted CRLF SPACE gives the
    original back. A break never falls inside a UTF-8 sequence (it moves back at most three
    octets to the lead byte), so 8-bit text stays decodable on both sides.

    Lines end at LF, as the server protocol counts them (spool content has only CRLF). The
    cost is one ``rfind`` per ``limit`` octets, not a step per line: in the usual message,
    with no long line, a block goes through untouched.
    """

    def __init__(self, limit: int, lead: bytes = b" ") -> None:
        if limit < 2 or len(lead) != 1:
            raise ValueError("the limit must be at least 2 and the lead one byte")
        self.limit = limit
        self._fold = b"\r\n" + lead
        self._col = 0  # octets of the current line already given out
        self._held = b""  # the end of the last block, given out with the next one
        self.folds = 0  # CRLF SPACE inserted so far

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        work = self._held + data if self._held else data
        # A final CR is held back: whether it starts a CRLF shows in the next block.
        return self._process(work, len(work) - 1 if work[-1] == _CR else len(work), False)

    def end(self) -> bytes:
        """The rest: octets held back at the very end are content."""
        held, self._held = self._held, b""
        return self._process(held, len(held), True) if held else b""

    def _process(self, work: bytes, n: int, final: bool) -> bytes:
        """Give out ``work[:n]`` with breaks (``work[n:]``, a held CR, is not an LF); hold
        back what a later break may need to look at."""
        limit = self.limit
        pieces: list[bytes] = []
        start = 0  # first byte of work not yet given out
        ls = -self._col  # where the current line starts, relative to work (may be before it)
        rfind = work.rfind
        reach = limit + 1  # an LF at ls + reach or before may end a line within the limit
        while True:
            top = ls + reach
            q = rfind(b"\n", ls if ls > 0 else 0, top + 1 if top < n else n)
            if q >= 0:
                # Every line ending in the window is short enough, except perhaps one of
                # limit + 1 octets before an LF with no CR: only possible if it starts at ls.
                if q == top and work[q - 1] != _CR and rfind(b"\n", ls if ls > 0 else 0, q) < 0:
                    ls = self._break(work, pieces, start, ls)
                    start = ls + 1
                    continue
                ls = q + 1
                continue
            if n - ls <= limit:
                break  # the current line may still end in time
            ls = self._break(work, pieces, start, ls)
            start = ls + 1
        # A break of the unfinished line looks back up to three octets from its limit: keep
        # those here, so that the output does not depend on where the blocks end.
        upto = n
        if not final and ls + limit - 3 < n:
            upto = max(ls + limit - 3, start)
        if start == 0 and upto == len(work):
            pieces.append(work)
        elif start < upto:
            pieces.append(work[start:upto])
        self._held = work[upto:]
        self._col = upto - ls
        return b"".join(pieces) if len(pieces) != 1 else pieces[0]

    def _break(self, work: bytes, pieces: list[bytes], start: int, ls: int) -> int:
        """Insert the fold after ``limit`` octets of the line at ``ls``; return the new line
        start (one before the first byte after the fold: the space is its first octet)."""
        at = ls + self.limit
        # Not inside a UTF-8 sequence: back to its lead byte (continuation bytes are
        # 10xxxxxx), at most three octets, leaving at least two on the line (a continuation
        # line's space counts), and never into what was given out (_process keeps those).
        floor = max(ls + 2, at - 3, start)
        back = at
        while back > floor and 0x80 <= work[back] < 0xC0:
            back -= 1
        if back < at and work[back] >= 0xC0:
            at = back
        pieces.append(work[start:at])
        pieces.append(self._fold)
        self.folds += 1
        return at - 1


class OutgoingContent:
    """The transforms a message goes through on its way to one next hop (before
    dot-stuffing): the 8BITMIME downgrade when ``plan`` says so, then line folding."""

    def __init__(self, *, line_limit: int, plan: Plan | None = None) -> None:
        self._downgrade = Downgrader(plan) if plan is not None and plan.converts else None
        self._fold = LineFolder(line_limit) if line_limit else None

    @property
    def converting(self) -> bool:
        """8-bit parts are being converted (Python work per line: worth yielding between
        blocks)."""
        return self._downgrade is not None

    @property
    def folds(self) -> int:
        return self._fold.folds if self._fold is not None else 0

    def feed(self, data: bytes) -> bytes:
        if self._downgrade is not None:
            data = self._downgrade.feed(data)
        return self._fold.feed(data) if self._fold is not None else data

    def end(self) -> bytes:
        data = self._downgrade.end() if self._downgrade is not None else b""
        if self._fold is None:
            return data
        return self._fold.feed(data) + self._fold.end()
