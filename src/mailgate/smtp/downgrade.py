"""8BITMIME downgrade: 8-bit MIME content made 7-bit for a next hop that does not offer
8BITMIME (RFC 6152 section 3: convert or bounce). Streaming and sans-IO: bytes in, bytes out.

We convert, as Postfix does by default (``disable_mime_output_conversion = no``) and Sendmail
too: a bounce would return mail that the next hop takes once it is 7-bit, and quoted-printable
leaves text readable. What changes, per MIME entity (the top-level message, each part of a
multipart/* at any depth, the message inside a message/rfc822 part, recursively):

- a leaf part whose body holds 8-bit octets and whose encoding is an identity (absent,
  ``7bit``, ``8bit``, ``binary``) gets its body quoted-printable and
  ``Content-Transfer-Encoding: quoted-printable`` in place of the old field; with no
  Content-Type it also gets ``Content-Type: text/plain; charset=utf-8`` (``unknown-8bit``,
  RFC 1428 and Sendmail's DefaultCharSet, when the body is not valid UTF-8), since the
  default ``us-ascii`` would now be wrong;
- a message (top level or inside message/rfc822) in which something was converted gets
  ``MIME-Version: 1.0`` if it has none (a Content-Transfer-Encoding means nothing outside
  MIME);
- multipart/* and message/rfc822 entities labelled ``8bit`` or ``binary`` whose content was
  converted are relabelled ``7bit`` (RFC 2045 6.4: they take no other encoding);
- everything else passes byte for byte: 7-bit parts, base64 and quoted-printable parts,
  message/partial and message/external-body (RFC 2046 5.2: never encoded), the preamble and
  epilogue of multiparts, and header fields. 8-bit octets in header fields cannot be made
  7-bit by the body's encoding; Postfix sends them unchanged (its mime_state passes every
  header through untouched) and so do we, rather than guess RFC 2047 charsets.

Unlike Postfix, which converts what is *labelled* 8bit and leaves unlabelled 8-bit text as it
is, the decision is made on the content: a part labelled 8bit that holds only 7-bit octets is
left alone, and a non-MIME message with 8-bit text is converted. Knowing whether a part holds
8-bit octets before writing its header section takes a first pass: `Scanner` runs the same
`MimeWalker` over the message and returns a `Plan` (one byte of flags per entity, in document
order), then `Downgrader` rewrites in a second pass (Sendmail's mime8to7 also reads a part
twice). Memory is bounded either way: the walker holds at most one header section (up to
``MAX_HEADER`` bytes), a candidate boundary line, and the open multipart boundaries.
"""

from __future__ import annotations

import binascii
import codecs
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADER",
    "Downgrader",
    "Entity",
    "MimeWalker",
    "Plan",
    "Scanner",
    "plan_for",
]

MAX_HEADER: Final = 64 * 1024  # a longer header section is passed through, its entity unparsed
MAX_DEPTH: Final = 100  # nesting deeper than this is not parsed (Postfix's mime_nesting_limit)
MAX_BOUNDARY: Final = 256  # boundaries are compared on this prefix (RFC 2046: at most 70)
_QP_HOLD: Final = 4096  # a longer partial line is encoded at once, ending in a soft break

# Entity flags in a Plan.
CONVERT: Final = 1  # leaf: body to quoted-printable
INNER: Final = 2  # something inside was converted
NOT_UTF8: Final = 4  # leaf body is not valid UTF-8 (charset for an added Content-Type)

_HEAD: Final = 0
_BODY: Final = 1
_TAIL: Final = 2  # the rest of a boundary line that did not end in its block

_FIELD = re.compile(
    rb"^(content-type|content-transfer-encoding|mime-version)[ \t]*:(.*(?:\n[ \t].*)*)",
    re.IGNORECASE | re.MULTILINE,
)
_MEDIA_TYPE = re.compile(r"\s*([^\s/;()]+)\s*/\s*([^\s;()]+)")
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))', re.IGNORECASE)
_TOKEN = re.compile(r"\s*([^\s;()]+)")
_QP_TOKEN = re.compile(rb"=[0-9A-F]{2}|[^=]", re.DOTALL)
_IDENTITY: Final = ("", "7bit", "8bit", "binary")


