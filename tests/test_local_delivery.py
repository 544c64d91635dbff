"""Local delivery: Maildir, mbox file append, program pipe."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailgate.delivery.local import (
    CHUNK,
    LfConverter,
    LocalDeliveryError,
    deliver_file,
    deliver_maildir,
)
from mailgate.delivery.pipe import deliver_program
from mailgate.reply import Reply
from mailgate.users import resolve_local_user
from tests.support.wait import wait_until

HOST = "gateway.example.com"
CONTENT = (
    b"Received: from client.example.net ([192.0.2.3])\r\n"
    b"\tby gateway.example.com with ESMTP id 6AOJL6hk004507\r\n"
    b"From: Alice <alice@example.net>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"From the start of a line\r\n"
    b">From already quoted\r\n"
    b" From not at line start\r\n"
    b"last line\r\n"
)


def spool_file(tmp_path: Path, content: bytes = CONTENT, name: str = "qf") -> tuple[Path, int]:
    env = json.dumps({"sender": "alice@example.net"}).encode()
    path = tmp_path / name
    path.write_bytes(env + b"\n" + content)
    return path, len(env) + 1


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- LfConverter


def run_converter(data: bytes, step: int, quote: bool) -> bytes:
    conv = LfConverter(quote_from=quote)
    out = b"".join(conv.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + conv.flush()


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 1000])
def test_converter_any_chunking(step: int) -> None:
    data = b"From a\r\nx\r\nFrom b\r\nFro\r\nFrom\r\n\r\nFrom \r\nbare\rcr\r\nFrom"
    assert run_converter(data, step, False) == lf(data)
    expected = b"".join(
        b">" + line if line.startswith(b"From ") else line
        for line in lf(data).splitlines(keepends=True)
    )
    assert run_converter(data, step, True) == expected


# --------------------------------------------------------------------------- users


def test_local_users(tmp_path: Path) -> None:
    """Who the local mailer delivers to: the name ``resolve_local_user`` gives, None for no
    one (routing asks it at RCPT and at delivery; ``deliver_maildir`` too)."""
    root = tmp_path / "maildir"
    root.mkdir()
    (root / "folderonly").mkdir()
    assert resolve_local_user("root", root) == "root"  # system account
    assert resolve_local_user("Root", root) == "root"  # lower-case fallback
    assert resolve_local_user("ROOT", root) == "root"
    assert resolve_local_user("folderonly", root) == "folderonly"
    assert resolve_local_user("FolderOnly", root) == "folderonly"
    assert resolve_local_user("nosuchuser-mg", root) is None
    for bad in ("", ".hidden", "..", "a/b", "a\0b", "x" * 300):
        assert resolve_local_user(bad, root) is None, bad


def test_exact_case_folder_wins(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    (root / "Mixed").mkdir(parents=True)
    (root / "mixed").mkdir()
    assert resolve_local_user("Mixed", root) == "Mixed"
    assert resolve_local_user("MIXED", root) == "mixed"


# --------------------------------------------------------------------------- Maildir


def maildir(tmp_path: Path, user: str, **kw: object) -> Path:
    src, off = spool_file(tmp_path)
    return deliver_maildir(
        user,
        tmp_path / "maildir",
        src,
        off,
        hostname=HOST,
        return_path=str(kw.get("return_path", "alice@example.net")),
        delivered_to=str(kw.get("delivered_to", f"{user}@{HOST}")),
    )


def test_maildir_delivery(tmp_path: Path) -> None:
    (tmp_path / "maildir" / "bob").mkdir(parents=True)
    final = maildir(tmp_path, "bob")
    box = tmp_path / "maildir" / "bob"
    assert final.parent == box / "new"
    for sub in ("tmp", "new", "cur"):
        assert (box / sub).is_dir()
    assert list((box / "tmp").iterdir()) == []
    data = final.read_bytes()
    assert b"\r" not in data
    assert data == (
        b"Return-Path: <alice@example.net>\nDelivered-To: bob@gateway.example.com\n" + lf(CONTENT)
    )
    # Unique name per the Maildir spec: <sec>.M<usec>P<pid>Q<n>.<host>
    sec, rest = final.name.split(".", 1)
    assert abs(int(sec) - time.time()) < 60
    assert rest.startswith("M") and f"P{os.getpid()}Q" in rest and rest.endswith("." + HOST)
    msg = mailbox.Maildir(box, create=False).get_message(final.name)
    assert msg["Subject"] == "hello"


def test_maildir_creates_folders_for_system_account(tmp_path: Path) -> None:
    final = maildir(tmp_path, "Root")  # passwd account, folder not there yet
    box = tmp_path / "maildir" / "root"
    assert final.parent == box / "new"
    for sub in (box, box / "tmp", box / "new", box / "cur"):
        assert stat.S_IMODE(sub.stat().st_mode) == 0o700
    assert stat.S_IMODE(final.stat().st_mode) == 0o600


def test_maildir_null_sender_and_header_injection(tmp_path: Path) -> None:
    (tmp_path / "maildir" / "bob").mkdir(parents=True)
    final = maildir(tmp_path, "bob", return_path="", delivered_to="bob@x\r\nX-Evil: 1")
    head = final.read_bytes().split(b"\n")[:3]
    assert head[0] == b"Return-Path: <>"
    assert head[1] == b"Delivered-To: bob@xX-Evil: 1"
    assert head[2].startswith(b"Received:")


def test_maildir_unique_names_many_deliveries(tmp_path: Path) -> None:
    (tmp_path / "maildir" / "bob").mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda _: maildir(tmp_path, "bob"), range(200)))
    assert len(set(paths)) == 200
    assert len(list((tmp_path / "maildir" / "bob" / "new").iterdir())) == 200


def test_maildir_large_message_streamed(tmp_path: Path) -> None:
    body = b"".join(b"line %06d\r\n" % i for i in range(30000))
    content = CONTENT + body
    assert len(content) > 3 * CHUNK
    src, off = spool_file(tmp_path, content)
    (tmp_path / "maildir" / "bob").mkdir(parents=True)
    final = deliver_maildir(
        "bob", tmp_path / "maildir", src, off, hostname=HOST, return_path="a@b", delivered_to="b@c"
    )
    assert final.read_bytes().endswith(lf(content))


def test_maildir_unknown_user_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(LocalDeliveryError) as exc:
        maildir(tmp_path, "nosuchuser-mg")
    assert not exc.value.temporary
    assert exc.value.reply.code == 550
    assert exc.value.reply.enhanced == "5.1.1"


def test_maildir_user_folder_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    root.mkdir()
    (root / "carol").write_text("not a maildir")
    assert resolve_local_user("carol", root) == "carol"
    with pytest.raises(LocalDeliveryError) as exc:
        maildir(tmp_path, "carol")
    assert exc.value.temporary
    assert exc.value.reply.code == 451
    assert (root / "carol").read_text() == "not a maildir"


def test_maildir_subfolder_is_a_file(tmp_path: Path) -> None:
    box = tmp_path / "maildir" / "dave"
    box.mkdir(parents=True)
    (box / "new").write_text("oops")
    with pytest.raises(LocalDeliveryError) as exc:
        maildir(tmp_path, "dave")
    assert exc.value.temporary
    assert list((box / "tmp").iterdir()) == []  # no stray temporary file left


def test_maildir_missing_source_is_temporary(tmp_path: Path) -> None:
    (tmp_path / "maildir" / "bob").mkdir(parents=True)
    with pytest.raises(LocalDeliveryError) as exc:
        deliver_maildir(
            "bob",
            tmp_path / "maildir",
            tmp_path / "gone",
            0,
            hostname=HOST,
            return_path="a@b",
            delivered_to="b@c",
        )
    assert exc.value.temporary
    assert list((tmp_path / "maildir" / "bob" / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- mbox file


def test_mbox_append_with_from_quoting(tmp_path: Path) -> None:
    src, off = spool_file(tmp_path)
    box = tmp_path / "mbox"
    deliver_file(box, src, off, return_path="alice@example.net")
    deliver_file(box, src, off, return_path="<>")
    data = box.read_bytes()
    assert b"\r" not in data
    first, second = data.split(b"\n\nFrom ", 1)
    assert first.startswith(b"From alice@example.net ")
    assert second.startswith(b"MAILER-DAEMON ")
    lines = first.split(b"\n")
    time.strptime(lines[0].split(b" ", 2)[2].decode(), "%a %b %d %H:%M:%S %Y")
    assert lines[1] == b"Return-Path: <alice@example.net>"
    assert b"\n>From the start of a line\n" in first
    assert b"\n>From already quoted\n" in first  # Sendmail (mboxo) leaves >From alone
    assert b"\n From not at line start\n" in first
    assert data.endswith(b"last line\n\n")
    msgs = list(mailbox.mbox(box, create=False))
    assert len(msgs) == 2
    assert msgs[0]["Subject"] == "hello"
    assert msgs[1]["Return-Path"] == "<>"


def test_mbox_message_without_final_newline(tmp_path: Path) -> None:
    src, off = spool_file(tmp_path, b"Subject: x\r\n\r\nno newline")
    box = tmp_path / "mbox"
    deliver_file(box, src, off, return_path="a@b")
    assert box.read_bytes().endswith(b"\nno newline\n\n")


def test_mbox_errors(tmp_path: Path) -> None:
    src, off = spool_file(tmp_path)
    with pytest.raises(LocalDeliveryError) as exc:
        deliver_file(tmp_path, src, off, return_path="a@b")  # a folder
    assert exc.value.temporary
    with pytest.raises(LocalDeliveryError) as exc:
        deliver_file(Path("relative/mbox"), src, off, return_path="a@b")
    assert exc.value.reply.is_permanent
    box = tmp_path / "mbox"
    deliver_file(box, src, off, return_path="a@b")
    before = box.read_bytes()
    with pytest.raises(LocalDeliveryError):
        deliver_file(box, tmp_path / "gone", 0, return_path="a@b")
    assert box.read_bytes() == before  # nothing half-written
    deliver_file(Path(os.devnull), src, off, return_path="a@b")


# --------------------------------------------------------------------------- program


def run_prog(tmp_path: Path, command: str, content: bytes = CONTENT, timeout: float = 10) -> None:
    src, off = spool_file(tmp_path, content)
    coro = deliver_program(
        command, src, off, sender="alice@example.net", recipient="bob@x.example", timeout=timeout
    )
    asyncio.run(coro)


def test_program_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_prog(tmp_path, f'echo "$SENDER $RECIPIENT" > {out}; cat >> {out}')
    assert out.read_bytes() == (
        b"alice@example.net bob@x.example\nReturn-Path: <alice@example.net>\n" + lf(CONTENT)
    )


def test_program_tempfail(tmp_path: Path) -> None:
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, "cat >/dev/null; echo 'try later' >&2; exit 75")
    assert exc.value.temporary
    assert exc.value.reply == Reply(450, "4.0.0", "Deferred: try later")


def test_program_failure_reports_first_stderr_line(tmp_path: Path) -> None:
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, "printf '\\nno such list\\nsecond\\n' >&2; exit 1")
    assert not exc.value.temporary
    assert exc.value.reply == Reply(554, "5.3.0", "unknown mailer error 1: no such list")


# Sendmail's sysexits.c texts; markfailure queues EX_OSERR, EX_IOERR and EX_TEMPFAIL only.
SYSEXITS = [
    (64, 500, "5.0.0", "Bad usage"),
    (65, 501, "5.6.0", "Data format error"),
    (66, 550, "5.3.0", "Cannot open input"),
    (67, 550, "5.1.1", "User unknown"),
    (68, 550, "5.1.2", "Host unknown"),
    (69, 554, "5.0.0", "Service unavailable"),
    (70, 554, "5.3.0", "Internal error"),
    (71, 451, "4.0.0", "Operating system error"),
    (72, 554, "5.3.5", "System file missing"),
    (73, 550, "5.0.0", "Can't create output"),
    (74, 451, "4.0.0", "I/O error"),
    (75, 450, "4.0.0", "Deferred"),
    (76, 554, "5.5.0", "Remote protocol error"),
    (77, 550, "5.0.0", "Insufficient permission"),
    (78, 554, "5.3.5", "Local configuration error"),
    (1, 554, "5.3.0", "unknown mailer error 1"),
    (3, 554, "5.3.0", "unknown mailer error 3"),
    (63, 554, "5.3.0", "unknown mailer error 63"),
    (79, 554, "5.3.0", "unknown mailer error 79"),
    (255, 554, "5.3.0", "unknown mailer error 255"),
]


@pytest.mark.parametrize(("status", "code", "enhanced", "text"), SYSEXITS)
def test_program_exit_status_means_what_it_means_to_sendmail(
    tmp_path: Path, status: int, code: int, enhanced: str, text: str
) -> None:
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, f"cat >/dev/null; exit {status}")
    assert exc.value.reply == Reply(code, enhanced, text)
    assert exc.value.temporary is (status in (71, 74, 75))


def test_program_not_reading_stdin(tmp_path: Path) -> None:
    big = CONTENT + b"x" * 100 + b"\r\n" * 1  # small header, then a large body
    big += b"".join(b"body line %07d\r\n" % i for i in range(200_000))
    assert len(big) > 2_000_000
    run_prog(tmp_path, "exit 0", content=big)
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, "head -c 10 >/dev/null; exit 75", content=big)
    assert exc.value.temporary


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans may wait long for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_program_timeout_kills_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, f"cat >/dev/null; sleep 30 & echo $! > {pidfile}; wait", timeout=0.5)
    assert time.monotonic() - start < 5
    assert exc.value.reply == Reply(451, "4.3.0", "mailer prog timed out after 0.5 s")
    pid = int(pidfile.read_text())
    wait_until(lambda: not _running(pid), "the program's background child to be killed", 2)


def test_program_killed_by_signal_is_temporary(tmp_path: Path) -> None:
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, "kill -TERM $$")
    assert exc.value.reply == Reply(451, "4.3.0", "mailer prog died with signal 15")


def test_program_background_child_does_not_hold_us(tmp_path: Path) -> None:
    # The grandchild keeps stderr open; the program's own exit status must decide promptly.
    start = time.monotonic()
    with pytest.raises(LocalDeliveryError) as exc:
        run_prog(tmp_path, "cat >/dev/null; sleep 4 & echo 'bad list' >&2; exit 2")
    assert time.monotonic() - start < 3
    assert exc.value.reply == Reply(554, "5.3.0", "unknown mailer error 2: bad list")
