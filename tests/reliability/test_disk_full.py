"""Disk full: the spool on a small tmpfs the test mounts, filled with mail and with filler files.

What must hold (issue 9, 4.3): while the spool's file system is low, clients get
``452 4.3.1 Insufficient system storage`` at MAIL or DATA (never ``421 Internal error``, never a
``250`` for a message that is not on disk); a write that finds the disk full mid-DATA, or a
commit that finds no room after the final dot, fails that message cleanly and the session goes
on; no corrupt or half-written entry, before or after a restart; nothing acknowledged is lost;
acceptance resumes by itself when space returns.

The tests mount a tmpfs (``mount -t tmpfs -o size=…``), so they need root, as the test machines
have; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import errno
import os
import smtplib
import subprocess
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailgate.config import ConfigError, parse_config
from mailgate.queue.spool import (
    Envelope,
    QueueStatus,
    RcptStatus,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    read_seal,
)
from tests.support.gateway import GatewayProcess, free_port
from tests.support.rawsmtp import RawSmtp
from tests.support.sink import SinkServer
from tests.support.wait import wait_until

KIB = 1024
MIB = 1024 * KIB
HOP = "127.0.0.5"  # targetdomain1.com's internal server (the sink)

Mount = Callable[[Path, int], Path]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """``mount(where, size)`` mounts a tmpfs of ``size`` bytes; all are unmounted at the end."""
    mounted: list[Path] = []

    def mount(where: Path, size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs for the spool needs root (the test machines are root)")
        where.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={size},mode=0700",
                    "mailgate-disk-full",
                    str(where),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except FileNotFoundError:
            pytest.skip("no mount command to mount a tmpfs for the spool")
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs was refused: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            if (
                subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode
                != 0
            ):
                # Still busy (a daemon that did not stop): detach it so nothing is left behind.
                subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full (ENOSPC); returns the bytes written."""
    chunk = b"\0" * (256 * KIB)
    total = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                total += os.write(fd, chunk)  # short at the very end, then ENOSPC
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return total
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_sealed(path: Path) -> bool:
    """The queue file is whole: the CRC and length in its envelope line match its content."""
    data = path.read_bytes()
    line, nl, content = data.partition(b"\n")
    seal = read_seal(line + nl)
    return bool(nl) and seal is not None and seal[:2] == (zlib.crc32(content), len(content))


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def make_gateway(tmp_path: Path, hop_port: int, settings: str = "") -> GatewayProcess:
    tables = {
        "mailertable": f"targetdomain1.com   smtp:[{HOP}]:{hop_port}\n",
        "access": "To:targetdomain1.com  RELAY\n",
    }
    return GatewayProcess(
        tmp_path / "gw",
        dns=None,
        tables=tables,
        settings=(
            '[queue]\nrun_interval = "2s"\nretry_min = "1s"\nmin_free = "1M"\n'
            '[delivery]\nconnect_timeout = "2s"\n'
            '[smtp]\ngreet_pause = "0s"\nbad_rcpt_throttle = 0\ncheck_sender_domain = false\n'
            'max_message_size = "8M"\n' + settings
        ),
    )


def message(msgid: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: <alice@example.org>\r\nTo: <bob@targetdomain1.com>\r\n"
        f"Subject: {msgid}\r\nMessage-ID: <{msgid}@example.org>\r\n\r\n"
    ).encode() + body


def message_id(data: bytes) -> str | None:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def test_min_free_setting() -> None:
    text = 'hostname = "gw.example.com"\n[queue]\nrun_interval = "30m"\nmin_free = "%s"\n'
    assert parse_config(text % "2G", None, Path("/")).queue.min_free == 2 * 1024**3
    assert parse_config(text.replace("min_free", "#"), None, Path("/")).queue.min_free == 100 * MIB
    with pytest.raises(ConfigError) as bad:
        parse_config(text % "lots", None, Path("/"))
    assert str(bad.value).startswith("<embedded default config>:4: queue.min_free: bad size")


# -- the spool itself ----------------------------------------------------------------------------


def envelope(spool: Spool) -> Envelope:
    return Envelope(
        qid=spool.new_qid(),
        sender="alice@example.org",
        recipients=[Recipient("bob@targetdomain1.com", "bob@targetdomain1.com")],
        arrival=time.time(),
        client_ip="192.0.2.1",
    )


