"""End to end with a real next hop (Postfix's smtp-sink): long lines and 8-bit mail.

The real daemon takes mail from smtplib, spools it byte for byte, and delivers it to smtp-sink,
which dumps what it received: with ``-8`` it does not offer 8BITMIME, with ``-e`` not even
ESMTP. What must arrive: no line over 998 octets (long ones folded with CRLF SPACE, nothing
lost), and to a 7-bit hop 8-bit parts as quoted-printable, without BODY=.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, free_port
from tests.support.mime import head_body, qp_decode
from tests.support.sink import SinkServer
from tests.support.smtpsink import SMTP_SINK, DumpedMessage, PostfixSink

pytestmark = pytest.mark.skipif(
    SMTP_SINK is None, reason="Postfix's smtp-sink is not installed (apt install postfix)"
)

OUTSIDE = "127.0.0.2"
HOP1 = "127.0.0.5"  # targetdomain1.com's server: smtp-sink
MXHOST = "127.0.0.7"  # example.org's MX (where bounces to alice@example.org go)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add("example.org", "MX", "10 mx.example.org.")
        server.add("mx.example.org", "A", MXHOST)
        yield server


def gateway(tmp_path: Path, dns: DnsServer, hop1_port: int, mx_port: int) -> GatewayProcess:
    tables = {
        "mailertable": f"targetdomain1.com   smtp:[{HOP1}]:{hop1_port}\n",
        "access": "To:targetdomain1.com  RELAY\n",
        "local-host-names": "mail.example.org\n",
        "aliases": "postmaster: alice\n",
    }
    settings = (
        '[queue]\nrun_interval = "2s"\nretry_min = "1s"\n'
        f'[delivery]\nport = {mx_port}\nconnect_timeout = "2s"\n'
        '[smtp]\ngreet_pause = "0s"\nbad_rcpt_throttle = 0\n'
    )
    gw = GatewayProcess(tmp_path / "gw", dns=dns.address, tables=tables, settings=settings)
    (gw.maildir / "alice").mkdir(parents=True)
    return gw


def our_part(msg: DumpedMessage) -> bytes:
    """The message as we sent it (CRLF), after the Received: field the gateway put on top."""
    content = msg.content.replace(b"\n", b"\r\n")
    assert content.startswith(b"Received: from client.example.net")
    end = content.index(b"\r\n", content.index(b"with ESMTP id "))
    rest = content[end + 2 :]
    while rest[:1] == b"\t":  # the rest of our Received:
        rest = rest[rest.index(b"\r\n") + 2 :]
    return rest


def send(gw: GatewayProcess, rcpts: list[str], message: bytes, *, eight: bool) -> None:
    """MAIL, RCPT and DATA with smtplib, which must get 250 for the message."""
    with gw.smtp(OUTSIDE) as s:
        s.ehlo()
        code, _ = s.mail("alice@example.org", ["BODY=8BITMIME"] if eight else [])
        assert code == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, reply = s.data(message)
        assert code == 250, reply


MIME_8BIT = (
    "From: alice@example.org\r\nTo: bob@targetdomain1.com\r\nSubject: Grüße\r\n"
    "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\nMessage-ID: <grusse@example.org>\r\n"
    'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="sep"\r\n\r\n'
    "--sep\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße aus Köln, 5 € = viel.\r\n.Punkt am Zeilenanfang\r\n"
    "--sep\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    "AAECAwQF\r\n--sep--\r\n"
).encode()
PLAIN_8BIT = (
    "From: alice@example.org\r\nTo: bob@targetdomain1.com\r\nSubject: non-MIME\r\n"
    "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\nMessage-ID: <plain@example.org>\r\n\r\n"
    "Ein Text ohne MIME, mit Umlauten: äöüß.\r\n"
).encode()


def test_8bit_to_a_hop_without_8bitmime_arrives_quoted_printable(
    tmp_path: Path, dns: DnsServer
) -> None:
    port = free_port(HOP1)
    with (
        PostfixSink(HOP1, port, tmp_path / "dump", "-8") as sink,
        gateway(tmp_path, dns, port, free_port(MXHOST)) as gw,
    ):
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


def test_8bit_to_a_hop_without_esmtp(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port(HOP1)
    with (
        PostfixSink(HOP1, port, tmp_path / "dump", "-e") as sink,
        gateway(tmp_path, dns, port, free_port(MXHOST)) as gw,
    ):
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


def test_8bit_to_a_hop_with_8bitmime_passes_unchanged(tmp_path: Path, dns: DnsServer) -> None:
    port = free_port(HOP1)
    with (
        PostfixSink(HOP1, port, tmp_path / "dump") as sink,
        gateway(tmp_path, dns, port, free_port(MXHOST)) as gw,
    ):
        send(gw, ["bob@targetdomain1.com"], MIME_8BIT, eight=True)
        send(gw, ["bob@targetdomain1.com"], PLAIN_8BIT, eight=True)
        gw.wait_log("stat=Sent")
        msgs = sink.wait_for(2, timeout=10)
    assert sorted(our_part(m) for m in msgs) == sorted([MIME_8BIT, PLAIN_8BIT])
    assert all(m.mail_args.endswith(" BODY=8BITMIME") for m in msgs)


LONG = (
    b"From: alice@example.org\r\nTo: bob@targetdomain1.com\r\nSubject: long lines\r\n"
    b"X-Long: " + b"h" * 1500 + b"\r\n"
    b"Date: Tue, 24 Nov 2026 19:17:12 +0000\r\nMessage-ID: <long@example.org>\r\n\r\n"
    + (bytes(range(33, 127)) * 60)[:5000]
    + b"\r\n"
    + b"."
    + b"d" * 1200
    + b"\r\nshort\r\n"
)


@pytest.mark.parametrize("flags", [(), ("-8",), ("-e",)], ids=["8bitmime", "7bit", "smtp"])
def test_long_lines_accepted_and_folded(
    tmp_path: Path, dns: DnsServer, flags: tuple[str, ...]
) -> None:
    port = free_port(HOP1)
    with (
        PostfixSink(HOP1, port, tmp_path / "dump", *flags) as sink,
        gateway(tmp_path, dns, port, free_port(MXHOST)) as gw,
    ):
        # 250 from the gateway (before: 552 5.6.0 "Message contains a line longer than 1000
        # bytes"); the local recipient's copy is not folded.
        send(gw, ["bob@targetdomain1.com", "alice@mail.example.org"], LONG, eight=False)
        gw.wait_log("to=<bob@targetdomain1.com>")
        [msg] = sink.wait_for(1, timeout=10)
        new = gw.maildir / "alice" / "new"
        deadline = time.monotonic() + 10
        while not any(new.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        [local] = list(new.iterdir())
        # Maildir files have LF line ends (as before); the long lines are whole.
        assert local.read_bytes().endswith(LONG.replace(b"\r\n", b"\n"))
    assert max(len(line) for line in msg.lines) == 998
    got = our_part(msg)
    assert got.replace(b"\r\n ", b"") == LONG  # nothing lost: only CRLF SPACE inserted
    assert got.count(b"\r\n ") == 1 + 5 + 1  # the X-Long: field, the 5000, the 1201 octets


def test_bounce_of_an_8bit_message_with_a_long_line(tmp_path: Path, dns: DnsServer) -> None:
    """Our own bounce goes through the same client: folded, and converted for a 7-bit hop."""
    mx_port = free_port(MXHOST)
    original = (
        "From: alice@example.org\r\nTo: gone@targetdomain1.com\r\nSubject: doomed\r\n"
        "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\nMessage-ID: <doomed@example.org>\r\n"
        "X-Long: " + "h" * 1500 + "\r\n\r\n"  # stays a header field: folded
        "Größe: " + "ß" * 2000 + "\r\n"
    ).encode()  # converted: quoted-printable lines
    with (
        SinkServer(HOP1, free_port(HOP1)) as hop1,
        PostfixSink(MXHOST, mx_port, tmp_path / "dump", "-8") as mx,
        gateway(tmp_path, dns, hop1.port, mx_port) as gw,
    ):
        hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
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


def test_long_line_limit_refusal_is_opt_in(tmp_path: Path, dns: DnsServer) -> None:
    gw = gateway(tmp_path, dns, free_port(HOP1), free_port(MXHOST))
    gw.config.write_text(
        gw.config.read_text().replace("[smtp]\n", "[smtp]\nmax_text_line = 1000\n")
    )
    with gw, gw.smtp(OUTSIDE) as s:
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail("alice@example.org", ["bob@targetdomain1.com"], LONG)
        assert err.value.smtp_code == 552
        assert b"line longer than 1000 bytes" in err.value.smtp_error
