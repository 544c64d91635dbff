"""Tests for the sans-IO SMTP server protocol (mailgate.smtp.protocol)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    ProtocolError,
    ServerConnection,
    Wait,
    reply_bytes,
)
from tests.reliability.fuzz_support import (
    BARE,
    NUL,
    Limits,
    long_line,
    too_big,
    unstuff,
    violation,
)

GO_AHEAD = Reply(354, None, "Go ahead")


def drain(conn: ServerConnection, limit: int = 100_000) -> list[Event]:
    """All events available now; accepts DATA automatically (bounded loop)."""
    out: list[Event] = []
    for _ in range(limit):
        ev = conn.next_event()
        if isinstance(ev, Wait):
            return out
        out.append(ev)
        if isinstance(ev, Command) and ev.verb == "DATA":
            assert conn.send(GO_AHEAD) == b"354 Go ahead\r\n"
    raise AssertionError("next_event() did not settle")


def feed(conn: ServerConnection, chunks: list[bytes], *, eof: bool = False) -> list[Event]:
    events: list[Event] = []
    for c in chunks:
        conn.receive_data(c)
        events += drain(conn)
    if eof:
        conn.receive_data(b"")
        events += drain(conn)
    return events


def data_result(events: list[Event]) -> tuple[bytes, Event | None]:
    """Concatenated DataChunks before the first data end, and that end event."""
    content = b""
    for ev in events:
        if isinstance(ev, DataChunk):
            content += ev.data
        elif isinstance(ev, DataEnd | DataFailed):
            return content, ev
    return content, None


def stuff(content: bytes) -> bytes:
    """Dot-stuff valid CRLF content for transmission (RFC 5321 4.5.2)."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- commands --------------------------------------------------------------------------------


BARE_LF_COMMAND = BadCommand(Reply(521, "5.5.2", "Error: bare <LF> received"), fatal=True)
BARE_CR_COMMAND = BadCommand(Reply(521, "5.5.2", "Error: bare <CR> received"), fatal=True)


def ended(events: list[Event]) -> bool:
    """The stream ended as the contract says: EOF seen, or a fatal refusal (nothing after)."""
    last = events[-1]
    closes = sum(isinstance(e, ConnectionClosed) for e in events)
    fatal = [i for i, e in enumerate(events) if isinstance(e, BadCommand) and e.fatal]
    if fatal:
        return fatal == [len(events) - 1] and closes == 0
    return isinstance(last, ConnectionClosed) and closes == 1


def test_commands_crlf() -> None:
    conn = ServerConnection()
    events = feed(conn, [b"ehlo client.example\r\nMail FROM:<a@b>  \r\nNOOP\r\nQUIT"], eof=True)
    assert events == [
        Command("EHLO", "client.example"),
        Command("MAIL", "FROM:<a@b>"),
        Command("NOOP", ""),
        ConnectionClosed(),
    ]


@pytest.mark.parametrize(
    ("wire", "refusal"),
    [
        (b"MAIL FROM:<a@b>\n", BARE_LF_COMMAND),
        (b"NOOP\nRCPT TO:<v@example.org>\r\n", BARE_LF_COMMAND),
        (b"NOOP\rRCPT TO:<v@example.org>\r\n", BARE_CR_COMMAND),
        (b"MAIL FROM:<a@b>\r\r\n", BARE_CR_COMMAND),
        (b"\n", BARE_LF_COMMAND),
        (b"\r\r\n", BARE_CR_COMMAND),
    ],
)
def test_bare_lf_or_cr_in_a_command_line_is_fatal(wire: bytes, refusal: BadCommand) -> None:
    """RFC 5321 2.3.8: only CRLF ends a line. The line is refused whole, nothing after it is
    read: the commands a smuggler hides behind a bare LF never become events."""
    for chunks in ([wire + b"QUIT\r\n"], [bytes([b]) for b in wire + b"QUIT\r\n"]):
        conn = ServerConnection()
        events = feed(conn, [b"EHLO a\r\n", *chunks], eof=True)
        assert events == [Command("EHLO", "a"), refusal]
        assert conn.next_event() is PAUSED
        assert conn.pending_bytes == 0


