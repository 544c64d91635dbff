"""A received message as the filters see and change it, between the end of DATA and the commit.

``MessageEdit`` reads the message written so far (``IncomingMessage.read``): the header fields
(bounded: the header section is at most ``MAX_HEADER_BYTES`` plus our stamp) are held as a
list, the body is only ever read in chunks from the spool file. The filters' changes apply to
that list, to a copy of the envelope, and to a new body streamed into an anonymous file beside
the spool; each filter's changes are kept apart until its verdict (``begin``/``commit``/
``rollback``), so a filter that fails half-way leaves nothing of its own behind, and the next
filter sees the message as the previous ones left it (Postfix's order). ``write`` edits a
message that never spilled in its buffer (``IncomingMessage.edit_head``), and otherwise makes
the new spool file under the same queue id, the body copied in chunks: memory stays bounded
whatever the message size.

Header positions follow Postfix (``cleanup_milter.c``): our own ``Received:`` (the first
field) is never shown to a filter and is not counted by change and delete, whose index is the
n-th field of that name among the others (0 counts as 1); insert counts every field, ours
included, so index 0 is the very top. A changed header that is not there is added; an empty
value deletes. Values arrive folded with bare LF (rspamd, opendkim): every line break becomes
CRLF, a continuation line gets a TAB if it has no leading white space, and an empty line (which
would end the header section) is dropped, so what goes into the spool is strict CRLF and our
smuggling rules never trip on our own output. Each change is logged as Sendmail logs it
(``Milter add: header: …``), when its filter's verdict keeps it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final, Protocol

from mailgate import maillog
from mailgate.address import AddressError, normalize, parse_path_arg
from mailgate.queue.spool import Envelope, IncomingMessage, Recipient, Spool
from mailgate.smtp.headers import MAX_HEADER_BYTES, split_header_section

# Read this much to find the header section: the client's section is at most MAX_HEADER_BYTES,
# our stamp adds a few lines.
HEAD_READ: Final = MAX_HEADER_BYTES + 16 * 1024
# The header section may grow by this much through the filters (a DKIM signature, spam
# reports); a filter that goes beyond it is broken.
MAX_ADDED_HEADER: Final = 256 * 1024
COPY_CHUNK: Final = 64 * 1024

_NAME: Final = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ":"
_BREAK: Final = re.compile(r"\r\n|\r|\n")
_BREAK_BYTES: Final = re.compile(rb"\r\n|\r|\n")


class EditError(Exception):
    """A change that cannot be made (a bad header name or address): the filter is wrong."""


class Readable(Protocol):
    def read(self, pos: int, size: int) -> bytes: ...


@dataclass(slots=True)
class HeaderField:
    """One header field: ``value`` is what follows the colon (leading blank, CRLF folding),
    ``raw`` the field's bytes as received (None once a filter made or changed it)."""

    name: str
    value: str
    raw: bytes | None = None
    own: bool = False  # our Received:, never shown to a filter

    def to_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return f"{self.name}:{self.value}\r\n".encode("utf-8", "surrogateescape")


def parse_fields(header: bytes) -> list[HeaderField]:
    """The fields of a header section (CRLF lines, as HeaderScanner cut it)."""
    fields: list[HeaderField] = []
    pos = 0
    while pos < len(header):
        nl = header.find(b"\r\n", pos)
        end = len(header) if nl < 0 else nl + 2
        line = header[pos:end]
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            last.raw = (last.raw or b"") + line
        else:
            fields.append(HeaderField("", "", line))
        pos = end
    for f in fields:
        text = (f.raw or b"").decode("utf-8", "surrogateescape")
        name, _, value = text.partition(":")
        f.name = name.rstrip(" \t")
        f.value = value[:-2] if value.endswith("\r\n") else value
    return fields


def clean_value(value: str) -> str:
    """A header value from a filter, made strict CRLF (see the module's docstring)."""
    # Filters fold with bare LF: a plain split then (the regex's alternation tries each of
    # its branches at every character of a DKIM signature's few hundred).
    lines = _BREAK.split(value) if "\r" in value else value.split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if line:
            out.append(line if line[:1] in (" ", "\t") else "\t" + line)
    return "\r\n".join(out)


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise EditError(f"bad header name {name[:60]!r}")
    return name


