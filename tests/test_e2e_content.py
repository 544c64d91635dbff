"""End to end with a real next hop (Postfix's smtp-sink): long lines and 8-bit mail.

The real daemon takes mail from smtplib, spools it byte for byte, and delivers it to smtp-sink,
which dumps what it received: with ``-8`` it does not offer 8BITMIME, with ``-e`` not even
ESMTP. What must arrive: no line over 998 octets (long ones folded with CRLF SPACE, nothing
lost), and to a 7-bit hop 8-bit parts as quoted-printable, without BODY=.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess, free_port
from tests.support.mime import head_body, qp_decode
from tests.support.smtpsink import SMTP_SINK, DumpedMessage, PostfixSink
from tests.support.world import (
    HOP1,
    MXHOST,
    OUTSIDE,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    issue_world,
    message,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    SMTP_SINK is None, reason="Postfix's smtp-sink is not installed (apt install postfix)"
)

DNS_RECORDS = SENDER_DNS  # example.org's MX: where bounces to alice@example.org go


@pytest.fixture
def hop1_port() -> int:
    """targetdomain1.com's server: an smtp-sink the test starts on this port."""
    return free_port(HOP1)


@pytest.fixture
def world(hop1_port: int, mx_port: int) -> World:
    return issue_world(hop1_port, mx_port)


def our_part(msg: DumpedMessage) -> bytes:
    """The message as we sent it (CRLF), after the Received: field the gateway put on top."""
    content = msg.content.replace(b"\n", b"\r\n")
    assert content.startswith(b"Received: from client.example.net")
    end = content.index(b"\r\n", content.index(b"with ESMTP id "))
    rest = content[end + 2 :]
    while rest[:1] == b"\t":  # the rest of our Received:
        rest = rest[rest.index(b"\r\n") + 2 :]
    return rest


def send(gw: GatewayProcess, rcpts: list[str], content: bytes, *, eight: bool) -> None:
    """MAIL, RCPT and DATA with smtplib, which must get 250 for the message."""
    with gw.smtp(OUTSIDE) as s:
        s.ehlo()
        code, _ = s.mail("alice@example.org", ["BODY=8BITMIME"] if eight else [])
        assert code == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, reply = s.data(content)
        assert code == 250, reply


MIME_8BIT = message(
    "Grüße",
    msgid="<grusse@example.org>",
    headers='MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="sep"\r\n',
    body=(
        "--sep\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße aus Köln, 5 € = viel.\r\n.Punkt am Zeilenanfang\r\n"
        "--sep\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        "AAECAwQF\r\n--sep--\r\n"
    ),
)
PLAIN_8BIT = message(
    "non-MIME", msgid="<plain@example.org>", body="Ein Text ohne MIME, mit Umlauten: äöüß.\r\n"
)


