"""Delivery status notifications (RFC 3464 / RFC 6522): bounces, delay warnings and return
receipts (RFC 3461 NOTIFY=SUCCESS).

The layout and the human-readable part follow Sendmail's (semantics §16).  The original
message is streamed from the spool file, never held in memory: ``dsn_stream`` gives the DSN
as blocks of at most ``CHUNK`` bytes past its head (``delivery.notify`` pulls them in a worker
thread and writes them into the spool on the loop), ``write_dsn`` writes them to a file.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

# "failed" (bounces), "delayed" (warnings), "relayed" or "delivered" (return receipts)
Action = Literal["failed", "delayed", "relayed", "delivered"]

CHUNK = 64 * 1024
_FOLD = 78  # RFC 5322 recommended line length
_MAX_VALUE = 4000  # cap for one header value built from remote text
_MAX_LINE = 990  # RFC 5322 hard limit is 998 + CRLF

# Short reasons for when no remote reply explains a failure (as Sendmail's texts).
_STATUS_TEXT = {
    "5.1.1": "User unknown",
    "5.1.2": "Host unknown (Name server: host not found)",
    "5.1.3": "Bad destination mailbox address",
    "4.4.7": "Message could not be delivered in time",
    "5.4.7": "Message could not be delivered in time",
    "5.4.6": "Too many hops",
    "5.3.0": "Mailer error",
    "4.3.0": "Deferred",
}


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's outcome for a DSN: a failure, a delay or a success (return receipt)."""

    address: str  # final (rewritten) recipient
    original: str | None  # as given at RCPT, when it differs (alias, virtusertable)
    status: str  # enhanced status, "5.1.1"
    diagnostic: str | None  # remote reply, e.g. "550 5.1.1 <bob@x>... User unknown"
    remote_mta: str | None  # "[198.51.100.25]" or a host name
    action: Action = "failed"
    last_attempt: float | None = None  # epoch
    transcript: tuple[str, ...] = ()  # >>>/<<< lines of the failed dialogue, for part 1
    orcpt: str | None = None  # RCPT ORCPT=, decoded: "rfc822;bob@example.org"
    retry_until: float | None = None  # epoch: when a delayed one is given up (max_age)
    local: bool = False  # ``diagnostic`` is our words, no peer's reply: no Diagnostic-Code


_SUCCESS = {
    "relayed": "relayed to non-DSN-aware mailer",
    "delivered": "successfully delivered to mailbox",
}


def _flatten(text: str) -> str:
    """One line of text: controls (CR, LF, TAB, ...) become spaces, runs of spaces collapse.

    Remote replies can be multi-line; a raw CR or LF in a header would end the field.
    """
    cleaned = "".join(" " if c < " " or c == "\x7f" else c for c in text)
    return " ".join(cleaned.split())[:_MAX_VALUE]


def _header(name: str, value: str) -> str:
    """``Name: value`` folded at spaces to about 78 columns, lines joined by CRLF + space."""
    words = _flatten(value).split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if line.endswith(":") or len(line) + 1 + len(word) <= _FOLD:
            line = f"{line} {word}"
        else:
            lines.append(line)
            line = f" {word}"
    lines.append(line.rstrip())
    return "\r\n".join(lines) + "\r\n"


def _text_lines(text: str) -> list[str]:
    """Split free text (maybe with CR/LF inside) into clean body lines of bounded length."""
    out = []
    for raw in text.splitlines() or [""]:
        line = "".join(c for c in raw if (c >= " " and c != "\x7f") or c == "\t")
        out.append(line[:_MAX_LINE])
    return out


def _encode(text: str) -> bytes:
    # Surrogates (undecodable bytes kept by surrogateescape) become "?", never invalid UTF-8.
    return text.encode("utf-8", "replace")


_REPLY_START = re.compile(r"[245]\d\d[ -]")


def _bracket(addr: str) -> str:
    addr = addr.strip()
    return addr if addr.startswith("<") else f"<{addr}>"


def _reason(r: DsnRecipient) -> str:
    if r.diagnostic:
        return _flatten(r.diagnostic)
    return _STATUS_TEXT.get(r.status, f"Status {r.status}")


def _smtp_reply(r: DsnRecipient) -> str | None:
    """The peer's SMTP reply for Diagnostic-Code (RFC 3464 §2.3.6: what the remote MTA
    said); None when no peer said anything (a refused connection, a DNS failure), also for
    an expired recipient whose last error was one ("Deferred: Connection refused by …")."""
    if r.local or not r.diagnostic:
        return None
    text = r.diagnostic.removeprefix("Deferred: ")
    return text if _REPLY_START.match(text) else None


