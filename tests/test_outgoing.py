"""What SmtpClient sends after DATA: long lines folded, 8-bit content converted for a server
without 8BITMIME (against the loopback SinkServer); streaming, with bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from pathlib import Path
from typing import Any

from mailgate.smtp.body import OutgoingContent
from mailgate.smtp.client import CHUNK, SmtpClient, Timeouts
from mailgate.smtp.downgrade import plan_for
from tests.support.mime import head_body, qp_decode
from tests.support.sink import SinkServer

FAST = Timeouts().scaled(0.05)
ENVELOPE = b'{"qid": "x"}\n'

# The last line is 900 octets: long, but not folded.
EIGHT_BIT = (
    "Subject: Grüße\r\nFrom: a@example.org\r\n\r\n"
    "Grüße aus Köln.\r\n.Zeile mit Punkt\r\n.\r\n" + "ü" * 450 + "\r\n"
).encode()


def spool(tmp_path: Path, body: bytes) -> tuple[Path, int]:
    path = tmp_path / "df"
    path.write_bytes(ENVELOPE + body)
    return path, len(ENVELOPE)


def send(sink: SinkServer, path: Path, offset: int, **kw: Any) -> tuple[Any, list[str]]:
    lines: list[str] = []

    async def go() -> Any:
        client = await SmtpClient.connect(
            sink.host,
            sink.port,
            helo_name="gw.example.com",
            timeouts=kw.pop("timeouts", FAST),
            transcript=lines.append,
        )
        try:
            return await client.send("a@example.org", ["b@example.com"], path, offset, **kw)
        finally:
            await client.quit()

    return asyncio.run(go()), lines


def test_8bit_to_a_server_without_8bitmime(tmp_path: Path) -> None:
    path, offset = spool(tmp_path, EIGHT_BIT)
    with SinkServer() as sink:
        sink.eightbitmime = False
        res, lines = send(sink, path, offset, size=len(EIGHT_BIT), body_8bit=True)
        assert res.rcpt[0].reply.code == 250
        [msg] = sink.wait_for(1, timeout=5)
    # No BODY= (not offered); SIZE is the size as queued, as Postfix sends it.
    assert msg.mail_options == [f"SIZE={len(EIGHT_BIT)}"]
    head, body = head_body(msg.data)
    assert body.isascii()  # the Subject keeps its 8-bit octets, as Postfix sends them
    assert head == (
        "Subject: Grüße\r\nFrom: a@example.org\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    assert qp_decode(body) == head_body(EIGHT_BIT)[1]
    # The dots were stuffed after the conversion: the sink unstuffed them back.
    assert b"\r\n.Zeile mit Punkt\r\n=2E\r\n" in body
    assert "--- no 8BITMIME here: 8-bit MIME parts sent as quoted-printable" in lines


def test_8bit_to_a_server_with_8bitmime_is_unchanged(tmp_path: Path) -> None:
    path, offset = spool(tmp_path, EIGHT_BIT)
    with SinkServer() as sink:
        send(sink, path, offset, size=len(EIGHT_BIT), body_8bit=True)
        [msg] = sink.wait_for(1, timeout=5)
    assert msg.mail_options == [f"SIZE={len(EIGHT_BIT)}", "BODY=8BITMIME"]
    assert msg.data == EIGHT_BIT


def test_seven_bit_content_claiming_8bitmime(tmp_path: Path) -> None:
    body = b"Subject: s\r\n\r\nonly ASCII = here\r\n"
    path, offset = spool(tmp_path, body)
    with SinkServer() as sink:
        sink.eightbitmime = False
        _, lines = send(sink, path, offset, size=len(body), body_8bit=True)
        [msg] = sink.wait_for(1, timeout=5)
    assert msg.mail_options == [f"SIZE={len(body)}"] and msg.data == body
    assert not any(line.startswith("---") for line in lines)


def test_without_ehlo_8bit_is_converted(tmp_path: Path) -> None:
    path, offset = spool(tmp_path, EIGHT_BIT)
    with SinkServer() as sink:
        sink.ehlo_supported = False
        send(sink, path, offset, body_8bit=True)
        [msg] = sink.wait_for(1, timeout=5)
    assert msg.mail_options == [] and head_body(msg.data)[1].isascii()
    assert qp_decode(head_body(msg.data)[1]) == head_body(EIGHT_BIT)[1]


def test_long_lines_folded_for_every_server(tmp_path: Path) -> None:
    body = (
        b"Subject: "
        + b"s" * 1500
        + b"\r\n\r\n"
        + b"x" * 5000
        + b"\r\n"
        + b"."
        + b"y" * 2500
        + b"\r\n"
    )
    path, offset = spool(tmp_path, body)
    with SinkServer() as sink:
        for eight in (True, False):
            sink.eightbitmime = eight
            send(sink, path, offset, size=len(body))
        send(sink, path, offset, line_limit=0)  # folding off: as it is
        folded, folded7, raw = sink.wait_for(3, timeout=5)
    for msg in (folded, folded7):
        assert max(len(line) for line in msg.data.split(b"\r\n")) == 998
        assert msg.data.replace(b"\r\n ", b"") == body
        assert msg.mail_options[0] == f"SIZE={len(body)}"
    assert raw.data == body


def test_large_8bit_message_streams_with_bounded_memory(tmp_path: Path) -> None:
    line = "Größe und Maß, äöü ÄÖÜ ß. ".encode() * 3 + b"\r\n"
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.write(
            ENVELOPE + b"Subject: big\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        )
        block = line * 1000
        for _ in range(8 * 1024 * 1024 // len(block)):
            f.write(block)
        f.write(b"--b--\r\n")
    # What should arrive: the transforms run here over the file, block by block too.
    expect = hashlib.sha256()
    message = path.read_bytes()[len(ENVELOPE) :]
    content = OutgoingContent(line_limit=998, plan=plan_for(message))
    for i in range(0, len(message), CHUNK):
        expect.update(content.feed(message[i : i + CHUNK]))
    expect.update(content.end())
    del message
    with SinkServer() as sink:
        sink.discard_data = True
        sink.eightbitmime = False

        async def go() -> tuple[Any, int]:
            client = await SmtpClient.connect(
                sink.host, sink.port, helo_name="gw", timeouts=Timeouts().scaled(0.2)
            )
            tracemalloc.start()
            try:
                res = await client.send(
                    "a@example.org", ["b@example.com"], path, len(ENVELOPE), body_8bit=True
                )
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await client.quit()
            return res, peak

        res, peak = asyncio.run(go())
        assert res.rcpt[0].reply.code == 250
        [msg] = sink.wait_for(1, timeout=30)
    assert msg.sha256 == expect.hexdigest()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"
