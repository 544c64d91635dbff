"""A message on ``sendmail``'s standard input, as the spool holds it: sans-IO, bytes in, bytes
out, in blocks of any size.

Line ends become CRLF: a bare LF (how every Unix program writes) and a CR not followed by LF
alike, so the spool keeps what the SMTP path guarantees, no bare CR or LF, and a next hop
never sees one (local submission is not a way round the smuggling checks). Input ends at end
of file or, unless ``ignore_dots`` (``-i``, ``-oi``), at a line that is a lone ``.``, as
Sendmail's ``collect`` ends it; nothing after that line is read. Lines are not dot-stuffed
here: that is SMTP's framing, and the SMTP client adds it on the way out.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class LocalInput:
    def __init__(self, *, ignore_dots: bool) -> None:
        self.ignore_dots = ignore_dots
        self.done = False  # the lone-dot line was seen: what follows is not the message
        self._carry = b""  # undecided bytes: a CR that may start a CRLF, a dot at a line start
        self._at_line_start = True  # the output so far ends with a line end (or is empty)

    def feed(self, data: bytes) -> bytes:
        """The content ``data`` completes (maybe less: see ``_carry``)."""
        if self.done:
            return b""
        text = self._carry + data
        self._carry = b""
        if text.endswith(b"\r"):
            text, self._carry = text[:-1], b"\r"
        out = _LINE_END.sub(b"\r\n", text)
        if not self.ignore_dots:
            out = self._cut_at_dot(out)
        if out:
            self._at_line_start = out.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        """The rest at end of input, with a line end added to an unfinished last line."""
        if self.done:
            return b""
        out = _LINE_END.sub(b"\r\n", self._carry)
        self._carry = b""
        if not self.ignore_dots and self._at_line_start and out in (b".", b".\r\n"):
            out = b""  # a lone dot at the very end (with its line end or not): the same end
        self.done = True
        if out:
            self._at_line_start = out.endswith(b"\r\n")
        return out if self._at_line_start else out + b"\r\n"

    def _cut_at_dot(self, out: bytes) -> bytes:
        if self._at_line_start and out.startswith(b".\r\n"):
            self.done = True
            return b""
        end = out.find(b"\r\n.\r\n")
        if end >= 0:
            self.done = True
            return out[: end + 2]
        # A dot that starts the last, unfinished line: a lone one ends the input, so wait.
        if out.endswith(b"\r\n.") or (out == b"." and self._at_line_start):
            self._carry = b"." + self._carry
            return out[:-1]
        return out
