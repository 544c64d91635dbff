"""DSN generation: parsed back with the standard email package."""

from __future__ import annotations

import email
import email.policy
import io
import json
import re
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from mailgate.dsn import CHUNK, DsnRecipient, interval_text, write_dsn

HOST = "gateway.example.com"
QID = "6AOJL6hk004507"
NOW = 1_795_000_000.0
ARRIVAL = NOW - 5 * 3600

ORIGINAL = (
    b"Received: from client.example.net ([192.0.2.3])\r\n"
    b"\tby gateway.example.com with ESMTP id 6AOJL6hk004507\r\n"
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@targetdomain1.com\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Body line one\r\n"
    b"From the body\r\n"
    b"\r\n"
    b"last line\r\n"
)


def spool_file(tmp_path: Path, content: bytes) -> tuple[Path, int]:
    """A file laid out as the spool keeps it: envelope JSON line, then the content."""
    env = json.dumps({"sender": "alice@example.net", "rcpts": ["bob@targetdomain1.com"]}).encode()
    path = tmp_path / "qf"
    path.write_bytes(env + b"\n" + content)
    return path, len(env) + 1


BOB = DsnRecipient(
    address="bob@targetdomain1.com",
    original=None,
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@targetdomain1.com>... User unknown",
    remote_mta="[198.51.100.25]",
    last_attempt=NOW - 10,
    transcript=(
        ">>> RCPT To:<bob@targetdomain1.com>",
        "<<< 550 5.1.1 <bob@targetdomain1.com>... User unknown",
    ),
)


def make(tmp_path: Path, recipients: list[DsnRecipient], content: bytes = ORIGINAL, **kw) -> bytes:
    path, offset = spool_file(tmp_path, content)
    out = io.BytesIO()
    mid = write_dsn(
        out,
        hostname=HOST,
        queue_id=QID,
        arrival=ARRIVAL,
        client="[192.0.2.3]",
        sender="alice@example.net",
        recipients=recipients,
        original_path=path,
        original_offset=offset,
        now=NOW,
        **kw,
    )
    data = out.getvalue()
    assert f"Message-Id: {mid}\r\n".encode() in data
    return data


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def boundary_of(msg: Message) -> str:
    b = msg.get_boundary()
    assert b is not None
    return b


def part3_raw(data: bytes, msg: Message) -> bytes:
    """The exact bytes enclosed in part 3 (between its blank line and the closing delimiter)."""
    b = boundary_of(msg).encode()
    start = data.rindex(b"--" + b + b"\r\n")
    body_start = data.index(b"\r\n\r\n", start) + 4
    end = data.rindex(b"\r\n--" + b + b"--\r\n")
    return data[body_start:end]


def test_failure_dsn_headers(tmp_path: Path) -> None:
    data = make(tmp_path, [BOB])
    msg = parse(data)
    assert msg["From"] == f"Mail Delivery Subsystem <MAILER-DAEMON@{HOST}>"
    assert msg["To"] == "<alice@example.net>"
    assert msg["Subject"] == "Returned mail: see transcript for details"
    assert msg["Auto-Submitted"] == "auto-generated (failure)"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(rf"<\d{{14}}\.{QID}\.[0-9a-f]+@{re.escape(HOST)}>", msg["Message-Id"])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert boundary_of(msg) == f"{QID}.{int(NOW)}/{HOST}"


def test_every_line_ends_crlf(tmp_path: Path) -> None:
    data = make(tmp_path, [BOB])
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def test_three_parts_and_human_text(tmp_path: Path) -> None:
    msg = parse(make(tmp_path, [BOB]))
    parts = msg.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    text = parts[0].get_payload(decode=True).decode()
    lines = text.split("\r\n")
    assert lines[0].startswith("The original message was received at ")
    assert parsedate_to_datetime(lines[0].removeprefix("The original message was received at "))
    assert lines[1] == "from [192.0.2.3]"
    i = lines.index("   ----- The following addresses had permanent fatal errors -----")
    assert lines[i + 1] == "<bob@targetdomain1.com>"
    assert lines[i + 2] == "    (reason: 550 5.1.1 <bob@targetdomain1.com>... User unknown)"
    j = lines.index("   ----- Transcript of session follows -----")
    assert lines[j + 1 : j + 4] == [
        "... while talking to [198.51.100.25]:",
        ">>> RCPT To:<bob@targetdomain1.com>",
        "<<< 550 5.1.1 <bob@targetdomain1.com>... User unknown",
    ]
    assert "WARNING" not in text


