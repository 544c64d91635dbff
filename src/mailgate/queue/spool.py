"""The durable spool: the only place a message becomes durable (``Spool.commit``).

Layout under ``spool_dir``::

    incoming/<qid>      being received; or a second name of queue/<qid> (see below)
    queue/<qid>         committed: one JSON envelope line, then the message content (CRLF)
    queue/<qid>.st      delivery status (done recipients, last errors, next attempt); its
                        modification time is when the message is due (``HELD_DUE``: held)
    spare/<pid>.<n>     delivered files kept open for reuse by the next incoming message; or
                        the second name of a queued message written over one (see below)
    corrupt/<qid>       entries that could not be read, moved aside instead of crashing
    due/<qid>           "attempt it now" (``mailgate release``/``requeue``), for the daemon: a
                        hard link to queue/<qid>, of which only the name counts
    trash/<qid>[.st]    a delivered message's files, out of the queue, for the daemon's
                        cleaner thread to unlink (``queue/cleaner.py``); emptied at start-up

A message is committed by sealing its envelope line (the CRC-32 and length of the content are
written into fixed-width fields at its start), fsync(file), then link(incoming → queue): one
fsync per message, as Postfix does. The link need not be durable before the 250: at start-up
a sealed file still in incoming/ (its CRC matches its content) is moved into the queue, and
only unsealed ones, which were never acknowledged, are dropped. So the incoming/ name, whose
entry the fsync made durable, is kept until the queue/ entry is durable too (the message's
first status file was fsync'd in queue/) or the message is gone: dropped right away, a crash
on a file system that writes directories out of order (ext4 without a journal) could keep the
removal and lose the link, leaving the inode with no name. Only the fsync waits for the
disk, and it runs outside the event loop (``queue.fsync``: Linux AIO, else a thread pool) so
that concurrent sessions' flushes overlap and share journal commits; the other file calls
(create, write, flock, link, unlink) are page-cache operations of a few microseconds and run
on the loop, which costs less than handing them to a thread.

A delivered message's file is not unlinked but kept (``spare/``, up to ``SPARE_MAX`` per
process, still open) and overwritten by the next message received: on ext4 without a journal
every new inode is searched for past all inodes freed in the last 1–6 minutes, so a spool that
frees and allocates an inode per message slows down the longer it runs (measured: CPU per
message up by half after a few minutes at 1,000 msgs/s), and the last close of an unlinked
file frees its blocks on the event loop. A spare file's seal is overwritten before it becomes
a spare. The next message is written over it where it is and linked into queue/ from there:
its spare/ name is that message's second name (the part incoming/<qid> plays for a new file),
and once the message is delivered, unlinking its queue/ name makes the file a spare again —
one link and one unlink per message, no rename. At start-up a sealed file in spare/ whose qid
has no queue/ entry (the link was lost in a crash) is queued under the qid in its envelope
line; one whose qid has is a second name, dropped.

Who may call what. ``open_incoming``, ``IncomingMessage`` (write, seal, discard), ``commit``,
``take_spare``, ``recycle`` and ``finish`` are **loop-only**: the spare-file pool and the
incoming message are plain lists and counters, never shared with a worker thread (a bounce
is built in a thread but written into its ``IncomingMessage`` on the loop, in bounded
blocks: ``delivery.notify``). ``save_status``, ``load``, ``load_status``, ``qids``,
``quarantine``, ``recover`` and ``remove`` touch only named files and may run in a thread;
``spent`` is the one counter threads may bump (a lost update only skews an estimate).
``lock_entry``, ``claim``, ``delete``, ``mark_due``, ``take_due``, ``set_due``, ``due_times``
and ``count`` may run in a thread or another process (the queue tools, ``queue.tools``).

The hand-off. ``commit(msg, lock=True)`` returns the ``QueuedMessage``, which owns the open,
flock'ed descriptor of its queue file; the scheduler carries it into the first attempt, which
reads the content through it, and ``finish`` ends it: the file goes to ``spare/`` (the
descriptor with it) or is removed. A message that never reaches an attempt is ``close``d,
which releases the lock. ``claim`` gives a queued message to a later attempt the same way.
Reading the queue (``load``, ``load_status``, ``qids``) never moves a file: an unreadable
entry raises ``CorruptEntry`` and only ``recover`` and the attempt quarantine it.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import signal
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import orjson

from mailgate import maillog
from mailgate.address import Mailbox
from mailgate.queue import fsync as fsync_impl
from mailgate.queue.cleaner import Cleaner

# "Read due/ now": ``mailgate release``, ``requeue`` and ``sendmail`` send it to the pid in
# ``pid_file`` (the master forwards it to the workers). Ignored by default, so an older
# daemon is not killed.
DUE_SIGNAL = signal.SIGURG

# Sendmail's queue-id alphabet: 60 characters, so a time field fits one character.
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
_STATUS_SUFFIX = ".st"
_QID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")  # a qid safe as a file name
_MAX_ENVELOPE = 16 * 1024 * 1024  # longest envelope line read
# The modification time of a held message's status file (2100-01-01): a queue pass, which
# reads only the status files' times (``Spool.due_times``), never takes it on.
HELD_DUE = 4102444800.0


def _read_line(fd: int, limit: int) -> bytes:
    """The first line of the file open on ``fd`` (through its LF; all of it, up to
    ``limit``, if it has none), read with pread: the descriptor's offset is not moved."""
    out = b""
    while len(out) < limit:
        block = os.pread(fd, min(64 * 1024, limit - len(out)), len(out))
        if not block:
            break
        end = block.find(b"\n")
        if end >= 0:
            return out + block[: end + 1]
        out += block
    return out


def _read_first(fd: int, limit: int) -> tuple[bytes, bytes]:
    """``_read_line``, and what the same first read gave after the line (the start of the
    content, for ``body_size``'s fallback: no read of its own)."""
    block = os.pread(fd, min(64 * 1024, limit), 0)
    end = block.find(b"\n")
    if end >= 0:
        return block[: end + 1], block[end + 1 :]
    return _read_line(fd, limit), b""


def body_size(content: bytes) -> int:
    """The size Sendmail's ``mailq`` shows for a message whose content is ``content``: its
    body (after the empty line that ends the header section; none without one) as Sendmail
    keeps it in its df file, with LF line ends where the spool has CR LF."""
    start = _body_start(content)
    if start is None:
        return 0
    return len(content) - start - content.count(b"\r\n", start)


def _body_start(content: bytes) -> int | None:
    """Where the body starts in ``content`` (after the empty line), None without one."""
    if content.startswith(b"\r\n"):
        return 2
    at = content.find(b"\r\n\r\n")
    return None if at < 0 else at + 4


def _loads(raw: bytes) -> Any:
    """JSON from an envelope line or a status file: orjson (a queue listing parses two per
    message, and orjson takes a third of json's time), else, for what it refuses (an address
    kept as raw bytes is not UTF-8), json with the bytes kept as surrogate escapes."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", "surrogateescape"))


def qid_time(qid: str, now: float | None = None) -> float | None:
    """When ``qid`` was made (``Spool.new_qid``: its first six characters are the UTC time to
    the second, the years since 1900 modulo 60): the arrival of its message. None for another
    name."""
    try:
        year60, month, day, hour, minute, second = (_ALPHABET.index(c) for c in qid[:6])
    except ValueError:
        return None
    if month > 11 or not 1 <= day <= 31 or hour > 23 or minute > 59 or second > 59:
        return None
    this_year = time.gmtime(now).tm_year
    year = this_year - (this_year - 1900 - year60) % 60
    return float(calendar.timegm((year, month + 1, day, hour, minute, second, 0, 0, 0)))


class SpoolError(Exception):
    """The spool cannot take or give a message (disk full, unreadable entry…)."""


class CorruptEntry(SpoolError):
    """A queue entry whose envelope cannot be read; ``Spool.quarantine`` moves it aside."""

    def __init__(self, qid: str, reason: str) -> None:
        super().__init__(f"{qid}: {reason}")
        self.qid = qid
        self.reason = reason


class EntryLocked(SpoolError):
    """Another runner (the daemon, ``mailgate flush``) holds the entry's delivery lock."""