def test_a_write_that_finds_the_disk_full_fails_the_message_cleanly(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """The bug: the failed pwrite left a memoryview on the write buffer alive (in the
    exception's traceback, which the session keeps), so the next write raised BufferError."""
    disk = tmpfs(tmp_path / "disk", 1 * MIB)
    spool = Spool(disk / "spool", fsync="threads")
    msg = spool.open_incoming(envelope(spool))
    failure: OSError | None = None
    for _ in range(64):  # 8 MiB: far more than the disk holds
        try:
            msg.write(b"x" * (128 * KIB))
        except OSError as exc:
            failure = exc  # kept, as the session keeps it until the end of the data
    assert failure is not None and failure.errno == errno.ENOSPC
    # The partial file is gone at once (its space is free for other messages) ...
    assert entries(spool.incoming) == []
    assert free_bytes(disk) > 900 * KIB
    # ... and the message can never be committed.
    with pytest.raises(SpoolError):
        asyncio.run(spool.commit(msg))
    assert entries(spool.incoming) == [] and entries(spool.queue) == []
    spool.close()


def test_commit_status_and_recovery_on_a_full_disk_leave_nothing_half_written(
    tmp_path: Path, tmpfs: Mount
) -> None:
    disk = tmpfs(tmp_path / "disk", 1 * MIB)
    spool = Spool(disk / "spool", fsync="threads")
    queued = spool.open_incoming(envelope(spool))
    queued.write(b"Subject: queued before the disk filled\r\n\r\nbody\r\n")
    asyncio.run(spool.commit(queued))
    qid = queued.envelope.qid
    sent = {"smtp:[192.0.2.9]:x@y": RcptStatus.SENT}
    spool.save_status(qid, QueueStatus({"x@y": RecipientState(targets=dict(sent))}, attempts=1))
    fill(disk / "filler")
    # A message that never spilled is written whole at commit: that write finds no room.
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"x" * (64 * KIB))
    with pytest.raises(SpoolError, match="No space left"):
        asyncio.run(spool.commit(msg))
    # A status that cannot be written leaves the old one as it was, and no .tmp.
    with pytest.raises(OSError) as failed:
        spool.save_status(
            qid, QueueStatus({"b@x": RecipientState(last_error="Deferred " * 1000)}, attempts=2)
        )
    assert failed.value.errno == errno.ENOSPC
    assert spool.load_status(qid).attempts == 1
    assert entries(spool.queue) == [qid, qid + ".st"]
    assert entries(spool.incoming) == []
    spool.close()
    # Start-up recovery on the full disk: the queued message, nothing moved aside.
    again = Spool(disk / "spool", fsync="threads")
    assert again.recover() == [qid]
    loaded = again.load(qid)
    assert loaded is not None and loaded.status.done_targets() == sent
    assert entries(again.corrupt) == [] and is_sealed(again.queue / qid)
    again.close()


# -- the daemon --------------------------------------------------------------------------------


def test_the_disk_filling_up_during_data_gets_452_and_the_session_goes_on(
    tmp_path: Path, tmpfs: Mount
) -> None:
    with SinkServer(HOP, free_port(HOP)) as sink:
        gw = make_gateway(tmp_path, sink.port)
        spool = tmpfs(gw.spool, 4 * MIB)
        with gw, RawSmtp(gw.host, gw.port) as c:
            assert c.read_reply().code == 220
            assert c.cmd("EHLO client.example.net").code == 250
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
            assert c.cmd("DATA").code == 354
            line = b"z" * 98 + b"\r\n"
            c.send(message("big") + line * 3000)  # 300 KB: the write buffer spills to disk

            def spilled() -> bool:
                return any(
                    p.stat().st_size >= 256 * KIB for p in spool.joinpath("incoming").iterdir()
                )

            wait_until(spilled, "the first part of the message is in its spool file", 20)
            filler = spool / "filler"
            fill(filler)
            # More content, with lines that would be commands if they were ever read as such.
            c.send(
                line * 3000
                + b"RSET\r\nMAIL FROM:<mallory@example.net>\r\nQUIT\r\n"
                + line * 3000
                + b".\r\n"
            )
            reply = c.read_reply()
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply.first
            assert "Insufficient system storage" in reply.text
            assert entries(spool / "incoming") == []  # the partial file is removed
            # The session goes on, and nothing of the content was taken as a command.
            reply = c.cmd("RSET")
            assert reply.first == "250 2.0.0 Reset state"
            assert c.pending(0.2) == b""
            # Still full: refused up front now.
            reply = c.cmd("MAIL FROM:<alice@example.org>")
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply.first
            # Space returns: acceptance resumes by itself, in the same session.
            filler.unlink()

            def accepted() -> bool:
                return c.cmd("MAIL FROM:<alice@example.org>").code == 250

            wait_until(accepted, "MAIL accepted again once the filler is gone", 20)
            assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(message("after") + b".\r\n")
            assert c.read_reply().code == 250
            assert c.cmd("QUIT").code == 221
            [got] = sink.wait_for(1, timeout=20)
            assert message_id(got.data) == "<after@example.org>"
            log = gw.log()
        assert "Internal error" not in log, log


