"""One filter's protocol state machine (milter/session.py), without sockets: what each event
puts on the wire for what was negotiated, and which replies are refused where; the filter's
replies are built with kilter.protocol."""

from __future__ import annotations

import pytest
from kilter.protocol import messages as km

from mailgate.milter import codec
from mailgate.milter.codec import MilterProtocolError, Step
from mailgate.milter.session import FilterSession, Stage, smtp_reply
from mailgate.reply import Reply
from tests.test_milter_codec import pack, unpack

LISTS = {codec.CONNECT: ("j", "client_addr"), codec.MAIL: ("{mail_addr}",), codec.BODYEOB: ("i",)}
MACROS = {"j": "gw.example", "{client_addr}": "192.0.2.1", "{mail_addr}": "a@b", "i": "Q1"}


def negotiated(
    actions: km.ActionFlags = km.ActionFlags.ALL,
    protocol: km.ProtocolFlags = km.ProtocolFlags.NONE,
    version: int = 6,
    macros: dict[km.Stage, list[str]] | None = None,
) -> FilterSession:
    s = FilterSession(LISTS)
    assert unpack(s.negotiate()) == km.Negotiate(
        6, km.ActionFlags.ALL, km.ProtocolFlags(int(codec.ALL_STEPS))
    )
    s.receive_data(pack(km.Negotiate(version, actions, protocol, macros or {})))
    assert isinstance(s.next_reply(), codec.Negotiation)
    assert s.awaiting is None and s.open
    return s


def packets(data: bytes) -> list[km.Message]:
    out = []
    while data:
        size = 4 + int.from_bytes(data[:4], "big")
        out.append(unpack(data[:size]))
        data = data[size:]
    return out


def answer(s: FilterSession, *replies: km.Message) -> list[codec.Reply]:
    s.receive_data(b"".join(pack(r) for r in replies))
    got = []
    while (reply := s.next_reply()) is not None:
        got.append(reply)
    return got


def test_an_event_goes_with_its_macros_and_waits_for_its_reply() -> None:
    s = negotiated()
    out = s.connect(MACROS, "[192.0.2.1]", codec.FAMILY_INET, 4000, "192.0.2.1")
    assert out.reply
    assert packets(out.data) == [
        km.Macro(ord("C"), {"j": "gw.example", "{client_addr}": "192.0.2.1"}),
        km.Connect("[192.0.2.1]", km.ip_address("192.0.2.1"), 4000),
    ]
    assert s.awaiting is Stage.CONNECT
    with pytest.raises(RuntimeError):
        s.helo(MACROS, "x")  # not before the reply
    assert answer(s, km.Continue()) == [codec.Verdict("c")]
    assert s.awaiting is None


def test_the_filter_s_own_macro_lists_replace_ours() -> None:
    s = negotiated(macros={km.Stage.CONNECT: ["{client_addr}"], km.Stage.ENVELOPE_FROM: []})
    assert packets(s.connect(MACROS, "h", codec.FAMILY_INET, 1, "192.0.2.1").data)[0] == km.Macro(
        ord("C"), {"{client_addr}": "192.0.2.1"}
    )
    answer(s, km.Continue())
    assert packets(s.mail(MACROS, ["<a@b>"]).data) == [km.EnvelopeFrom(b"<a@b>", [])]


def test_steps_the_filter_declined_are_not_sent_and_no_reply_steps_not_awaited() -> None:
    s = negotiated(protocol=km.ProtocolFlags.NO_HELO | km.ProtocolFlags.NR_MAIL)
    assert not s.helo(MACROS, "client.example").sent
    out = s.mail(MACROS, ["<a@b>"])
    assert out.sent and not out.reply and s.awaiting is None
    assert s.declines(Stage.HELO) and not s.declines(Stage.MAIL)


def test_an_older_filter_gets_only_the_events_its_version_knows() -> None:
    s = negotiated(version=2)
    assert not s.data({}).sent  # DATA came with version 4
    assert not s.unknown({}, "XYZZY").sent  # UNKNOWN with version 3
    assert s.mail({}, ["<a@b>"]).reply  # no-reply steps are version 6's


def test_headers_lose_one_leading_space_unless_the_filter_wants_it() -> None:
    plain = negotiated()
    assert packets(plain.header("Subject", " hi\r\n\tthere").data) == [
        km.Header("Subject", b"hi\n\tthere")
    ]
    assert plain.header_value("added") == " added"
    spaced = negotiated(protocol=km.ProtocolFlags.HEADER_LEADING_SPACE)
    assert packets(spaced.header("Subject", " hi").data) == [km.Header("Subject", b" hi")]
    assert spaced.header_value(" v=1") == " v=1"


def test_body_chunks_follow_the_negotiated_data_size() -> None:
    assert negotiated().chunk_size == codec.MAX_DATA_64K
    big = negotiated(protocol=km.ProtocolFlags.MAX_DATA_SIZE_1M)
    assert big.chunk_size == codec.MAX_DATA_1M
    with pytest.raises(ValueError):
        negotiated().body(b"x" * (codec.MAX_DATA_64K + 1))


def test_end_of_message_takes_changes_then_a_verdict() -> None:
    s = negotiated()
    s.mail(MACROS, ["<a@b>"])
    answer(s, km.Continue())
    out = s.end_of_message(MACROS)
    assert packets(out.data) == [km.Macro(ord("E"), {"i": "Q1"}), km.EndOfMessage(b"")]
    assert answer(
        s,
        km.Progress(),
        km.AddHeader("X-A", b"1"),
        km.Quarantine("why"),
        km.ReplaceBody(b"x"),
        km.Accept(),
    ) == [
        codec.Progress(),
        codec.AddHeader("X-A", "1"),
        codec.Quarantine("why"),
        codec.ReplaceBody(b"x"),
        codec.Verdict("a"),
    ]
    assert s.awaiting is None and not s.in_message


