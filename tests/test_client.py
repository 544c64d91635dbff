"""SmtpClient tests against the loopback SinkServer (and tiny scripted servers for misbehaviour)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from mailgate.reply import Reply
from mailgate.smtp.client import CHUNK, SmtpClient, SmtpClientError, Timeouts
from tests.support.sink import SinkServer
from tests.support.world import SinkFactory

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
FAST = Timeouts().scaled(0.01)  # 0.3 s connect, 3 s per command: every wait is bounded
ENVELOPE = b"queue-envelope-header: x\nsender: a@example.org\n\n"


@pytest.fixture
def sink(make_sink: SinkFactory) -> SinkServer:
    return make_sink("127.0.0.1")


def spool(tmp_path: Path, body: bytes, name: str = "df") -> tuple[Path, int]:
    """A spool file: our envelope header, then the message; returns (path, offset)."""
    path = tmp_path / name
    path.write_bytes(ENVELOPE + body)
    return path, len(ENVELOPE)


async def connect(sink: SinkServer, **kw: Any) -> SmtpClient:
    kw.setdefault("timeouts", FAST)
    return await SmtpClient.connect(sink.host, sink.port, helo_name="gw.example.com", **kw)


async def deliver(sink: SinkServer, path: Path, offset: int, rcpts: list[str], **kw: Any) -> Any:
    client = await connect(sink)
    try:
        return await client.send("a@example.org", rcpts, path, offset, **kw)
    finally:
        await client.quit()


BODY = b"Subject: test\r\nFrom: a@example.org\r\n\r\nBodyText\r\n.leading dot\r\n.\r\n..\r\nend\r\n"


@pytest.mark.parametrize("pipelining", [False, True])
def test_send(sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool) -> None:
    sink.pipelining = pipelining
    path, offset = spool(tmp_path, BODY)
    lines: list[str] = []

    async def go() -> Any:
        client = await connect(sink, transcript=lines.append)
        assert client.esmtp and client.pipelining == pipelining
        assert client.greeting.code == 220
        assert client.peer == (sink.host, sink.port)
        res = await client.send("a@example.org", ["b@example.com", "c@example.com"], path, offset)
        await client.quit()
        assert client.closed
        return res

    res = run(go())
    assert res.mail_reply.code == 250
    # Both accepted: each recipient's reply is the end-of-data reply.
    assert [(r.address, r.reply) for r in res.rcpt] == [
        ("b@example.com", Reply(250, "2.0.0", "Ok: queued")),
        ("c@example.com", Reply(250, "2.0.0", "Ok: queued")),
    ]
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.data == BODY  # byte-exact after the sink's dot-unstuffing
    assert msg.mail_from == "a@example.org"
    assert msg.rcpt_tos == ["b@example.com", "c@example.com"]
    assert msg.helo == "gw.example.com"
    assert msg.pipelined is pipelining
    assert sink.transactions[0].pipelined is pipelining
    # Sendmail-style transcript, without the body.
    assert ">>> EHLO gw.example.com" in lines
    assert ">>> MAIL From:<a@example.org>" in lines
    assert ">>> RCPT To:<b@example.com>" in lines
    assert "<<< 250 2.1.5 Ok" in lines
    assert ">>> ." in lines
    assert not any("BodyText" in line or "leading dot" in line for line in lines)


def test_helo_fallback(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    sink.ehlo_supported = False
    path, offset = spool(tmp_path, BODY)

    async def go() -> Any:
        client = await connect(sink)
        assert not client.esmtp and client.extensions == {}
        res = await client.send("a@example.org", ["b@example.com"], path, offset, size=99)
        await client.quit()
        return res

    res = run(go())
    assert [r.reply.code for r in res.rcpt] == [250]
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.data == BODY and msg.helo == "gw.example.com"
    assert sink.commands[:3] == [
        "EHLO gw.example.com",
        "HELO gw.example.com",
        "MAIL From:<a@example.org>",
    ]
    assert msg.mail_options == []  # no SIZE= to a server that did not offer it


@pytest.mark.parametrize(
    ("greeting", "first"),
    [
        ("220 sink.example Sendmail 8.17; ESMTP ready", "EHLO gw.example.com"),
        ("220-sink.example SMTP\r\n220 ESMTP on the second line", "EHLO gw.example.com"),
        ("220 sink.example SMTP ready", "HELO gw.example.com"),
        ("220 sink.example esmtp, but not in capitals", "HELO gw.example.com"),
    ],
)
def test_the_smtp_mailer_says_ehlo_only_to_an_esmtp_greeting(
    sink: SinkServer, run: Runner, greeting: str, first: str
) -> None:
    """Sendmail's smtp mailer (no F=a): EHLO when the word ESMTP is in the greeting, as its
    esmtp_check looks for it, else HELO and none of the extensions. The other SMTP mailers
    say EHLO whatever the greeting (esmtp's behaviour: test_helo_fallback)."""
    sink.greeting = greeting

    async def go() -> bool:
        client = await connect(sink, ehlo_if_esmtp=True)
        await client.quit()
        return client.esmtp

    assert run(go()) is first.startswith("EHLO")
    assert sink.commands[0] == first


@pytest.mark.parametrize("pipelining", [False, True])
def test_per_recipient_refusal(
    sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    sink.rcpt_reply["bad@example.com"] = "550 5.1.1 No such user"
    sink.rcpt_reply["later@example.com"] = "450 4.2.1 Mailbox busy"
    path, offset = spool(tmp_path, BODY)
    rcpts = ["good@example.com", "bad@example.com", "later@example.com", "good2@example.com"]
    res = run(deliver(sink, path, offset, rcpts))
    replies = {r.address: r.reply for r in res.rcpt}
    assert replies["bad@example.com"] == Reply(550, "5.1.1", "No such user")
    assert replies["later@example.com"].is_temporary
    assert (
        replies["good@example.com"]
        == replies["good2@example.com"]
        == Reply(250, "2.0.0", "Ok: queued")
    )
    assert [a for a, r in replies.items() if r.is_positive] == [
        "good@example.com",
        "good2@example.com",
    ]
    # the refusals are RCPT's (each its own to= line), the others the end of data's
    assert [r.at_rcpt for r in res.rcpt] == [False, True, True, False]
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.rcpt_tos == ["good@example.com", "good2@example.com"]


@pytest.mark.parametrize("pipelining", [False, True])
def test_data_refused_temporarily_and_connection_stays_usable(
    sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    sink.data_reply = "451 4.3.0 Try later"
    sink.rcpt_reply["bad@example.com"] = "550 5.1.1 No such user"
    path, offset = spool(tmp_path, BODY)

    async def go() -> tuple[Any, Any]:
        client = await connect(sink)
        first = await client.send(
            "a@example.org", ["b@example.com", "bad@example.com"], path, offset
        )
        sink.data_reply = None
        second = await client.send("a@example.org", ["b@example.com"], path, offset)
        await client.quit()
        return first, second

    first, second = run(go())
    assert first.rcpt[0].reply == Reply(451, "4.3.0", "Try later")  # the end-of-data reply
    assert first.rcpt[0].reply.is_temporary
    assert first.rcpt[1].reply.code == 550
    assert [r.at_rcpt for r in first.rcpt] == [False, True]
    assert second.rcpt[0].reply.code == 250
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.data == BODY and msg.connection == 1
    assert sink.connections == 1


@pytest.mark.parametrize("pipelining", [False, True])
def test_data_command_refused_then_rset_before_next(
    sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    sink.data_cmd_reply = "554 5.3.0 No content wanted"
    sink.rcpt_reply["bad@example.com"] = "550 5.1.1 No such user"
    path, offset = spool(tmp_path, BODY)

    async def go() -> tuple[Any, Any]:
        client = await connect(sink)
        first = await client.send(
            "a@example.org", ["b@example.com", "bad@example.com"], path, offset
        )
        sink.data_cmd_reply = None
        second = await client.send("a@example.org", ["b@example.com"], path, offset)
        await client.quit()
        return first, second

    first, second = run(go())
    assert first.rcpt[0].reply == Reply(554, "5.3.0", "No content wanted")  # DATA's refusal
    assert [r.reply.code for r in first.rcpt] == [554, 550]
    assert second.rcpt[0].reply.code == 250
    # The server may still hold the first transaction: it is reset before the second.
    assert (
        sink.commands.index("RSET")
        < [i for i, c in enumerate(sink.commands) if c.startswith("MAIL")][1]
    )
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.data == BODY


@pytest.mark.parametrize("pipelining", [False, True])
def test_no_recipient_accepted_sends_no_content(
    sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool
) -> None:
    sink.pipelining = pipelining
    sink.rcpt_reply["x@example.com"] = "550 5.1.1 No such user"
    sink.rcpt_reply["y@example.com"] = "451 4.4.0 Later"
    path, offset = spool(tmp_path, BODY)

    async def go() -> tuple[Any, Any]:
        client = await connect(sink)
        first = await client.send("a@example.org", ["x@example.com", "y@example.com"], path, offset)
        second = await client.send("a@example.org", ["ok@example.com"], path, offset)
        await client.quit()
        return first, second

    first, second = run(go())
    # No DATA phase: each recipient keeps its RCPT reply.
    assert [r.reply for r in first.rcpt] == [
        Reply(550, "5.1.1", "No such user"),
        Reply(451, "4.4.0", "Later"),
    ]
    assert [r.reply.code for r in first.rcpt] == [550, 451]
    assert second.rcpt[0].reply.code == 250  # still in step with the server
    assert len(sink.wait_for(1, timeout=5)) == 1
    assert sink.transactions[0].completed is False
    # Without PIPELINING no DATA is sent at all for the first transaction.
    data_cmds = [c for c in sink.commands if c == "DATA"]
    assert len(data_cmds) == (2 if pipelining else 1)


@pytest.mark.parametrize("pipelining", [False, True])
def test_mail_refused(sink: SinkServer, run: Runner, tmp_path: Path, pipelining: bool) -> None:
    sink.pipelining = pipelining
    sink.mail_reply = "553 5.1.8 Sender domain does not exist"
    path, offset = spool(tmp_path, BODY)

    async def go() -> tuple[Any, Any]:
        client = await connect(sink)
        first = await client.send("a@example.org", ["b@example.com", "c@example.com"], path, offset)
        sink.mail_reply = None
        second = await client.send("a@example.org", ["b@example.com"], path, offset)
        await client.quit()
        return first, second

    first, second = run(go())
    assert first.mail_reply == Reply(553, "5.1.8", "Sender domain does not exist")
    # No DATA phase: every recipient's reply is the MAIL refusal.
    assert all(r.reply == first.mail_reply for r in first.rcpt) and len(first.rcpt) == 2
    assert not any(r.at_rcpt for r in first.rcpt)  # no RCPT was sent: one line for both
    assert second.rcpt[0].reply.code == 250
    assert len(sink.wait_for(1, timeout=5)) == 1
    if not pipelining:
        assert "RCPT To:<c@example.com>" not in sink.commands


def test_connection_refused_is_temporary(run: Runner) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(SmtpClientError) as info:
        run(SmtpClient.connect("127.0.0.1", port, helo_name="gw", timeouts=FAST))
    assert info.value.temporary and info.value.stage == "connect" and info.value.reply is None


@pytest.mark.parametrize(
    ("greeting", "temporary"), [("554 5.3.2 Go away", False), ("421 busy", True)]
)
def test_greeting_refused(sink: SinkServer, run: Runner, greeting: str, temporary: bool) -> None:
    sink.greeting = greeting
    with pytest.raises(SmtpClientError) as info:
        run(connect(sink))
    assert info.value.stage == "greeting"
    assert info.value.temporary is temporary
    assert info.value.reply is not None and str(info.value.reply) == greeting


def test_greeting_timeout(sink: SinkServer, run: Runner) -> None:
    sink.delays["greeting"] = 3
    start = time.monotonic()
    with pytest.raises(SmtpClientError) as info:
        run(connect(sink, timeouts=Timeouts().scaled(0.001)))  # 0.3 s for the greeting
    assert time.monotonic() - start < 2
    assert info.value.temporary and info.value.stage == "greeting"


def test_peer_closing_mid_dialogue(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    sink.close_at = "rcpt"
    path, offset = spool(tmp_path, BODY)

    async def go() -> SmtpClient:
        client = await connect(sink)
        with pytest.raises(SmtpClientError) as info:
            await client.send("a@example.org", ["b@example.com"], path, offset)
        assert info.value.temporary
        return client

    assert run(go()).closed


def test_421_on_rcpt_fails_the_connection(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    sink.rcpt_reply["b@example.com"] = "421 4.3.2 Shutting down"
    path, offset = spool(tmp_path, BODY)
    with pytest.raises(SmtpClientError) as info:
        run(deliver(sink, path, offset, ["a@example.com", "b@example.com"]))
    assert info.value.reply is not None and info.value.reply.code == 421
    assert info.value.temporary and info.value.stage == "rcpt"


async def scripted(replies: list[bytes]) -> tuple[asyncio.Server, int]:
    """A server that sends replies[0] at once, then one reply per line received."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(replies[0])
        for reply in replies[1:]:
            if not await reader.readline():
                break
            writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "greeting",
    [b"hello there\r\n", b"220-" + b"x" * 5000 + b"\r\n220 ok\r\n", b"220-a\r\n230 b\r\n", b""],
    ids=["garbage", "too-long", "mixed-codes", "closed"],
)
def test_bad_greeting(run: Runner, greeting: bytes) -> None:
    async def go() -> None:
        server, port = await scripted([greeting])
        async with server:
            await SmtpClient.connect("127.0.0.1", port, helo_name="gw", timeouts=FAST)

    with pytest.raises(SmtpClientError) as info:
        run(go())
    assert info.value.temporary and info.value.stage == "greeting"


def test_multiline_reply_and_lenient_long_line(run: Runner) -> None:
    long_text = "y" * 2000  # over RFC 5321's 512, under our 4096
    script = [
        b"220-mx.example.com ESMTP\r\n220 second line\r\n",
        b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
        f"250-2.0.0 first\r\n250 2.0.0 {long_text}\r\n".encode(),
    ]

    async def go() -> tuple[SmtpClient, Reply]:
        server, port = await scripted(script)
        async with server:
            client = await SmtpClient.connect("127.0.0.1", port, helo_name="gw", timeouts=FAST)
            reply = await client._command("NOOP", 1, "noop")
            await client.close()
            return client, reply

    client, reply = run(go())
    assert client.greeting == Reply(220, None, "mx.example.com ESMTP\nsecond line")
    assert client.extensions == {"PIPELINING": "", "SIZE": "1000000", "8BITMIME": ""}
    assert client.size_limit == 1_000_000
    assert reply == Reply(250, "2.0.0", f"first\n{long_text}")


def test_mail_parameters(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)
    run(deliver(sink, path, offset, ["b@example.com"], size=len(BODY), body_8bit=True))
    sink.eightbitmime = False
    sink.size = None
    run(deliver(sink, path, offset, ["b@example.com"], size=len(BODY), body_8bit=True))
    first, second = sink.wait_for(2, timeout=5)
    assert first.mail_options == [f"SIZE={len(BODY)}", "BODY=8BITMIME"]
    assert second.mail_options == []  # not offered: not sent (and no downgrade)
    assert second.data == BODY


def test_smtputf8(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)
    res = run(deliver(sink, path, offset, ["b@example.com", "c@example.com"], smtputf8=True))
    assert all(
        r.reply == Reply(553, "5.6.7", "Remote server does not support SMTPUTF8") for r in res.rcpt
    )
    assert res.rcpt[0].reply.is_permanent
    assert not any(c.startswith("MAIL") for c in sink.commands)
    sink.smtputf8 = True

    async def utf8() -> Any:
        client = await connect(sink)
        res = await client.send("ä@example.org", ["ö@bücher.example"], path, offset, smtputf8=True)
        await client.quit()
        return res

    res = run(utf8())
    assert res.rcpt[0].reply.code == 250
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.mail_options == ["SMTPUTF8"] and msg.rcpt_tos == ["ö@bücher.example"]


def test_size_over_remote_limit_fails_without_sending(
    sink: SinkServer, run: Runner, tmp_path: Path
) -> None:
    sink.size = 100
    path, offset = spool(tmp_path, BODY)
    res = run(deliver(sink, path, offset, ["b@example.com"], size=1000))
    assert res.rcpt[0].reply.code == 552 and res.rcpt[0].reply.enhanced == "5.3.4"
    assert not any(c.startswith("MAIL") for c in sink.commands)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no final newline",
        b".",
        b"line\r\n.",
        b".\r\n",
        b"\r\n.\r\n.\r\n",
        b"a\r\n..\r\n...\r\n. \r\n",
    ],
)
def test_dot_stuffing_and_final_crlf(
    sink: SinkServer, run: Runner, tmp_path: Path, body: bytes
) -> None:
    path, offset = spool(tmp_path, body)
    res = run(deliver(sink, path, offset, ["b@example.com"]))
    assert res.rcpt[0].reply.code == 250
    [msg] = sink.wait_for(1, timeout=5)
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert msg.data == expected


def body_with_split(before: bytes, after: bytes) -> bytes:
    """A body whose first CHUNK bytes end with ``before`` and whose rest starts with ``after``."""
    filler = (b"x" * 78 + b"\r\n") * (CHUNK // 80 + 1)
    head = filler[: CHUNK - len(before)]
    if head.endswith(b"\r"):
        head = head[:-1] + b"x"  # keep the filler's own line ends intact
    return head + before + after + b"more\r\n.\r\nend\r\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"\r\n", b".dot line\r\n"),  # a line starting with "." opens the second chunk
        (b"\r\n", b".\r\n"),  # a lone dot line there: must not end the data early
        (b"\r", b"\n.dot line\r\n"),  # CRLF split across the chunks
        (b"\r\n.", b"dot line\r\n"),  # the dot is the chunk's last byte
        (b"\r\n.", b"\r\n"),  # a lone dot line split after the dot
    ],
    ids=["dot-first", "lone-dot-first", "cr|lf-dot", "dot-last", "lone-dot-last"],
)
def test_dot_stuffing_at_chunk_boundary(
    sink: SinkServer, run: Runner, tmp_path: Path, before: bytes, after: bytes
) -> None:
    body = body_with_split(before, after)
    assert body[:CHUNK].endswith(before) and body[CHUNK:].startswith(after)
    path, offset = spool(tmp_path, body)
    res = run(deliver(sink, path, offset, ["b@example.com"]))
    assert res.rcpt[0].reply.code == 250
    [msg] = sink.wait_for(1, timeout=5)
    assert msg.data == body


def test_large_message_streams_with_bounded_memory(sink: SinkServer, tmp_path: Path) -> None:
    sink.discard_data = True  # the sink keeps a hash, so only the client's memory shows
    line = b"." + b"z" * 997 + b"\r\n"  # every line needs stuffing
    count = 20 * 1024 * 1024 // len(line)
    path = tmp_path / "big"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(ENVELOPE)
        block = line * 1024
        for _ in range(count // 1024):
            f.write(block)
            digest.update(block)
    size = path.stat().st_size - len(ENVELOPE)

    async def go() -> Any:
        client = await connect(sink, timeouts=Timeouts().scaled(0.1))
        tracemalloc.start()
        try:
            res = await client.send(
                "a@example.org", ["b@example.com"], path, len(ENVELOPE), size=size
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await client.quit()
        return res, peak

    start = time.monotonic()
    res, peak = asyncio.run(go())
    assert res.rcpt[0].reply.code == 250
    [msg] = sink.wait_for(1, timeout=10)
    assert msg.size == size and msg.sha256 == digest.hexdigest()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a {size} byte message"
    assert time.monotonic() - start < 15


def test_connection_reuse_with_reset(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    p1, o1 = spool(tmp_path, b"Subject: one\r\n\r\n1\r\n", "df1")
    p2, o2 = spool(tmp_path, b"Subject: two\r\n\r\n2\r\n", "df2")

    async def go() -> None:
        client = await connect(sink)
        r1 = await client.send("a@example.org", ["b@example.com"], p1, o1)
        await client.reset()
        r2 = await client.send("c@example.org", ["d@example.com"], p2, o2)
        await client.quit()
        assert r1.rcpt[0].reply.code == r2.rcpt[0].reply.code == 250

    run(go())
    m1, m2 = sink.wait_for(2, timeout=5)
    assert (m1.data, m2.data) == (b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n")
    assert m1.connection == m2.connection == 1 and sink.connections == 1
    assert "RSET" in sink.commands
    assert len(sink.transactions) == 2  # two transactions on the one connection


def test_source_address_and_other_loopback_host(run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)
    with SinkServer(host="127.0.0.5") as sink:
        res = run(deliver_from(sink, path, offset, "127.0.0.9"))
        assert res.rcpt[0].reply.code == 250
        [msg] = sink.wait_for(1, timeout=5)
        assert msg.peer == "127.0.0.9"


async def deliver_from(sink: SinkServer, path: Path, offset: int, source: str) -> Any:
    client = await connect(sink, source_address=source)
    res = await client.send("a@example.org", ["b@example.com"], path, offset)
    await client.quit()
    return res


def test_sink_restart_on_same_port(sink: SinkServer, run: Runner) -> None:
    port = sink.port
    sink.stop()
    with pytest.raises(SmtpClientError):
        run(connect(sink))
    sink.start()
    assert sink.port == port

    async def go() -> None:
        client = await connect(sink)
        await client.quit()

    run(go())
    assert sink.connections == 1


def test_timeouts_scaled() -> None:
    t = Timeouts().scaled(0.5)
    assert (t.connect, t.greeting, t.data_end) == (15, 150, 300)
    assert Timeouts().data_block == 180 and Timeouts().data_init == 120


def test_send_on_closed_connection(sink: SinkServer, run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)

    async def go() -> None:
        client = await connect(sink)
        await client.close()
        with pytest.raises(SmtpClientError):
            await client.send("a@example.org", ["b@example.com"], path, offset)

    run(go())


def test_pipelined_server_accepting_data_without_recipients(run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)
    script = [
        b"220 odd.example ESMTP\r\n",
        b"250-odd.example\r\n250 PIPELINING\r\n",  # EHLO
        b"250 2.1.0 Ok\r\n",  # MAIL
        b"550 5.1.1 No such user\r\n",  # RCPT
        b"354 go ahead anyway\r\n",  # DATA, wrongly
        b"554 5.5.1 No valid recipients\r\n",  # "." ends the empty content
        b"250 2.0.0 Ok\r\n",  # RSET before the next transaction
    ]
    lines: list[str] = []

    async def go() -> Any:
        server, port = await scripted(script)
        async with server:
            client = await SmtpClient.connect(
                "127.0.0.1", port, helo_name="gw", timeouts=FAST, transcript=lines.append
            )
            res = await client.send("a@example.org", ["x@example.com"], path, offset)
            await client.reset()
            await client.close()
            return res

    res = run(go())
    # The RCPT refusal stands, not the reply to the empty content's ".".
    assert res.rcpt[0].reply == Reply(550, "5.1.1", "No such user")
    assert ">>> ." in lines and not any("BodyText" in line for line in lines)
    assert lines[-1] == "<<< 250 2.0.0 Ok"  # still in step: the RSET got its own reply


def test_overlong_reply_line_mid_dialogue(run: Runner, tmp_path: Path) -> None:
    path, offset = spool(tmp_path, BODY)
    script = [b"220 x\r\n", b"250 x\r\n", b"250 " + b"z" * 70000 + b"\r\n"]

    async def go() -> SmtpClient:
        server, port = await scripted(script)
        async with server:
            client = await SmtpClient.connect("127.0.0.1", port, helo_name="gw", timeouts=FAST)
            with pytest.raises(SmtpClientError) as info:
                await client.send("a@example.org", ["b@example.com"], path, offset)
            assert info.value.temporary and info.value.stage == "mail"
            return client

    assert run(go()).closed