# For what orjson refuses (below). json.dumps with these options would make this encoder anew
# for every message; the text is the same (no cycle can occur in an envelope's plain dicts and
# lists, so none is checked).
_ENVELOPE_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)


@dataclass
class Recipient:
    address: str  # after %-hack / source-route normalisation (domaintable: at delivery)
    original: str  # as the client wrote it at RCPT
    notify: str | None = None  # DSN NOTIFY= (RFC 3461)
    orcpt: str | None = None

    @property
    def mailbox(self) -> Mailbox:
        """``address`` split again (it was stored normalised): local part, domain."""
        local, at, domain = self.address.rpartition("@")
        return Mailbox(local, domain) if at else Mailbox(self.address, "")


@dataclass
class Envelope:
    qid: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    client_ip: str = ""
    client_name: str | None = None
    helo: str | None = None
    proto: str = "ESMTP"
    body_8bit: bool = False
    smtputf8: bool = False
    envid: str | None = None
    ret: str | None = None  # DSN RET=FULL|HDRS
    is_bounce: bool = False  # one of our reports (bounce, delay warning, return receipt)
    postmaster_notify: bool = False  # a double bounce: its own failure is not reported

    def to_line(self) -> bytes:
        """The envelope line, its seal fields still unset (see ``seal_fields``)."""
        # A shallow dict, not dataclasses.asdict (which deep-copies): this runs per message.
        data = dict(self.__dict__)
        data["recipients"] = [r.__dict__ for r in self.recipients]
        if not self.postmaster_notify:
            # Only where it is true, so that ordinary queue files stay as an earlier version
            # wrote and reads them (a rollback must not find its queue unreadable).
            del data["postmaster_notify"]
        try:
            # A tenth of json's time (0.7 against 6 µs), and the same text: compact, non-ASCII
            # as UTF-8, the shortest repr of the arrival time.
            body = orjson.dumps(data)
        except TypeError:
            # A byte of an address that is not UTF-8, kept as a surrogate escape: orjson takes
            # only valid text; json writes the escape, and the line gets the byte back.
            body = _ENVELOPE_JSON.encode(data).encode("utf-8", "surrogateescape")
        return b'{"crc":"' + UNSEALED + b'",' + body[1:] + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Envelope:
        data: dict[str, Any] = _loads(line)
        data.pop("crc", None)
        data.pop("len", None)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)


SEAL_OFFSET = len(b'{"crc":"')  # where the fixed-width seal fields start in the envelope line


def seal_fields(crc: int, length: int) -> bytes:
    """``crc`` and ``len`` as fixed-width text, rewritten in place when the message is sealed."""
    return b'%08x","len":"%012d' % (crc, length)


# The placeholder can never match a real seal: no message is 999,999,999,999 bytes long.
UNSEALED = seal_fields(0xFFFFFFFF, 999_999_999_999)


def read_seal(line: bytes) -> tuple[int, int, str] | None:
    """(crc, length, qid) from an envelope line; None if it has none."""
    try:
        data = json.loads(line)
        return int(data["crc"], 16), int(data["len"]), str(data["qid"])
    except (ValueError, KeyError, TypeError):
        return None


class RcptStatus(StrEnum):
    """Where one envelope recipient stands (chasquid's Recipient.Status)."""

    PENDING = "pending"
    SENT = "sent"  # every target it routes to is delivered
    FAILED = "failed"  # done, and some target failed for good (and was bounced)


@dataclass
class RecipientState:
    """One envelope recipient's record in the status file."""

    status: RcptStatus = RcptStatus.PENDING
    # The targets (``Route.target``: "mailer:host:address") done for it: SENT or FAILED. A
    # target done is never delivered again, for this recipient or another that routes to it.
    targets: dict[str, RcptStatus] = field(default_factory=dict)
    last_error: str | None = None  # the last temporary failure, as maillog's stat= says it

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "targets": {t: s.value for t, s in self.targets.items()},
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecipientState:
        # A dict lookup, not RcptStatus(value): a listing reads every status file of the
        # queue, and the enum's call is most of this function's time.
        status = _RCPT_STATUS
        return cls(
            status[data["status"]],
            {str(t): status[s] for t, s in data.get("targets", {}).items()},
            data.get("last_error"),
        )


_RCPT_STATUS: dict[object, RcptStatus] = {s.value: s for s in RcptStatus}


STATUS_VERSION = 2  # 1 (no "version" field): "done" with "rcpt:<address>" keys, "errors"