def test_delivery_status_fields(tmp_path: Path) -> None:
    alias = DsnRecipient(
        address="carol@elsewhere.example",
        original="list@gateway.example.com",
        status="5.2.2",
        diagnostic="552 5.2.2 Mailbox full",
        remote_mta="mx.elsewhere.example",
    )
    msg = parse(make(tmp_path, [BOB, alias]))
    status = msg.get_payload()[1]
    blocks = status.get_payload()
    assert len(blocks) == 3
    per_msg, b1, b2 = blocks
    assert per_msg["Reporting-MTA"] == f"dns; {HOST}"
    assert per_msg["Received-From-MTA"] == "dns; [192.0.2.3]"
    assert parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == ARRIVAL
    assert b1["Final-Recipient"] == "rfc822; bob@targetdomain1.com"
    assert b1["X-Actual-Recipient"] is None
    assert b1["Action"] == "failed"
    assert b1["Status"] == "5.1.1"
    assert b1["Remote-MTA"] == "dns; [198.51.100.25]"
    assert b1["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@targetdomain1.com>... User unknown"
    assert parsedate_to_datetime(b1["Last-Attempt-Date"]).timestamp() == NOW - 10
    assert b2["Final-Recipient"] == "rfc822; list@gateway.example.com"
    assert b2["X-Actual-Recipient"] == "rfc822; carol@elsewhere.example"
    assert b2["Status"] == "5.2.2"
    assert b2["Remote-MTA"] == "dns; mx.elsewhere.example"
    assert b2["Last-Attempt-Date"] is None
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "<carol@elsewhere.example>\r\n    (expanded from: <list@gateway.example.com>)" in text


def test_original_included_byte_exact(tmp_path: Path) -> None:
    data = make(tmp_path, [BOB])
    msg = parse(data)
    inner = msg.get_payload()[2].get_payload()[0]
    assert inner["Subject"] == "hello"
    assert part3_raw(data, msg) == ORIGINAL


def test_large_original_streamed_exact(tmp_path: Path) -> None:
    body = b"".join(b"line %06d of a long message body\r\n" % i for i in range(12000))
    original = ORIGINAL + body
    assert len(original) > 4 * CHUNK
    data = make(tmp_path, [BOB], content=original)
    assert part3_raw(data, parse(data)) == original


def test_headers_only(tmp_path: Path) -> None:
    data = make(tmp_path, [BOB], return_headers_only=True)
    msg = parse(data)
    part = msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    headers = ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
    assert part3_raw(data, msg) == headers
    assert b"Body line one" not in data


@pytest.mark.parametrize("shift", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_headers_only_blank_line_across_chunks(tmp_path: Path, shift: int) -> None:
    # Put the header/body separator exactly around the 64 KiB read boundary.
    first = b"Subject: x\r\n"
    filler_len = CHUNK + shift - len(first) - len(b"X-Fill: \r\n")
    headers = first + b"X-Fill: " + b"a" * filler_len + b"\r\n"
    original = headers + b"\r\nbody\r\n"
    data = make(tmp_path, [BOB], content=original, return_headers_only=True)
    assert part3_raw(data, parse(data)) == headers


def test_headers_only_without_body_and_without_headers(tmp_path: Path) -> None:
    only = b"Subject: no body\r\n"
    data = make(tmp_path, [BOB], content=only, return_headers_only=True)
    assert part3_raw(data, parse(data)) == only
    data = make(tmp_path, [BOB], content=b"\r\njust a body\r\n", return_headers_only=True)
    assert part3_raw(data, parse(data)) == b""


def test_delay_warning(tmp_path: Path) -> None:
    late = DsnRecipient(
        address="bob@targetdomain1.com",
        original=None,
        status="4.4.1",
        diagnostic=None,
        remote_mta=None,
        action="delayed",
    )
    data = make(tmp_path, [late], warning_after=4 * 3600)
    msg = parse(data)
    assert msg["Subject"] == "Warning: could not send message for past 4 hours"
    assert msg["Auto-Submitted"].startswith("auto-generated")
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "THIS IS A WARNING MESSAGE ONLY" in text
    assert "   ----- The following addresses had transient non-fatal errors -----" in text
    assert "permanent fatal errors" not in text
    assert "Warning: message still undelivered after 4 hours" in text
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Diagnostic-Code"] is None
    assert block["Remote-MTA"] is None


def test_a_delay_warning_says_until_when_it_is_tried(tmp_path: Path) -> None:
    until = NOW + 4 * 86400
    late = DsnRecipient(
        "b@x.example", None, "4.4.7", None, None, action="delayed", retry_until=until
    )
    block = parse(make(tmp_path, [late], warning_after=4 * 3600)).get_payload()[1].get_payload()[1]
    assert parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until


def test_an_expired_message_says_so_as_sendmail(tmp_path: Path) -> None:
    """The bounce of a message given up in the queue (4.4.7, failed) says for how long it
    could not be delivered, and that it leaves the queue; Will-Retry-Until is a delay's."""
    expired = DsnRecipient(
        "b@x.example",
        None,
        "4.4.7",
        "Deferred: Connection refused by [192.0.2.1]",
        None,
        retry_until=NOW,
    )
    msg = parse(make(tmp_path, [expired]))
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "Message could not be delivered for 5 hours\r\nMessage will be deleted from queue" in (
        text
    )
    assert msg.get_payload()[1].get_payload()[1]["Will-Retry-Until"] is None
    assert "Message could not be delivered" not in (
        parse(make(tmp_path, [BOB])).get_payload()[0].get_payload(decode=True).decode()
    )


def test_delay_hours_default_from_age(tmp_path: Path) -> None:
    late = DsnRecipient("b@x.example", None, "4.4.1", None, None, action="delayed")
    msg = parse(make(tmp_path, [late]))
    assert msg["Subject"] == "Warning: could not send message for past 5 hours"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1800, "30 minutes"),
        (3600, "1 hour"),
        (4 * 3600, "4 hours"),
        (5400, "1 hour, 30 minutes"),
        (86400 + 12 * 3600, "1 day, 12 hours"),
        (8 * 86400 + 61, "1 week, 1 day, 1 minute, 1 second"),
        (1, "1 second"),
        (0.2, "zero seconds"),
    ],
)
def test_interval_text_is_sendmails(seconds: float, text: str) -> None:
    assert interval_text(seconds) == text