@dataclass(slots=True, eq=False)
class Entity:
    """One MIME entity. ``index`` counts entities in document order from 0 (the message)."""

    index: int
    parent: Entity | None
    is_message: bool  # the top level or the content of message/rfc822: MIME-Version lives here
    depth: int
    ctype: str = "text/plain"  # lower case; RFC 2045 5.2's default when absent or invalid
    has_ctype: bool = False
    cte: str = ""  # lower case, "" when absent
    has_mime_version: bool = False
    boundary: bytes | None = None
    opaque: bool = False  # the header section was too big: passed through, never changed

    @property
    def convertible(self) -> bool:
        """A leaf whose body may be made quoted-printable."""
        if self.opaque or self.cte not in _IDENTITY:
            return False
        major, _, minor = self.ctype.partition("/")
        if major == "multipart":
            return False
        if major == "message":
            # message/global* (RFC 6532, 6533) may be encoded; rfc822 nests; partial,
            # external-body and the 7-bit report types may not be encoded.
            return minor.startswith("global")
        return True


# An event: (kind, entity, data, terminator). HEAD: the header section as received (without
# the empty line ending it) and that empty line (b"" when the section ended otherwise: at a
# line that is no field, which then is body, or at the end). BODY: content of the entity
# (multipart entities own their preamble, boundary lines and epilogue).
Event = tuple[int, Entity, bytes, bytes]


