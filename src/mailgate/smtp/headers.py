"""The header section of a message being received: where it ends (HeaderScanner) and what we
add to it (:func:`stamp`: our ``Received:``, and ``Message-Id``, ``Date``, ``From`` and
``X-Authentication-Warning`` where Sendmail adds them). Pure functions over bytes and facts, as
Postfix keeps this apart in its cleanup daemon; the session only feeds and writes."""

from __future__ import annotations

import email.utils
import functools
import re
import time
from dataclasses import dataclass

MAX_HEADER_BYTES = 32768  # Sendmail's MaxHeadersLength with DOMAIN(generic)
MAX_HOPS = 25  # Sendmail's MaxHopCount


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def rfc2822_date(ts: float) -> str:
    """The RFC 5322 date of ``ts`` (to the second, as mail dates are), cached per second."""
    return _date_of_second(int(ts))


class HeaderScanner:
    """Holds the header section (bounded) so that we can add headers and read Message-Id.

    The section ends at the empty line or at the first line that is neither a field nor a
    continuation (as Sendmail ends it). Lines are looked at once each, as they complete, so
    the limit (MAX_HEADER_BYTES of field lines) is the same however the bytes arrive."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self.too_large = False
        # The field lines so far are buf[:pos]; once the section is complete, the section
        # feed returned is its field lines up to pos, then the empty line or the first line
        # of the body (stamp's ``fields_end``, so that it need not look for the end again).
        self.pos = 0
        self.rest = b""

    def feed(self, data: bytes) -> bytes | None:
        """The header section once it is complete (what follows it is in ``self.rest``)."""
        if self.too_large:
            return None  # keep memory bounded; the message is refused at its end
        self.buf += data
        buf = self.buf
        pos = self.pos
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            if nl == pos:
                return self._split(nl + 2)  # the empty line ends the section
            if not (pos and buf[pos] in _WSP) and _HEADER_LINE.match(buf, pos, nl) is None:
                # The body starts here; with no field line before it there is no section.
                return self._split(nl + 2 if pos else 0)
            pos = self.pos = nl + 2
            if pos > MAX_HEADER_BYTES:
                self._overflow()
                return None
        partial = bytes(buf[pos:])
        if pos + len(partial) > MAX_HEADER_BYTES and _may_be_header_line(partial):
            self._overflow()
        return None

    def _overflow(self) -> None:
        self.too_large = True
        self.buf = bytearray()

    def _split(self, cut: int) -> bytes:
        self.done = True
        head = bytes(self.buf[:cut])
        self.rest = bytes(self.buf[cut:])
        self.buf = bytearray()
        return head


_WSP = b" \t"  # a line starting with one of these continues the field above


def _may_be_header_line(start: bytes) -> bool:
    """Could a line beginning with ``start`` still turn out to be a field or continuation?"""
    if start[:1] in (b" ", b"\t"):
        return True
    name, colon, _ = start.partition(b":")
    if colon:
        return _is_header_line(start)
    return b" " not in name.rstrip()


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """Unfolded (name, value) pairs of a header section."""
    fields: list[tuple[str, str]] = []
    for raw in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if not raw:
            continue
        if raw[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + raw.strip())
        elif ":" in raw:
            name, _, value = raw.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


# A header field line: a name that starts with neither white space nor ":", and whose spaces
# are all in the white space before the colon. One match (HeaderScanner's in place, no copy
# of each line); possessive, so a long line that is no field costs one pass, never a
# backtrack.
_HEADER_LINE = re.compile(rb"[^\s:][^ :]*+[ \t\n\r\x0b\x0c]*+:")


def _is_header_line(line: bytes | bytearray) -> bool:
    return _HEADER_LINE.match(line) is not None


def drop_fields(head: bytes, names: frozenset[str]) -> bytes:
    """``head`` without the fields named in ``names`` (lower case), continuation lines
    included: ``sendmail -t`` removes ``Bcc:`` before the message goes anywhere."""
    header, _ = split_header_section(head)
    kept: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.partition(b":")[0].strip().lower()
        dropping = name.decode("ascii", "replace") in names
        if not dropping:
            kept.append(line)
    return b"".join(kept) + head[len(header) :]


def split_header_section(head: bytes) -> tuple[bytes, bytes]:
    """(header lines, start of the body): the body starts after the empty line, or at the first
    line that is neither a header nor a continuation (where Sendmail also ends the headers)."""
    pos, n = 0, len(head)
    while pos < n:
        nl = head.find(b"\r\n", pos)
        end = n if nl < 0 else nl + 2
        line = head[pos:end].rstrip(b"\r\n")
        if not line:
            return head[:pos], head[end:]
        if not (pos and line[:1] in (b" ", b"\t")) and not _is_header_line(line):
            return head[:pos], head[pos:]
        pos = end
    return head, b""


@dataclass(slots=True)
class StampFacts:
    """What the stamp says about the message and the session it came in. (Not frozen, nor
    ``Stamped``: made per message; see docs/design.md, "CPU per message".)"""

    hostname: str  # $j
    qid: str
    arrival: float
    sender: str
    recipients: tuple[str, ...]
    client_ip: str
    client_name: str | None  # the PTR name, verified or not
    client_verified: str | None  # the PTR name if it resolves back
    client_is_loopback: bool
    helo: str | None
    esmtp: bool
    smtputf8: bool
    tls: str | None  # the TLS session as Received: shows it (tls.Session.for_received)
    authwarnings: bool  # PrivacyOptions authwarnings
    # A local submission (``mailgate sendmail``): the submitting user's login name, which
    # makes Sendmail's ``Received: (from user@localhost) by host (…/Submit)`` line.
    submitter: str | None = None
    untrusted_from: bool = False  # that user is not trusted and set the sender with -f
    sender_name: str | None = None  # the full name (-F, or passwd's) for a From: we add


@dataclass(slots=True)
class Stamped:
    """The header section to write, and what the session learnt from it."""

    data: bytes
    msgid: str  # the client's Message-Id, or the one we added
    hops: int  # Received: fields the client's section had
    warning: str | None  # the X-Authentication-Warning text we added (for the maillog)


def auth_warning(facts: StampFacts) -> str | None:
    """X-Authentication-Warning: where Sendmail's authwarnings adds one (semantics §11)."""
    if not facts.authwarnings:
        return None
    if facts.submitter is not None:
        if facts.untrusted_from:
            return f"{facts.submitter} set sender to {facts.sender or '<>'} using -f"
        return None
    if facts.helo is None:
        return f"[{facts.client_ip}] didn't use HELO protocol"
    verified = facts.client_verified
    if (
        verified
        and not facts.client_is_loopback
        and facts.helo.lower().rstrip(".") != verified.lower()
    ):
        return f"Host {verified} [{facts.client_ip}] claimed to be {facts.helo}"
    return None