def _human_part(
    *,
    arrival: float,
    client: str,
    recipients: Sequence[DsnRecipient],
    warning: bool,
    delay: float,
) -> list[str]:
    lines: list[str] = []
    if warning:
        lines += [
            "    **********************************************",
            "    **      THIS IS A WARNING MESSAGE ONLY      **",
            "    **  YOU DO NOT NEED TO RESEND YOUR MESSAGE  **",
            "    **********************************************",
            "",
        ]
    lines.append(f"The original message was received at {formatdate(arrival, localtime=True)}")
    lines.append(f"from {_flatten(client)}")
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    succeeded = [r for r in recipients if r.action in _SUCCESS]
    for title, group in (
        ("permanent fatal errors", failed),
        ("transient non-fatal errors", delayed),
        ("successful delivery notifications", succeeded),
    ):
        if not group:
            continue
        lines += ["", f"   ----- The following addresses had {title} -----"]
        for r in group:
            lines.append(_bracket(_flatten(r.address)))
            if r.original and r.original != r.address:
                lines.append(f"    (expanded from: {_bracket(_flatten(r.original))})")
            lines.append(
                f"    ({_SUCCESS[r.action]})"
                if r.action in _SUCCESS
                else f"    (reason: {_reason(r)})"
            )
    # One transcript per distinct dialogue: several recipients often share one session.
    seen: set[tuple[str | None, tuple[str, ...]]] = set()
    body: list[str] = []
    for r in failed + delayed:
        key = (r.remote_mta, r.transcript or ((r.diagnostic,) if r.diagnostic else ()))
        if not key[1] or key in seen:
            continue
        seen.add(key)
        if r.remote_mta:
            body.append(f"... while talking to {_flatten(r.remote_mta)}:")
        for item in key[1]:
            if item is not None:
                body += _text_lines(item)
    if warning:
        body.append(f"Warning: message still undelivered after {interval_text(delay)}")
    elif any(r.status == "4.4.7" for r in failed):  # given up in the queue, as Sendmail says
        body.append(f"Message could not be delivered for {interval_text(delay)}")
        body.append("Message will be deleted from queue")
    if body:
        lines += ["", "   ----- Transcript of session follows -----", *body]
    return lines


def is_receipt(recipients: Sequence[DsnRecipient]) -> bool:
    """A return receipt (NOTIFY=SUCCESS), not a failure notice or a delay warning."""
    return all(r.action in _SUCCESS for r in recipients)


