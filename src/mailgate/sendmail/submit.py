"""Local submission (``sendmail -bm``, the default): a message on standard input goes straight
into the spool, durably, and the running daemon is told; it works while the daemon is down
(the daemon takes the message on at its start).

The path is the SMTP session's, without the network: recipients are normalised and checked
by the same functions (``address.normalize``, ``policy.check_recipient``: access ``To:``
REJECT with blocklist_recipients, ``error:`` routes, unknown local users), as a relay client
(a local user may send anywhere, as with Sendmail's local submission); the header section is
stamped by ``smtp.headers.stamp`` (Sendmail's ``Received: (from user@localhost) by host
(…/Submit)`` line, ``X-Authentication-Warning`` for an untrusted ``-f``); the content goes
through ``IncomingMessage`` in bounded blocks and is durable when ``Spool.commit`` returns.
Nothing is read whole: standard input is read ``BLOCK`` bytes at a time.

Exit statuses are sendmail's (sysexits.h): the caller prints :class:`Refused` lines and
returns the status this module gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mailgate import maillog
from mailgate.address import AddressError, Mailbox, normalize
from mailgate.delivery.sysexits import dsn_exit_status
from mailgate.milter.hold import hold_message
from mailgate.milter.local import LocalFilters, chosen
from mailgate.policy import Client, check_recipient
from mailgate.queue.spool import (
    Envelope,
    IncomingMessage,
    Recipient,
    Spool,
    SpoolError,
)
from mailgate.reply import Reply
from mailgate.routing import resolve
from mailgate.sendmail.input import LocalInput
from mailgate.sendmail.options import Invocation
from mailgate.smtp.headers import (
    MAX_HEADER_BYTES,
    MAX_HOPS,
    HeaderScanner,
    StampFacts,
    drop_fields,
    header_fields,
    stamp,
)
from mailgate.smtp.protocol import content_size_refusal
from mailgate.snapshot import Snapshot

BLOCK = 64 * 1024  # bytes read from standard input at a time
LOOKAHEAD = IncomingMessage.SPILL_AT  # read before the envelope line, to see 8-bit text
LOCAL_CLIENT = Client("127.0.0.1", "OK", "localhost")
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_RESENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")


class SubmitError(Exception):
    """The message cannot be taken: ``status`` is the exit status (sysexits), ``str()`` why."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class Submitter:
    """Who runs the command (its real uid, as Sendmail's RealUserName)."""

    login: str
    uid: int
    full_name: str | None  # passwd's GECOS name, for a From: we add


@dataclass(frozen=True)
class Refused:
    """A recipient that is not queued, and Sendmail's line for it."""

    address: str
    reply: Reply
    exit: int | None = None  # the error: entry's own sysexits status, if it names one

    def __str__(self) -> str:
        text = self.reply.text  # a permanent refusal's text names the address already
        return text if text.startswith(f"{self.address}... ") else f"{self.address}... {text}"

    @property
    def status(self) -> int:
        return self.exit if self.exit is not None else dsn_exit_status(self.reply)


@dataclass
class Submitted:
    qid: str
    refused: list[Refused] = field(default_factory=list)

    @property
    def status(self) -> int:
        """EX_NOUSER (or EX_TEMPFAIL) when some recipient was refused: the others have it."""
        return max((r.status for r in self.refused), default=os.EX_OK)


def who_am_i() -> Submitter:
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise SubmitError(os.EX_OSERR, f"no user name for uid {uid} (passwd)") from None
    gecos = pw.pw_gecos.split(",")[0].strip()
    return Submitter(pw.pw_name, uid, gecos or None)


def is_trusted(user: Submitter, trusted_users: tuple[str, ...], spool_owner: int) -> bool:
    """Sendmail's class t: the listed users, and the spool's owner (the daemon's user)."""
    return user.login in trusted_users or user.uid == spool_owner


def split_addresses(text: str) -> list[str]:
    """The addresses in a recipient list as the command line or a header field writes them
    (RFC 5322): comma-separated, display names and ``<…>``, comments dropped, groups
    (``team: a@x, b@y;``, ``undisclosed-recipients:;``) opened. Nothing is repaired: a piece
    that is no address stays as written, for the address check to refuse (email.utils'
    parser drops or cuts what it cannot read: ``a@b@c`` became ``@c``)."""
    pieces: list[str] = []
    cur: list[str] = []
    quoted = angle = False
    comment = 0
    chars = iter(text)
    for c in chars:
        if quoted:
            cur.append(c)
            if c == "\\":
                cur.append(next(chars, ""))
            elif c == '"':
                quoted = False
        elif comment:
            if c == "\\":
                next(chars, "")
            else:
                comment += {"(": 1, ")": -1}.get(c, 0)
        elif c == '"':
            quoted = True
            cur.append(c)
        elif c == "(":
            comment = 1
        elif c in "<>":
            angle = c == "<"
            cur.append(c)
        elif c in ",;" and not angle:
            pieces.append("".join(cur))
            cur = []
        elif c == ":" and not angle and "@" not in cur:
            cur = []  # a group's name
        else:
            cur.append(c)
    pieces.append("".join(cur))
    found = []
    for piece in (p.strip() for p in pieces):
        if piece.endswith(">") and "<" in piece:
            piece = piece[piece.rindex("<") + 1 : -1].strip()
        if piece:
            found.append(piece)
    return found


