"""Sans-IO SMTP server protocol: bytes in, events out (in the style of h11).

No sockets, no event loop, no policy. The session feeds received bytes with
:meth:`ServerConnection.receive_data` and pulls events with
:meth:`ServerConnection.next_event` until it returns ``None``.

Only CRLF ends a command line: a line ended by a bare LF, or holding a bare CR, is refused
with a fatal ``BadCommand`` (the session closes) and no part of it is acted on. End of data is
only ``CRLF . CRLF``. Any bare CR or bare LF in message content makes the message fail (anti
SMTP smuggling), but never ends it. DATA content is scanned per received
block, never byte by byte in Python: CR, LF and CRLF are counted and ``CRLF .`` found at
SIMD speed (smtp/search.py), the rest with ``bytes`` methods.

Text lines of any length are accepted by default (``max_text_line=0``), as Postfix's smtpd and
Sendmail accept them: the client folds them when it passes the message on (smtp/body.py), so
refusing them here would only bounce mail the other MTAs deliver. A limit is an opt-in.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, TypeAlias

from mailgate.reply import Reply
from mailgate.smtp.search import count as _count
from mailgate.smtp.search import find as _find

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "BadCommand",
    "Command",
    "ConnectionClosed",
    "DataChunk",
    "DataEnd",
    "DataFailed",
    "Event",
    "ProtocolError",
    "ServerConnection",
    "Wait",
    "reply_bytes",
]


# The events are plain slots dataclasses, not frozen: one is made per command line and per
# block of content (see docs/design.md, "CPU per message").
@dataclass(slots=True)
class Command:
    """A command line: ``verb`` upper-cased, ``arg`` the stripped rest after the first
    blank, ``line`` as the client wrote it (what an unknown command's reply repeats)."""

    verb: str
    arg: str
    line: str = field(default="", compare=False)


@dataclass(slots=True)
class BadCommand:
    """A command line the protocol refused; the session sends ``reply``. With ``fatal`` the
    line broke the framing itself (a bare CR or LF): the session must close after the reply,
    and the protocol produces no further events."""

    reply: Reply
    fatal: bool = False


@dataclass(slots=True)
class DataChunk:
    """Message content (dot-unstuffed, CRLF kept); may end mid-line."""

    data: bytes


@dataclass(slots=True)
class DataEnd:
    """The terminating CRLF.CRLF arrived and the content was valid; ``size`` content bytes."""

    size: int


@dataclass(slots=True)
class DataFailed:
    """The terminating CRLF.CRLF arrived but the content broke a rule (first violation wins)."""

    reply: Reply
    size: int


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed its side and all buffered input was consumed."""


Event: TypeAlias = Command | BadCommand | DataChunk | DataEnd | DataFailed | ConnectionClosed


class Wait(Enum):
    """What :meth:`ServerConnection.next_event` returns when it has no event (h11's two
    sentinels): NEED_DATA, feed more bytes; PAUSED, nothing comes until the session answers
    the DATA command with :meth:`ServerConnection.send`, or ever again (after the end or a
    fatal refusal)."""

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"


NEED_DATA: Final = Wait.NEED_DATA
PAUSED: Final = Wait.PAUSED


class ProtocolError(RuntimeError):
    """The caller drove the protocol wrongly (e.g. start_data() without a pending DATA)."""


def reply_bytes(*replies: Reply) -> bytes:
    """Concatenate the wire form of ``replies`` (one write for a pipelined group)."""
    return b"".join(r.to_bytes() for r in replies)


_TERM: Final = b"\r\n.\r\n"
_VIRTUAL_BOL: Final = b"\r\n"  # DATA content starts at a line start, as if after a CRLF
# Only used on the failure path to locate the first bare CR/LF in a chunk.
_BARE_RE: Final = re.compile(rb"\r(?!\n)|(?<!\r)\n")

_BLANK: Final = re.compile(r"[ \t]")  # between a verb and its argument
_CMD_TOO_LONG: Final = Reply(500, "5.5.0", "Command line too long")
_CMD_NUL: Final = Reply(500, "5.5.1", "Invalid command: NUL byte")
# Only CRLF ends a command line (RFC 5321 2.3.8). A line ended by a bare LF, or holding a bare
# CR, is where SMTP smuggling starts: a peer that splits lines differently would see other
# commands in it. Postfix (smtpd_forbid_bare_newline = reject) answers 521 and disconnects.
_CMD_BARE_LF: Final = Reply(521, "5.5.2", "Error: bare <LF> received")
_CMD_BARE_CR: Final = Reply(521, "5.5.2", "Error: bare <CR> received")
_DATA_BARE: Final = Reply(
    550, "5.6.11", "Message contains bare CR or LF; lines must end in CRLF (RFC 5321 2.3.8)"
)
_DATA_NUL: Final = Reply(550, "5.6.0", "Message contains NUL bytes")


# Sendmail's words for MaxMessageSize, with RFC 3463's "exceeds administrative limit" (5.2.3):
# one refusal of a MAIL whose SIZE= says too much, one of content that grew past the limit.
def declared_size_refusal(limit: int) -> Reply:
    return Reply(552, "5.2.3", f"Message size exceeds fixed maximum message size ({limit})")


def content_size_refusal(limit: int) -> Reply:
    return Reply(552, "5.2.3", f"Message exceeds maximum fixed size ({limit})")


# Modes.
_COMMAND: Final = 0
_PAUSED: Final = 1  # DATA command returned; waiting for start_data() / reject_data()
_DATA: Final = 2
_CLOSED: Final = 3


class ServerConnection:
    """One SMTP server connection's byte-level state (commands and DATA content)."""

    def __init__(
        self,
        *,
        max_command_line: int = 512,
        max_text_line: int = 0,
        max_message_size: int | None = None,
    ) -> None:
        # max_text_line: longest content line in bytes with its CRLF; 0 = no limit.
        if max_command_line < 2 or max_text_line == 1 or max_text_line < 0:
            raise ValueError("line limits must be at least 2 (room for CRLF)")
        self.max_command_line = max_command_line
        self.max_text_line = max_text_line
        self.max_message_size = max_message_size
        self._mode = _COMMAND
        self._eof = False
        # Received blocks not yet looked at; kept as separate bytes so DATA content is
        # scanned straight from what the transport handed us, without a growing buffer.
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._events: deque[Event] = deque()
        # Command mode: at most one partial line (< max_command_line) plus one block.
        self._cmdbuf = bytearray()
        self._scanned = 0  # cmdbuf[:_scanned] holds no LF: do not rescan it
        self._discarding = False  # inside an over-long command line, dropping up to its LF
        self._discard_cr = False  # the last byte dropped was a CR (it may pair with the LF)
        self._discard_bare_cr = False  # a bare CR was among the dropped bytes
        # DATA mode.
        self._tail = b""  # held-back suffix that may be part of CRLF.CRLF or a CR before LF
        self._skip = 0  # leading bytes of _tail that are the virtual CRLF, never content
        self._size = 0
        self._line_len = 0  # bytes of the current (unfinished) content line handed out
        self._failed: Reply | None = None

    # -- feeding ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` signals EOF."""
        if self._eof:
            if data:
                raise ProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._mode == _CLOSED:
            return  # after a fatal BadCommand nothing more is read
        # The transport hands us bytes (copied only if it is another buffer type).
        self._inbox.append(data if type(data) is bytes else bytes(data))
        self._inbox_bytes += len(data)

    @property
    def peer_closed(self) -> bool:
        """The peer sent EOF (its last bytes may still be buffered)."""
        return self._eof

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet turned into events."""
        # Asked at each received block: the held-back parts are usually empty, and a truth
        # test costs less than a len() call.
        n = self._inbox_bytes
        if self._cmdbuf:
            n += len(self._cmdbuf)
        if self._tail:
            n += len(self._tail) - self._skip
        return n

    def _pop_block(self) -> bytes:
        block = self._inbox.popleft()
        self._inbox_bytes -= len(block)
        return block

    def _push_front(self, block: bytes) -> None:
        self._inbox.appendleft(block)
        self._inbox_bytes += len(block)

    # -- events ----------------------------------------------------------------------------

    def next_event(self) -> Event | Wait:
        """The next event, NEED_DATA if more bytes are needed, or PAUSED (see :class:`Wait`)."""
        if self._events:
            return self._events.popleft()
        mode = self._mode
        if mode == _DATA:
            event = self._next_data_event()
        elif mode == _COMMAND:
            event = self._next_command()
        else:
            return PAUSED
        return NEED_DATA if event is None else event

    def send(self, reply: Reply) -> bytes:
        """The wire form of a reply. The answer to a DATA command decides what follows it:
        a 354 makes the next bytes message content, anything else keeps them commands."""
        if self._mode == _PAUSED:
            if reply.code == 354:
                self.start_data()
            else:
                self.reject_data()
        return reply.to_bytes()

    def start_data(self) -> None:
        """The session accepted DATA (sent 354): following bytes are message content."""
        if self._mode != _PAUSED:
            raise ProtocolError("start_data() without a pending DATA command")
        self._mode = _DATA
        if self._cmdbuf:
            # Pipelined bytes after the DATA line are content now.
            self._push_front(bytes(self._cmdbuf))
            self._cmdbuf.clear()
        self._scanned = 0
        self._tail = _VIRTUAL_BOL
        self._skip = len(_VIRTUAL_BOL)
        self._size = 0
        self._line_len = 0
        self._failed = None

    def discard_pending(self) -> int:
        """Forget every byte received but not yet turned into an event, and the events not yet
        taken (in command mode). After STARTTLS: plaintext a client pipelined behind it must
        not be read as if it had come through TLS (RFC 3207 4.2, CVE-2011-0411). Returns how
        many bytes were dropped."""
        if self._mode != _COMMAND:
            raise ProtocolError("discard_pending() outside command mode")
        dropped = self._inbox_bytes + len(self._cmdbuf)
        self._inbox.clear()
        self._inbox_bytes = 0
        self._cmdbuf.clear()
        self._scanned = 0
        self._discarding = False
        self._events.clear()
        return dropped

    def reject_data(self) -> None:
        """The session refused DATA: keep parsing commands."""
        if self._mode != _PAUSED:
            raise ProtocolError("reject_data() without a pending DATA command")
        self._mode = _COMMAND

    def _closed(self) -> Event | None:
        if not self._eof:
            return None
        # A partial last line (or an unterminated message) is dropped.
        self._mode = _CLOSED
        self._inbox.clear()
        self._inbox_bytes = 0
        self._cmdbuf.clear()
        self._tail = b""
        self._skip = 0
        return ConnectionClosed()

    # -- command mode ----------------------------------------------------------------------

    def _next_command(self) -> Event | None:
        buf = self._cmdbuf
        if not buf and not self._discarding:
            # The usual, unpipelined case: nothing held back, and the next block is one whole
            # line (its only LF is its last byte). It is the line as the general path below
            # would cut it, without copying it through the bytearray; _parse_command makes
            # every check on it. Nothing held and nothing received: no scan at all.
            inbox = self._inbox
            if not inbox:
                return self._closed() if self._eof else None  # the call only at the end
            block = inbox[0]
            if block.find(10) == len(block) - 1:  # an int needle: no buffer protocol
                inbox.popleft()
                self._inbox_bytes -= len(block)
                return self._parse_command(block)
        while True:
            if self._discarding:
                # Drop whole blocks until the LF of the over-long line: memory stays bounded.
                if not self._inbox:
                    return self._closed()
                block = self._pop_block()
                i = block.find(b"\n")
                if i < 0:
                    self._drop(block)
                    continue
                self._discarding = False
                if not (block[i - 1] == 13 if i else self._discard_cr):
                    return self._broken(_CMD_BARE_LF)
                if i:
                    self._drop(block[:i])  # up to the CR of the CRLF (its last byte: not bare)
                if self._discard_bare_cr:
                    # As for a line that fits: a bare CR anywhere in it is fatal, however the
                    # line was split into blocks.
                    return self._broken(_CMD_BARE_CR)
                buf += memoryview(block)[i + 1 :]
                self._scanned = 0
                return BadCommand(_CMD_TOO_LONG)
            i = buf.find(b"\n", self._scanned)
            if i >= 0:
                line = bytes(buf[: i + 1])
                del buf[: i + 1]  # O(1) amortised at the front of a bytearray
                self._scanned = 0
                return self._parse_command(line)
            if len(buf) >= self.max_command_line:
                # Already too long and no LF yet: forget it, answer once its LF arrives.
                self._discard_cr = self._discard_bare_cr = False
                self._drop(buf)
                buf.clear()
                self._scanned = 0
                self._discarding = True
                continue
            self._scanned = len(buf)
            if not self._inbox:
                return self._closed()
            buf += self._pop_block()

    def _drop(self, part: bytes | bytearray) -> None:
        """Note what a dropped piece (no LF in it) of an over-long line held: a CR that is not
        its last byte, or a CR before it from the previous piece, is bare."""
        if not part:
            return
        if self._discard_cr or part.find(b"\r", 0, len(part) - 1) >= 0:
            self._discard_bare_cr = True
        self._discard_cr = part[-1] == 13

    def _broken(self, reply: Reply) -> BadCommand:
        """The framing is broken: refuse, and never look at another byte of this connection."""
        self._mode = _CLOSED
        self._inbox.clear()
        self._inbox_bytes = 0
        self._cmdbuf.clear()
        self._events.clear()
        return BadCommand(reply, fatal=True)

    def _parse_command(self, line: bytes) -> Event:
        if not line.endswith(b"\r\n"):
            return self._broken(_CMD_BARE_LF)
        raw = line[:-2]
        # ``13 in``/``0 in``, not ``b"\r" in``: an int operand skips the buffer protocol.
        if 13 in raw:
            return self._broken(_CMD_BARE_CR)
        if len(line) > self.max_command_line:
            return BadCommand(_CMD_TOO_LONG)
        if 0 in raw:
            return BadCommand(_CMD_NUL)
        written = raw.decode("utf-8", "surrogateescape")
        verb, _, arg = written.partition(" ")
        if not verb or "\t" in verb:
            # Blanks before the verb, or a tab after it: Sendmail skips the one and splits at
            # the other, and so do we (the usual line costs only this test).
            text = written.lstrip(" \t")
            blank = _BLANK.search(text)
            verb, arg = (text[: blank.start()], text[blank.end() :]) if blank else (text, "")
        verb = verb.upper()
        if verb == "DATA":
            # Bytes after DATA are content only if the session accepts it: stop here.
            self._mode = _PAUSED
        return Command(verb, arg.strip(), written)

    # -- data mode -------------------------------------------------------------------------

    def _next_data_event(self) -> Event | None:
        while not self._events:
            if not self._inbox:
                return self._closed()
            self._feed_data(self._pop_block())
            if self._mode != _DATA:
                break
        return self._events.popleft() if self._events else None

    def _feed_data(self, block: bytes) -> None:
        work = self._tail + block if self._tail else block
        # Every CRLF.CRLF starts with CRLF. (as does every stuffed line): one scan usually
        # rules out both, and blocks without a line starting with "." skip replace().
        dot = _find(work, b"\r\n.")
        end = _find(work, _TERM, dot) if dot >= 0 else -1
        if end >= 0:
            cut = end + 2  # the CRLF ending the last content line is content
            rest = work[end + len(_TERM) :]
            tail = b""
        else:
            # Hold back a suffix that may still become CRLF.CRLF, a stuffed dot at a line
            # start, or a CR whose LF is in the next block.
            n = len(work)
            if work.endswith(b"\r"):
                hold = 4 if work.endswith(b"\r\n.\r") else 1
            elif work.endswith(b"\r\n"):
                hold = 2
            elif work.endswith(b"\r\n."):
                hold = 3
            else:
                hold = 0
            cut = n - hold
            rest = b""
            tail = work[cut:] if hold else b""

        if cut:
            # Every line start in work[:cut] follows a CRLF inside work (or the virtual one).
            content = work[:cut] if cut != len(work) else work
            if 0 <= dot < cut:
                content = content.replace(b"\r\n.", b"\r\n")
            if self._skip:
                content = content[self._skip :]
                self._skip = 0
            if content:
                if self._failed is None:
                    self._check(content)
                    if self._failed is None:
                        self._events.append(DataChunk(content))
                self._size += len(content)
        self._tail = tail

        if end >= 0:
            if self._failed is None:
                self._events.append(DataEnd(self._size))
            else:
                self._events.append(DataFailed(self._failed, self._size))
            self._failed = None
            self._mode = _COMMAND
            if rest:
                self._push_front(rest)

    def _check(self, piece: bytes) -> None:
        """Validate one content piece (never splits a CRLF); record the first violation."""
        n = len(piece)
        cr = _count(piece, b"\r")
        # As many LFs and CRLF pairs as CRs: every CR and every LF is in a pair.
        bare = cr != _count(piece, b"\n") or _count(piece, b"\r\n") != cr
        # ``0 in`` first: without a NUL (nearly always) one scan and no method call, a third
        # of ``find``'s cost on a 1 KiB piece.
        nul = piece.find(0) if 0 in piece else -1

        # Line length: jump window by window (each window holds max_text_line bytes), so the
        # cost is per window, not per line. Lines are delimited by LF.
        m = self.max_text_line
        long_at = -1
        p = -self._line_len  # start of the current line, relative to piece
        while m and n - p > m:
            q = piece.rfind(b"\n", p if p > 0 else 0, p + m)
            if q < 0:
                long_at = p + m
                break
            p = q + 1
        else:
            if m:
                q = piece.rfind(b"\n", p if p > 0 else 0)
                self._line_len = n - q - 1 if q >= 0 else n - p

        limit = self.max_message_size
        big_at = limit - self._size if limit is not None and self._size + n > limit else -1
        if not bare and nul < 0 and long_at < 0 and big_at < 0:
            return

        # Failure path: find which violation comes first in the stream.
        found: list[tuple[int, int, Reply]] = []
        if bare:
            match = _BARE_RE.search(piece)
            found.append((match.start() if match else 0, 0, _DATA_BARE))
        if nul >= 0:
            found.append((nul, 1, _DATA_NUL))
        if long_at >= 0:
            text = f"Message contains a line longer than {m} bytes"
            found.append((long_at, 2, Reply(552, "5.6.0", text)))
        if big_at >= 0 and limit is not None:
            found.append((big_at, 3, content_size_refusal(limit)))
        self._failed = min(found, key=lambda f: (f[0], f[1]))[2]