_UNITS = (("week", 7 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def interval_text(seconds: float) -> str:
    """A duration as Sendmail writes it in DSNs and maillog (``pintvl``): ``4 hours``,
    ``1 day, 12 hours``, ``30 minutes``, ``2 weeks``; in whole seconds."""
    left = max(0, round(seconds))
    if not left:
        return "zero seconds"
    parts = []
    for name, size in _UNITS:
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return ", ".join(parts)


def warning_subject(delay: float) -> str:
    """A delay warning's subject, and its maillog ``DSN:`` reason, as Sendmail's."""
    return f"Warning: could not send message for past {interval_text(delay)}"


def _rounded_age(age: float) -> float:
    unit = 3600 if age >= 3600 else 60
    return max(1, round(age / unit)) * unit


def needs_utf8(sender: str, recipients: Sequence[DsnRecipient]) -> bool:
    """Whether a DSN about these addresses must be internationalised (RFC 6533): a UTF-8
    address can only travel in message/global-delivery-status and with SMTPUTF8."""
    return not all(
        a.isascii()
        for a in (
            sender,
            *(x for r in recipients for x in (r.address, r.original or "", r.orcpt or "")),
        )
    )


def has_8bit_text(recipients: Sequence[DsnRecipient]) -> bool:
    """Whether the human-readable part will hold non-ASCII text (a remote reply in UTF-8)."""
    return not all(
        t.isascii()
        for r in recipients
        for t in (r.address, r.original or "", r.diagnostic or "", *r.transcript)
    )


def _address_field(name: str, address: str, utf8: bool) -> str:
    # RFC 6533 3: a non-ASCII address is of type utf-8, and only in the global report.
    kind = "utf-8" if utf8 and not address.isascii() else "rfc822"
    return _header(name, f"{kind}; {address}")


def _status_part(
    *,
    hostname: str,
    arrival: float,
    client: str,
    recipients: Sequence[DsnRecipient],
    envid: str | None = None,
    utf8: bool = False,
) -> str:
    out = _header("Original-Envelope-Id", _flatten(envid)) if envid else ""
    out += _header("Reporting-MTA", f"dns; {hostname}")
    if client:
        out += _header("Received-From-MTA", f"dns; {client}")
    out += _header("Arrival-Date", formatdate(arrival, localtime=True))
    for r in recipients:
        out += "\r\n"
        # As Sendmail: Final-Recipient is the address we were given at RCPT;
        # X-Actual-Recipient the one we tried after aliases / virtusertable.
        given = r.original or r.address
        if r.orcpt:
            out += _header("Original-Recipient", _flatten(r.orcpt))
        out += _address_field("Final-Recipient", given, utf8)
        if r.original and r.original != r.address:
            out += _address_field("X-Actual-Recipient", r.address, utf8)
        out += _header("Action", r.action)
        out += _header("Status", r.status)
        if r.remote_mta:
            out += _header("Remote-MTA", f"dns; {r.remote_mta}")
        code = _smtp_reply(r)
        if code:
            out += _header("Diagnostic-Code", f"smtp; {code}")
        if r.last_attempt is not None:
            out += _header("Last-Attempt-Date", formatdate(r.last_attempt, localtime=True))
        if r.action == "delayed" and r.retry_until is not None:  # RFC 3464 §2.3.9
            out += _header("Will-Retry-Until", formatdate(r.retry_until, localtime=True))
    return out


class SupportsWriteBytes(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _contains(path: Path, offset: int, needle: bytes) -> bool:
    """Whether ``needle`` occurs in the file from ``offset``, streaming with an overlap."""
    keep = len(needle) - 1
    tail = b""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            window = tail + chunk
            if needle in window:
                return True
            tail = window[-keep:] if keep else b""
    return False


def _iter_all(src: BinaryIO) -> Iterator[bytes]:
    while chunk := src.read(CHUNK):
        yield chunk


def _iter_headers(src: BinaryIO) -> Iterator[bytes]:
    """The header section, through the CRLF ending the last field, without the blank line.

    A virtual CRLF is put before the content so that a message starting with the blank line
    (no headers) is found by the same search; three bytes are held back between chunks so a
    CRLF CRLF split across chunks is still seen.
    """
    pending = b"\r\n"
    virtual = 2  # leading bytes of ``pending`` that are not content
    while True:
        chunk = src.read(CHUNK)
        window = pending + chunk
        idx = window.find(b"\r\n\r\n")
        if idx >= 0:
            yield window[virtual : idx + 2]
            return
        if not chunk:
            yield window[virtual:]
            return
        cut = len(window) - 3
        yield window[virtual:cut]
        pending = window[cut:]
        virtual = max(0, virtual - cut)


def write_dsn(out: SupportsWriteBytes, **kw: Any) -> str:
    """Write the DSN ``dsn_stream(**kw)`` describes to ``out``; returns its Message-Id."""
    message_id, blocks = dsn_stream(**kw)
    for block in blocks:
        out.write(block)
    return message_id


def dsn_stream(
    *,
    hostname: str,
    queue_id: str,
    arrival: float,
    client: str,
    sender: str,
    recipients: Sequence[DsnRecipient],
    original_path: Path,
    original_offset: int,
    return_headers_only: bool = False,
    warning_after: float | None = None,
    now: float | None = None,
    envid: str | None = None,
    international: bool = False,
    postmaster: str | None = None,
) -> tuple[str, Iterator[bytes]]:
    """A multipart/report DSN for ``recipients`` (CRLF): its Message-Id, and its content as
    blocks, made as they are asked for (the original is read then, in ``CHUNK`` blocks).

    The DSN is a delay warning when every recipient's action is ``delayed`` (subject
    ``Warning: could not send message for past 4 hours``: ``warning_after`` seconds, or the
    age of the message in whole hours, minutes under an hour), a return receipt when every
    one is ``relayed`` or ``delivered`` (subject ``Return receipt``, as Sendmail), else a
    failure notice.  Part 3 is the original message, byte for byte, or only its header
    section (``text/rfc822-headers``) when ``return_headers_only`` (RET=HDRS).  ``envid`` is
    the sender's ENVID=, decoded.
    ``international`` (an SMTPUTF8 original, or a UTF-8 address): RFC 6533's
    message/global-delivery-status, and message/global (-headers) for the original.
    The caller sends it with ``MAIL FROM:<>`` to ``sender``; an empty sender (a bounce itself)
    must not be bounced, so it raises ValueError (at once, not from the blocks), unless
    ``postmaster`` is given: a double bounce (Sendmail's postmaster notify), addressed to it,
    subject ``Postmaster notify: see transcript for details``.
    """
    if postmaster is None and not sender.strip("<> "):
        raise ValueError("no DSN for the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    warning = all(r.action == "delayed" for r in recipients)
    receipt = is_receipt(recipients)
    delay = warning_after if warning_after is not None else _rounded_age(now - arrival)
    host = _flatten(hostname)

    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    message_id = f"<{stamp}.{_flatten(queue_id)}.{secrets.token_hex(4)}@{host}>"
    if warning:
        subject, kind = warning_subject(delay), "warning"
    elif postmaster is not None:
        subject, kind = "Postmaster notify: see transcript for details", "failure"
    elif receipt:
        subject, kind = "Return receipt", "return-receipt"
    else:
        subject, kind = "Returned mail: see transcript for details", "failure"

    def blocks() -> Iterator[bytes]:
        boundary = f"{_flatten(queue_id)}.{int(now)}/{host}"
        # A sender who guesses the boundary could forge parts; make sure the original lacks it.
        for _ in range(4):
            if not _contains(original_path, original_offset, boundary.encode()):
                break
            boundary = f"{boundary}.{secrets.token_hex(4)}"
        yield _encode(
            _head(
                boundary,
                host=host,
                to=postmaster or sender,
                subject=subject,
                kind=kind,
                now=now,
                message_id=message_id,
            )
            + _part1(
                boundary,
                arrival=arrival,
                client=client,
                recipients=recipients,
                warning=warning,
                delay=delay,
            )
            + _part2(
                boundary,
                hostname=host,
                arrival=arrival,
                client=client,
                recipients=recipients,
                envid=envid,
                utf8=international,
            )
            + _part3(boundary, headers_only=return_headers_only, international=international)
        )
        with open(original_path, "rb") as src:
            src.seek(original_offset)
            yield from _iter_headers(src) if return_headers_only else _iter_all(src)
        # The CRLF before the closing delimiter belongs to the delimiter (RFC 2046), so the
        # original's own last CRLF stays part of the enclosed message.
        yield _encode(f"\r\n--{boundary}--\r\n")

    return message_id, blocks()


def _head(
    boundary: str, *, host: str, to: str, subject: str, kind: str, now: float, message_id: str
) -> str:
    return (
        _header("From", f"Mail Delivery Subsystem <MAILER-DAEMON@{host}>")
        + _header("To", _bracket(_flatten(to)))
        + _header("Subject", subject)
        + _header("Auto-Submitted", f"auto-generated ({kind})")
        + _header("Date", formatdate(now, localtime=True))
        + _header("Message-Id", message_id)
        + _header("MIME-Version", "1.0")
        + "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        + f'\tboundary="{boundary}"\r\n'
        + "\r\n"
        + "This is a MIME-encapsulated message\r\n"
        + "\r\n"
    )


def _part1(
    boundary: str,
    *,
    arrival: float,
    client: str,
    recipients: Sequence[DsnRecipient],
    warning: bool,
    delay: float,
) -> str:
    human = "".join(
        line + "\r\n"
        for line in _human_part(
            arrival=arrival, client=client, recipients=recipients, warning=warning, delay=delay
        )
    )
    charset = "us-ascii" if human.isascii() else "utf-8"
    part1 = f"--{boundary}\r\nContent-Type: text/plain; charset={charset}\r\n"
    if charset != "us-ascii":
        part1 += "Content-Transfer-Encoding: 8bit\r\n"
    return part1 + "\r\n" + human + "\r\n"


def _part2(
    boundary: str,
    *,
    hostname: str,
    arrival: float,
    client: str,
    recipients: Sequence[DsnRecipient],
    envid: str | None,
    utf8: bool,
) -> str:
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    return (
        f"--{boundary}\r\nContent-Type: {status_type}\r\n"
        + ("Content-Transfer-Encoding: 8bit\r\n" if utf8 else "")
        + "\r\n"
        + _status_part(
            hostname=hostname,
            arrival=arrival,
            client=client,
            recipients=recipients,
            envid=envid,
            utf8=utf8,
        )
        + "\r\n"
    )


def _part3(boundary: str, *, headers_only: bool, international: bool) -> str:
    if international:
        ctype = "message/global-headers" if headers_only else "message/global"
    else:
        ctype = "text/rfc822-headers" if headers_only else "message/rfc822"
    return f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n"