def test_8bit_to_a_hop_without_8bitmime_arrives_quoted_printable(
    tmp_path: Path, make_gateway: GatewayFactory, world: World, hop1_port: int
) -> None:
    gw = make_gateway(world)
    with PostfixSink(HOP1, hop1_port, tmp_path / "dump", "-8") as sink:
        send(gw, ["bob@targetdomain1.com"], MIME_8BIT, eight=True)
        gw.wait_log("stat=Sent")
        [msg] = sink.wait_for(1, timeout=10)
    assert "BODY=" not in msg.mail_args and msg.proto == "ESMTP"
    got = our_part(msg)
    # The Subject keeps its 8-bit octets (Postfix too leaves header fields alone); every
    # other line is 7-bit.
    assert [ln for ln in got.split(b"\r\n") if not ln.isascii()] == ["Subject: Grüße".encode()]
    head, body = head_body(got)
    assert head == head_body(MIME_8BIT)[0]
    sep = body.split(b"--sep")
    text_head, text_body = head_body(sep[1][2:])
    assert text_head == (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    text = "Grüße aus Köln, 5 € = viel.\r\n.Punkt am Zeilenanfang".encode()
    assert qp_decode(text_body[:-2]) == text
    assert sep[2] == head_body(MIME_8BIT)[1].split(b"--sep")[2]  # base64 part as it was


def test_8bit_to_a_hop_without_esmtp(
    tmp_path: Path, make_gateway: GatewayFactory, world: World, hop1_port: int
) -> None:
    gw = make_gateway(world)
    with PostfixSink(HOP1, hop1_port, tmp_path / "dump", "-e") as sink:
        send(gw, ["bob@targetdomain1.com"], PLAIN_8BIT, eight=True)
        gw.wait_log("stat=Sent")
        [msg] = sink.wait_for(1, timeout=10)
    assert msg.proto == "SMTP" and msg.mail_args == "<alice@example.org>"
    got = our_part(msg)
    assert got.isascii()
    head, body = head_body(got)
    assert head == head_body(PLAIN_8BIT)[0] + (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    assert qp_decode(body) == head_body(PLAIN_8BIT)[1]


def test_8bit_to_a_hop_with_8bitmime_passes_unchanged(
    tmp_path: Path, make_gateway: GatewayFactory, world: World, hop1_port: int
) -> None:
    gw = make_gateway(world)
    with PostfixSink(HOP1, hop1_port, tmp_path / "dump") as sink:
        send(gw, ["bob@targetdomain1.com"], MIME_8BIT, eight=True)
        send(gw, ["bob@targetdomain1.com"], PLAIN_8BIT, eight=True)
        gw.wait_log("stat=Sent")
        msgs = sink.wait_for(2, timeout=10)
    assert sorted(our_part(m) for m in msgs) == sorted([MIME_8BIT, PLAIN_8BIT])
    assert all(m.mail_args.endswith(" BODY=8BITMIME") for m in msgs)


LONG = message(
    "long lines",
    msgid="<long@example.org>",
    headers="X-Long: " + "h" * 1500 + "\r\n",
    body=(bytes(range(33, 127)) * 60)[:5000] + b"\r\n." + b"d" * 1200 + b"\r\nshort\r\n",
)


@pytest.mark.parametrize("flags", [(), ("-8",), ("-e",)], ids=["8bitmime", "7bit", "smtp"])
def test_long_lines_accepted_and_folded(
    tmp_path: Path,
    make_gateway: GatewayFactory,
    world: World,
    hop1_port: int,
    flags: tuple[str, ...],
) -> None:
    gw = make_gateway(world)
    with PostfixSink(HOP1, hop1_port, tmp_path / "dump", *flags) as sink:
        # 250 from the gateway (before: 552 5.6.0 "Message contains a line longer than 1000
        # bytes"); the local recipient's copy is not folded.
        send(gw, ["bob@targetdomain1.com", "alice@mail.example.org"], LONG, eight=False)
        gw.wait_log("to=<bob@targetdomain1.com>")
        [msg] = sink.wait_for(1, timeout=10)
        new = gw.maildir / "alice" / "new"
        wait_until(lambda: any(new.iterdir()), "the local copy in alice's Maildir")
        [local] = list(new.iterdir())
        # Maildir files have LF line ends (as before); the long lines are whole.
        assert local.read_bytes().endswith(LONG.replace(b"\r\n", b"\n"))
    assert max(len(line) for line in msg.lines) == 998
    got = our_part(msg)
    assert got.replace(b"\r\n ", b"") == LONG  # nothing lost: only CRLF SPACE inserted
    assert got.count(b"\r\n ") == 1 + 5 + 1  # the X-Long: field, the 5000, the 1201 octets


def test_bounce_of_an_8bit_message_with_a_long_line(
    tmp_path: Path, make_gateway: GatewayFactory, make_sink: SinkFactory, mx_port: int
) -> None:
    """Our own bounce goes through the same client: folded, and converted for a 7-bit hop."""
    original = message(
        "doomed",
        to="gone@targetdomain1.com",
        headers="X-Long: " + "h" * 1500 + "\r\n",  # stays a header field: folded
        body="Größe: " + "ß" * 2000 + "\r\n",  # converted: quoted-printable lines
    )
    hop1 = make_sink(HOP1)
    hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
    gw = make_gateway(issue_world(hop1.port, mx_port))
    with PostfixSink(MXHOST, mx_port, tmp_path / "dump", "-8") as mx:
        send(gw, ["gone@targetdomain1.com"], original, eight=True)
        gw.wait_log("stat=User unknown")
        gw.wait_log("to=<alice@example.org>", timeout=15)
        [bounce] = mx.wait_for(1, timeout=10)
    assert bounce.mail_args == "<>" and "BODY=" not in bounce.mail_args
    assert max(len(line) for line in bounce.lines) <= 998
    data = bounce.content.replace(b"\n", b"\r\n")
    assert data.isascii() and b"Content-Type: multipart/report" in data
    inner = data.split(b"Content-Type: message/rfc822\r\n\r\n")[1]
    head, body = head_body(inner)
    assert head.endswith(
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    qp = body[: body.index(b"\r\n--")]
    assert qp_decode(qp) == head_body(original)[1]
    assert b"X-Long: " + b"h" * 990 + b"\r\n " in head  # folded where it went over 998


def test_long_line_limit_refusal_is_opt_in(make_gateway: GatewayFactory, world: World) -> None:
    gw = make_gateway(world.but(settings="[smtp]\nmax_text_line = 1000\n"))
    with gw.smtp(OUTSIDE) as s:
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail("alice@example.org", ["bob@targetdomain1.com"], LONG)
        assert err.value.smtp_code == 552
        assert b"line longer than 1000 bytes" in err.value.smtp_error
