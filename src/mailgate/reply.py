"""SMTP replies: a code, an optional RFC 3463 enhanced status code and text.

Kept apart from the protocol so that policy (pure decisions) can return replies without
importing anything that does I/O.
"""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    """An SMTP reply. A NamedTuple rather than a frozen dataclass: as immutable and hashable,
    and made at a fraction of the cost (a frozen dataclass sets each field through
    ``object.__setattr__``), which counts for something made fourteen times per message."""

    code: int
    enhanced: str | None
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply as text lines without line ends, e.g. ``["250 2.1.0 <a@b>... Sender ok"]``."""
        text = self.text
        if "\r" in text:
            # A CR would put a bare CR on the wire inside the reply line: texts that echo what
            # the client sent (an address, a verb) may hold one. Postfix prints it as "?".
            text = text.replace("\r", "?")
        texts = text.split("\n") if text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, t in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{t}".rstrip())
        return out

    def to_bytes(self) -> bytes:
        """The reply as sent, each line ended by CRLF."""
        text = self.text
        if "\n" in text or "\r" in text:
            # The EHLO reply, the same for each connection of a client: made once.
            wire = _MULTILINE.get(self)
            if wire is None:
                if len(_MULTILINE) >= _MULTILINE_KEPT:
                    _MULTILINE.clear()
                wire = _MULTILINE[self] = ("\r\n".join(self.lines()) + "\r\n").encode(
                    "utf-8", "surrogateescape"
                )
            return wire
        # The usual reply, one line: formatted at once, as lines() would (every reply sent
        # comes here, and lines() costs twice as much).
        line = f"{self.code} {self.enhanced} {text}" if self.enhanced else f"{self.code} {text}"
        return (line.rstrip() + "\r\n").encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return " ".join(self.lines()) if "\n" not in self.text else "\n".join(self.lines())


_MULTILINE: dict[Reply, bytes] = {}  # multi-line replies' wire forms
_MULTILINE_KEPT = 1024


def parse_reply_line(line: str) -> tuple[int, bool, str]:
    """Split one received reply line into (code, is_last_line, text).

    Raises ValueError on a line that is not a reply.
    """
    if len(line) < 3 or not line[:3].isdigit():
        raise ValueError(f"not an SMTP reply: {line!r}")
    code = int(line[:3])
    sep = line[3:4]
    if sep not in ("", " ", "-"):
        raise ValueError(f"not an SMTP reply: {line!r}")
    return code, sep != "-", line[4:]


def split_enhanced(text: str) -> tuple[str | None, str]:
    """Split ``"5.1.1 User unknown"`` into ``("5.1.1", "User unknown")``."""
    head, _, rest = text.partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() for p in parts[1:]):
        return head, rest
    return None, text