def _is_field(line: bytes) -> bool:
    """A header field's first line, as the session judges it (smtp/session.py)."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and not name[:1].isspace() and b" " not in name.rstrip()


def _parse_header(entity: Entity, raw: bytes) -> None:
    """Content-Type (type, boundary), Content-Transfer-Encoding and MIME-Version: the first
    of each counts."""
    seen: set[bytes] = set()
    for m in _FIELD.finditer(raw):
        name = m.group(1).lower()
        if name in seen:
            continue
        seen.add(name)
        value = m.group(2).replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")
        if name == b"mime-version":
            entity.has_mime_version = True
        elif name == b"content-transfer-encoding":
            t = _TOKEN.match(value)
            entity.cte = t.group(1).lower() if t else ""
        else:
            entity.has_ctype = True
            mt = _MEDIA_TYPE.match(value)
            entity.ctype = f"{mt.group(1)}/{mt.group(2)}".lower() if mt else "text/plain"
            b = _BOUNDARY.search(value)
            if b is not None:
                text = b.group(1) if b.group(1) is not None else b.group(2)
                if b.group(1) is not None:
                    text = re.sub(r"\\(.)", r"\1", text)
                if text:
                    entity.boundary = text.encode("latin-1")[:MAX_BOUNDARY]


class MimeWalker:
    """The MIME structure of a message fed in blocks: events for header sections and bodies.

    As Postfix's mime_state: a header section ends at an empty line or at a line that is no
    field (that line is body); multipart/* pushes its boundary; a line starting with
    ``--boundary`` of any open multipart is a boundary (a prefix match, as RFC 2046 5.1.1
    says; an outer boundary also ends the inner multiparts); ``--boundary--`` closes it; the
    content of message/rfc822 (with an identity encoding) starts with a header section of its
    own. Lines end at LF. Bodies are scanned with ``bytes.find`` for line starts with ``--``.
    """

    def __init__(self) -> None:
        self._count = 0
        self._cur = self._new(None, is_message=True)
        self._mode = _HEAD
        self._head = bytearray()  # complete lines of the header section being read
        self._line = b""  # its unfinished last line
        self._stack: list[tuple[bytes, Entity]] = []  # open boundaries, innermost last
        self._hold = 0  # bytes of a line start needed to tell a boundary: 4 + longest
        self._bol = True  # the next body byte starts a line
        self._pending = b""  # held back: a possible boundary line not yet complete
        self._after_close = False  # the boundary line in _TAIL mode closed its multipart
        self._events: list[Event] = []

    def _new(self, parent: Entity | None, *, is_message: bool) -> Entity:
        depth = parent.depth + 1 if parent is not None else 0
        entity = Entity(self._count, parent, is_message, depth)
        if parent is not None and parent.ctype == "multipart/digest" and not is_message:
            entity.ctype = "message/rfc822"  # RFC 2046 5.1.5: a digest's default part type
        self._count += 1
        return entity

    def feed(self, data: bytes) -> list[Event]:
        work = self._pending + data if self._pending else data
        self._pending = b""
        self._run(work, final=False)
        events, self._events = self._events, []
        return events

    def end(self) -> list[Event]:
        work, self._pending = self._pending, b""
        self._run(work, final=True)
        while self._mode == _HEAD:
            # The message ends inside a header section: its last line has no LF.
            line, self._line = self._line, b""
            if line and (_is_field(line) or (self._head and line[:1] in (b" ", b"\t"))):
                self._head += line
                line = b""
            self._end_section(b"")
            if not line:
                break
            self._run(line, final=True)  # body, or the first line of a nested message
        events, self._events = self._events, []
        return events

    # -- modes -------------------------------------------------------------------------------

    def _run(self, work: bytes, *, final: bool) -> None:
        i, n = 0, len(work)
        while i < n:
            if self._mode == _HEAD:
                work, i = self._header_lines(work, i)
                n = len(work)
            elif self._mode == _TAIL:
                i = self._boundary_tail(work, i)
            else:
                i = self._body(work, i, final)

    def _header_lines(self, work: bytes, i: int) -> tuple[bytes, int]:
        while True:
            j = work.find(b"\n", i)
            if j < 0:
                self._line += work[i:]
                if len(self._head) + len(self._line) > MAX_HEADER:
                    return self._overflow(), 0
                return work, len(work)
            line = self._line + work[i : j + 1] if self._line else work[i : j + 1]
            self._line = b""
            i = j + 1
            if line in (b"\r\n", b"\n"):
                self._end_section(line)
                return work, i
            if _is_field(line) or (self._head and line[:1] in (b" ", b"\t")):
                self._head += line
                if len(self._head) > MAX_HEADER:
                    return self._overflow() + work[i:], 0
                continue
            # No field: the section ends and this line is the first of what follows.
            self._end_section(b"")
            return line + work[i:], 0

    def _overflow(self) -> bytes:
        """A header section past MAX_HEADER: the entity is passed through as it is (as body,
        so that the boundaries of the multiparts around it are still found)."""
        held = bytes(self._head) + self._line
        self._head.clear()
        self._line = b""
        self._cur.opaque = True
        self._events.append((_HEAD, self._cur, b"", b""))
        self._mode = _BODY
        self._bol = True
        return held

    def _end_section(self, terminator: bytes) -> None:
        entity = self._cur
        raw = bytes(self._head)
        self._head.clear()
        _parse_header(entity, raw)
        self._events.append((_HEAD, entity, raw, terminator))
        self._mode = _BODY
        self._bol = True
        major = entity.ctype.partition("/")[0]
        if entity.depth >= MAX_DEPTH:
            return
        if major == "multipart" and entity.boundary:
            self._stack.append((entity.boundary, entity))
            self._hold = 4 + max(len(b) for b, _ in self._stack)
        elif entity.ctype == "message/rfc822" and entity.cte in _IDENTITY:
            self._cur = self._new(entity, is_message=True)
            self._mode = _HEAD

    def _body(self, work: bytes, i: int, final: bool) -> int:
        entity = self._cur
        n = len(work)
        if not self._stack:
            self._emit(entity, work, i, n)
            return n
        while i < n:
            if self._bol and work.startswith(b"--", i):
                p = i
            elif self._bol and n - i < 2 and work[i] == 45 and not final:  # "-"
                self._pending = work[i:]
                return n
            else:
                q = work.find(b"\n--", i)
                if q < 0:
                    # Hold back a final "\n-": the line may start "--" in the next block.
                    cut = n - 1 if not final and work.endswith(b"\n-") else n
                    self._emit(entity, work, i, cut)
                    if cut < n:
                        self._pending = work[cut:]
                        self._bol = True
                    return n
                p = q + 1
                self._emit(entity, work, i, p)
            self._bol = True
            j = work.find(b"\n", p)
            stop = j + 1 if j >= 0 else n
            if j < 0 and n - p < self._hold and not final:
                self._pending = work[p:]  # too short to tell yet
                return n
            found = self._match(work[p : min(stop, p + self._hold)])
            if found is None:
                self._emit(entity, work, p, stop)
                self._bol = j >= 0
                i = stop
                continue
            level, close = found
            owner = self._stack[level][1]
            del self._stack[level + 1 :]
            if close:
                self._stack.pop()
            self._hold = 4 + max((len(b) for b, _ in self._stack), default=0)
            self._emit(owner, work, p, stop)
            self._cur = owner
            if j < 0:
                self._mode = _TAIL
                self._after_close = close
                return n
            self._after_boundary(close)
            return stop
        return n

    def _boundary_tail(self, work: bytes, i: int) -> int:
        j = work.find(b"\n", i)
        stop = j + 1 if j >= 0 else len(work)
        self._emit(self._cur, work, i, stop)
        if j >= 0:
            self._after_boundary(self._after_close)
        return stop

    def _after_boundary(self, close: bool) -> None:
        self._bol = True
        if close:
            self._mode = _BODY  # the epilogue belongs to the closed multipart
        else:
            self._cur = self._new(self._cur, is_message=False)
            self._mode = _HEAD

    def _match(self, start: bytes) -> tuple[int, bool] | None:
        """Which open boundary (innermost first) the line starting with ``start`` is."""
        for level in range(len(self._stack) - 1, -1, -1):
            b = self._stack[level][0]
            if start.startswith(b, 2):
                return level, start[2 + len(b) : 4 + len(b)] == b"--"
        return None

    def _emit(self, entity: Entity, work: bytes, i: int, j: int) -> None:
        if j > i:
            self._events.append((_BODY, entity, work[i:j] if i or j != len(work) else work, b""))
            self._bol = work[j - 1] == 10


@dataclass(frozen=True)
class Plan:
    """What the second pass changes: flags per entity index (CONVERT, INNER, NOT_UTF8)."""

    flags: bytes

    @property
    def converts(self) -> bool:
        return any(f & CONVERT for f in self.flags)

    def of(self, index: int) -> int:
        return self.flags[index] if index < len(self.flags) else 0


class Scanner:
    """First pass: which entities hold 8-bit octets (and, for a leaf without Content-Type,
    whether its body is UTF-8)."""

    def __init__(self) -> None:
        self._walker = MimeWalker()
        self._flags = bytearray()
        self._utf8: codecs.IncrementalDecoder | None = None
        self._utf8_entity: Entity | None = None

    def feed(self, data: bytes) -> None:
        self._events(self._walker.feed(data))

    def end(self) -> Plan:
        self._events(self._walker.end())
        self._close_utf8()
        return Plan(bytes(self._flags))

    def _events(self, events: list[Event]) -> None:
        flags = self._flags
        for kind, entity, data, _ in events:
            if kind == _HEAD:
                self._close_utf8()
                while len(flags) <= entity.index:
                    flags.append(0)
                if entity.convertible and not entity.has_ctype:
                    self._utf8 = codecs.getincrementaldecoder("utf-8")()
                    self._utf8_entity = entity
                continue
            if entity is self._utf8_entity and self._utf8 is not None:
                try:
                    self._utf8.decode(data)
                except UnicodeDecodeError:
                    flags[entity.index] |= NOT_UTF8
                    self._utf8 = None
            if not data.isascii() and entity.convertible and not flags[entity.index] & CONVERT:
                flags[entity.index] |= CONVERT
                up = entity.parent
                while up is not None and not flags[up.index] & INNER:
                    flags[up.index] |= INNER
                    up = up.parent

    def _close_utf8(self) -> None:
        if self._utf8 is not None and self._utf8_entity is not None:
            try:
                self._utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                self._flags[self._utf8_entity.index] |= NOT_UTF8
        self._utf8 = None
        self._utf8_entity = None


def plan_for(message: bytes) -> Plan:
    """The plan for a whole message in memory (tests, small messages)."""
    scanner = Scanner()
    scanner.feed(message)
    return scanner.end()


class Downgrader:
    """Second pass: the message with the entities of ``plan`` converted (see the module)."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._walker = MimeWalker()
        self._qp: _QpEncoder | None = None
        self._qp_entity: Entity | None = None

    def feed(self, data: bytes) -> bytes:
        return self._out(self._walker.feed(data))

    def end(self) -> bytes:
        out = self._out(self._walker.end())
        if self._qp is not None:
            out += self._qp.end()
            self._qp = None
        return out

    def _out(self, events: list[Event]) -> bytes:
        out: list[bytes] = []
        for kind, entity, data, terminator in events:
            if self._qp is not None and entity is not self._qp_entity:
                out.append(self._qp.end())
                self._qp = None
            if kind == _HEAD:
                out.append(self._header(entity, data, terminator))
            elif self._qp is not None:
                out.append(self._qp.feed(data))
            else:
                out.append(data)
        return b"".join(out)

    def _header(self, entity: Entity, raw: bytes, terminator: bytes) -> bytes:
        flags = self._plan.of(entity.index)
        if entity.opaque or not flags & (CONVERT | INNER):
            return raw + terminator
        added: list[bytes] = []
        if entity.is_message and not entity.has_mime_version:
            added.append(b"MIME-Version: 1.0\r\n")
        cte: bytes | None = None
        if flags & CONVERT and entity.convertible:
            if not entity.has_ctype and entity.ctype == "text/plain":
                charset = b"unknown-8bit" if flags & NOT_UTF8 else b"utf-8"
                added.append(b"Content-Type: text/plain; charset=" + charset + b"\r\n")
            cte = b"quoted-printable"
            self._qp = _QpEncoder()
            self._qp_entity = entity
        elif entity.cte in ("8bit", "binary"):
            cte = b"7bit"
        if cte is not None:
            raw = _without_cte(raw)
            added.append(b"Content-Transfer-Encoding: " + cte + b"\r\n")
        if not added:
            return raw + terminator
        # The new fields go last, where Postfix puts its Content-Transfer-Encoding; a
        # section that did not end in an empty line gets one, so the body stays body.
        return raw + b"".join(added) + (terminator or b"\r\n")


def _without_cte(raw: bytes) -> bytes:
    """The header section without its Content-Transfer-Encoding fields (with their
    continuation lines)."""
    kept: list[bytes] = []
    dropping = False
    i = 0
    while i < len(raw):
        j = raw.find(b"\n", i)
        end = j + 1 if j >= 0 else len(raw)
        line = raw[i:end]
        if line[:1] not in (b" ", b"\t"):
            name = line.partition(b":")[0].strip().lower()
            dropping = name == b"content-transfer-encoding"
        if not dropping:
            kept.append(line)
        i = end
    return b"".join(kept)


class _QpEncoder:
    """Quoted-printable (RFC 2045 6.7) of one body, streaming: CRLF are the hard line
    breaks, every other octet (bare CR and LF included) is encoded or kept so that decoding
    gives the body back byte for byte; lines of at most 76 characters; trailing white space
    encoded; no line starts with "-" after a soft break, so a break cannot make a line that
    looks like a boundary of an enclosing multipart.

    A line is encoded in segments of ``_QP_HOLD`` octets (a soft break between them), so an
    unfinished line is never held longer than that, and the output is the same however the
    body is split into blocks."""

    def __init__(self) -> None:
        self._line = b""  # the unfinished line (its earlier segments went out)
        self._soft = False  # the last output ended in a soft line break

    def feed(self, data: bytes) -> bytes:
        work = self._line + data if self._line else data
        cut = work.rfind(b"\r\n") + 2
        out: list[bytes] = []
        if cut >= 2:
            soft = self._soft
            start = 0
            while start < cut:
                j = work.find(b"\r\n", start)
                out.append(_encode_content(work[start:j], soft))
                out.append(b"\r\n")
                soft = False
                start = j + 2
            self._soft = False
            rest = work[cut:]
        else:
            rest = work
        # Segments of the unfinished line that are surely followed by more of it (not by
        # the end of the line: a final CR may be the start of its CRLF) can go now.
        avail = len(rest) - (1 if rest.endswith(b"\r") else 0)
        whole = (avail - 1) // _QP_HOLD * _QP_HOLD if avail > _QP_HOLD else 0
        if whole:
            for k in range(0, whole, _QP_HOLD):
                out.append(_encode_line(rest[k : k + _QP_HOLD], self._soft))
                out.append(b"=\r\n")
                self._soft = True
            rest = rest[whole:]
        self._line = rest
        return b"".join(out)

    def end(self) -> bytes:
        line, self._line = self._line, b""
        return _encode_content(line, self._soft) if line else b""


def _encode_content(content: bytes, after_soft: bool) -> bytes:
    """A line's content in segments of _QP_HOLD octets joined by soft breaks."""
    if len(content) <= _QP_HOLD:
        return _encode_line(content, after_soft)
    return b"=\r\n".join(
        _encode_line(content[k : k + _QP_HOLD], after_soft or k > 0)
        for k in range(0, len(content), _QP_HOLD)
    )


def _encode_line(content: bytes, after_soft: bool) -> bytes:
    """One line's content (no CRLF in it) as quoted-printable lines, soft breaks CRLF."""
    # Binary mode: CR and LF inside the content are encoded, so "=\n" is only a soft break.
    enc = binascii.b2a_qp(content, quotetabs=False, istext=False, header=False)
    if b"=\n-" in enc or (after_soft and enc.startswith(b"-")):
        return _resplit(enc.replace(b"=\n", b""), after_soft)
    return enc.replace(b"=\n", b"=\r\n")


def _resplit(encoded: bytes, after_soft: bool) -> bytes:
    """Break one encoded line into lines of at most 76 characters (75 and the soft break's
    "="), encoding a "-" that would start a line after a soft break."""
    lines: list[bytes] = []
    cur: list[bytes] = []
    width = 0
    protect = after_soft
    for tok in _QP_TOKEN.findall(encoded):
        if width + len(tok) > 75:
            lines.append(b"".join(cur) + b"=")
            cur, width, protect = [], 0, True
        if not width and protect and tok == b"-":
            tok = b"=2D"
        cur.append(tok)
        width += len(tok)
    lines.append(b"".join(cur))
    return b"\r\n".join(lines)
