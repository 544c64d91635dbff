"""Shared by the hypothesis suites in this folder and the atheris targets in ``fuzz/``.

The checks each surface must pass (:func:`check_protocol`, :func:`check_address_error`,
:func:`check_mailbox`, :func:`check_table_error`, :func:`check_proxy`) and, for the
protocol, a slow, obvious reference model of the sans-IO SMTP server protocol
(:mod:`mailgate.smtp.protocol`), written from its documented contract rather than from its
code, plus the driver that feeds a :class:`ServerConnection` and normalises its events so
that two runs (or a run and the model) can be compared.

The contract modelled here:

- A command line ends at LF. One that does not end in CRLF is refused with a fatal
  ``BadCommand`` 521 5.5.2 "bare <LF>", one holding any other CR with 521 5.5.2 "bare <CR>",
  whatever its length (issue 9 item 2): the session closes and the protocol produces no
  event after it, not even ConnectionClosed. Otherwise: longer than ``max_command_line``
  (CRLF included), ``BadCommand`` 500 5.5.0 once its LF arrives; a NUL, 500 5.5.1; else
  ``Command(verb.upper(), rest.strip())``.
- After ``DATA``, if the session accepts, content runs to the first ``CRLF . CRLF`` (the
  CRLF before the DATA content is implied), dot-unstuffed; nothing else ends it. The first
  violation (bare CR/LF, NUL, a line over ``max_text_line``, the size limit) by position,
  then in that order, makes the message fail, but the content still runs to CRLF.CRLF.
- EOF: a partial line or an unterminated message is dropped; one ``ConnectionClosed``.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.address import AddressError, Mailbox, canon_domain, is_valid_domain
from mailgate.reply import Reply
from mailgate.smtp.protocol import (
    NEED_DATA,
    PAUSED,
    BadCommand,
    Command,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataFailed,
    Event,
    ServerConnection,
    Wait,
)
from mailgate.smtp.proxy import MAX_HEADER, ProxyError, ProxyHeader, Versions
from mailgate.smtp.proxy import parse as parse_proxy
from mailgate.tables.maps import TableError

__all__ = [
    "BARE",
    "CMD_BARE_CR",
    "CMD_BARE_LF",
    "CMD_NUL",
    "CMD_TOO_LONG",
    "NUL",
    "Limits",
    "MBad",
    "MClosed",
    "MCmd",
    "MData",
    "MEvent",
    "Run",
    "check_address_error",
    "check_mailbox",
    "check_protocol",
    "check_table_error",
    "comparable",
    "compare_with_model",
    "drive",
    "long_line",
    "model",
    "split_at",
    "too_big",
    "unstuff",
]

CMD_TOO_LONG = Reply(500, "5.5.0", "Command line too long")
CMD_NUL = Reply(500, "5.5.1", "Invalid command: NUL byte")
GO_AHEAD = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
NO_DATA = Reply(503, "5.0.0", "Need MAIL command")
CMD_BARE_LF = Reply(521, "5.5.2", "Error: bare <LF> received")
CMD_BARE_CR = Reply(521, "5.5.2", "Error: bare <CR> received")
BARE = Reply(
    550, "5.6.11", "Message contains bare CR or LF; lines must end in CRLF (RFC 5321 2.3.8)"
)
NUL = Reply(550, "5.6.0", "Message contains NUL bytes")
TERM = b"\r\n.\r\n"
# What DATA mode may hold back once every event has been taken: a possible "\r\n.\r".
DATA_HOLD_MAX = 4


def long_line(m: int) -> Reply:
    return Reply(552, "5.6.0", f"Message contains a line longer than {m} bytes")


def too_big(n: int) -> Reply:
    return Reply(552, "5.2.3", f"Message exceeds maximum fixed size ({n})")


@dataclass(frozen=True)
class Limits:
    max_command_line: int = 512
    max_text_line: int = 0  # 0: no limit (the protocol's default)
    max_message_size: int | None = None

    def connection(self) -> ServerConnection:
        return ServerConnection(
            max_command_line=self.max_command_line,
            max_text_line=self.max_text_line,
            max_message_size=self.max_message_size,
        )


# -- normalised events (model and driver alike) ---------------------------------------------


@dataclass(frozen=True)
class MCmd:
    verb: str
    arg: str


@dataclass(frozen=True)
class MBad:
    reply: Reply
    fatal: bool = False


@dataclass(frozen=True)
class MData:
    """One accepted DATA section.

    From the driver, ``content`` is what the DataChunks carried; from the model, the valid
    part of the unstuffed content (all of it when ``end`` is a DataEnd). ``end`` is None when
    EOF came first.
    """

    content: bytes
    end: DataEnd | DataFailed | None


@dataclass(frozen=True)
class MClosed:
    pass


MEvent = MCmd | MBad | MData | MClosed


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (out-of-range and repeated cuts ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Run:
    """What one drive() saw: raw events, normalised events, the largest drained backlog."""

    events: list[Event] = field(default_factory=list)
    normal: list[MEvent] = field(default_factory=list)
    peak_backlog: int = 0


class BoundError(AssertionError):
    """pending_bytes exceeded what the protocol promises to hold."""


def drive(
    wire: bytes | Sequence[bytes],
    lim: Limits,
    accept: Sequence[bool] = (True,),
    *,
    cuts: Sequence[int] = (),
    eof: bool = True,
    max_steps: int = 1_000_000,
) -> Run:
    """Feed ``wire`` (cut at ``cuts``, or already a list of chunks) and take every event.

    The n-th DATA command is answered at once, as a session does, through ``send()``: 354 if
    ``accept[n % len(accept)]``, else 503; before that, next_event() must say PAUSED. After
    each chunk, once ``next_event()`` has returned NEED_DATA (PAUSED after the end), the
    ``pending_bytes`` must be below ``max_command_line``
    in command mode and at most 4 in DATA mode (a possible ``\\r\\n.\\r``); after EOF, 0.
    """
    chunks = split_at(wire, cuts) if isinstance(wire, bytes | bytearray) else list(wire)
    chunks = [c for c in chunks if c]  # an empty chunk would be EOF
    conn = lim.connection()
    run = Run()
    state = _DriveState()
    steps = 0
    for chunk in [*chunks, b""] if eof else chunks:
        conn.receive_data(chunk)
        while True:
            steps += 1
            if steps > max_steps:
                raise AssertionError("next_event() did not settle")
            ev = conn.next_event()
            if isinstance(ev, Wait):
                # PAUSED once nothing can come (after ConnectionClosed or a fatal refusal);
                # NEED_DATA otherwise (a DATA command is answered at once below).
                want = PAUSED if state.closed else NEED_DATA
                if ev is not want:
                    raise AssertionError(f"next_event() gave {ev}, expected {want}")
                break
            run.events.append(ev)
            state.take(ev, run.normal)
            if isinstance(ev, Command) and ev.verb == "DATA":
                waiting = conn.next_event()
                if waiting is not PAUSED:
                    raise AssertionError(f"{waiting!r} before the DATA command was answered")
                ok = accept[state.ndata % len(accept)] if accept else True
                state.ndata += 1
                # As the session does: its reply decides (354 = content follows).
                conn.send(GO_AHEAD if ok else NO_DATA)
                if ok:
                    state.open_data()
        pending = conn.pending_bytes
        run.peak_backlog = max(run.peak_backlog, pending)
        if state.closed:
            bound = 0
        elif state.in_data:
            bound = DATA_HOLD_MAX
        else:
            bound = lim.max_command_line - 1
        if pending > bound or pending < 0:
            mode = "data" if state.in_data else "command"
            raise BoundError(f"pending_bytes {pending} > {bound} in {mode} mode")
    if state.in_data:
        # EOF (or the end of input without EOF) inside DATA: an unterminated message, put
        # before the ConnectionClosed it led to.
        at = state.data_at if state.data_at is not None else len(run.normal)
        run.normal.insert(at, MData(bytes(state.content), None))
    return run


class _DriveState:
    def __init__(self) -> None:
        self.ndata = 0
        self.in_data = False
        self.closed = False
        self.content = bytearray()
        self.data_at: int | None = None

    def open_data(self) -> None:
        self.in_data = True
        self.content = bytearray()
        self.data_at = None

    def take(self, ev: Event, out: list[MEvent]) -> None:
        if self.closed:
            raise AssertionError(f"event after ConnectionClosed: {ev!r}")
        if isinstance(ev, DataChunk):
            if not self.in_data:
                raise AssertionError("DataChunk outside DATA")
            if not ev.data:
                raise AssertionError("empty DataChunk")
            self.content += ev.data
            return
        if isinstance(ev, DataEnd | DataFailed):
            if not self.in_data:
                raise AssertionError(f"{ev!r} outside DATA")
            if isinstance(ev, DataEnd) and ev.size != len(self.content):
                raise AssertionError(f"DataEnd size {ev.size} != {len(self.content)} handed out")
            out.append(MData(bytes(self.content), ev))
            self.in_data = False
            return
        if isinstance(ev, ConnectionClosed):
            self.closed = True
            if self.in_data:
                self.data_at = len(out)
            out.append(MClosed())
            return
        if self.in_data:
            raise AssertionError(f"{ev!r} inside DATA")
        if isinstance(ev, Command):
            out.append(MCmd(ev.verb, ev.arg))
        elif isinstance(ev, BadCommand):
            out.append(MBad(ev.reply, ev.fatal))
            if ev.fatal:
                self.closed = True
        else:  # pragma: no cover - the Event union is closed
            raise AssertionError(f"unknown event {ev!r}")


def comparable(events: Sequence[MEvent]) -> list[MEvent]:
    """Events with what is split-dependent removed: the content handed out before a failure
    (or before EOF inside DATA) depends on where the chunks were cut; its end does not."""
    out: list[MEvent] = []
    for e in events:
        if isinstance(e, MData) and not isinstance(e.end, DataEnd):
            out.append(MData(b"", e.end))
        else:
            out.append(e)
    return out


# -- the model -------------------------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    """Remove the dot that starts a line (after the implied CRLF, or after any CRLF)."""
    out = bytearray()
    for j, c in enumerate(wire):
        if c == 0x2E and (j == 0 or (j >= 2 and wire[j - 2 : j] == b"\r\n")):
            continue
        out.append(c)
    return bytes(out)


def violation(content: bytes, lim: Limits) -> tuple[int, Reply] | None:
    """Where the first rule DATA content breaks is broken, and its reply (None: none)."""
    found: list[tuple[int, int, Reply]] = []
    for j, c in enumerate(content):
        prev = content[j - 1] if j else None
        nxt = content[j + 1] if j + 1 < len(content) else None
        if (c == 13 and nxt != 10) or (c == 10 and prev != 13):
            found.append((j, 0, BARE))
            break
    if b"\0" in content:
        found.append((content.index(b"\0"), 1, NUL))
    start = 0
    for j, c in enumerate(content if lim.max_text_line else b""):  # 0: no limit
        if j - start + 1 > lim.max_text_line:
            found.append((j, 2, long_line(lim.max_text_line)))
            break
        if c == 10:
            start = j + 1
    limit = lim.max_message_size
    if limit is not None and len(content) > limit:
        found.append((limit, 3, too_big(limit)))
    if not found:
        return None
    pos, _, reply = min(found, key=lambda f: (f[0], f[1]))
    return pos, reply


def _model_data(wire: bytes, p: int, lim: Limits) -> tuple[int, MData]:
    s = b"\r\n" + wire[p:]
    i = s.find(TERM)
    if i < 0:
        content = unstuff(wire[p:])
        bad = violation(content, lim)
        return len(wire), MData(content if bad is None else content[: bad[0]], None)
    content = unstuff(s[2 : i + 2])
    bad = violation(content, lim)
    nxt = p + i + len(TERM) - 2
    if bad is None:
        return nxt, MData(content, DataEnd(len(content)))
    pos, reply = bad
    return nxt, MData(content[:pos], DataFailed(reply, len(content)))


def model(
    wire: bytes, lim: Limits, accept: Sequence[bool] = (True,), *, eof: bool = True
) -> list[MEvent]:
    """The events the contract asks for (see the module docstring)."""
    out: list[MEvent] = []
    p = 0
    ndata = 0
    while True:
        lf = wire.find(b"\n", p)
        if lf < 0:
            break
        line = wire[p : lf + 1]
        p = lf + 1
        if not line.endswith(b"\r\n"):
            out.append(MBad(CMD_BARE_LF, fatal=True))
            return out
        body = line[:-2]
        if b"\r" in body:
            out.append(MBad(CMD_BARE_CR, fatal=True))
            return out
        if len(line) > lim.max_command_line:
            out.append(MBad(CMD_TOO_LONG))
            continue
        if b"\0" in body:
            out.append(MBad(CMD_NUL))
            continue
        # Blanks before the verb are skipped; a space or a tab ends it (as Sendmail's).
        words = re.fullmatch(
            r"[ \t]*([^ \t]*)(?:[ \t](.*))?", body.decode("utf-8", "surrogateescape"), re.S
        )
        assert words is not None
        verb = words.group(1).upper()
        out.append(MCmd(verb, (words.group(2) or "").strip()))
        if verb != "DATA":
            continue
        ok = accept[ndata % len(accept)] if accept else True
        ndata += 1
        if not ok:
            continue
        p, section = _model_data(wire, p, lim)
        if section.end is None:
            # EOF inside DATA: the connection closes with the message unterminated.
            out.append(section)
            if eof:
                out.append(MClosed())
            return out
        out.append(section)
    if eof:
        out.append(MClosed())
    return out


def compare_with_model(got: Sequence[MEvent], want: Sequence[MEvent]) -> None:
    """Assert ``got`` (from drive()) is the model's ``want``.

    DATA content handed out before a failure or before EOF must only be a prefix of the
    model's valid content: no byte after a violation is ever handed out.
    """
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} events, model has {len(want)}:\n{got}\n{want}")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, MData) and isinstance(g, MData):
            if g.end != w.end:
                raise AssertionError(f"event {i}: data end {g.end!r}, model {w.end!r}")
            if isinstance(w.end, DataEnd):
                if g.content != w.content:
                    raise AssertionError(f"event {i}: content {g.content!r} != {w.content!r}")
            elif not w.content.startswith(g.content):
                raise AssertionError(
                    f"event {i}: handed out {g.content!r}, not a prefix of the valid {w.content!r}"
                )
        elif g != w:
            raise AssertionError(f"event {i}: {g!r}, model {w!r}\n{got}\n{want}")


def check_protocol(wire: bytes, lim: Limits, accept: Sequence[bool], cuts: Sequence[int]) -> Run:
    """Every protocol property on one input: split invariance against the unsplit run, the
    model, bounded buffering (in drive())."""
    run = drive(wire, lim, accept, cuts=cuts)
    if cuts:
        whole = drive(wire, lim, accept)
        if comparable(whole.normal) != comparable(run.normal):
            raise AssertionError(f"split changed the events:\n{whole.normal}\n{run.normal}")
    compare_with_model(run.normal, model(wire, lim, accept))
    return run


# -- addresses --------------------------------------------------------------------------------

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_address_error(exc: AddressError) -> None:
    """A permanent reply (5xx, enhanced 5.x.x) that is well formed on the wire."""
    r = exc.reply
    assert 500 <= r.code <= 599, r
    assert r.enhanced is not None and r.enhanced.startswith("5."), r
    assert r.text
    # CRLF-terminated lines "5xx-" ... "5xx ", no bare CR or LF.
    wire = r.to_bytes()
    assert wire.endswith(b"\r\n") and wire.count(b"\r") == wire.count(b"\r\n"), wire
    lines = wire[:-2].split(b"\r\n")
    assert all(b"\n" not in ln and ln[:3] == str(r.code).encode() for ln in lines), wire
    assert all(ln[3:4] == b"-" for ln in lines[:-1]) and lines[-1][3:4] in (b" ", b""), wire


def unquoted_at(local: str) -> bool:
    """An ``@`` outside quotes and not backslash-escaped."""
    quoted = False
    i = 0
    while i < len(local):
        c = local[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "@" and not quoted:
            return True
        i += 1
    return False


def check_mailbox(mb: Mailbox, raw: str) -> None:
    """A well-formed result of ``normalize(raw, ...)``."""
    if mb.is_null:
        assert raw == "", (raw, mb)
        return
    assert mb.local, mb
    assert not unquoted_at(mb.local), mb
    assert not CONTROL.search(str(mb)), mb
    # The limit normalize() puts on its input holds for its result too (else it would refuse
    # its own output, and a next hop might refuse the longer path).
    assert len(str(mb).encode("utf-8", "surrogateescape")) <= 255, mb
    if mb.domain:
        assert is_valid_domain(mb.domain), mb
        assert canon_domain(mb.domain) == mb.domain, mb
        assert mb.domain == mb.domain.lower() and not mb.domain.endswith("."), mb


# -- tables -----------------------------------------------------------------------------------


def check_table_error(exc: TableError, path: Path | str, data: bytes) -> None:
    """``path:line: message``, the line one that an editor shows with text on it (or, for bad
    UTF-8, the line of the first bad byte)."""
    assert exc.line is not None, str(exc)
    assert str(exc) == f"{path}:{exc.line}: {exc.message}", str(exc)
    if "not valid UTF-8" in exc.message:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            assert exc.line == data.count(b"\n", 0, bad.start) + 1, str(exc)
            return
        raise AssertionError(f"valid UTF-8 called invalid: {exc}")
    lines = data.split(b"\n")
    assert 1 <= exc.line <= len(lines), f"line {exc.line} of a {len(lines)}-line file: {exc}"
    shown = lines[exc.line - 1].decode("utf-8", "replace").strip()
    assert shown and not shown.startswith("#"), f"line {exc.line} is {shown!r}: {exc}"


def check_proxy(data: bytes, versions: Versions) -> ProxyHeader | None:
    """The PROXY parser's contract (smtp/proxy.py): a header, None or ProxyError, nothing
    else raised; None only for a short beginning; a header no longer than ``MAX_HEADER`` nor
    than ``data``, read from its own bytes alone (the same without what follows, and with
    anything else after it), with addresses that parse and ports in range, and the same
    whether the bytes came at once or one by one."""
    try:
        header = parse_proxy(data, versions)
    except ProxyError:
        return None
    if header is None:
        assert len(data) < MAX_HEADER
        return None
    assert 0 < header.size <= min(len(data), MAX_HEADER)
    assert parse_proxy(data[: header.size], versions) == header
    assert parse_proxy(data[: header.size] + b"QUIT\r\n" * 3, versions) == header
    for n in range(header.size):  # a slow proxy: every beginning waits for more
        assert parse_proxy(data[:n], versions) is None
    for part in (header.source, header.destination):
        if part is not None:
            addr = ipaddress.ip_address(part[0])
            assert 0 <= part[1] <= 65535
            # Given as IPv4 when mapped, and in the one canonical spelling.
            assert getattr(addr, "ipv4_mapped", None) is None and str(addr) == part[0]
    return header