def envelope_sender(given: str | None, user: Submitter, snap: Snapshot) -> str:
    """``-f``'s address normalised (qualified with our host name), or the user's own."""
    hostname = snap.config.hostname
    if given is None:
        return f"{user.login}@{hostname}"
    text = given.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        return ""  # -f '<>': the null sender
    try:
        mailbox = normalize(text, snap.routing.is_local)
    except AddressError as exc:
        raise SubmitError(os.EX_USAGE, f"-f {given}: {exc.reply.text}") from None
    return str(mailbox if mailbox.domain else Mailbox(mailbox.local, hostname))


def check_address(raw: str, snap: Snapshot) -> Mailbox | Refused:
    """A recipient as SMTP's RCPT checks it, for a relay client: normalised, or why it is
    refused."""
    try:
        mailbox = normalize(raw, snap.routing.is_local, written=raw)
    except AddressError as exc:
        return Refused(raw, exc.reply)
    decision = check_recipient(
        raw, mailbox, LOCAL_CLIENT, True, snap.routing, snap.config, shown=raw
    )
    if not decision.accepted:
        return Refused(raw, decision.reply, decision.exit)
    return mailbox


def verify(raw: str, snap: Snapshot) -> Iterator[str | Refused]:
    """``sendmail -bv``: where ``raw`` would be delivered, aliases expanded, sending nothing:
    Sendmail's ``addr... deliverable: mailer m, host h, user u`` lines, or refusals."""
    mailbox = check_address(raw, snap)
    if isinstance(mailbox, Refused):
        yield mailbox
        return
    # Sendmail names a recipient as it was given (a domaintable or virtusertable rewrite
    # shows in ``user``), or, expanded from an alias, as each member of it.
    aliased = any(r.mailer == "alias" for r in resolve(mailbox, snap.routing, expand=False))
    for route in resolve(mailbox, snap.routing, expand=True):
        if route.mailer == "error" and route.error is not None:
            yield Refused(raw, route.error.reply(raw), route.error.exit)
            continue
        host = f", host {route.host}" if route.host else ""
        named = route.address if aliased else raw
        yield f"{named}... deliverable: mailer {route.mailer}{host}, user {route.address}"


@dataclass
class _Message:
    """What local submission has gathered before the message is written."""

    sender: str
    recipients: list[Recipient] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # normalised addresses already taken

    def add(self, raw: str, snap: Snapshot, notify: str | None) -> None:
        checked = check_address(raw, snap)
        if isinstance(checked, Refused):
            self.refused.append(checked)
            return
        address = str(checked)
        if address not in self.seen:  # Sendmail sends one copy per address
            self.seen.add(address)
            self.recipients.append(Recipient(address, raw, notify))


def _header_recipients(head: bytes) -> list[str]:
    """``-t``: To, Cc and Bcc; or, when the message was resent, the Resent- ones only."""
    fields = header_fields(head)
    names = {n for n, _ in fields}
    wanted = _RESENT_FIELDS if names & set(_RESENT_FIELDS) else _RECIPIENT_FIELDS
    found: list[str] = []
    for name, value in fields:
        if name in wanted:
            found += split_addresses(value)
    return found


def _status_for(exc: OSError) -> int:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.EX_TEMPFAIL
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return os.EX_NOPERM
    return os.EX_CANTCREAT


def open_spool(snap: Snapshot) -> Spool:
    """The spool, if this user may write it; SubmitError otherwise."""
    cfg = snap.config
    try:
        spool = Spool(cfg.spool_dir, fsync=cfg.queue.fsync)
    except OSError as exc:
        raise SubmitError(
            _status_for(exc), f"cannot open the spool {cfg.spool_dir}: {exc.strerror}"
        ) from None
    for directory in (spool.incoming, spool.queue):
        if not os.access(directory, os.W_OK | os.X_OK):
            spool.close()
            raise SubmitError(
                os.EX_NOPERM,
                f"cannot write the spool {directory}: permission denied (it is the daemon's: "
                "run as root or as the spool's owner)",
            )
    return spool