def test_delay_under_an_hour_says_minutes(tmp_path: Path) -> None:
    late = DsnRecipient("b@x.example", None, "4.4.1", None, None, action="delayed")
    msg = parse(make(tmp_path, [late], warning_after=1800))
    assert msg["Subject"] == "Warning: could not send message for past 30 minutes"
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    assert "Warning: message still undelivered after 30 minutes" in text


def test_mixed_failed_and_delayed_is_a_failure(tmp_path: Path) -> None:
    late = DsnRecipient("c@x.example", None, "4.4.1", None, None, action="delayed")
    msg = parse(make(tmp_path, [BOB, late]))
    assert msg["Subject"] == "Returned mail: see transcript for details"
    actions = [b["Action"] for b in msg.get_payload()[1].get_payload()[1:]]
    assert actions == ["failed", "delayed"]


def test_multiline_remote_reply_is_flattened(tmp_path: Path) -> None:
    evil = DsnRecipient(
        address="bob@targetdomain1.com",
        original=None,
        status="5.7.1",
        diagnostic="550-5.7.1 first line\r\n550 5.7.1 second\rline\nInjected: yes " + "w" * 200,
        remote_mta="mx.example\r\nX-Evil: 1",
    )
    data = make(tmp_path, [evil])
    msg = parse(data)
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Injected"] is None
    assert block["X-Evil"] is None
    diag = " ".join(block["Diagnostic-Code"].split())
    assert diag.startswith("smtp; 550-5.7.1 first line 550 5.7.1 second line Injected: yes")
    assert b"\n" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


def test_boundary_collision_avoided(tmp_path: Path) -> None:
    guessed = f"--{QID}.{int(NOW)}/{HOST}".encode()
    original = ORIGINAL + guessed + b"\r\nContent-Type: text/plain\r\n\r\nforged\r\n"
    data = make(tmp_path, [BOB], content=original)
    msg = parse(data)
    assert boundary_of(msg) != guessed[2:].decode()
    assert boundary_of(msg).startswith(guessed[2:].decode())
    assert len(msg.get_payload()) == 3
    assert part3_raw(data, msg) == original


def test_null_sender_refused(tmp_path: Path) -> None:
    path, offset = spool_file(tmp_path, ORIGINAL)
    with pytest.raises(ValueError):
        write_dsn(
            io.BytesIO(),
            hostname=HOST,
            queue_id=QID,
            arrival=ARRIVAL,
            client="[192.0.2.3]",
            sender="",
            recipients=[BOB],
            original_path=path,
            original_offset=offset,
        )


def test_xtext_round_trip_and_orcpt() -> None:
    from mailgate.smtp import dsn_params

    for text in ("bob@example.org", "a+b=c d@x", "caf\u00e9@x", "\x01\x7f"):
        encoded = dsn_params.xtext_encode(text)
        assert dsn_params._XTEXT.fullmatch(encoded), encoded
        if text.isascii():
            assert dsn_params.xtext_decode(encoded) == text
    assert dsn_params.xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert dsn_params.orcpt_for(None, "Bob@X.org") == "rfc822;Bob@X.org"
    assert dsn_params.orcpt_for("rfc822;given", "Bob@X.org") == "rfc822;given"
    assert dsn_params.orcpt_for(None, "caf\u00e9@x") is None  # not ASCII: no rfc822 ORCPT
    assert dsn_params.orcpt_text("rfc822;a+2Bb@x") == "rfc822;a+b@x"