def test_bare_lf_ending_an_overlong_command_line_is_fatal() -> None:
    conn = ServerConnection(max_command_line=16)
    events = feed(conn, [b"X" * 40, b"\nRCPT TO:<v@example.org>\r\n"], eof=True)
    assert events == [BARE_LF_COMMAND]
    conn = ServerConnection(max_command_line=16)
    events = feed(conn, [b"X" * 40 + b"\r", b"\nNOOP\r\n"], eof=True)
    assert events == [
        BadCommand(Reply(500, "5.5.0", "Command line too long")),
        Command("NOOP", ""),
        ConnectionClosed(),
    ]


def test_command_utf8_surrogateescape() -> None:
    conn = ServerConnection()
    events = feed(conn, ["RCPT TO:<jörg@example.org>\r\n".encode() + b"RCPT TO:<\xff>\r\n"])
    assert events == [Command("RCPT", "TO:<jörg@example.org>"), Command("RCPT", "TO:<\udcff>")]


def test_command_byte_by_byte() -> None:
    conn = ServerConnection()
    data = b"HELO x\r\nRSET\r\n"
    events = feed(conn, [data[i : i + 1] for i in range(len(data))])
    assert events == [Command("HELO", "x"), Command("RSET", "")]


def test_command_nul() -> None:
    conn = ServerConnection()
    events = feed(conn, [b"HELO a\0b\r\nNOOP\r\n"])
    assert events == [
        BadCommand(Reply(500, "5.5.1", "Invalid command: NUL byte")),
        Command("NOOP", ""),
    ]


def test_command_length_limit_exact() -> None:
    conn = ServerConnection(max_command_line=16)
    ok = b"NOOP " + b"x" * 9 + b"\r\n"  # 16 bytes incl. CRLF
    bad = b"NOOP " + b"x" * 10 + b"\r\n"  # 17 bytes
    events = feed(conn, [ok + bad + b"QUIT\r\n"])
    assert events == [
        Command("NOOP", "x" * 9),
        BadCommand(Reply(500, "5.5.0", "Command line too long")),
        Command("QUIT", ""),
    ]


def test_overlong_command_without_lf_memory_bounded() -> None:
    conn = ServerConnection()
    block = b"A" * 65536
    peak = 0
    for _ in range(100 * 1024 * 1024 // len(block)):
        conn.receive_data(block)
        assert conn.next_event() is NEED_DATA
        peak = max(peak, conn.pending_bytes)
    assert peak <= conn.max_command_line
    events = feed(conn, [b"tail\r\nNOOP\r\n"])
    assert events == [BadCommand(Reply(500, "5.5.0", "Command line too long")), Command("NOOP", "")]


def test_overlong_command_split_in_small_pieces() -> None:
    conn = ServerConnection(max_command_line=20)
    data = b"X" * 50 + b"\r\nNOOP\r\n"
    events = feed(conn, [data[i : i + 3] for i in range(0, len(data), 3)])
    assert events == [BadCommand(Reply(500, "5.5.0", "Command line too long")), Command("NOOP", "")]
    assert conn.pending_bytes == 0


def test_bdat_is_a_plain_command() -> None:
    conn = ServerConnection()
    assert feed(conn, [b"BDAT 5 LAST\r\n"]) == [Command("BDAT", "5 LAST")]


def test_protocol_errors() -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError):
        conn.start_data()
    with pytest.raises(ProtocolError):
        conn.reject_data()
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.receive_data(b"x")


def test_reply_bytes() -> None:
    assert reply_bytes(Reply(250, "2.0.0", "Ok"), Reply(354, None, "Go ahead")) == (
        b"250 2.0.0 Ok\r\n354 Go ahead\r\n"
    )
    assert reply_bytes() == b""


# -- DATA ------------------------------------------------------------------------------------