class Submission:
    """One ``sendmail -bm`` run: ``read`` gives standard input's blocks (b"" at its end)."""

    def __init__(
        self, inv: Invocation, snap: Snapshot, user: Submitter, read: Callable[[int], bytes]
    ) -> None:
        self.inv = inv
        self.snap = snap
        self.user = user
        self.read = read
        self.input = LocalInput(ignore_dots=inv.ignore_dots)

    def run(self) -> Submitted:
        cfg = self.snap.config
        inv = self.inv
        if not inv.extract and not inv.recipients:
            raise SubmitError(os.EX_USAGE, "Recipient names must be specified")
        sender = envelope_sender(inv.sender, self.user, self.snap)
        msg = _Message(sender)
        if not inv.extract:
            for arg in inv.recipients:
                for raw in split_addresses(arg) or [arg]:
                    msg.add(raw, self.snap, inv.notify)
            if not msg.recipients:
                return Submitted("", msg.refused)  # nothing to send: stdin is not read
        spool = open_spool(self.snap)
        try:
            if not spool.room_for(0, cfg.queue.min_free):
                raise SubmitError(os.EX_TEMPFAIL, "452 4.3.1 Insufficient system storage")
            head, rest = self._read_head()
            if inv.extract:
                # Sendmail: addresses on the command line are left out, even if listed.
                for raw in inv.recipients:
                    for addr in split_addresses(raw) or [raw]:
                        checked = check_address(addr, self.snap)
                        if not isinstance(checked, Refused):
                            msg.seen.add(str(checked))
                for raw in _header_recipients(head):
                    msg.add(raw, self.snap, inv.notify)
                if not msg.recipients:
                    if msg.refused:
                        return Submitted("", msg.refused)
                    raise SubmitError(os.EX_USAGE, "No recipient addresses found in header")
            # Bcc: never goes out, -t or not (Sendmail's H_BCC).
            head = drop_fields(head, frozenset({"bcc", "resent-bcc"}))
            qid = self._write(spool, msg, head, rest)
        finally:
            spool.close()
        return Submitted(qid, msg.refused)

    def _blocks(self) -> Iterator[bytes]:
        """Standard input, line ends converted, up to its end or the lone-dot line."""
        while not self.input.done:
            try:
                data = self.read(BLOCK)
            except OSError as exc:
                raise SubmitError(os.EX_IOERR, f"reading standard input: {exc.strerror}") from None
            out = self.input.end() if not data else self.input.feed(data)
            if out:
                yield out

    def _read_head(self) -> tuple[bytes, Iterator[bytes]]:
        """The header section (at most MAX_HEADER_BYTES, held in memory to be stamped), and
        the rest of the content, still to be read."""
        scanner = HeaderScanner()
        blocks = self._blocks()
        for block in blocks:
            head = scanner.feed(block)
            if head is not None:
                return head, _chain(scanner.rest, blocks)
            if scanner.too_large:
                break
        if scanner.too_large:
            raise SubmitError(
                os.EX_DATAERR, f"552 5.6.0 Headers too large ({MAX_HEADER_BYTES} max)"
            )
        return bytes(scanner.buf), iter(())

    def _body_8bit(self, head: bytes, rest: Iterator[bytes]) -> tuple[bool, Iterator[bytes]]:
        """Whether to declare 8BITMIME (``-B`` says, else the content), and the content
        again. The envelope line, which holds the answer, is written before the content, so
        up to LOOKAHEAD bytes are read first: the whole of most messages. A larger one is
        declared 8-bit, its rest unseen: a 7-bit message may go as 8BITMIME, and the client
        converts 8-bit content for a hop without it either way."""
        if self.inv.body is not None:
            return self.inv.body == "8BITMIME", rest
        ahead: list[bytes] = []
        size = 0
        for block in rest:
            ahead.append(block)
            size += len(block)
            if size >= LOOKAHEAD:
                return True, _chain(b"".join(ahead), rest)
        return not all(b.isascii() for b in (head, *ahead)), iter(ahead)

    def _write(self, spool: Spool, msg: _Message, head: bytes, rest: Iterator[bytes]) -> str:
        cfg = self.snap.config
        inv = self.inv
        addresses = [msg.sender, *(r.address for r in msg.recipients)]
        body_8bit, rest = self._body_8bit(head, rest)
        envelope = Envelope(
            qid=spool.new_qid(),
            sender=msg.sender,
            recipients=msg.recipients,
            arrival=time.time(),
            client_ip=LOCAL_CLIENT.ip,
            client_name=LOCAL_CLIENT.ptr_name,
            proto="local",
            body_8bit=body_8bit,
            smtputf8=not all(a.isascii() for a in addresses),
            envid=inv.envid,
            ret=inv.ret,
        )
        trusted = is_trusted(self.user, cfg.submission.trusted_users, spool_owner(spool))
        default_sender = f"{self.user.login}@{cfg.hostname}"
        stamped = stamp(
            head,
            StampFacts(
                hostname=cfg.hostname,
                qid=envelope.qid,
                arrival=envelope.arrival,
                sender=msg.sender,
                recipients=tuple(r.address for r in msg.recipients),
                client_ip=LOCAL_CLIENT.ip,
                client_name=None,
                client_verified=None,
                client_is_loopback=True,
                helo=None,
                esmtp=False,
                smtputf8=envelope.smtputf8,
                tls=None,
                authwarnings="authwarnings" in cfg.smtp.privacy,
                submitter=self.user.login,
                untrusted_from=(
                    inv.sender is not None and not trusted and msg.sender != default_sender
                ),
                sender_name=_one_line(
                    inv.full_name or (self.user.full_name if inv.sender is None else None)
                ),
            ),
        )
        if stamped.hops > MAX_HOPS:
            raise SubmitError(
                os.EX_DATAERR, f"554 5.4.6 Too many hops {stamped.hops} ({MAX_HOPS} max)"
            )
        # The message being written (None before it is made): a filter may replace it.
        self._incoming: IncomingMessage | None = None
        try:
            queued = asyncio.run(self._queue(spool, msg, envelope, stamped.data, rest))
        except SubmitError:
            self._discard()
            raise
        except (OSError, SpoolError) as exc:
            self._discard()
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            status = _status_for(cause) if isinstance(cause, OSError) else os.EX_CANTCREAT
            text = cause.strerror if isinstance(cause, OSError) and cause.strerror else exc
            raise SubmitError(status, f"cannot queue the message: {text}") from None
        except BaseException:
            self._discard()
            raise
        incoming = self._incoming
        if not queued or incoming is None:
            return ""  # a filter discarded it, or refused every recipient (logged)
        # For the daemon (DUE_SIGNAL: the caller tells it): "attempt it now". Without the
        # marker it is still found, at the next queue run.
        with contextlib.suppress(OSError):
            spool.mark_due(envelope.qid)
        if stamped.warning is not None:
            maillog.auth_warning(cfg.hostname, stamped.warning)
        maillog.submitted(
            envelope.qid,
            msg.sender,
            incoming.size,
            len(msg.recipients),
            stamped.msgid,
            self.user.login,
        )
        return envelope.qid

    async def _queue(
        self,
        spool: Spool,
        msg: _Message,
        envelope: Envelope,
        head: bytes,
        rest: Iterator[bytes],
    ) -> bool:
        """Write the message and commit it, through ``[submission] milters`` if it names any
        (milter/local.py): their envelope events before the spool file is made, the message
        before the commit, the hold of a quarantined one after it. False if a filter
        discarded it or refused every recipient; a refusal is a SubmitError with its reply
        (EX_TEMPFAIL for a 4xx, as for the command's other refusals, else EX_UNAVAILABLE)."""
        settings = chosen(self.snap)
        filters = LocalFilters(self.snap, spool, LOCAL_CLIENT, settings) if settings else None
        hold = None
        try:
            if filters is not None:
                refusal = await filters.envelope(envelope)
                msg.refused += [Refused(r.original, reply) for r, reply in filters.refused]
                if refusal is not None:
                    raise _refused(refusal)
                if not envelope.recipients:
                    return False
            self._incoming = spool.open_incoming(envelope)
            self._fill(self._incoming, head, rest)
            if filters is not None:
                outcome = await filters.message(self._incoming)
                self._incoming = outcome.msg
                if outcome.refusal is not None:
                    raise _refused(outcome.refusal)
                if outcome.discarded or not outcome.msg.envelope.recipients:
                    self._discard()
                    return False
                hold = outcome.hold_reason
            queued = await spool.commit(self._incoming)
        finally:
            if filters is not None:
                filters.close()
        if hold is not None:
            await hold_message(spool, queued, hold)
        else:
            queued.close()
        return True

    def _discard(self) -> None:
        if self._incoming is not None:
            self._incoming.discard()

    def _fill(self, incoming: IncomingMessage, head: bytes, rest: Iterator[bytes]) -> None:
        limit = self.snap.config.smtp.max_message_size
        for block in _chain(head, rest):
            if limit and incoming.size + len(block) > limit:
                raise SubmitError(os.EX_DATAERR, str(content_size_refusal(limit)))
            incoming.write(block)


def _refused(reply: Reply) -> SubmitError:
    return SubmitError(os.EX_TEMPFAIL if reply.is_temporary else os.EX_UNAVAILABLE, str(reply))


def _one_line(text: str | None) -> str | None:
    """A full name fit for a header field: ``-F "x\\r\\nBcc: y"`` must not add a field (nor
    put a bare CR or LF into the spool)."""
    if text is None:
        return None
    return " ".join("".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).split())


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def spool_owner(spool: Spool) -> int:
    return spool.root.stat().st_uid