@dataclass
class QueueStatus:
    """A queued message's delivery status: per-recipient records and the retry bookkeeping.
    A recipient without a record is pending and has no target done."""

    recipients: dict[str, RecipientState] = field(default_factory=dict)  # by envelope address
    attempts: int = 0
    last_attempt: float | None = None
    next_attempt: float | None = None
    warned: bool = False
    last_message: str | None = None
    # On hold (``mailgate hold``): never attempted until released. The text is the reason
    # ("" when none was given); None when not held. Written under the message's lock.
    hold: str | None = None
    # The body's size as Sendmail's mailq shows it (``body_size``), counted as the message
    # was received and kept from its first status file on; None when not known (a message
    # written by an older version, or whose content a filter replaced).
    body_size: int | None = None
    # A status file exists for it (read or written): ``finish`` must remove it. Not stored.
    on_disk: bool = field(default=False, compare=False)

    @property
    def held(self) -> bool:
        return self.hold is not None

    def of(self, address: str) -> RecipientState:
        """The record of ``address``, made (pending) on first use."""
        state = self.recipients.get(address)
        if state is None:
            state = self.recipients[address] = RecipientState()
        return state

    def is_pending(self, address: str) -> bool:
        state = self.recipients.get(address)
        return state is None or state.status is RcptStatus.PENDING

    def pending(self, recipients: Iterable[Recipient]) -> list[Recipient]:
        return [r for r in recipients if self.is_pending(r.address)]

    def last_error(self, address: str) -> str | None:
        state = self.recipients.get(address)
        return state.last_error if state is not None else None

    def done_targets(self) -> dict[str, RcptStatus]:
        """Every target done for any recipient: SENT or FAILED."""
        done: dict[str, RcptStatus] = {}
        for state in self.recipients.values():
            done.update(state.targets)
        return done

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": STATUS_VERSION,
                "recipients": {a: r.to_json() for a, r in self.recipients.items()},
                "attempts": self.attempts,
                "last_attempt": self.last_attempt,
                "next_attempt": self.next_attempt,
                "warned": self.warned,
                "last_message": self.last_message,
                "hold": self.hold,
                # An older version ignores the key (and drops it when it writes the file).
                **({} if self.body_size is None else {"body_size": self.body_size}),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8", "surrogateescape")

    @classmethod
    def from_json(cls, raw: bytes, recipients: Sequence[str] = ()) -> QueueStatus:
        """Read a status file, in this format or the one before it (``recipients``: the
        envelope's addresses, which the old format needs; see ``_from_v1``). Raises
        ValueError, TypeError or KeyError when it is neither."""
        data = _loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a status file holds a JSON object")
        if "version" not in data:
            return cls._from_v1(data, recipients)
        if data["version"] != STATUS_VERSION:
            raise ValueError(f"status file version {data['version']!r}")
        return cls(
            {str(a): RecipientState.from_json(r) for a, r in data["recipients"].items()},
            int(data["attempts"]),
            data["last_attempt"],
            data["next_attempt"],
            bool(data["warned"]),
            data["last_message"],
            # Optional: files written before holds existed have none (and are not held).
            hold=None if data.get("hold") is None else str(data["hold"]),
            body_size=None if data.get("body_size") is None else int(data["body_size"]),
        )

    @classmethod
    def _from_v1(cls, data: dict[str, Any], recipients: Sequence[str]) -> QueueStatus:
        """The format before per-recipient records (queues on disk survive the upgrade):
        ``done`` mapped each target to "sent" or "failed" and each finished envelope
        recipient's ``"rcpt:<address>"`` to "done"; ``errors`` held the last error of each.

        It did not say which recipient a target was done for. A target whose address is a
        recipient's goes to that recipient; every other one (an alias or virtusertable
        expansion) to each recipient still pending, so that no target done is delivered
        again. A finished recipient is FAILED when a target with its address failed, else
        SENT (the old file said only "done")."""
        done: dict[str, str] = dict(data.get("done", {}))
        finished = {k.removeprefix("rcpt:") for k in done if k.startswith("rcpt:")}
        targets = {
            t: RcptStatus.FAILED if v == "failed" else RcptStatus.SENT
            for t, v in done.items()
            if not t.startswith("rcpt:")
        }
        status = cls(
            attempts=int(data.get("attempts", 0)),
            last_attempt=data.get("last_attempt"),
            next_attempt=data.get("next_attempt"),
            warned=bool(data.get("warned", False)),
            last_message=data.get("last_message"),
        )
        addresses = list(dict.fromkeys([*recipients, *finished]))
        for address in addresses:
            state = status.of(address)
            if address in finished:
                state.status = RcptStatus.SENT
        for target, result in targets.items():
            owner = target.rpartition(":")[2]
            if owner in status.recipients:
                status.recipients[owner].targets[target] = result
            else:
                for address in addresses:
                    if address not in finished:
                        status.recipients[address].targets[target] = result
        for address in finished:
            state = status.recipients[address]
            if any(v is RcptStatus.FAILED for v in state.targets.values()):
                state.status = RcptStatus.FAILED
        for address, error in dict(data.get("errors", {})).items():
            status.of(str(address)).last_error = str(error)
        return status


