"""The milter codec cross-checked against an independent implementation (kilter.protocol,
test-only): every packet we send is what kilter reads, every reply kilter builds is what we
read, for fixed cases and for Hypothesis' strings; and what is not a reply is refused."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kilter.protocol import messages as km
from kilter.protocol.buffer import SimpleBuffer

from mailgate.milter import codec
from mailgate.milter.codec import Action, MilterProtocolError, Step


def unpack(data: bytes) -> km.Message:
    """One packet read by kilter (copied out of its buffer: its views pin the buffer)."""
    buf = SimpleBuffer(len(data) + 16)
    buf[:] = data
    message, size = km.Message.unpack(buf)
    assert size == len(data)
    message.freeze()
    return message


def pack(message: km.Message) -> bytes:
    buf = SimpleBuffer(2 * 1024 * 1024)
    message.pack(buf)
    return bytes(buf[:])


def reply(data: bytes) -> codec.Reply:
    reader = codec.PacketReader()
    reader.feed(data)
    packets = list(reader.packets())
    assert len(packets) == 1 and reader.pending == 0
    return codec.parse_reply(*packets[0])


# -- MTA → filter --------------------------------------------------------------------------------


def test_optneg_and_macros() -> None:
    msg = unpack(codec.encode_optneg(6, codec.ALL_ACTIONS, codec.ALL_STEPS))
    assert msg == km.Negotiate(6, km.ActionFlags.ALL, km.ProtocolFlags(int(codec.ALL_STEPS)))
    macros = unpack(codec.encode_macros(b"C", [("j", "gw.example"), ("{client_addr}", "1.2.3.4")]))
    assert macros == km.Macro(ord("C"), {"j": "gw.example", "{client_addr}": "1.2.3.4"})


def test_connect_for_each_family() -> None:
    assert unpack(
        codec.encode_connect("mx.example.org", codec.FAMILY_INET, 2525, "192.0.2.1")
    ) == km.Connect("mx.example.org", IPv4Address("192.0.2.1"), 2525)
    assert unpack(
        codec.encode_connect("[2001:db8::1]", codec.FAMILY_INET6, 25, "2001:db8::1")
    ) == km.Connect("[2001:db8::1]", IPv6Address("2001:db8::1"), 25)
    assert unpack(codec.encode_connect("localhost", codec.FAMILY_UNKNOWN, 0, "")) == km.Connect(
        "localhost"
    )


def test_envelope_and_content_events() -> None:
    assert unpack(codec.encode_helo("client.example.net")) == km.Helo("client.example.net")
    mail = unpack(codec.encode_args(codec.MAIL, ["<a@example.org>", "SIZE=10", "BODY=8BITMIME"]))
    assert mail == km.EnvelopeFrom(b"<a@example.org>", [b"SIZE=10", b"BODY=8BITMIME"])
    rcpt = unpack(codec.encode_args(codec.RCPT, ["<b@example.net>", "NOTIFY=NEVER"]))
    assert rcpt == km.EnvelopeRecipient(b"<b@example.net>", [b"NOTIFY=NEVER"])
    assert unpack(codec.encode_header("Subject", "hi\n\tthere")) == km.Header(
        "Subject", b"hi\n\tthere"
    )
    assert unpack(codec.encode_body(b"line\r\n")) == km.Body(b"line\r\n")
    assert unpack(codec.encode_unknown("XYZZY now")) == km.Unknown(b"XYZZY now\0")
    for command, cls in [
        (codec.DATA, km.Data),
        (codec.EOH, km.EndOfHeaders),
        (codec.ABORT, km.Abort),
        (codec.QUIT, km.Close),
    ]:
        assert isinstance(unpack(codec.encode_bare(command)), cls)
    assert unpack(codec.encode_bare(codec.BODYEOB)) == km.EndOfMessage(b"")


def test_a_nul_never_goes_out_inside_a_string() -> None:
    with pytest.raises(ValueError):
        codec.encode_helo("a\0b")
    # The strings joined and encoded at once: a NUL in any one of them is still seen.
    with pytest.raises(ValueError):
        codec.encode_header("X-A", "v\0")
    with pytest.raises(ValueError):
        codec.encode_header("\0", "v")
    with pytest.raises(ValueError):
        codec.encode_args(codec.RCPT, ["<a@b>", "NOTIFY=\0NEVER"])
    with pytest.raises(ValueError):
        codec.encode_macros(codec.MAIL, [("i", "Q1"), ("{mail_addr}", "a\0")])
    # Surrogates (a client's non-UTF-8 bytes) go back as they came.
    assert codec.encode_header("X-A", "\udcff") == codec.packet(codec.HEADER, b"X-A\0\xff\0")


_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=200
)
_ascii = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"))


@given(_ascii.filter(bool), st.binary(max_size=300).filter(lambda b: b"\0" not in b))
def test_header_packets_read_alike(name: str, value: bytes) -> None:
    text = value.decode("utf-8", "surrogateescape")
    assert unpack(codec.encode_header(name, text)) == km.Header(name, value)


@given(st.lists(_text, min_size=1, max_size=8))
def test_mail_arguments_read_alike(args: list[str]) -> None:
    raw = [a.encode() for a in args]
    assert unpack(codec.encode_args(codec.MAIL, args)) == km.EnvelopeFrom(raw[0], raw[1:])


@given(st.binary(max_size=codec.MAX_DATA_64K))
def test_body_chunks_read_alike(chunk: bytes) -> None:
    assert unpack(codec.encode_body(chunk)) == km.Body(chunk)


# -- filter → MTA --------------------------------------------------------------------------------


def test_negotiation_with_macro_lists() -> None:
    answer = reply(
        pack(
            km.Negotiate(
                6,
                km.ActionFlags.ADD_HEADERS | km.ActionFlags.CHANGE_HEADERS,
                km.ProtocolFlags.NO_HELO | km.ProtocolFlags.SKIP,
                {km.Stage.CONNECT: ["j", "{client_addr}"], km.Stage.END_MESSAGE: ["i"]},
            )
        )
    )
    assert answer == codec.Negotiation(
        6,
        Action.ADDHDRS | Action.CHGHDRS,
        Step.NOHELO | Step.SKIP,
        {codec.CONNECT: ("j", "{client_addr}"), codec.BODYEOB: ("i",)},
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (km.Continue(), codec.Verdict("c")),
        (km.Accept(), codec.Verdict("a")),
        (km.Reject(), codec.Verdict("r")),
        (km.TemporaryFailure(), codec.Verdict("t")),
        (km.Discard(), codec.Verdict("d")),
        (km.Skip(), codec.Verdict("s")),
        (km.ReplyCode(b"554 5.7.1 Gtube pattern\0"), codec.Verdict("y", "554 5.7.1 Gtube pattern")),
        (km.Progress(), codec.Progress()),
        (km.Quarantine("virus found"), codec.Quarantine("virus found")),
        (
            km.AddHeader("X-Spam-Status", b"No, score=1.00"),
            codec.AddHeader("X-Spam-Status", "No, score=1.00"),
        ),
        (
            km.InsertHeader(0, "DKIM-Signature", b" v=1; a=rsa-sha256"),
            codec.InsertHeader(0, "DKIM-Signature", " v=1; a=rsa-sha256"),
        ),
        (km.ChangeHeader(2, "Subject", b""), codec.ChangeHeader(2, "Subject", "")),
        (
            km.ChangeSender("<new@example.org>", "BODY=8BITMIME"),
            codec.ChangeSender("<new@example.org>", "BODY=8BITMIME"),
        ),
        (km.ChangeSender("<new@example.org>"), codec.ChangeSender("<new@example.org>", "")),
        (km.AddRecipient("<c@example.net>"), codec.AddRecipient("<c@example.net>")),
        (
            km.AddRecipientPar("<c@example.net>", "NOTIFY=NEVER"),
            codec.AddRecipient("<c@example.net>", "NOTIFY=NEVER", par=True),
        ),
        (km.RemoveRecipient("<b@example.net>"), codec.DeleteRecipient("<b@example.net>")),
        (km.ReplaceBody(b"new body\r\n"), codec.ReplaceBody(b"new body\r\n")),
    ],
)
def test_each_reply(message: km.Message, expected: codec.Reply) -> None:
    assert reply(pack(message)) == expected


@given(st.integers(0, 2**32 - 1), _ascii.filter(bool), _text)
def test_header_changes_read_alike(index: int, name: str, value: str) -> None:
    data = value.encode()
    assert reply(pack(km.ChangeHeader(index, name, data))) == codec.ChangeHeader(index, name, value)
    assert reply(pack(km.InsertHeader(index, name, data))) == codec.InsertHeader(index, name, value)


@given(_text, _text)
def test_sender_changes_read_alike(address: str, args: str) -> None:
    assert reply(pack(km.ChangeSender(address, args or None))) == codec.ChangeSender(address, args)


@given(st.binary(max_size=200_000))
def test_body_replacement_reads_alike(chunk: bytes) -> None:
    assert reply(pack(km.ReplaceBody(chunk))) == codec.ReplaceBody(chunk)


def test_packets_split_anywhere() -> None:
    data = pack(km.AddHeader("X-A", b"1")) + pack(km.Accept())
    for cut in range(len(data) + 1):
        reader = codec.PacketReader()
        got = []
        for part in (data[:cut], data[cut:]):
            reader.feed(part)
            got += [codec.parse_reply(c, d) for c, d in reader.packets()]
        assert got == [codec.AddHeader("X-A", "1"), codec.Verdict("a")]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\0\0\0\0", "packet length 0"),
        (codec.packet(b"h", b"X-A\0value"), "without its NUL"),
        (codec.packet(b"c", b"x"), "followed by 1 bytes"),
        (codec.packet(b"q", b"reason\0extra"), "followed by 5 bytes"),
        (codec.packet(b"m", b"\0\0"), "too short"),
        (codec.packet(b"Z"), "unknown reply 'Z'"),
        (codec.packet(b"y", b"554 5.7.1 a\0b\0"), "holds a NUL"),
    ],
)
def test_what_is_not_a_reply(data: bytes, why: str) -> None:
    reader = codec.PacketReader()
    reader.feed(data)
    with pytest.raises(MilterProtocolError, match=why):
        for command, body in reader.packets():
            codec.parse_reply(command, body)


def test_a_packet_over_the_limit_is_refused_before_it_is_read() -> None:
    reader = codec.PacketReader(limit=100)
    reader.feed(b"\0\0\x10\0b")  # announces 4 KiB
    with pytest.raises(MilterProtocolError, match="limit 100"):
        list(reader.packets())