def stamp(head: bytes, facts: StampFacts, *, fields_end: int | None = None) -> Stamped:
    """Our Received: first, then the client's header section with Message-Id, Date and From
    added when missing (RFC 5322 3.6 requires them; Sendmail adds them), and the
    authentication warning. ``head`` is the section as HeaderScanner cut it (maybe with the
    start of the body); ``fields_end``, where its field lines end if the caller knows
    (``HeaderScanner.pos``), else they are looked for here."""
    if fields_end is None:
        header, body = split_header_section(head)
    else:
        header, body = head[:fields_end], head[fields_end:]
        if body.startswith(b"\r\n"):
            body = body[2:]  # the empty line: written again below
    fields = header_fields(header)
    names = {n for n, _ in fields}
    hops = sum(1 for n, _ in fields if n == "received")
    msgid = next((v for n, v in reversed(fields) if n == "message-id"), None)
    date = rfc2822_date(facts.arrival)
    if facts.submitter is not None:
        # Sendmail's MSP line: no client, no protocol.
        recv = (
            f"Received: (from {facts.submitter}@localhost)\r\n"
            f"\tby {facts.hostname} (mailgate/Submit) id {facts.qid}"
        )
    else:
        if facts.client_name:
            forged = "" if facts.client_verified else " (may be forged)"
            origin = f"({facts.client_name} [{facts.client_ip}]{forged})"
        else:
            origin = f"([{facts.client_ip}])"
        helo = facts.helo or f"[{facts.client_ip}]"
        with_proto = ("UTF8SMTP" if facts.smtputf8 else "ESMTP") if facts.esmtp else "SMTP"
        recv = f"Received: from {helo} {origin}"
        if facts.tls:
            # As Sendmail: the TLS session on a line of its own, and "with ESMTPS".
            recv += f"\r\n\t({facts.tls})"
            with_proto += "S"
        recv += f"\r\n\tby {facts.hostname} (mailgate) with {with_proto} id {facts.qid}"
    if len(facts.recipients) == 1:
        recv += f"\r\n\tfor <{facts.recipients[0]}>"
    recv += f"; {date}\r\n"
    warning = auth_warning(facts)
    extra = f"X-Authentication-Warning: {facts.hostname}: {warning}\r\n" if warning else ""
    if msgid is None:
        msgid = (
            f"<{time.strftime('%Y%m%d%H%M', time.gmtime(facts.arrival))}."
            f"{facts.qid}@{facts.hostname}>"
        )
        extra += f"Message-Id: {msgid}\r\n"
    if "date" not in names:
        extra += f"Date: {date}\r\n"
    if "from" not in names:
        sender = facts.sender or "MAILER-DAEMON@" + facts.hostname
        if facts.sender_name:
            sender = email.utils.formataddr((facts.sender_name, sender))
        extra += f"From: {sender}\r\n"
    # Keep a headers-only message as it was; otherwise one empty line ends the headers.
    had_blank = head[len(header) : len(header) + 2] == b"\r\n"
    sep = b"\r\n" if had_blank or body or not header else b""
    # surrogateescape: a HELO name in non-UTF-8 bytes goes back out as it came.
    return Stamped(
        recv.encode("utf-8", "surrogateescape")
        + header
        + extra.encode("utf-8", "surrogateescape")
        + sep
        + body,
        msgid,
        hops,
        warning,
    )