class QueuedMessage:
    """A committed message: its envelope, where its content is, its delivery status, and
    (while it is being delivered) the open descriptor of its queue file holding the delivery
    ``flock``. The descriptor is this object's to close: ``close()`` (or ``with``), or
    ``Spool.finish``, which may hand it to the spare-file pool."""

    __slots__ = ("_path", "body_size", "envelope", "fd", "offset", "size", "status")

    def __init__(
        self,
        envelope: Envelope,
        path: Path | str,
        offset: int,
        size: int,
        status: QueueStatus,
        fd: int | None = None,
        body_size: int | None = None,
    ) -> None:
        # mailq's Size: the status file's figure, else what ``Spool.peek`` could work out.
        self.body_size = status.body_size if body_size is None else body_size
        self.envelope = envelope
        self._path = path  # a str from a commit: made a Path only if someone asks
        self.offset = offset  # where the message content starts in ``path``
        self.size = size  # content bytes
        self.status = status
        self.fd = fd  # read-write, flock'ed: the delivery lock; None once closed or given up

    @property
    def path(self) -> Path:
        """The queue file (the first attempt reads it through ``fd`` and never asks)."""
        path = self._path
        if isinstance(path, str):
            path = self._path = Path(path)
        return path

    @property
    def qid(self) -> str:
        return self.envelope.qid

    def take_fd(self) -> int | None:
        """Hand the descriptor (and the lock) over; this message no longer closes it."""
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        """Release the lock: another runner may take the message."""
        fd = self.take_fd()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IncomingMessage:
    """A message being received: the envelope line, then content as it streams in.

    Content collects in a write buffer of ``SPILL_AT`` bytes (as any buffered writer would) and
    the file is created only when the buffer spills or at commit, so a small message is
    written with one ``write``, its seal included. Memory per message is bounded by the
    buffer, whatever the message size.
    """

    SPILL_AT = 256 * 1024

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        # A string, not a Path: the names of the hot path are joined and passed as text (a
        # pathlib join and its str() cost more than the system call they name).
        self.name = f"{spool.incoming_dir}/{envelope.qid}"
        line = envelope.to_line()
        self.buf = bytearray(line)
        self.offset = len(line)
        self.size = 0
        self.fd: int | None = None
        self.closed = False  # committed (the descriptor went to the QueuedMessage) or discarded
        self.crc = 0  # CRC-32 of the content so far, for the seal
        self.written = 0  # bytes in the file so far
        self.stale_size = 0  # a reused spare file: its old length, cut back at the seal
        self.failed: OSError | None = None  # a write failed: the message can only be refused
        # The body as mailq sizes it (``body_size``), counted as it streams in: nobody has
        # to read the file again for it. ``_head_tail``: the header section's last bytes
        # (None once its empty line was seen), so that an empty line split between two
        # writes is found; it starts as a line end, for content that opens with the empty line.
        self._head_tail: bytes | None = b"\r\n"
        self._body_bytes = 0
        self._body_crlf = 0  # CR LF pairs in the body: one byte each in Sendmail's df file
        self._body_cr = False  # the body so far ends with a CR

    @property
    def path(self) -> Path:
        return Path(self.name)

    def _open(self) -> int:
        if self.fd is None:
            spare = self.spool.take_spare()
            if spare is not None:
                # The file keeps its spare/ name, durable already: the message's name until
                # the link into queue/ (see ``Spool.commit``), with no rename on the way.
                self.fd, self.name, self.stale_size = spare
            else:
                # Read-write: after the commit this descriptor is the delivery lock, and the
                # first attempt reads the content through it instead of opening the file again.
                self.fd = os.open(
                    self.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                )
                self.spool.spent(0, new_file=True)
        return self.fd

    def _write_out(self) -> None:
        fd = self._open()
        buf = self.buf
        # For the free-space estimate: only what grows the file (a reused one has room).
        self.spool.spent(max(0, self.written + len(buf) - max(self.written, self.stale_size)))
        # No memoryview over the buffer: a view left alive by a failed pwrite (the exception's
        # traceback holds it, and the session keeps the exception until the end of the data)
        # forbids resizing the buffer, and the next write raised BufferError, which ended the
        # session with "421 Internal error" instead of failing the message.
        while buf:
            n = os.pwrite(fd, buf, self.written)
            self.written += n
            if n == len(buf):
                buf.clear()
            else:
                del buf[:n]  # a short write (the disk is filling up): the rest goes again

    def write(self, data: bytes) -> None:
        """Add content. Raises OSError (ENOSPC…) when the file cannot take it; the message has
        then failed (``failed``): its file is removed at once, later writes are dropped and
        ``commit`` refuses it, so the caller can read the rest of the content and refuse it."""
        if self.failed is not None or self.closed:
            return  # failed, or discarded
        self.buf += data
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self._count_body(data)
        if len(self.buf) >= self.SPILL_AT:
            try:
                self._write_out()
            except OSError as exc:
                self._fail(exc)
                raise

    def _count_body(self, data: bytes) -> None:
        start = 0  # where the body starts in ``data``
        tail = self._head_tail
        if tail is not None:
            # The empty line may be split between the last write and this one: look across
            # the edge first, then in ``data`` alone (no copy of it either way).
            edge = (tail + data[:3]).find(b"\r\n\r\n")
            if edge >= 0:
                start = edge + 4 - len(tail)
            else:
                at = data.find(b"\r\n\r\n")
                if at < 0:
                    self._head_tail = (tail + data[-3:])[-3:]
                    return
                start = at + 4
            self._head_tail = None
        if start >= len(data):
            return
        self._body_bytes += len(data) - start
        self._body_crlf += data.count(b"\r\n", start) + (self._body_cr and data[start] == 0x0A)
        self._body_cr = data[-1] == 0x0D

    @property
    def body_size(self) -> int:
        """The body's size as Sendmail's df file has it (see ``spool.body_size``)."""
        return self._body_bytes - self._body_crlf

    def _fail(self, exc: OSError) -> None:
        # A copy without the traceback: nothing of the failed call is kept alive.
        self.failed = OSError(exc.errno, exc.strerror)
        self.buf = bytearray()
        # The partial file goes now, not at the end of the data: on a full disk its space is
        # what the next message needs.
        self.discard()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.spool.free_space_changed()

    def seal(self, *, lock: bool) -> int:
        """Write out the rest with the seal (and cut a reused file to length); with ``lock``,
        take the delivery flock. Returns the descriptor, still this message's (see
        ``Spool.commit``). Raises OSError."""
        if self.failed is not None:
            raise self.failed
        seal = seal_fields(self.crc, self.size)
        if self.fd is None:
            # Never spilled: the envelope line is still in the buffer, seal it there and
            # write the whole file at once.
            self.buf[SEAL_OFFSET : SEAL_OFFSET + len(seal)] = seal
            self._write_out()
        else:
            self._write_out()
            os.pwrite(self.fd, seal, SEAL_OFFSET)
        fd = self.fd
        assert fd is not None
        if self.stale_size > self.written:
            os.ftruncate(fd, self.written)  # a reused file: the rest is its old message
        if lock:
            # Held from here until the first delivery attempt, so that `mailgate flush`
            # (another process) cannot deliver it at the same time.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd

    def committed(self, queue_path: str, *, keep_fd: bool) -> QueuedMessage:
        """After the link into the queue: the ``QueuedMessage``, which takes the descriptor
        (``keep_fd``) or has it closed."""
        fd, self.fd = self.fd, None
        self.closed = True
        if not keep_fd and fd is not None:
            with contextlib.suppress(OSError):  # flushed and linked: it is queued whatever
                os.close(fd)  # close says
            fd = None
        # The body's size goes into the first status file, where the listing finds it.
        status = QueueStatus(body_size=self.body_size)
        return QueuedMessage(self.envelope, queue_path, self.offset, self.size, status, fd)

    # -- read back before the seal (milters: ``milter/message.py``) -----------------------------
    def read(self, pos: int, size: int) -> bytes:
        """Up to ``size`` bytes of the content written so far, from ``pos``."""
        return _read_written(self.fd, self.offset, self.written, self.buf, self.size, pos, size)

    def edit_head(self, envelope: Envelope, cut: int, head: bytes) -> bool:
        """Content ``[0, cut)`` replaced by ``head`` and the envelope by ``envelope``, in the
        buffer, for a message that never spilled (the filters' changes, milter/message.py):
        no second message to copy this one into. The seal's CRC is worked out again over the
        whole new content (it covers all of it). False if part of the content is in the file
        already (or the message failed, or is closed): the caller copies it into a new one.
        Raises OSError when the grown buffer spills and the write fails (the message has then
        failed, as in ``write``)."""
        if self.fd is not None or self.failed is not None or self.closed:
            return False
        buf = self.buf
        offset = self.offset
        if envelope is not self.envelope:
            line = envelope.to_line()
            buf[: offset + cut] = line + head
            offset = len(line)
        else:
            buf[offset : offset + cut] = head
        self.envelope = envelope
        self.offset = offset
        self.size = len(buf) - offset
        # Views released at once: a view alive over the buffer forbids resizing it (see
        # _write_out).
        with memoryview(buf) as view, view[offset:] as content:
            self.crc = zlib.crc32(content)
        if len(buf) >= self.SPILL_AT:  # the header grew it past the buffer's bound
            try:
                self._write_out()
            except OSError as exc:
                self._fail(exc)
                raise
        return True

    def hand_over(self) -> WrittenContent:
        """Give the message up and keep its content readable: a rewritten message takes its
        queue id (and so its incoming/ name) while the content is copied into it. The file
        is unlinked, a second descriptor keeps it readable until ``WrittenContent.close``."""
        fd = os.dup(self.fd) if self.fd is not None else None
        content = WrittenContent(fd, self.offset, self.written, bytes(self.buf), self.size)
        self.discard()
        return content

    def discard(self) -> None:
        if not self.closed:
            self.closed = True
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)


def _read_written(
    fd: int | None,
    offset: int,
    written: int,
    buf: bytes | bytearray,
    total: int,
    pos: int,
    size: int,
) -> bytes:
    """Content bytes [pos, pos + size) of a message whose first ``written`` bytes (envelope
    line included, from ``offset`` on content) are in the file on ``fd`` and the rest in
    ``buf`` (which holds the envelope line too while nothing was written)."""
    start = offset + pos
    end = offset + min(total, pos + size)
    out = bytearray()
    while start < min(end, written):
        assert fd is not None
        block = os.pread(fd, min(end, written) - start, start)
        if not block:
            raise OSError(errno.EIO, "spool file shorter than written")
        out += block
        start += len(block)
    if start < end:
        out += buf[start - written : end - written]
    return bytes(out)


class WrittenContent:
    """A message's content after ``IncomingMessage.hand_over``: readable, owning its
    descriptor (if the message had a file) until ``close``."""

    def __init__(self, fd: int | None, offset: int, written: int, buf: bytes, size: int) -> None:
        self.fd = fd
        self.offset = offset
        self.written = written
        self.buf = buf
        self.size = size

    def read(self, pos: int, size: int) -> bytes:
        return _read_written(self.fd, self.offset, self.written, self.buf, self.size, pos, size)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def status_due(status: QueueStatus) -> float:
    """When the message of ``status`` is due, as its status file's modification time says:
    ``HELD_DUE`` for a held one, its next attempt, or now (a status without one)."""
    if status.held:
        return HELD_DUE
    return time.time() if status.next_attempt is None else status.next_attempt


# How much of a file ``Spool.warm`` has read ahead: the envelope line, the status, and the
# content of a typical message (a larger one is read as it is sent, as before).
WARM_BYTES = 64 * 1024


def queue_ids(queue: Path) -> Iterator[str]:
    """The queue ids in the folder ``queue``, streamed: ``mailgate status`` counts a queue of
    any size this way, without a `Spool` (which would create folders and open files)."""
    with os.scandir(queue) as entries:
        for entry in entries:
            name = entry.name
            if not name.endswith(_STATUS_SUFFIX) and not name.endswith(".tmp"):
                yield name