def test_continue_ends_the_wait_and_at_the_end_of_message_the_message() -> None:
    s = negotiated()
    s.mail(MACROS, ["<a@b>"])
    assert answer(s, km.Continue()) == [codec.Verdict("c")]
    assert s.awaiting is None and s.in_message and s.open
    s.end_of_message(MACROS)
    assert answer(s, km.Continue()) == [codec.Verdict("c")]
    assert s.awaiting is None and not s.in_message and s.open


def test_skip_stops_the_body_only() -> None:
    s = negotiated(protocol=km.ProtocolFlags.SKIP)
    s.body(b"chunk")
    assert answer(s, km.Skip()) == [codec.Verdict("s")]
    assert not s.wants(Stage.BODY) and s.wants(Stage.EOM)


def test_accept_ends_the_message_or_the_connection() -> None:
    s = negotiated()
    s.mail({}, ["<a@b>"])
    answer(s, km.Accept())
    assert not s.rcpt({}, ["<c@d>"]).sent and not s.end_of_message({}).sent
    assert s.abort() == codec.encode_bare(codec.ABORT)  # RSET still ends it for the filter
    assert s.mail({}, ["<a@b>"]).sent  # the next transaction is the filter's again
    answer(s, km.Continue())
    conn = negotiated()
    conn.connect({}, "h", codec.FAMILY_INET, 1, "192.0.2.1")
    answer(conn, km.Accept())
    assert not conn.helo({}, "x").sent and not conn.mail({}, ["<a@b>"]).sent
    assert conn.quit() == b""  # nothing more on that connection


@pytest.mark.parametrize(
    ("setup", "reply", "why"),
    [
        ("mail", km.AddHeader("X", b"1"), "AddHeader in answer to mail"),
        ("mail", km.Skip(), "SKIP in answer to mail"),
        ("connect", km.Discard(), "DISCARD in answer to connect"),
        ("body", km.Skip(), "SKIP in answer to body"),  # SKIP was not negotiated
        ("mail", km.Negotiate(6, km.ActionFlags.NONE, km.ProtocolFlags.NONE), "OPTNEG in answer"),
        ("mail", km.ReplyCode(b"250 fine\0"), "not a 4xx or 5xx"),
        ("mail", km.ReplyCode(b"550 4.7.1 mixed\0"), "4.7.1 with 550"),
        ("mail", km.ReplyCode(b"550-first\r\n451 second\0"), "line 2 is not 550"),
    ],
)
def test_replies_that_do_not_belong(setup: str, reply: km.Message, why: str) -> None:
    s = negotiated()
    if setup == "connect":
        s.connect({}, "h", codec.FAMILY_INET, 1, "192.0.2.1")
    elif setup == "mail":
        s.mail({}, ["<a@b>"])
    else:
        s.body(b"x")
    with pytest.raises(MilterProtocolError, match=why):
        answer(s, reply)


def test_changes_need_their_action() -> None:
    s = negotiated(actions=km.ActionFlags.ADD_HEADERS)
    s.end_of_message({})
    assert answer(s, km.AddHeader("X", b"1")) == [codec.AddHeader("X", "1")]
    with pytest.raises(MilterProtocolError, match="CHGHDRS"):
        answer(s, km.ChangeHeader(1, "X", b""))


def test_negotiation_is_checked() -> None:
    for bad, why in [
        (km.Negotiate(7, km.ActionFlags.NONE, km.ProtocolFlags.NONE), "version 7"),
        (km.Negotiate(1, km.ActionFlags.NONE, km.ProtocolFlags.NONE), "version 1"),
        (km.Continue(), "instead of OPTNEG"),
    ]:
        s = FilterSession(LISTS, actions=codec.Action.ADDHDRS)
        s.negotiate()
        with pytest.raises(MilterProtocolError, match=why):
            answer(s, bad)
    s = FilterSession(LISTS, actions=codec.Action.ADDHDRS)
    s.negotiate()
    with pytest.raises(MilterProtocolError, match="beyond"):
        answer(s, km.Negotiate(6, km.ActionFlags.CHANGE_BODY, km.ProtocolFlags.NONE))


def test_bytes_nobody_asked_for_are_an_error() -> None:
    s = negotiated()
    with pytest.raises(MilterProtocolError, match="without an event"):
        s.receive_data(pack(km.Continue()))


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("554 5.7.1 Gtube pattern", Reply(554, "5.7.1", "Gtube pattern")),
        ("451 Try later", Reply(451, None, "Try later")),
        ("550-5.7.1 one\r\n550 5.7.1 two", Reply(550, "5.7.1", "one\ntwo")),
        ("550 5.7.1 100%% spam", Reply(550, "5.7.1", "100% spam")),
        ("421 4.7.0 closing", Reply(421, "4.7.0", "closing")),
    ],
)
def test_reply_codes(text: str, reply: Reply) -> None:
    assert smtp_reply(text) == reply


def test_no_step_is_offered_that_version_6_lacks() -> None:
    assert not codec.ALL_STEPS & ~(Step(0x1FFFFF) | Step.MDS_256K | Step.MDS_1M)
