"""The filters' changes to a received message (milter/message.py), on a real spool: header
positions as Postfix counts them, bare-LF folding made CRLF, envelope changes, a new body
streamed through a file, one filter's changes kept or dropped as a whole, and the rewritten
spool file committed under the same queue id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailgate.milter.message import EditError, MessageEdit, clean_value
from mailgate.queue.spool import Envelope, IncomingMessage, Recipient, Spool

OURS = (
    b"Received: from client.example.net ([192.0.2.1])\r\n"
    b"\tby gw.example (mailgate) with ESMTP id Q1; Tue, 24 Nov 2026 19:17:12 +0000\r\n"
)
HEADER = (
    b"From: <alice@example.org>\r\n"
    b"To: <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"X-Tag: one\r\n"
    b"X-Tag: two\r\n"
)
BODY = b"Hi Bob.\r\n\r\n.a line with a dot\r\n"


def incoming(spool: Spool, content: bytes, qid: str = "Q1") -> IncomingMessage:
    env = Envelope(qid, "alice@example.org", [Recipient("bob@example.net", "bob@example.net")], 0.0)
    msg = spool.open_incoming(env)
    msg.write(content)
    return msg


def edit_of(tmp_path: Path, content: bytes = OURS + HEADER + b"\r\n" + BODY) -> MessageEdit:
    spool = Spool(tmp_path / "spool", fsync="threads")
    return MessageEdit(incoming(spool, content), lambda d: d == "example.org")


def committed(edit: MessageEdit, spool: Spool) -> bytes:
    msg = edit.write(spool)
    queued = asyncio.run(spool.commit(msg))
    # The seal (CRC-32 and length of the whole content) matches what was written.
    assert Spool._sealed_qid(queued.path) == queued.envelope.qid
    return queued.path.read_bytes()[queued.offset :]


def fields(edit: MessageEdit) -> list[str]:
    return [f"{f.name}:{f.value}" for f in edit.fields]


def test_what_the_filters_see(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    assert [f.name for f in edit.visible_fields()] == ["From", "To", "Subject", "X-Tag", "X-Tag"]
    assert edit.visible_fields()[2].value == " hello"
    assert b"".join(edit.body_chunks(7)) == BODY
    assert [len(c) for c in edit.body_chunks(16)] == [16, 15]


def test_header_positions_as_postfix_counts_them(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    edit.insert_header(0, "DKIM-Signature", " v=1")  # above our Received:
    edit.insert_header(3, "X-Third", " 3")  # among all fields, ours included
    edit.change_header(2, "x-tag", " TWO")  # the 2nd X-Tag
    edit.change_header(0, "Subject", " changed")  # index 0 is 1
    edit.change_header(1, "X-Tag", "")  # empty: deleted
    edit.change_header(1, "Received", " no")  # ours is not counted: not found, so added
    edit.change_header(5, "X-None", "")  # nothing to delete
    edit.add_header("X-Last", " end")
    edit.commit()
    assert [f.split(":")[0] for f in fields(edit)] == [
        "DKIM-Signature",
        "Received",
        "From",
        "X-Third",
        "To",
        "Subject",
        "X-Tag",
        "Received",
        "X-Last",
    ]
    assert fields(edit)[5:7] == ["Subject: changed", "X-Tag: TWO"]


def test_folded_values_come_out_strict_crlf(tmp_path: Path) -> None:
    assert clean_value(" a;\n\tb;\r\n c;\rd\n\nBcc: x") == " a;\r\n\tb;\r\n c;\r\n\td\r\n\tBcc: x"
    assert clean_value(" v=1;\n\tb=ab\n\ncd\n") == " v=1;\r\n\tb=ab\r\n\tcd"  # bare LF only
    edit = edit_of(tmp_path)
    edit.begin()
    edit.add_header("X-Spamd-Result", " default: False [1.00 / 15.00];\n\tDATE_IN_PAST(1.00)")
    edit.commit()
    out = committed(edit, edit.msg.spool)
    head = out[: out.index(b"\r\n\r\n")]
    assert b"X-Spamd-Result: default: False [1.00 / 15.00];\r\n\tDATE_IN_PAST(1.00)" in head
    assert head.count(b"\n") == head.count(b"\r\n") and head.count(b"\r") == head.count(b"\r\n")


def test_bad_header_names_are_the_filter_s_fault(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    for name in ("", "Bad Name", "X:Y", "Ümlaut"):
        with pytest.raises(EditError):
            edit.add_header(name, " v")


def test_envelope_changes(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    edit.change_sender("<bounces@example.org>", "BODY=8BITMIME")
    edit.add_recipient("<carol@example.net>", "NOTIFY=NEVER")
    edit.add_recipient("BOB@example.net", "")  # already there: not twice
    edit.delete_recipient("<bob@example.net>")
    edit.commit()
    env = edit.envelope
    assert (env.sender, env.body_8bit) == ("bounces@example.org", True)
    assert [(r.address, r.notify) for r in env.recipients] == [("carol@example.net", "NEVER")]
    with pytest.raises(EditError):
        edit.add_recipient("<a b@example.net>", "")


def test_a_filter_s_changes_go_together_or_not_at_all(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    edit.add_header("X-Kept", " 1")
    edit.commit()
    edit.begin()
    edit.add_header("X-Dropped", " 2")
    edit.change_header(1, "Subject", " dropped")  # a field changed, then the change dropped
    edit.change_header(1, "X-Tag", "")
    edit.delete_recipient("<bob@example.net>")
    edit.replace_body(b"new body\n", edit.msg.spool)
    edit.rollback()
    assert [f.name for f in edit.fields][-1] == "X-Kept"
    assert b"".join(f.to_bytes() for f in edit.fields) == OURS + HEADER + b"X-Kept: 1\r\n"
    assert [r.address for r in edit.envelope.recipients] == ["bob@example.net"]
    assert b"".join(edit.body_chunks(100)) == BODY


def test_a_new_body_is_streamed_and_made_crlf(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    for chunk in (b"line one\n", b"line two\r", b"\nline three\r", b"line four"):
        edit.replace_body(chunk, edit.msg.spool)
    edit.commit()
    assert b"".join(edit.body_chunks(5)) == b"line one\r\nline two\r\nline three\r\nline four\r\n"
    out = committed(edit, edit.msg.spool)
    assert out.endswith(b"\r\n\r\nline one\r\nline two\r\nline three\r\nline four\r\n")


def test_the_rewrite_keeps_the_queue_id_and_every_untouched_byte(tmp_path: Path) -> None:
    """A big message (it spilled to its file) keeps its header fields byte for byte, and its
    body is copied in chunks into the new file of the same queue id."""
    body = b"".join(b"%08d " % i + b"x" * 90 + b"\r\n" for i in range(20_000))  # ~2 MB
    header = OURS + b"Subject: big\r\n  folded  oddly \r\n"
    edit = edit_of(tmp_path, header + b"\r\n" + body)
    spool = edit.msg.spool
    edit.begin()
    edit.add_header("X-Scanned", " yes")
    edit.commit()
    out = committed(edit, spool)
    assert out == header + b"X-Scanned: yes\r\n\r\n" + body
    assert (spool.queue / "Q1").exists() and not list(spool.incoming.glob(".body*"))


def test_a_message_still_in_its_buffer_is_edited_there(tmp_path: Path) -> None:
    """A small message (never spilled, no file yet) gets its new header section in its own
    buffer, no second message: the content, the seal and the unchanged envelope are right."""
    edit = edit_of(tmp_path)
    msg, spool = edit.msg, edit.msg.spool
    assert msg.fd is None
    line = bytes(msg.buf[: msg.offset])
    edit.begin()
    edit.add_header("X-Scanned", " yes")
    edit.insert_header(0, "DKIM-Signature", " v=1;\n\tb=abc")
    edit.commit()
    assert edit.write(spool) is msg and msg.fd is None
    assert bytes(msg.buf[: msg.offset]) == line
    expected = b"DKIM-Signature: v=1;\r\n\tb=abc\r\n" + OURS + HEADER
    expected += b"X-Scanned: yes\r\n\r\n" + BODY
    assert (msg.size, msg.read(0, msg.size)) == (len(expected), expected)
    queued = asyncio.run(spool.commit(msg))
    assert Spool._sealed_qid(queued.path) == "Q1"
    assert queued.path.read_bytes()[queued.offset :] == expected
    assert queued.envelope.recipients == [Recipient("bob@example.net", "bob@example.net")]


def test_a_changed_envelope_in_the_buffer(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    spool = edit.msg.spool
    edit.begin()
    edit.change_header(1, "Subject", " changed")
    edit.change_sender("<bounces@example.org>", "")
    edit.add_recipient("<carol@example.net>", "NOTIFY=NEVER")
    edit.commit()
    out = committed(edit, spool)
    assert out == OURS + HEADER.replace(b"hello", b"changed") + b"\r\n" + BODY
    with (spool.queue / "Q1").open("rb") as f:
        env = Envelope.from_line(f.readline())
    assert env.sender == "bounces@example.org"
    assert [r.address for r in env.recipients] == ["bob@example.net", "carol@example.net"]


def test_a_header_that_grows_the_buffer_past_its_bound_spills_it(tmp_path: Path) -> None:
    body = b"z" * 100 + b"\r\n"
    body *= (IncomingMessage.SPILL_AT - 2000) // len(body)
    edit = edit_of(tmp_path, OURS + HEADER + b"\r\n" + body)
    msg, spool = edit.msg, edit.msg.spool
    assert msg.fd is None
    edit.begin()
    edit.add_header("X-Report", " " + "r" * 4000)
    edit.commit()
    assert edit.write(spool) is msg
    assert msg.fd is not None and not msg.buf  # written out, as a write would have
    out = committed_msg(msg, spool)
    assert out == OURS + HEADER + b"X-Report: " + b"r" * 4000 + b"\r\n\r\n" + body


def test_a_spilled_message_is_copied_into_a_new_one(tmp_path: Path) -> None:
    body = b"q" * 1000 + b"\r\n"
    body *= 2 * IncomingMessage.SPILL_AT // len(body)
    edit = edit_of(tmp_path, OURS + HEADER + b"\r\n" + body)
    msg, spool = edit.msg, edit.msg.spool
    assert msg.fd is not None
    edit.begin()
    edit.add_header("X-Scanned", " yes")
    edit.commit()
    assert committed(edit, spool) == OURS + HEADER + b"X-Scanned: yes\r\n\r\n" + body
    assert msg.closed


def committed_msg(msg: IncomingMessage, spool: Spool) -> bytes:
    queued = asyncio.run(spool.commit(msg))
    assert Spool._sealed_qid(queued.path) == queued.envelope.qid
    return queued.path.read_bytes()[queued.offset :]


def test_a_headers_only_message_stays_one(tmp_path: Path) -> None:
    edit = edit_of(tmp_path, OURS + b"Subject: none\r\n")
    edit.begin()
    edit.add_header("X-A", " 1")
    edit.commit()
    assert committed(edit, edit.msg.spool) == OURS + b"Subject: none\r\nX-A: 1\r\n"


def test_the_header_cannot_grow_without_bound(tmp_path: Path) -> None:
    edit = edit_of(tmp_path)
    edit.begin()
    with pytest.raises(EditError, match="header section over"):
        for _ in range(10_000):
            edit.add_header("X-Junk", " " + "j" * 100)


def test_reading_back_spans_the_file_and_the_buffer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync="threads")
    content = bytes(range(256)) * 2048  # 512 KiB: part written out, part still buffered
    msg = incoming(spool, content)
    msg.write(b"tail")
    assert msg.fd is not None and msg.buf
    whole = content + b"tail"
    for pos, size in [(0, 10), (len(content) - 5, 20), (100, len(whole)), (len(whole), 5)]:
        assert msg.read(pos, size) == whole[pos : pos + size]
    handed = msg.hand_over()
    assert not msg.path.exists()
    assert handed.read(len(whole) - 8, 100) == whole[-8:]
    handed.close()
    assert handed.fd is None