class Spool:
    SPARE_MAX = 64  # delivered files kept for reuse, per process
    SPARE_MAX_SIZE = IncomingMessage.SPILL_AT  # larger ones are freed: no hoarding of disk

    def __init__(self, root: Path, *, fsync: str = "auto") -> None:
        """``fsync``: "auto" (Linux AIO where the kernel has it) or "threads"."""
        self.root = root
        self.incoming = root / "incoming"
        self.queue = root / "queue"
        self.corrupt = root / "corrupt"
        self.spare = root / "spare"
        self.due = root / "due"
        self.trash = root / "trash"  # delivered files waiting for the cleaner's unlink
        # For the calls made once per message or once per entry of a whole-queue command:
        # no pathlib there.
        self._queue_dir = str(self.queue)
        self._due_dir = str(self.due)
        self.incoming_dir = str(self.incoming)
        self._spare_dir = str(self.spare)
        self._trash_dir = str(self.trash)
        self._cleaner: Cleaner | None = None  # the daemon's (start_cleaner)
        for d in (self.incoming, self.queue, self.corrupt, self.spare, self.due, self.trash):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spares: list[tuple[int, str, int]] = []  # (open fd, name in spare/, size)
        # Committed messages written over a spare file, qid → the file's spare/ path: their
        # second name until ``_forget_incoming`` (an in-flight first attempt's, at most).
        self._spare_names: dict[str, str] = {}
        self._spare_seq = 0
        self._fsync_choice = fsync
        self._fsync: fsync_impl.Fsync | None = None
        self._fsync_loop: asyncio.AbstractEventLoop | None = None
        self._inline_fsync = fsync_impl.InlineFsync()
        self._pid = os.getpid() % 1_000_000
        self._last_second = 0
        self._seq = 0
        self._free = 0  # bytes free in the spool's file system, as of _free_at
        self._free_at = -math.inf  # time.monotonic() of that statvfs; -inf: look again
        self._spent = 0  # bytes this process has written into the spool since then
        self._block = 4096  # the file system's block size (statvfs f_frsize)
        self._low = False  # below min_free at the last look (logged once per change)
        # Messages this process put into queue/ (word 0) and took out of it (word 1):
        # delivered, bounced, deleted, quarantined. The daemon points this at two words of
        # its metrics row (``count_moves_in``), so that a count of the queue taken now and
        # then stays right in between (``monitor.QueueCount``); plain stores, no lock.
        self.moves: memoryview = memoryview(bytearray(16)).cast("Q")

    ENTERED, LEFT = 0, 1  # the words of ``moves``

    def count_moves_in(self, words: memoryview) -> None:
        """Count what enters and leaves queue/ in ``words`` (two 64-bit words) from now on."""
        self.moves = words

    def fsync_for(self, loop: asyncio.AbstractEventLoop) -> fsync_impl.Fsync:
        """The flusher bound to ``loop`` (made on first use: an AIO context is per process)."""
        if self._fsync is None or self._fsync_loop is not loop:
            if self._fsync is not None:
                self._fsync.close()
            self._fsync = fsync_impl.for_loop(loop, self._fsync_choice)
            self._fsync_loop = loop
        return self._fsync

    def start_cleaner(self) -> None:
        """The daemon's: delivered messages' files are freed by a thread from now on
        (``queue/cleaner.py``), not by the unlink on the event loop. In the process that
        delivers (after a fork, never before)."""
        if self._cleaner is None:
            self._cleaner = Cleaner(self._trash_dir)

    def close(self) -> None:
        if self._fsync is not None:
            self._fsync.close()
            self._fsync = None
        if self._cleaner is not None:
            self._cleaner.close()
            self._cleaner = None
        while self._spares:
            fd, name, _ = self._spares.pop()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(f"{self._spare_dir}/{name}")
        if self._spare_names:
            # Queued messages still known by their spare/ names (never attempted here, or
            # delivered by another process): their queue/ entries made durable first.
            with contextlib.suppress(OSError):
                self._fsync_queue_dir()
                while self._spare_names:
                    _qid, path = self._spare_names.popitem()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    # -- free space ------------------------------------------------------------------------------
    FREE_SPACE_TTL = 1.0  # seconds one statvfs answer stands for
    # Within this of the reserve, every check looks again: the other workers' writes are
    # not in this process's ``_spent``, and N of them could run through the reserve within
    # the TTL (statvfs costs a microsecond; far from the reserve it is not worth it).
    NEAR_RESERVE = 64 * 1024 * 1024

    def free_space(self, *, look: bool = False) -> int:
        """Bytes available (to non-root users, as Sendmail and Postfix count them) in the
        spool's file system, less what this process has written since it last looked.

        One statvfs per ``FREE_SPACE_TTL`` at most: this is asked at every MAIL and DATA,
        thousands of times a second on a busy gateway. In between, what this process writes
        is taken off the figure (each file rounded up a block), so a burst cannot run through
        the reserve within the second: on the test's 4 MiB disk 4 clients filled it all in
        less than that. Space freed in between is seen at the next look, and a write that
        finds the disk full makes the next call look at once. ``look``: now, whatever the
        age of the last answer (``room_for`` near the reserve)."""
        now = time.monotonic()
        if look or now - self._free_at >= self.FREE_SPACE_TTL:
            try:
                st = os.statvfs(self.root)
            except OSError:
                self._free_at = now  # keep the last figure; the write path still sees ENOSPC
            else:
                self._free = st.f_bavail * st.f_frsize
                self._block = st.f_frsize or 4096
                self._free_at = now
                self._spent = 0
        return max(0, self._free - self._spent)

    def spent(self, nbytes: int, *, new_file: bool = False) -> None:
        """``nbytes`` written into the spool (a new file: plus a block for its last one).
        Also called from threads (status files, DSNs): a lost update only skews an estimate
        that the next statvfs replaces."""
        self._spent += nbytes + (self._block if new_file else 0)

    def free_space_changed(self) -> None:
        """A write found the disk full (or space was freed): the next check looks again."""
        self._free_at = -math.inf

    def room_for(self, size: int, min_free: int) -> bool:
        """Can a message of ``size`` bytes (0: not announced) be taken and still leave
        ``min_free`` bytes free? Always true with ``min_free`` 0 (no check, no statvfs)."""
        if min_free <= 0:
            return True
        free = self.free_space()
        if free - size < min_free + self.NEAR_RESERVE:
            free = self.free_space(look=True)
        low = free < min_free
        if low != self._low:
            self._low = low
            if low:
                maillog.low_space(free, self.root, min_free)
            else:
                maillog.space_available(free, self.root)
        return free - size >= min_free

    # -- spare files -----------------------------------------------------------------------------
    def recycle(self, qid: str, fd: int, size: int, *, status_file: bool) -> bool:
        """Remove a delivered message but keep its file, open on ``fd`` (read-write), for the
        next incoming message. False if it is not kept: the caller removes it as usual."""
        if len(self._spares) >= self.SPARE_MAX or size > self.SPARE_MAX_SIZE:
            return False
        spare_path = self._spare_names.pop(qid, None)
        try:
            # Unsealed first: a crash must not bring the delivered message back as new mail.
            os.pwrite(fd, UNSEALED, SEAL_OFFSET)
            if spare_path is not None:
                # Still named in spare/ (it was a spare when the message came): dropping the
                # queue/ name makes it one again, one unlink where a rename would do two
                # directory changes.
                os.unlink(f"{self._queue_dir}/{qid}")
                name = spare_path[len(self._spare_dir) + 1 :]
            else:
                name = f"{self._pid}.{self._spare_seq}"
                self._spare_seq += 1
                os.rename(f"{self._queue_dir}/{qid}", f"{self._spare_dir}/{name}")
        except OSError:
            if spare_path is not None:
                self._spare_names[qid] = spare_path  # the caller's remove() unlinks it
            return False
        self.moves[self.LEFT] += 1
        if status_file:
            self._drop(f"{qid}{_STATUS_SUFFIX}")
        if spare_path is None:
            self._forget_incoming(qid)  # a second name: unlinking it frees nothing
        self._spares.append((fd, name, size))
        return True

    def _forget_incoming(self, qid: str) -> None:
        """Drop a committed message's second name (incoming/, or spare/ for a reused file):
        it is delivered, or its queue/ entry is on disk. Another process (a queue tool) knows
        only the incoming/ one; a spare/ name lives no longer than the first attempt, which
        holds the message's lock, and is this process's to drop (or start-up recovery's)."""
        name = self._spare_names.pop(qid, None) or f"{self.incoming_dir}/{qid}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)

    def settle_spare_name(self, qid: str) -> None:
        """A message just committed over a spare file that this process will not attempt
        (the scheduler's window had no room): its spare/ name, which no other process knows,
        goes once queue/ is on disk, so that a crash later cannot bring back a copy another
        process has delivered meanwhile. Blocks on the directory's fsync: for a thread."""
        path = self._spare_names.get(qid)
        if path is None:
            return
        try:
            self._fsync_queue_dir()
        except OSError:
            return  # kept: the close, or start-up recovery, drops it
        if self._spare_names.pop(qid, None) is not None:  # an attempt here may have taken it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def has_spare_name(self, qid: str) -> bool:
        return qid in self._spare_names

    def take_spare(self) -> tuple[int, str, int] | None:
        """A kept file for a new message: (its open fd, its path in spare/, its old size);
        None if there is none. It stays where it is: written over in place, it is linked
        into queue/ at the commit, and its spare/ name is that message's second name."""
        if not self._spares:
            return None
        fd, name, size = self._spares.pop()
        return fd, f"{self._spare_dir}/{name}", size

    # -- queue ids -----------------------------------------------------------------------------
    def new_qid(self) -> str:
        """A 14-character queue id as Sendmail makes one: the UTC time (its year as Sendmail's
        ``tm_year % 60``, the years since 1900: "6" in 2026), sequence within the second, pid.

        Unique within this process by construction; a queue file left by an earlier process
        with the same pid at the same second is never overwritten: commit links (which fails
        on an existing name) instead of renaming."""
        now = int(time.time())
        if now > self._last_second:  # never step back into a second we borrowed below
            self._last_second, self._seq = now, 0
        if self._seq >= 3600:
            # More than 3,600 ids in one second in one process: borrow the next second.
            self._last_second += 1
            self._seq = 0
        t = time.gmtime(self._last_second)
        seq = self._seq
        self._seq += 1
        return (
            _ALPHABET[(t.tm_year - 1900) % 60]
            + _ALPHABET[t.tm_mon - 1]
            + _ALPHABET[t.tm_mday]
            + _ALPHABET[t.tm_hour]
            + _ALPHABET[t.tm_min]
            + _ALPHABET[min(t.tm_sec, 59)]
            + _ALPHABET[seq // 60]
            + _ALPHABET[seq % 60]
            + f"{self._pid:06d}"
        )

    def census(self) -> tuple[int, float | None]:
        """How many messages are queued, and when the oldest of them arrived (``qid_time``):
        one listing of queue/, names only, no file opened or stat'ed (~1 s of CPU per
        million entries). May run in a thread."""
        count = 0
        first: dict[str, str] = {}  # per year character: the earliest time characters
        for qid in self.qids():
            count += 1
            stamp = qid[:6]
            known = first.get(stamp[:1])
            if known is None or stamp < known:
                first[stamp[:1]] = stamp
        times = [t for t in map(qid_time, first.values()) if t is not None]
        return count, min(times, default=None)

    # -- receiving (loop-only) -----------------------------------------------------------------
    def open_incoming(self, envelope: Envelope) -> IncomingMessage:
        """A message to write; no file exists until its buffer spills or it is committed."""
        return IncomingMessage(self, envelope)

    def _failed(self, msg: IncomingMessage, exc: BaseException) -> SpoolError:
        # Only the incoming/ file goes. Nothing to undo in queue/: the link is the last step
        # and nothing fails after it, and a queue/ entry of that name when the link fails
        # (EEXIST) is another process's acknowledged message, which must stay.
        msg.discard()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.free_space_changed()
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return SpoolError(f"cannot commit message: {text}")

    async def commit(
        self, msg: IncomingMessage, *, lock: bool = False, inline: bool = False
    ) -> QueuedMessage:
        """Make ``msg`` durable and return it queued. Only after this returns may the 250 be
        sent.

        Seal, fsync (off the loop; with ``inline``, on it while the disk is fast:
        ``fsync.InlineFsync``), then link into queue/: a link, not a rename, so that an
        existing queue file of that name is never replaced, and the durable incoming/ name
        stays (see the module's docstring) until ``_forget_incoming``. With ``lock``, the
        ``QueuedMessage`` owns the open descriptor holding the delivery flock, for the first
        attempt; else it holds none. A message whose content could not be written
        (``msg.failed``) raises SpoolError.
        """
        try:
            fd = msg.seal(lock=lock)
            if inline and self._inline_fsync.usable():
                self._inline_fsync.fsync(fd)
            else:
                await self.fsync_for(asyncio.get_running_loop()).fsync(fd)
            qid = msg.envelope.qid
            queue_path = f"{self._queue_dir}/{qid}"
            os.link(msg.name, queue_path)
        except OSError as exc:
            raise self._failed(msg, exc) from exc
        except BaseException as exc:  # cancelled mid-flush: never acknowledged
            self._failed(msg, exc)
            raise
        self.moves[self.ENTERED] += 1
        if not msg.name.startswith(self.incoming_dir):
            self._spare_names[qid] = msg.name  # a reused file: its second name is in spare/
        return msg.committed(queue_path, keep_fd=lock)

    # -- the queue ------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At start-up: drop unacknowledged receptions, quarantine unreadable entries, return
        the committed queue ids."""
        self.recover_incoming()
        qids = []
        for qid in sorted(self.qids()):
            try:
                self.load(qid, with_status=False)
            except CorruptEntry as exc:
                self.quarantine(qid, exc.reason)
                continue
            qids.append(qid)
        return qids

    def recover_incoming(self) -> int:
        """Before any session runs: move sealed files (acknowledged, but their link into
        the queue was not yet on disk at the crash) into the queue; drop the others, which
        never got their 250, the spare files, and the incoming/ names of queued messages
        once the queue directory is on disk; and what is in trash/ (delivered, its unlink
        not done when its process ended). Returns how many were moved."""
        moved = 0
        done: list[Path] = []
        for directory in (self.incoming, self.spare):
            for p in directory.iterdir():
                try:
                    if directory is self.incoming and (self.queue / p.name).exists():
                        done.append(p)  # the second name of a queued message
                        continue
                    qid = self._sealed_qid(p)
                    if directory is self.incoming and qid != p.name:
                        qid = None  # a reused spare file whose new message was never written
                    if qid is not None and not (self.queue / qid).exists():
                        os.link(p, self.queue / qid)
                        moved += 1
                        self.moves[self.ENTERED] += 1
                    done.append(p)
                except OSError as exc:
                    # Kept where it is (a full disk can refuse the link): the next start-up
                    # tries again; an acknowledged message is never dropped for want of room.
                    maillog.recover_failed(p, exc.strerror or exc)
                    continue
        if done:
            self._fsync_queue_dir()
        for p in done:
            with contextlib.suppress(OSError):
                p.unlink()
        # Delivered mail a cleaner had not unlinked yet when its process ended.
        for p in self.trash.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        return moved

    @staticmethod
    def _sealed_qid(path: Path) -> str | None:
        """The qid of a complete message file (its seal matches its content), else None."""
        with open(path, "rb") as f:
            line = f.readline(16 * 1024 * 1024)
            seal = read_seal(line)
            if seal is None or not _QID.fullmatch(seal[2]):
                return None
            crc = 0
            length = 0
            while chunk := f.read(256 * 1024):
                crc = zlib.crc32(chunk, crc)
                length += len(chunk)
        return seal[2] if (crc, length) == seal[:2] else None

    def _fsync_queue_dir(self) -> None:
        fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def qids(self) -> Iterator[str]:
        """The queued messages, in directory order, as the folder is read (never a list)."""
        yield from queue_ids(self.queue)

    def count(self) -> int:
        """How many messages are queued (names only: no file is opened)."""
        return sum(1 for _ in self.qids())

    @staticmethod
    def valid_qid(qid: str) -> bool:
        """Could ``qid`` be a queue id (a plain file name: no "/", no "..")?"""
        return _QID.fullmatch(qid) is not None

    @staticmethod
    def _envelope(qid: str, line: bytes) -> Envelope:
        try:
            if not line.endswith(b"\n"):
                raise ValueError("envelope line is incomplete")
            return Envelope.from_line(line)
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptEntry(qid, str(exc)) from None

    def load(self, qid: str, *, with_status: bool = True) -> QueuedMessage | None:
        """Read a committed message's envelope and status (without a lock: for listing);
        None if it is gone. Raises CorruptEntry, and moves nothing."""
        peeked = self.peek(qid, with_status=with_status, probe=False)
        return peeked[0] if peeked else None

    def peek(
        self, qid: str, *, with_status: bool = True, probe: bool = True
    ) -> tuple[QueuedMessage, bool] | None:
        """``load``, and (``probe``) whether a runner holds the message's lock now: a
        non-blocking flock on the same descriptor, let go at once (``mailq``'s ``*``). Plain
        ``os`` calls on string paths: a listing does this for every entry of the queue."""
        try:
            fd = os.open(f"{self._queue_dir}/{qid}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        locked = False
        try:
            line, start = _read_first(fd, _MAX_ENVELOPE)
            size = os.fstat(fd).st_size - len(line)
            if probe:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    locked = True
        finally:
            os.close(fd)
        envelope = self._envelope(qid, line)
        status = self.load_status(qid, envelope) if with_status else QueueStatus()
        body = status.body_size
        if body is None:
            # Never attempted, or written by an older version: the body's size from the
            # start of the content the first read brought along, exact when that is all of
            # it; of a larger message, its bytes after the header section (CR LF counted as
            # two), since counting its lines would read the whole file.
            if len(start) >= size:
                body = body_size(start)
            else:
                at = _body_start(start)
                body = size if at is None else size - at
        path = f"{self._queue_dir}/{qid}"  # a Path only if asked: a Path a message costs 7 µs
        msg = QueuedMessage(envelope, path, len(line), size, status, body_size=body)
        return msg, locked

    LOCK_POLL = 0.02  # seconds between two tries of a lock ``lock_entry`` waits for

    def lock_entry(self, qid: str, *, wait: float = 0.0) -> int | None:
        """Open ``qid``'s queue file read-write and take its delivery flock, waiting up to
        ``wait`` seconds while another runner has it. Returns the descriptor, the caller's to
        close (which releases the lock); None if the message is gone (delivered, removed)
        meanwhile; raises EntryLocked when the wait is over."""
        path = self.queue / qid
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            ino = os.fstat(fd).st_ino
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    locked = False
                # The name must still be this file: another runner may have finished it
                # between our open and our lock (removed it, or its file now holds another
                # message: spare files are reused). Looked at while waiting too, since a
                # delivered file kept as a spare stays locked by its new owner.
                if os.stat(path).st_ino != ino:
                    raise FileNotFoundError(qid)
                if locked:
                    return fd
                if time.monotonic() >= deadline:
                    raise EntryLocked(qid)
                time.sleep(self.LOCK_POLL)
        except FileNotFoundError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    def claim(self, qid: str, *, wait: float = 0.0) -> QueuedMessage | None:
        """Take a queued message for a delivery attempt (or a queue tool's change): one open
        (read-write, so that ``finish`` may keep the file as a spare), the delivery flock
        (``lock_entry``, waiting up to ``wait`` seconds), the envelope read through the same
        descriptor. The caller owns the result (``close``/``finish``). None if it is gone;
        raises EntryLocked (another runner has it) or CorruptEntry."""
        fd = self.lock_entry(qid, wait=wait)
        if fd is None:
            return None
        path = self.queue / qid
        try:
            st = os.fstat(fd)
            line = _read_line(fd, _MAX_ENVELOPE)
            envelope = self._envelope(qid, line)
            msg = QueuedMessage(
                envelope,
                path,
                len(line),
                st.st_size - len(line),
                self.load_status(qid, envelope),
                fd,
            )
        except BaseException:
            os.close(fd)
            raise
        return msg

    def load_status(self, qid: str, envelope: Envelope | None = None) -> QueueStatus:
        """The status file of ``qid`` (a fresh one if there is none). ``envelope``: needed
        to read a status file of the old format completely (``QueueStatus._from_v1``)."""
        try:
            fd = os.open(f"{self._queue_dir}/{qid}{_STATUS_SUFFIX}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return QueueStatus()
        try:
            raw = block = os.read(fd, 64 * 1024)
            while len(block) == 64 * 1024:  # a short read of a file is its end
                block = os.read(fd, 64 * 1024)
                raw += block
        finally:
            os.close(fd)
        try:
            addresses = [r.address for r in envelope.recipients] if envelope else ()
            status = QueueStatus.from_json(raw, addresses)
        except (ValueError, TypeError, KeyError, AttributeError):
            # A torn status file only loses retry bookkeeping; the envelope stays authoritative.
            status = QueueStatus()
        status.on_disk = True
        return status

    def save_status(self, qid: str, status: QueueStatus) -> None:
        """Atomically replace the status file (blocking; call from a thread)."""
        final = self.queue / (qid + _STATUS_SUFFIX)
        tmp = self.queue / (qid + _STATUS_SUFFIX + ".tmp")
        data = status.to_json()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # Every byte, or an error: on a filling disk one write can come back short,
                # and a torn status renamed over the good one would forget what was delivered.
                self.spent(len(data), new_file=True)
                pos = 0
                while pos < len(data):
                    pos += os.write(fd, data[pos:])
                # Its time is when the message is due (a queue pass reads only that), set
                # before the fsync and the rename: the new file is never seen with another.
                due = status_due(status)
                os.utime(fd, (due, due))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            status.on_disk = True
        except OSError as exc:
            # The old status file stays as it was; no half-written .tmp is left to take space.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.free_space_changed()
            raise
        # That fsync of a new entry in queue/ wrote queue/'s entries out (ext4 syncs a new
        # file's directory; journalling file systems commit the earlier link first).
        self._forget_incoming(qid)

    def finish(self, msg: QueuedMessage) -> None:
        """``msg`` is delivered or bounced: keep its file as a spare (loop-only) if it holds
        its descriptor, else remove it; either way its descriptor is closed or kept. On the
        event loop: a rename (or an unlink and a close) is quicker than a thread hop."""
        # A status file exists once an attempt has been recorded (attempts ≥ 1), or a queue
        # tool wrote one (a hold, released since); a fresh message has none to unlink.
        status_file = msg.status.attempts > 0 or msg.status.on_disk
        fd = msg.fd
        if fd is not None and self.recycle(
            msg.qid, fd, msg.offset + msg.size, status_file=status_file
        ):
            msg.take_fd()  # the spool keeps the file open for the next message
            return
        self.remove(msg.qid, status_file=status_file)
        msg.close()

    def remove(self, qid: str, *, status_file: bool = True) -> None:
        """The message is delivered or bounced: forget it (and its status file, if any)."""
        if self._drop(qid):
            self.moves[self.LEFT] += 1
        if status_file:
            self._drop(f"{qid}{_STATUS_SUFFIX}")
        self._forget_incoming(qid)

    def _drop(self, name: str) -> bool:
        """Take ``queue/<name>`` out of the queue; False if it was not there. With the
        cleaner (the daemon) it is renamed into ``trash/`` for the cleaner's thread to
        unlink, while the cleaner has room; else, or in another process, unlinked here.
        Either way the name is gone from ``queue/`` when this returns."""
        path = f"{self._queue_dir}/{name}"
        cleaner = self._cleaner
        if cleaner is not None and cleaner.room:
            try:
                os.rename(path, f"{self._trash_dir}/{name}")
            except FileNotFoundError:
                return False
            except OSError:
                pass  # trash/ unusable (removed under us): unlinked here, as before
            else:
                cleaner.put(name)
                return True
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def delete(self, qid: str) -> None:
        """``mailgate delete``: forget the message, its status file and any due marker. The
        caller holds its lock (``lock_entry``), so no attempt is delivering it."""
        self.remove(qid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.due / qid)

    # -- due markers: "attempt it now", for the daemon -------------------------------------------
    def mark_due(self, qid: str) -> bool:
        """Ask the daemon to attempt ``qid`` now (it reads ``due/`` when told, by
        ``DUE_SIGNAL``, and at every queue run and start). The marker is a second name of
        the queue file, a hard link, not a new empty file: ``requeue --all`` makes one per
        message, and on ext4 creating 19,000 files after as many deletions took 12 s (every
        new inode is searched for past the recently freed ones; see "The spool" in
        docs/design.md), linking them 0.2 s. Only the name is ever read. Not fsync'd: a
        crash can forget the request, never a message. False if the message is gone."""
        try:
            os.link(f"{self._queue_dir}/{qid}", f"{self._due_dir}/{qid}")
        except FileExistsError:
            pass  # marked already
        except FileNotFoundError:
            return False
        return True

    def take_due(
        self, mine: Callable[[str], bool], limit: int | None = None
    ) -> tuple[list[str], int]:
        """The queue ids marked due that ``mine`` accepts (a worker's share), their markers
        removed; the others are left for the worker whose share they are. At most ``limit``
        are returned: the markers beyond it are removed too, their messages made due now on
        disk (``set_due``) for a queue pass to take on (``requeue --all`` of a million
        messages must not become a list of a million names). Returns (the ids, how many
        were made due on disk instead)."""
        taken: list[str] = []
        spilled = 0
        now = time.time()
        with os.scandir(self.due) as entries:
            for entry in entries:
                qid = entry.name
                if not self.valid_qid(qid):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)  # not ours to keep: no qid looks like that
                    continue
                if not mine(qid):
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                if limit is None or len(taken) < limit:
                    taken.append(qid)
                else:
                    self.set_due(qid, now)
                    spilled += 1
        return taken, spilled

    def set_due(self, qid: str, when: float) -> bool:
        """Make ``qid`` due at ``when`` for the queue passes (its status file's time; a
        message without one is due now anyway). Only the time changes, without the lock:
        an attempt writing the status meanwhile sets its own, which is as good. False if
        there is no status file."""
        try:
            os.utime(f"{self._queue_dir}/{qid}{_STATUS_SUFFIX}", (when, when))
        except FileNotFoundError:
            return False
        return True

    def due_times(self, mine: Callable[[str], bool]) -> Iterator[tuple[str, float]]:
        """One queue pass: (qid, when it is due) for each queued message ``mine`` accepts,
        in directory order, as the folder is read: a ``stat`` of its status file (its time
        is the next attempt, ``HELD_DUE`` when held; ``save_status``), 0.0 for a message
        without one (never attempted: due now). No file is opened. May run in a thread, one
        at a time (it is a generator over an open ``os.scandir``)."""
        queue_dir = self._queue_dir
        for qid in self.qids():
            if not mine(qid):
                continue
            try:
                due = os.stat(f"{queue_dir}/{qid}{_STATUS_SUFFIX}").st_mtime
            except FileNotFoundError:
                due = 0.0
            yield qid, due

    def cached(self, qid: str) -> bool:
        """Whether the start of ``qid``'s queue file is in the page cache (a read that may not
        wait, ``RWF_NOWAIT``): a listing's guess whether the queue is. True when it cannot
        tell (gone, or a kernel without the flag)."""
        try:
            fd = os.open(f"{self._queue_dir}/{qid}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            os.close(fd)
        return True

    def warm(self, qid: str) -> None:
        """Have the kernel read ``qid``'s queue file and status file into the page cache,
        without waiting for the data (``posix_fadvise`` WILLNEED starts the reads, several
        at once): for the attempt that will claim it on the event loop, which would
        otherwise wait there for each read in turn when the queue is not cached. Only the
        inode is read before this returns. In a thread (the queue pass's); takes no lock
        (a descriptor closed here lets go of no one's ``flock``)."""
        for path in (f"{self._queue_dir}/{qid}", f"{self._queue_dir}/{qid}{_STATUS_SUFFIX}"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # gone (delivered meanwhile), or no status file yet
            try:
                os.posix_fadvise(fd, 0, WARM_BYTES, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a file system without readahead: the attempt reads it as before
            finally:
                os.close(fd)

    def quarantine(self, qid: str, reason: str) -> None:
        for name in (qid, qid + _STATUS_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.queue / name, self.corrupt / name)
                if name == qid:
                    self.moves[self.LEFT] += 1
        self._forget_incoming(qid)
        with contextlib.suppress(OSError):
            (self.corrupt / (qid + ".reason")).write_text(reason + "\n")
        maillog.quarantined(qid, reason, self.corrupt)

    @contextlib.contextmanager
    def locked(self, qid: str) -> Iterator[bool]:
        """Hold an exclusive lock on a queued message while delivering it.

        Yields False when another process (the daemon, or ``mailgate flush``) holds it, or the
        message is gone; so two runners never deliver the same message at once.
        """
        try:
            fd = os.open(self.queue / qid, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def is_locked(self, qid: str) -> bool:
        with self.locked(qid) as got:
            return not got and (self.queue / qid).exists()