def mail_code(s: smtplib.SMTP) -> int:
    """What MAIL gets now (a 250 is reset again): the daemon's view of the free space."""
    code, _text = s.mail("alice@example.org")
    if code == 250:
        s.rset()
    return code


def test_space_running_out_after_mail_gets_452_at_data_and_at_the_end_of_data(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """A transaction under way when the disk fills: DATA gets 452 and the transaction stays
    (DATA again once there is room); the content of a message that never spilled to disk is
    written at commit, and a commit that finds no room gets 452 after the ``.``: nothing is in
    the spool, nothing was acknowledged, and the client's retry, once space is back, arrives
    once."""
    with SinkServer(HOP, free_port(HOP)) as sink:
        gw = make_gateway(tmp_path, sink.port)
        spool = tmpfs(gw.spool, 4 * MIB)
        filler = spool / "filler"
        with gw, RawSmtp(gw.host, gw.port) as c, gw.smtp() as probe:
            probe.ehlo()
            assert c.read_reply().code == 220
            assert c.cmd("EHLO client.example.net").code == 250
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
            fill(filler)
            # Near the reserve each worker looks at every check: what the probe's worker sees
            # the client's sees (with workers, the two sessions are often in different ones).
            wait_until(lambda: mail_code(probe) == 452, "the daemon sees the disk full", 20)
            reply = c.cmd("DATA")
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply.first
            assert reply.first == "452 4.3.1 Insufficient system storage"
            filler.unlink()
            wait_until(lambda: mail_code(probe) == 250, "the daemon sees room again", 20)
            assert c.cmd("DATA").code == 354  # the same transaction: MAIL and RCPT stand
            fill(filler)  # full again before the content arrives: the commit finds no room
            c.send(message("twice") + b".\r\n")
            reply = c.read_reply()
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply.first
            assert entries(spool / "incoming") == [] and entries(spool / "queue") == []
            gw.wait_log("No space left on device")
            filler.unlink()
            wait_until(lambda: mail_code(probe) == 250, "the daemon sees room again", 20)
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(message("twice") + b".\r\n")
            assert c.read_reply().code == 250
            [got] = sink.wait_for(1, timeout=20)
            assert message_id(got.data) == "<twice@example.org>"
            wait_until(lambda: gw.queued() == [], "the queue is empty", 20)
            assert len(sink.messages) == 1
            assert entries(spool / "corrupt") == [] and entries(spool / "incoming") == []
            log = gw.log()
        assert "Internal error" not in log, log


def test_mail_whose_size_would_not_leave_min_free_gets_452(tmp_path: Path, tmpfs: Mount) -> None:
    """As Postfix: SIZE= more than the space above the reserve is refused up front (4 MiB disk,
    1 MiB reserve); more than max_message_size stays a permanent 552."""
    gw = make_gateway(tmp_path, free_port(HOP))
    tmpfs(gw.spool, 4 * MIB)
    with gw, gw.smtp() as s:
        s.ehlo()
        assert s.mail("alice@example.org", ["SIZE=3500000"]) == (
            452,
            b"4.3.1 Insufficient system storage",
        )
        assert s.mail("alice@example.org", ["SIZE=9000000"])[0] == 552
        assert s.mail("alice@example.org", ["SIZE=100000"])[0] == 250


def send(s: smtplib.SMTP, msgid: str, body: bytes) -> tuple[str, int, str]:
    """One transaction: (the stage that answered last, its code, its text)."""
    code, text = s.mail("alice@example.org")
    if code != 250:
        return "MAIL", code, text.decode()
    code, text = s.rcpt("bob@targetdomain1.com")
    if code != 250:
        s.rset()
        return "RCPT", code, text.decode()
    try:
        code, text = s.data(message(msgid, body))
    except smtplib.SMTPDataError as exc:  # DATA itself refused: the transaction stays
        s.rset()
        error = exc.smtp_error
        return "DATA", exc.smtp_code, error.decode() if isinstance(error, bytes) else error
    return "end of data", code, text.decode()


def test_mail_fills_the_spool_then_nothing_is_lost_and_acceptance_resumes(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """(a) four clients send until acceptance stops at the reserve; (c) the disk is then
    filled to the last byte, the daemon is killed and restarted on it; (d) the filler goes,
    the next hop comes up, and as the queue drains acceptance resumes by itself; every
    acknowledged message arrives exactly once."""
    port = free_port(HOP)
    sink = SinkServer(HOP, port)  # held down: everything stays queued until (d)
    gw = make_gateway(tmp_path, port)
    spool = tmpfs(gw.spool, 4 * MIB)
    body = (b"f" * 98 + b"\r\n") * 240  # 24 KB: about 120 messages fill the disk
    acked: dict[str, str] = {}  # Message-ID → queue id, for every 250
    refused: Counter[str] = Counter()  # stage → 452 4.3.1 answers there
    bad: list[str] = []  # anything else
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            with gw.smtp() as s:
                s.ehlo()
                in_a_row = 0
                for i in range(400):
                    msgid = f"fill-{n}-{i}"
                    stage, code, text = send(s, msgid, body)
                    with lock:
                        if code == 250 and stage == "end of data":
                            acked[f"<{msgid}@example.org>"] = text.split()[1]
                            in_a_row = 0
                        elif code == 452 and text.startswith("4.3.1 Insufficient system storage"):
                            refused[stage] += 1
                            in_a_row += 1
                        else:
                            bad.append(f"{msgid}: {stage}: {code} {text}")
                            return
                    if in_a_row == 5:
                        return
        except (OSError, smtplib.SMTPException) as exc:  # a 421 closes the connection
            with lock:
                bad.append(f"client {n}: {exc!r}")

    gw.start()
    try:
        # (a)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not bad, bad
        # how many fit, and at which stage each client is refused, depends on how the four
        # clients' writes interleave: floors, and the set of stages
        assert len(acked) >= 20 and refused["MAIL"] >= 4, (len(acked), refused)
        assert set(refused) <= {"MAIL", "DATA", "end of data"}, refused
        # Every 250 is a whole message on disk; nothing refused is queued.
        assert set(gw.queued()) == set(acked.values())
        assert all(is_sealed(spool / "queue" / qid) for qid in acked.values())
        # The reserve held: acceptance stopped before any write found the disk full.
        log = gw.log()
        assert "low on space" in log and "No space left" not in log, log
        assert free_bytes(spool) > 0
        # (c) Full to the last byte: acceptance stays refused, and the queue runs (the hop
        # is still down) find no room for their status files.
        filler = spool / "filler"
        fill(filler)
        with gw.smtp() as s:
            s.ehlo()
            assert s.mail("alice@example.org") == (452, b"4.3.1 Insufficient system storage")
        gw.wait_log("cannot record the delivery status", timeout=20)
        gw.kill9()
        gw.start()
        wait_until(
            lambda: gw.recovered() == len(acked), f"{len(acked)} queued messages recovered", 20
        )
        assert entries(spool / "corrupt") == []
        assert set(gw.queued()) == set(acked.values())
        assert all(is_sealed(spool / "queue" / qid) for qid in acked.values())
        # (d) Space returns and the hop comes up: no restart, no signal, no operator.
        filler.unlink()
        sink.start()

        def accepting() -> bool:
            with gw.smtp() as s:
                s.ehlo()
                _stage, code, text = send(s, "after", b"Space again.\r\n")
            if code == 250:
                acked["<after@example.org>"] = text.split()[1]
            return code == 250

        wait_until(accepting, "acceptance resumes once the filler is gone", 20)
        sink.wait_for(len(acked), timeout=60)
        wait_until(lambda: gw.queued() == [], "the queue is empty", timeout=30)
        arrived = Counter(message_id(m.data) for m in sink.messages)
        assert arrived == Counter(dict.fromkeys(acked, 1))  # each exactly once, nothing else
        assert entries(spool / "corrupt") == [] and entries(spool / "incoming") == []
        log = gw.log()
        assert "Internal error" not in log and "failed:" not in log, log
    finally:
        sink.stop()
        gw.stop()


def test_a_bounce_that_finds_the_disk_full_waits_for_space(tmp_path: Path, tmpfs: Mount) -> None:
    """The next hop refuses the recipient while the disk is full: the bounce cannot be
    written, so the message stays queued (no partial bounce file) and is bounced, once,
    when space returns."""
    port = free_port(HOP)
    sink = SinkServer(HOP, port)
    gw = make_gateway(tmp_path, port)
    spool = tmpfs(gw.spool, 4 * MIB)
    gw.start()
    try:
        with gw.smtp() as s:
            s.sendmail("carol@targetdomain1.com", ["bob@targetdomain1.com"], message("bounced"))
        [qid] = gw.queued()
        wait_until((spool / "queue" / f"{qid}.st").exists, "the first attempt is deferred", 20)
        filler = spool / "filler"
        fill(filler)
        sink.rcpt_reply["bob@targetdomain1.com"] = "550 5.1.1 No such user"
        sink.start()
        gw.wait_log(f"{qid}: cannot queue the bounce", timeout=20)
        assert gw.queued() == [qid]
        assert entries(spool / "incoming") == [] and entries(spool / "corrupt") == []
        filler.unlink()
        [dsn] = sink.wait_for(1, timeout=30)
        wait_until(lambda: gw.queued() == [], "the queue is empty", timeout=30)
        assert (dsn.mail_from, dsn.rcpt_tos) == ("", ["carol@targetdomain1.com"])
        assert b"<bounced@example.org>" in dsn.data
        assert len(sink.messages) == 1
    finally:
        sink.stop()
        gw.stop()