class CrlfWriter:
    """A new body, streamed into an anonymous file on the spool's file system (gone when
    closed, or at a crash): every line break becomes CRLF, as the spool keeps content."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.fd = _anonymous_file(spool)
        self.size = 0
        self.held_cr = False  # a CR ended the last chunk: its LF may start the next
        self.last = b"\n"

    def write(self, chunk: bytes) -> None:
        if self.held_cr:
            chunk = b"\r" + chunk
            self.held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self.held_cr = True
        if not chunk:
            return
        # 13 and 10, not b"\r" and b"\n": codec._text says why.
        data = _BREAK_BYTES.sub(b"\r\n", chunk) if (13 in chunk or 10 in chunk) else chunk
        self._put(data)

    def finish(self) -> None:
        """The last chunk came: a held CR is a line end, and the body ends with one."""
        if self.held_cr:
            self.held_cr = False
            self._put(b"\r\n")
        elif self.size and self.last != b"\n":
            self._put(b"\r\n")

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.size)
            self.size += n
            view = view[n:]
        self.spool.spent(len(data))
        self.last = data[-1:]

    def read(self, pos: int, size: int) -> bytes:
        return os.pread(self.fd, size, pos)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _anonymous_file(spool: Spool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(spool.incoming, flags | tmpfile, 0o600)
        except OSError:
            pass  # a file system without O_TMPFILE: a named file, unlinked at once
    path = spool.incoming / f".body.{os.getpid()}.{id(spool)}.{os.urandom(4).hex()}"
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


@dataclass(slots=True)
class _Body:
    """Where the body is: ``length`` bytes from ``start`` in ``source``."""

    source: Readable
    start: int
    length: int


class MessageEdit:
    """The message between the end of DATA and the commit, as the filters change it."""

    def __init__(self, msg: IncomingMessage, is_local: Callable[[str], bool]) -> None:
        self.msg = msg
        self.is_local = is_local
        head = msg.read(0, min(msg.size, HEAD_READ))
        header, rest = split_header_section(head)
        self.fields = parse_fields(header)
        if self.fields and self.fields[0].name.lower() == "received":
            self.fields[0].own = True  # headers.stamp puts ours first
        # The empty line after the header, if the message has one.
        self.blank = head[len(header) : len(header) + 2] == b"\r\n" and len(rest) < len(head)
        start = len(header) + (2 if self.blank else 0)
        self.body = _Body(msg, start, msg.size - start)
        self.envelope = msg.envelope
        self.changed = False
        self.header_size = len(header)
        self.replacement: CrlfWriter | None = None  # the body now, if a filter replaced it
        self.new_body: CrlfWriter | None = None  # the body the current filter is sending
        self._saved: tuple[list[HeaderField], Envelope, _Body, int] | None = None
        self._log: list[Callable[[], None]] = []

    # -- what a filter is sent -----------------------------------------------------------------
    def visible_fields(self) -> list[HeaderField]:
        return [f for f in self.fields if not f.own]

    def body_chunks(self, size: int) -> Iterator[bytes]:
        body = self.body
        pos, end = body.start, body.start + body.length
        while pos < end:
            chunk = body.source.read(pos, min(size, end - pos))
            if not chunk:
                raise OSError("message content shorter than its size")
            pos += len(chunk)
            yield chunk

    # -- one filter's changes, kept or dropped together ----------------------------------------
    def begin(self) -> None:
        # The list, not copies of its fields: no change alters a field in place (a changed
        # header is a new field in its slot), so the saved list keeps them as they were.
        self._saved = (
            list(self.fields),
            self.envelope,
            self.body,
            self.header_size,
        )
        self._log = []

    def commit(self) -> None:
        new = self.new_body
        if new is not None:
            new.finish()
            if self.replacement is not None:
                self.replacement.close()
            self.replacement, self.new_body = new, None
            self.body = _Body(new, 0, new.size)
        for log in self._log:
            log()
        if self._log:
            self.changed = True
        self._saved = None
        self._log = []

    def rollback(self) -> None:
        if self._saved is not None:
            self.fields, self.envelope, self.body, self.header_size = self._saved
        if self.new_body is not None:
            self.new_body.close()
            self.new_body = None
        self._saved = None
        self._log = []

    def close(self) -> None:
        """Done (written, refused or failed): the new bodies' files go."""
        for writer in (self.replacement, self.new_body):
            if writer is not None:
                writer.close()
        self.replacement = self.new_body = None

    # -- the changes ---------------------------------------------------------------------------
    @property
    def qid(self) -> str:
        return self.envelope.qid

    def _grow(self, field: HeaderField) -> None:
        self.header_size += len(field.to_bytes())
        if self.header_size > HEAD_READ + MAX_ADDED_HEADER:
            raise EditError(f"header section over {HEAD_READ + MAX_ADDED_HEADER} bytes")

    def _named(self, name: str, index: int) -> int | None:
        """Where the ``index``-th visible field called ``name`` is (from 1; 0 counts as 1)."""
        wanted = name.lower()
        seen = 0
        for at, f in enumerate(self.fields):
            if not f.own and f.name.lower() == wanted:
                seen += 1
                if seen == max(index, 1):
                    return at
        return None

    def add_header(self, name: str, value: str) -> None:
        field = HeaderField(_check_name(name), clean_value(value))
        self._grow(field)
        self.fields.append(field)
        self._log.append(lambda: maillog.milter_header_added(self.qid, field.name, field.value))

    def insert_header(self, index: int, name: str, value: str) -> None:
        field = HeaderField(_check_name(name), clean_value(value))
        self._grow(field)
        self.fields.insert(min(index, len(self.fields)), field)
        self._log.append(
            lambda: maillog.milter_header_inserted(self.qid, index, field.name, field.value)
        )

    def change_header(self, index: int, name: str, value: str) -> None:
        _check_name(name)
        at = self._named(name, index)
        if at is None:
            if not value.strip():
                self._log.append(lambda: maillog.milter_header_delete_noop(self.qid, name))
                return
            field = HeaderField(name, clean_value(value))
            self._grow(field)
            self.fields.append(field)
            self._log.append(
                lambda: maillog.milter_header_change_added(self.qid, field.name, field.value)
            )
            return
        old = self.fields[at]
        self.header_size -= len(old.to_bytes())
        if not value.strip():
            del self.fields[at]
            self._log.append(lambda: maillog.milter_header_deleted(self.qid, old.name, old.value))
            return
        new = self.fields[at] = HeaderField(old.name, clean_value(value), None, old.own)
        self._grow(new)
        self._log.append(
            lambda: maillog.milter_header_changed(self.qid, new.name, old.value, new.value)
        )

    def _parse(self, keyword: str, address: str, args: str) -> tuple[str, dict[str, str | None]]:
        """(raw address, ESMTP parameters) of an address from a filter, ``<>`` or not."""
        text = address.strip()
        if not text.startswith("<"):
            text = f"<{text}>"
        try:
            raw, params = parse_path_arg(f"{keyword}:{text} {args}".rstrip(), keyword)
            normalize(raw, self.is_local)
        except AddressError as exc:
            raise EditError(f"bad address {address[:80]!r}: {exc.reply.text}") from None
        return raw, params

    def _mailbox(self, raw: str) -> str:
        return str(normalize(raw, self.is_local)) if raw else ""

    def change_sender(self, address: str, args: str) -> None:
        raw, params = self._parse("FROM", address, args)
        sender = self._mailbox(raw)
        changes: dict[str, object] = {"sender": sender}
        if "BODY" in params:
            changes["body_8bit"] = (params["BODY"] or "").upper() == "8BITMIME"
        if "RET" in params:
            changes["ret"] = (params["RET"] or "").upper() or None
        if "ENVID" in params:
            changes["envid"] = params["ENVID"]
        if "SMTPUTF8" in params:
            changes["smtputf8"] = True
        self.envelope = replace(self.envelope, **changes)  # type: ignore[arg-type]
        self._log.append(lambda: maillog.milter_sender_changed(self.qid, f"<{sender}>"))

    def add_recipient(self, address: str, args: str) -> None:
        raw, params = self._parse("TO", address, args)
        if not raw:
            raise EditError("an empty recipient address")
        mailbox = self._mailbox(raw)
        recipients = self.envelope.recipients
        if any(r.address.lower() == mailbox.lower() for r in recipients):
            return  # already one: Sendmail's duplicate suppression
        notify = params.get("NOTIFY")
        added = Recipient(mailbox, raw, notify.upper() if notify else None, params.get("ORCPT"))
        self.envelope = replace(self.envelope, recipients=[*recipients, added])
        self._log.append(lambda: maillog.milter_rcpt_added(self.qid, f"<{mailbox}>"))

    def delete_recipient(self, address: str) -> None:
        raw, _ = self._parse("TO", address, "")
        wanted = {raw.lower(), self._mailbox(raw).lower()}
        kept = [
            r
            for r in self.envelope.recipients
            if r.address.lower() not in wanted and r.original.lower() not in wanted
        ]
        self.envelope = replace(self.envelope, recipients=kept)
        self._log.append(lambda: maillog.milter_rcpt_deleted(self.qid, f"<{raw}>"))

    def replace_body(self, chunk: bytes, spool: Spool) -> None:
        """The next chunk of this filter's new body (its first chunk starts it)."""
        if self.new_body is None:
            self.new_body = CrlfWriter(spool)
            self._log.append(lambda: maillog.milter_body_replaced(self.qid))
        self.new_body.write(chunk)

    # -- the result ----------------------------------------------------------------------------
    def write(self, spool: Spool) -> IncomingMessage:
        """The changed message as a new incoming file under the same queue id (the old one
        handed over and read from as its body is copied), or, for a message whose content
        is all in its buffer still (never spilled: most of them) and whose body no filter
        replaced, the same message with its header section and envelope changed in place.
        Raises OSError (the disk)."""
        head = b"".join([f.to_bytes() for f in self.fields])
        if self.blank or self.body.length:
            head += b"\r\n"
        msg = self.msg
        if self.body.source is msg and msg.edit_head(self.envelope, self.body.start, head):
            self.close()
            return msg
        old = msg.hand_over()
        new = spool.open_incoming(self.envelope)
        try:
            if self.body.source is msg:
                self.body.source = old
            new.write(head)
            for chunk in self.body_chunks(COPY_CHUNK):
                new.write(chunk)
        except BaseException:
            new.discard()
            raise
        finally:
            old.close()
            self.close()
        return new