def test_data_pauses_until_decision_then_pipelined_commands() -> None:
    conn = ServerConnection()
    conn.receive_data(b"MAIL FROM:<a@b>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert conn.next_event() == Command("MAIL", "FROM:<a@b>")
    assert conn.next_event() == Command("DATA", "")
    assert conn.next_event() is PAUSED  # the session has not decided yet
    assert conn.next_event() is PAUSED
    conn.send(GO_AHEAD)
    events = drain(conn)
    content, end = data_result(events)
    assert content == b"Subject: x\r\n\r\nbody\r\n"
    assert end == DataEnd(len(content))
    assert events[-1] == Command("QUIT", "")


def test_reject_data_keeps_parsing_commands() -> None:
    conn = ServerConnection()
    conn.receive_data(b"DATA\r\nhello\r\n.\r\n")
    assert conn.next_event() == Command("DATA", "")
    assert conn.next_event() is PAUSED
    assert (
        conn.send(Reply(554, "5.5.1", "No valid recipients"))
        == b"554 5.5.1 No valid recipients\r\n"
    )
    assert conn.next_event() == Command("HELLO", "")
    assert conn.next_event() == Command(".", "")
    assert conn.next_event() is NEED_DATA


def test_empty_message_and_leading_dots() -> None:
    conn = ServerConnection()
    events = feed(conn, [b"DATA\r\n.\r\nDATA\r\n..\r\n...x\r\n.y\r\n.\r\nNOOP\r\n"])
    assert events == [
        Command("DATA", ""),
        DataEnd(0),
        Command("DATA", ""),
        DataChunk(b".\r\n..x\r\ny\r\n"),
        DataEnd(11),
        Command("NOOP", ""),
    ]


@pytest.mark.parametrize(
    "content",
    [b"", b"a\r\n", b".\r\n", b"..\r\n", b"x\r\n.\r\n\r\n", b"\r\n", b"a\r\n\r\n.b\r\n"],
)
def test_every_split_of_data(content: bytes) -> None:
    wire = b"DATA\r\n" + stuff(content) + b".\r\nNOOP\r\n"
    # Byte by byte, and every single two-way split.
    for chunks in [[wire[i : i + 1] for i in range(len(wire))]] + [
        [wire[:k], wire[k:]] for k in range(1, len(wire))
    ]:
        conn = ServerConnection()
        events = feed(conn, chunks)
        got, end = data_result(events)
        assert got == content, chunks
        assert end == DataEnd(len(content))
        assert events[-1] == Command("NOOP", "")


@pytest.mark.parametrize(
    "payload",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n\n", b"\r\r"],
)
def test_smuggling_is_not_end_of_data(payload: bytes) -> None:
    body = b"a" + payload + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nevil\r\n"
    wire = b"DATA\r\n" + body + b".\r\nQUIT\r\n"
    # Only the part before the first bare CR/LF may have been handed out: nothing when the
    # bare CR/LF came in the same read, the "a" when it was a read of its own.
    for chunks, handed_out in [([wire], b""), ([wire[i : i + 1] for i in range(len(wire))], b"a")]:
        conn = ServerConnection()
        events = feed(conn, chunks)
        assert [e for e in events if isinstance(e, Command)] == [
            Command("DATA", ""),
            Command("QUIT", ""),
        ]
        assert data_result(events)[0] == handed_out
        # A dot after CRLF is unstuffed, bare CR/LF or not.
        assert events[-2] == DataFailed(BARE, len(body.replace(b"\r\n.", b"\r\n")))


@pytest.mark.parametrize("line_len", [10, 1000])
@pytest.mark.parametrize("bad", [b"\rz\n", b"z\n", b"\r\r\n\n", b"z\r"])
def test_bare_in_big_block(line_len: int, bad: bytes) -> None:
    # Big single blocks take the scan paths for both short and long lines; CR and LF
    # counts may even match (b"\rz\n").
    line = b"w" * (line_len - 2) + b"\r\n"
    body = line * 40 + b"v" + bad + b"\r\n" + line * 40
    conn = ServerConnection(max_text_line=2000)
    events = feed(conn, [b"DATA\r\n" + body + b".\r\nNOOP\r\n"])
    assert events == [Command("DATA", ""), DataFailed(BARE, len(body)), Command("NOOP", "")]


def test_data_nul() -> None:
    events = feed(ServerConnection(), [b"DATA\r\nab\0c\r\n.\r\nNOOP\r\n"])
    assert events == [Command("DATA", ""), DataFailed(NUL, 6), Command("NOOP", "")]


def test_first_violation_wins() -> None:
    conn = ServerConnection(max_text_line=10)
    # NUL on line 1, bare LF on line 2: NUL wins (even in one chunk).
    events = feed(conn, [b"DATA\r\na\0\r\nb\nc\r\n" + b"x" * 30 + b"\r\n.\r\n"])
    assert events[-1] == DataFailed(NUL, 4 + 5 + 32)
    conn = ServerConnection(max_text_line=10)
    events = feed(conn, [b"DATA\r\n", b"b\nc\r\na\0\r\n", b"x" * 30 + b"\r\n.\r\n"])
    assert events[-1] == DataFailed(BARE, 41)
    conn = ServerConnection(max_text_line=10)
    events = feed(conn, [b"DATA\r\n" + b"x" * 30 + b"\0\n\r\n.\r\n"])
    assert events[-1] == DataFailed(long_line(10), 34)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_long_text_line(chunk: int) -> None:
    ok = b"x" * 998 + b"\r\n"  # exactly 1000 bytes incl. CRLF
    bad = b"y" * 999 + b"\r\n"
    # The duplicated leading dot does not count (RFC 5321 4.5.3.1.6): 1001 bytes on the wire.
    stuffed = b".." + ok[1:]
    for body, expect_ok in [(ok * 3, True), (ok + bad + ok, False), (stuffed, True)]:
        wire = b"DATA\r\n" + body + b".\r\n"
        conn = ServerConnection(max_text_line=1000)  # the opt-in limit
        events = feed(conn, [wire[i : i + chunk] for i in range(0, len(wire), chunk)])
        content, end = data_result(events)
        want = body.replace(b"..", b".", 1) if body is stuffed else body
        if expect_ok:
            assert end == DataEnd(len(want))
            assert content == want
        else:
            assert end == DataFailed(long_line(1000), len(want))
            # Nothing after the violation (byte 1000 of the bad line) was handed out.
            assert want.startswith(content)
            assert len(content) <= len(ok) + 1000


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_long_text_lines_accepted_by_default(chunk: int) -> None:
    # As Postfix's smtpd and Sendmail: no line limit unless one is configured (the client
    # folds long lines when it passes the message on).
    body = b"Subject: " + b"s" * 3000 + b"\r\n\r\n" + b"y" * 10_000 + b"\r\n.." + b"z" * 5000
    body += b"\r\n"
    wire = b"DATA\r\n" + body + b".\r\nNOOP\r\n"
    conn = ServerConnection()
    events = feed(conn, [wire[i : i + chunk] for i in range(0, len(wire), chunk)])
    content, end = data_result(events)
    want = body.replace(b"\r\n..", b"\r\n.")
    assert end == DataEnd(len(want)) and content == want
    assert events[-1] == Command("NOOP", "")


def test_oversize_message_keeps_counting_and_stays_in_sync() -> None:
    conn = ServerConnection(max_message_size=1000)
    body = b"z" * 98 + b"\r\n"
    chunks = [b"DATA\r\n"] + [body] * 50 + [b".\r\nNOOP\r\n"]
    events = feed(conn, chunks)
    content, end = data_result(events)
    assert end == DataFailed(too_big(1000), 5000)
    assert len(content) <= 1000
    assert events[-1] == Command("NOOP", "")
    # Exactly at the limit is fine; the size is settable per transaction.
    conn.max_message_size = 200
    events = feed(conn, [b"DATA\r\n" + body * 2 + b".\r\n"])
    assert events == [Command("DATA", ""), DataChunk(body * 2), DataEnd(200)]


def test_eof_mid_data() -> None:
    conn = ServerConnection()
    events = feed(conn, [b"DATA\r\npartial line\r\nno end"], eof=True)
    assert events[0] == Command("DATA", "")
    assert events[-1] == ConnectionClosed()
    assert not any(isinstance(e, DataEnd | DataFailed) for e in events)
    assert conn.next_event() is PAUSED


def test_eof_with_partial_command_line() -> None:
    conn = ServerConnection()
    assert feed(conn, [b"NOOP\r\nQUI"], eof=True) == [Command("NOOP", ""), ConnectionClosed()]
    assert conn.pending_bytes == 0


def test_data_memory_bounded() -> None:
    conn = ServerConnection()
    conn.receive_data(b"DATA\r\n")
    assert conn.next_event() == Command("DATA", "")
    conn.send(GO_AHEAD)
    block = (b"q" * 62 + b"\r\n") * 1024
    for _ in range(64):
        conn.receive_data(block + b"x\r")
        for _ in range(10):
            if conn.next_event() is NEED_DATA:
                break
        assert conn.pending_bytes <= 4


# -- property tests --------------------------------------------------------------------------

line_st = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotty_st = st.lists(st.sampled_from([b".", b"a", b".."]), max_size=4).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.one_of(line_st, dotty_st), max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_random_chunking(lines: list[bytes], seed: int) -> None:
    content = b"".join(ln + b"\r\n" for ln in lines if b"\0" not in ln)
    wire = b"DATA\r\n" + stuff(content) + b".\r\nQUIT\r\n"
    rng = random.Random(seed)
    cuts = [rng.randrange(1, len(wire)) for _ in range(rng.randrange(0, 12))]
    events = feed(ServerConnection(), split_at(wire, cuts))
    got, end = data_result(events)
    assert got == content
    assert end == DataEnd(len(content))
    assert events[-1] == Command("QUIT", "")


def reference(raw: bytes, m: int, limit: int | None) -> tuple[bytes, Event] | None:
    """Slow, obvious model of DATA: (valid content prefix, end event) or None if no end."""
    s = b"\r\n" + raw
    i = s.find(b"\r\n.\r\n")
    if i < 0:
        return None
    content = unstuff(s[2 : i + 2])
    bad = violation(content, Limits(max_text_line=m, max_message_size=limit))
    if bad is None:
        return content, DataEnd(len(content))
    pos, reply = bad
    return content[:pos], DataFailed(reply, len(content))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(
        st.sampled_from(
            [b"a", b".", b"\r", b"\n", b"\0", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"bcdef"]
        ),
        max_size=60,
    ).map(b"".join),
    m=st.one_of(st.just(0), st.integers(2, 12)),
    limit=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_against_reference(raw: bytes, m: int, limit: int | None, seed: int) -> None:
    wire = b"DATA\r\n" + raw + b"\r\n.\r\nNOOP\r\n"
    rng = random.Random(seed)
    cuts = [rng.randrange(1, len(wire)) for _ in range(rng.randrange(0, 15))]
    conn = ServerConnection(max_text_line=m, max_message_size=limit)
    events = feed(conn, split_at(wire, cuts), eof=True)
    assert ended(events)
    got, end = data_result(events)
    expect = reference(raw + b"\r\n.\r\n", m, limit)
    assert expect is not None
    want_content, want_end = expect
    assert end == want_end
    if isinstance(end, DataEnd):
        assert got == want_content
    else:
        # Chunks handed out before the failure are a prefix of the valid part.
        assert want_content.startswith(got)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**32 - 1))
def test_fuzz_arbitrary_bytes_never_crash(data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    cuts = [rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 10))]
    conn = ServerConnection(max_command_line=32, max_text_line=16, max_message_size=64)
    events = feed(conn, split_at(b"DATA\r\n" + data, cuts) + split_at(data, cuts), eof=True)
    assert ended(events)
    assert conn.pending_bytes == 0
