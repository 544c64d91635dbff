"""The spool: commit seals and fsyncs the file, then renames it, before it returns; recovery;
locking."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.queue import fsync as fsync_impl
from mailgate.queue.spool import (
    UNSEALED,
    EntryLocked,
    Envelope,
    IncomingMessage,
    QueueStatus,
    RcptStatus,
    Recipient,
    RecipientState,
    Spool,
    body_size,
    read_seal,
)
from tests.support.wait import wait_until_async


def envelope(spool: Spool, sender: str = "a@example.org") -> Envelope:
    return Envelope(
        qid=spool.new_qid(),
        sender=sender,
        recipients=[Recipient("b@example.net", "B@Example.NET")],
        arrival=time.time(),
        client_ip="192.0.2.1",
    )


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch, mode: str) -> list[tuple[str, bytes]]:
    """Record (path, content) of every file the spool flushes, as the flush is asked for;
    ``mode`` "threads" flushes with os.fsync, "auto" through Linux AIO."""
    synced: list[tuple[str, bytes]] = []
    if mode == "threads":
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            path = fd_path(fd)
            synced.append((path, Path(path).read_bytes()))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", recording_fsync)
    else:
        real = fsync_impl.KernelFsync.fsync

        def recording_submit(self: fsync_impl.KernelFsync, fd: int) -> asyncio.Future[None]:
            path = fd_path(fd)
            synced.append((path, Path(path).read_bytes()))
            return real(self, fd)

        monkeypatch.setattr(fsync_impl.KernelFsync, "fsync", recording_submit)
    return synced


@pytest.mark.parametrize("mode", ["threads", "auto"])
def test_commit_seals_and_fsyncs_before_returning(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode == "auto" and fsync_impl.linux_aio() is None:
        pytest.skip("no Linux AIO on this kernel")
    spool = Spool(tmp_path, fsync=mode)
    synced = _record_fsyncs(monkeypatch, mode)
    msg = spool.open_incoming(envelope(spool))
    content = b"Subject: x\r\n\r\nbody\r\n"
    msg.write(content)
    qid = msg.envelope.qid

    async def commit() -> str:
        await spool.commit(msg)
        return spool.fsync_for(asyncio.get_running_loop()).name

    used = asyncio.run(commit())
    assert used == ("threads" if mode == "threads" else "linux-aio")
    # One fsync, of the complete and sealed file, while it was still in incoming/.
    [(path, data)] = synced
    assert path == str(tmp_path / "incoming" / qid)
    line, _, rest = data.partition(b"\n")
    assert rest == content
    assert read_seal(line)[:2] == (zlib.crc32(content), len(content))
    assert (tmp_path / "queue" / qid).exists()
    # The incoming/ name stays, as a second link, until the queue/ entry is known durable.
    assert os.stat(tmp_path / "incoming" / qid).st_ino == os.stat(tmp_path / "queue" / qid).st_ino
    loaded = spool.load(qid)
    assert loaded is not None
    assert loaded.envelope.sender == "a@example.org"
    assert loaded.envelope.recipients[0].original == "B@Example.NET"
    with open(loaded.path, "rb") as f:
        f.seek(loaded.offset)
        assert f.read() == content
    assert loaded.size == len(content)
    spool.close()


def test_an_inline_commit_fsyncs_the_sealed_file_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inline``: the same one fsync of the sealed file before commit returns, made by
    ``os.fsync`` on the loop's thread; the kernel's AIO is not asked."""
    spool = Spool(tmp_path)
    synced = _record_fsyncs(monkeypatch, "threads")  # records os.fsync
    monkeypatch.setattr(spool, "fsync_for", lambda loop: pytest.fail("AIO asked"))
    msg = spool.open_incoming(envelope(spool))
    content = b"Subject: x\r\n\r\nbody\r\n"
    msg.write(content)
    queued = asyncio.run(spool.commit(msg, lock=True, inline=True))
    [(path, data)] = synced
    assert path == str(tmp_path / "incoming" / queued.qid)
    assert read_seal(data.partition(b"\n")[0])[:2] == (zlib.crc32(content), len(content))
    assert (tmp_path / "queue" / queued.qid).exists()
    queued.close()
    spool.close()


def test_a_slow_inline_fsync_sends_the_next_commits_to_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inline = fsync_impl.InlineFsync()
    monkeypatch.setattr(os, "fsync", lambda fd: time.sleep(inline.SLOW * 2))
    assert inline.usable()
    inline.fsync(0)
    assert not any(inline.usable() for _ in range(inline.BACKOFF))
    assert inline.usable()  # then tried again
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    inline.fsync(0)
    assert inline.usable()


def test_a_spilled_message_is_sealed_in_place(tmp_path: Path) -> None:
    """A message bigger than the write buffer reached the disk before its end: its seal is
    written into the envelope line afterwards."""
    spool = Spool(tmp_path)
    msg = spool.open_incoming(envelope(spool))
    content = b"y" * (msg.SPILL_AT + 1000) + b"\r\n"
    msg.write(content[: msg.SPILL_AT + 10])
    assert msg.path.exists()
    msg.write(content[msg.SPILL_AT + 10 :])
    asyncio.run(spool.commit(msg))
    data = (tmp_path / "queue" / msg.envelope.qid).read_bytes()
    line, _, rest = data.partition(b"\n")
    assert rest == content
    assert read_seal(line)[:2] == (zlib.crc32(content), len(content))
    spool.close()


@pytest.mark.skipif(fsync_impl.linux_aio() is None, reason="no Linux AIO on this kernel")
def test_kernel_fsync_reports_errors(tmp_path: Path) -> None:
    async def run() -> None:
        flusher = fsync_impl.KernelFsync(asyncio.get_running_loop())
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        await asyncio.gather(*(flusher.fsync(fd) for _ in range(3)))  # one io_submit
        # /dev/null cannot be flushed: the kernel refuses the request, the fallback says why.
        null = os.open("/dev/null", os.O_RDONLY)
        with pytest.raises(OSError) as info:
            await flusher.fsync(null)
        assert info.value.errno == errno.EINVAL
        # A completion carrying an error (the result is -errno, as an unsigned 64-bit value).
        fut = flusher.fsync(fd)
        await asyncio.sleep(0)  # submitted
        [key] = list(flusher._in_flight)
        await wait_until_async(fut.done, "the kernel's completion", 5)
        assert fut.done() and fut.exception() is None
        fut2: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        flusher._in_flight[key] = (None, fut2)
        flusher._done(key, (1 << 64) - errno.EIO)
        with pytest.raises(OSError) as info:
            await fut2
        assert info.value.errno == errno.EIO
        flusher.close()
        os.close(fd)
        os.close(null)

    asyncio.run(run())


def test_recovery_keeps_a_sealed_message_whose_link_was_lost(tmp_path: Path) -> None:
    """The 250 went out after the fsync; a crash before the link reached the disk leaves the
    sealed file in incoming/ only: it must be queued at start, not dropped."""
    spool = Spool(tmp_path)
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: acknowledged\r\n\r\nkeep me\r\n")
    asyncio.run(spool.commit(msg))
    qid = msg.envelope.qid
    os.unlink(tmp_path / "queue" / qid)  # the link never reached the disk
    torn = spool.open_incoming(envelope(spool))
    torn.write(b"x" * (torn.SPILL_AT + 10))  # on disk, never sealed: never acknowledged
    assert torn.path.exists()
    spool.close()

    spool = Spool(tmp_path)
    assert spool.recover() == [qid]
    assert not any((tmp_path / "incoming").iterdir())
    loaded = spool.load(qid)
    assert loaded is not None
    with open(loaded.path, "rb") as f:
        f.seek(loaded.offset)
        assert f.read() == b"Subject: acknowledged\r\n\r\nkeep me\r\n"
    spool.close()


def test_a_sealed_file_with_damaged_content_is_not_recovered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: x\r\n\r\nbody\r\n")
    asyncio.run(spool.commit(msg))
    qid = msg.envelope.qid
    path = tmp_path / "incoming" / qid
    os.unlink(tmp_path / "queue" / qid)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # content lost in the crash: the seal no longer matches
    spool.close()
    spool = Spool(tmp_path)
    assert spool.recover() == []
    spool.close()


def test_recover_drops_unacknowledged_and_quarantines_corrupt(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    half = spool.open_incoming(envelope(spool))
    half.write(b"partial" * (half.SPILL_AT // 7 + 1))  # big enough to reach the disk
    assert half.path.exists()
    good = spool.open_incoming(envelope(spool))
    good.write(b"x\r\n")
    asyncio.run(spool.commit(good))
    (tmp_path / "queue" / "BROKEN00000001").write_bytes(b'{"qid": "BROKEN0')
    spool.close()

    spool = Spool(tmp_path)
    qids = spool.recover()
    assert not any((tmp_path / "incoming").iterdir())
    assert good.envelope.qid in qids
    assert spool.load("BROKEN00000001") is None
    assert (tmp_path / "corrupt" / "BROKEN00000001").exists()
    assert "BROKEN00000001" not in list(spool.qids())
    spool.close()


def test_status_round_trip_and_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"x\r\n")
    asyncio.run(spool.commit(msg))
    qid = msg.envelope.qid
    st = QueueStatus(
        {
            "b@example.net": RecipientState(
                RcptStatus.SENT, {"esmtp:example.net:b@example.net": RcptStatus.SENT}
            ),
            "x@y": RecipientState(last_error="Deferred: 451"),
        },
        attempts=2,
        next_attempt=123.0,
    )
    spool.save_status(qid, st)
    assert spool.load_status(qid) == st
    spool.remove(qid)
    assert spool.load(qid) is None
    assert list((tmp_path / "queue").iterdir()) == []
    spool.close()


def test_queue_ids_are_sendmail_shaped_and_unique(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = set()
    for _ in range(5000):
        qid = spool.new_qid()
        assert len(qid) == 14 and qid.isalnum()
        ids.add(qid)
    assert len(ids) == 5000
    spool.close()


def test_lock_excludes_a_second_runner(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"x\r\n")
    asyncio.run(spool.commit(msg))
    qid = msg.envelope.qid
    with spool.locked(qid) as first:
        assert first
        assert spool.is_locked(qid)
        with spool.locked(qid) as second:
            assert not second
    assert not spool.is_locked(qid)
    with spool.locked("NOSUCHQID00000") as gone:
        assert not gone
    spool.close()


def test_commit_failure_is_reported_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailgate.queue.spool import SpoolError

    spool = Spool(tmp_path, fsync="threads")
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"x\r\n")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SpoolError):
        asyncio.run(spool.commit(msg))
    assert list((tmp_path / "queue").iterdir()) == []
    assert list((tmp_path / "incoming").iterdir()) == []
    spool.close()


def test_many_concurrent_commits_with_a_fast_disk_finish(tmp_path: Path) -> None:
    """Waiters that find the shared directory fsync already finished must not spin."""
    spool = Spool(tmp_path)

    async def many() -> None:
        for _round in range(5):
            msgs = []
            for _ in range(40):
                m = spool.open_incoming(envelope(spool))
                m.write(b"x\r\n")
                msgs.append(m)
            await asyncio.wait_for(asyncio.gather(*(spool.commit(m) for m in msgs)), 20)

    asyncio.run(many())
    assert len(list(spool.qids())) == 200
    spool.close()


def test_one_spool_serves_successive_event_loops(tmp_path: Path) -> None:
    """`mailgate flush` and tests run a loop, close it and run another: the flusher follows."""
    spool = Spool(tmp_path)
    for _ in range(2):
        msg = spool.open_incoming(envelope(spool))
        msg.write(b"x\r\n")
        asyncio.run(spool.commit(msg))
        assert (tmp_path / "queue" / msg.envelope.qid).exists()
    spool.close()


def _delivered(spool: Spool, content: bytes) -> tuple[str, int, int]:
    """Commit a message holding its lock (as a session does), then "deliver" it: recycle its
    file. Returns (qid, inode, size)."""
    msg = spool.open_incoming(envelope(spool))
    msg.write(content)
    queued = asyncio.run(spool.commit(msg, lock=True))
    fd = queued.fd
    assert fd is not None
    qid = queued.qid
    ino = os.fstat(fd).st_ino
    spool.finish(queued)
    assert queued.fd is None  # kept (recycled), not closed: the spool holds it now
    assert [kept for kept, _name, _size in spool._spares] == [fd]
    return qid, ino, msg.offset + msg.size


def test_a_delivered_file_is_reused_for_the_next_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    long = b"Subject: first\r\n\r\n" + b"a" * 3000 + b"\r\n"
    qid, ino, _ = _delivered(spool, long)
    assert not (tmp_path / "queue" / qid).exists()
    [spare] = list((tmp_path / "spare").iterdir())
    assert spare.stat().st_ino == ino
    # The delivered message can no longer pass for mail: its seal is gone.
    assert Spool._sealed_qid(spare) is None

    short = b"Subject: second\r\n\r\nshort\r\n"
    msg = spool.open_incoming(envelope(spool))
    msg.write(short)
    asyncio.run(spool.commit(msg))
    # Written over in place and linked into queue/: the spare/ name, durable already, is the
    # new message's second name (no rename into incoming/ on the way).
    assert list((tmp_path / "spare").iterdir()) == [spare]
    assert not any((tmp_path / "incoming").iterdir())
    assert Spool._sealed_qid(spare) == msg.envelope.qid
    path = tmp_path / "queue" / msg.envelope.qid
    assert path.stat().st_ino == ino  # the same inode, no new one allocated
    assert path.stat().st_size == msg.offset + len(short)  # the old tail is cut off
    loaded = spool.load(msg.envelope.qid)
    assert loaded is not None and loaded.envelope.sender == "a@example.org"
    assert path.read_bytes()[loaded.offset :] == short
    assert Spool._sealed_qid(path) == msg.envelope.qid
    # Its queue/ entry on disk (the first status file's fsync), the second name goes.
    spool.save_status(msg.envelope.qid, QueueStatus(attempts=1))
    assert not any((tmp_path / "spare").iterdir())
    assert path.stat().st_nlink == 1
    spool.close()


def test_a_reused_file_delivered_again_becomes_a_spare_under_the_same_name(
    tmp_path: Path,
) -> None:
    """The usual cycle of a busy gateway: a spare written over, queued, delivered at its first
    attempt, a spare again; one link and one unlink a message, no rename."""
    spool = Spool(tmp_path)
    _delivered(spool, b"Subject: first\r\n\r\nx\r\n")
    [spare] = list((tmp_path / "spare").iterdir())
    for n in range(3):
        msg = spool.open_incoming(envelope(spool))
        msg.write(b"Subject: again %d\r\n\r\ny\r\n" % n)
        queued = asyncio.run(spool.commit(msg, lock=True))
        assert (tmp_path / "queue" / queued.qid).stat().st_ino == spare.stat().st_ino
        spool.finish(queued)
        assert not (tmp_path / "queue" / queued.qid).exists()
        assert list((tmp_path / "spare").iterdir()) == [spare]
        assert Spool._sealed_qid(spare) is None  # delivered: never mail again
    assert spool._spare_names == {}
    spool.close()
    assert not any((tmp_path / "spare").iterdir())


def test_a_queued_messages_spare_name_goes_at_close_once_the_queue_is_on_disk(
    tmp_path: Path,
) -> None:
    """A message written over a spare and never attempted by this process (the daemon
    stopped first, or another worker delivered it) still has its spare/ name at the close:
    the close drops it after making queue/ durable, so spare/ ends empty and the message
    stays queued."""
    spool = Spool(tmp_path)
    _delivered(spool, b"Subject: first\r\n\r\nx\r\n")
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: queued\r\n\r\nkeep me\r\n")
    asyncio.run(spool.commit(msg))
    spool.close()
    assert not any((tmp_path / "spare").iterdir())
    spool = Spool(tmp_path)
    assert spool.recover() == [msg.envelope.qid]
    loaded = spool.load(msg.envelope.qid)
    assert loaded is not None
    assert loaded.path.read_bytes()[loaded.offset :] == b"Subject: queued\r\n\r\nkeep me\r\n"
    spool.close()


def test_a_reused_file_grows_and_spills(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    _, ino, _ = _delivered(spool, b"Subject: small\r\n\r\nx\r\n")
    msg = spool.open_incoming(envelope(spool))
    big = b"y" * (msg.SPILL_AT + 5000)
    msg.write(big[:1000])
    msg.write(big[1000:])  # spills: written to the reused file before the commit
    asyncio.run(spool.commit(msg))
    path = tmp_path / "queue" / msg.envelope.qid
    assert path.stat().st_ino == ino
    assert path.read_bytes()[msg.offset :] == big
    assert Spool._sealed_qid(path) == msg.envelope.qid
    spool.close()


def test_spare_files_are_bounded_in_number_and_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.SPARE_MAX = 2
    committed = []
    for _ in range(4):
        msg = spool.open_incoming(envelope(spool))
        msg.write(b"x\r\n")
        asyncio.run(spool.commit(msg))
        fd = os.open(tmp_path / "queue" / msg.envelope.qid, os.O_RDWR)
        committed.append((msg.envelope.qid, fd, msg.offset + msg.size))
    kept = [spool.recycle(qid, fd, size, status_file=False) for qid, fd, size in committed[:3]]
    assert kept == [True, True, False]  # the third is one too many
    qid, fd, _ = committed[3]
    spool.SPARE_MAX = 10
    assert not spool.recycle(qid, fd, spool.SPARE_MAX_SIZE + 1, status_file=False)  # too big
    for _, fd, _ in committed[2:]:
        os.close(fd)
    assert len(list((tmp_path / "spare").iterdir())) == 2
    # Closing the spool frees what it kept.
    spool.close()
    assert not any((tmp_path / "spare").iterdir())


def test_recovery_of_spare_and_reused_files(tmp_path: Path) -> None:
    """What a crash can leave with reused files: a delivered file in spare/ (dropped); an
    acknowledged message written over a spare whose link into queue/ never reached the disk,
    so that its only name is in spare/ (queued under the qid of its envelope); one whose link
    did (queued once, the spare/ name dropped); and a reused file in incoming/ still holding an
    older sealed message (dropped: the older one was delivered)."""
    spool = Spool(tmp_path)
    queued = []
    for n in range(3):  # three files at once, then delivered: three spares
        msg = spool.open_incoming(envelope(spool))
        msg.write(b"Subject: delivered %d\r\n\r\ngone\r\n" % n)
        queued.append(asyncio.run(spool.commit(msg, lock=True)))
    for q in queued:
        spool.finish(q)
    # The pool hands its files out last in, first out: the first stays a delivered spare.
    delivered_spare = tmp_path / "spare" / spool._spares[0][1]

    unlinked = spool.open_incoming(envelope(spool))
    unlinked.write(b"Subject: acknowledged\r\n\r\nkeep me\r\n")
    asyncio.run(spool.commit(unlinked))
    os.unlink(tmp_path / "queue" / unlinked.envelope.qid)  # the link never reached disk

    linked = spool.open_incoming(envelope(spool))
    linked.write(b"Subject: linked\r\n\r\nonce\r\n")
    asyncio.run(spool.commit(linked))
    assert len(list((tmp_path / "spare").iterdir())) == 3  # two second names, one spare

    pool, spool._spares = spool._spares, []  # no spare to write over: a new file, in incoming/
    old = spool.open_incoming(envelope(spool))
    old.write(b"Subject: old\r\n\r\nalready delivered\r\n")
    asyncio.run(spool.commit(old))
    spool._spares = pool
    os.rename(tmp_path / "queue" / old.envelope.qid, tmp_path / "incoming" / spool.new_qid())
    os.unlink(tmp_path / "incoming" / old.envelope.qid)
    # As after a crash: nothing kept open, nothing cleaned up by a close.
    spool._spares.clear()
    spool._spare_names.clear()
    spool.close()
    assert delivered_spare.exists()

    spool = Spool(tmp_path)
    assert spool.recover() == sorted([unlinked.envelope.qid, linked.envelope.qid])
    assert not any((tmp_path / "spare").iterdir())
    assert not any((tmp_path / "incoming").iterdir())
    for msg, content in (
        (unlinked, b"Subject: acknowledged\r\n\r\nkeep me\r\n"),
        (linked, b"Subject: linked\r\n\r\nonce\r\n"),
    ):
        loaded = spool.load(msg.envelope.qid)
        assert loaded is not None
        assert loaded.path.read_bytes()[loaded.offset :] == content
        assert loaded.path.stat().st_nlink == 1
    spool.close()


def test_the_incoming_name_goes_once_the_queue_entry_is_durable_or_gone(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qids = []
    for _ in range(4):
        msg = spool.open_incoming(envelope(spool))
        msg.write(b"x\r\n")
        asyncio.run(spool.commit(msg))
        qids.append(msg.envelope.qid)
    assert sorted(os.listdir(tmp_path / "incoming")) == sorted(qids)
    deferred, delivered, crashed, kept = qids
    spool.save_status(deferred, QueueStatus(attempts=1))  # fsync'd in queue/
    spool.remove(delivered)
    assert sorted(os.listdir(tmp_path / "incoming")) == sorted([crashed, kept])
    os.unlink(tmp_path / "queue" / crashed)  # its link was lost in a crash
    spool.close()
    spool = Spool(tmp_path)
    assert spool.recover() == sorted([deferred, crashed, kept])
    assert os.listdir(tmp_path / "incoming") == []
    spool.close()


def test_a_commit_that_fails_never_removes_an_existing_queue_entry(tmp_path: Path) -> None:
    """A queue file of the same name (left by an earlier process with the same pid in the same
    second) makes the link fail; the failed commit used to unlink that acknowledged message."""
    from mailgate.queue.spool import SpoolError

    spool = Spool(tmp_path, fsync="threads")
    env = envelope(spool)
    (tmp_path / "queue" / env.qid).write_bytes(b"an acknowledged message\n")
    msg = spool.open_incoming(env)
    msg.write(b"x\r\n")
    with pytest.raises(SpoolError, match="exists"):
        asyncio.run(spool.commit(msg))
    assert (tmp_path / "queue" / env.qid).read_bytes() == b"an acknowledged message\n"
    assert list((tmp_path / "incoming").iterdir()) == []
    spool.close()


# -- what the queue tools use (queue.tools) ------------------------------------------------------
def _queued(spool: Spool) -> str:
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"x\r\n")
    asyncio.run(spool.commit(msg))
    return msg.envelope.qid


def test_hold_is_kept_in_the_status_file_and_a_released_message_leaves_no_status(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    qid = _queued(spool)
    spool.save_status(qid, QueueStatus(hold="spam score 12"))
    assert spool.load_status(qid).hold == "spam score 12"
    # A file written before holds existed has no "hold": not held.
    raw = (tmp_path / "queue" / f"{qid}.st").read_bytes().replace(b',"hold":"spam score 12"', b"")
    (tmp_path / "queue" / f"{qid}.st").write_bytes(raw)
    assert not spool.load_status(qid).held
    # Released before any attempt (attempts 0), then delivered: its status file goes too.
    msg = spool.claim(qid)
    assert msg is not None and msg.status.attempts == 0
    spool.finish(msg)
    assert sorted(os.listdir(tmp_path / "queue")) == []
    spool.close()


def test_lock_entry_waits_for_the_runner_or_sees_the_message_go(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = _queued(spool)
    runner = spool.claim(qid)
    assert runner is not None
    with pytest.raises(EntryLocked):
        spool.lock_entry(qid)
    with pytest.raises(EntryLocked):
        spool.lock_entry(qid, wait=0.1)
    # The runner finishes the message while a tool waits: the tool finds it gone.
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(spool.lock_entry(qid, wait=30)))
    waiter.start()
    spool.remove(qid)
    runner.close()
    waiter.join(30)
    assert got == [None]
    assert spool.lock_entry("NOSUCHQID00000") is None
    spool.close()


def test_due_markers_are_taken_by_share(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qids = sorted(_queued(spool) for _ in range(4))
    assert all(spool.mark_due(q) for q in qids)
    assert spool.mark_due(qids[0])  # marked twice: one marker
    assert not spool.mark_due("NOSUCHQID00000")
    (tmp_path / "due" / "not a qid").write_bytes(b"")
    taken, spilled = spool.take_due(lambda q: q in qids[:2])
    assert sorted(taken) == qids[:2] and spilled == 0
    assert sorted(os.listdir(tmp_path / "due")) == qids[2:]  # the other share's, and no junk
    spool.delete(qids[2])
    assert sorted(os.listdir(tmp_path / "due")) == qids[3:]
    assert not (tmp_path / "queue" / qids[2]).exists()
    assert spool.take_due(lambda q: True) == (qids[3:], 0)
    spool.close()


def test_due_markers_beyond_the_limit_are_made_due_on_disk(tmp_path: Path) -> None:
    """``take_due(limit=…)``: the markers past the limit are removed and their messages'
    status files made due now, for a queue pass (``due_times``) to find."""
    spool = Spool(tmp_path)
    later = time.time() + 3600
    qids = []
    for _ in range(5):
        qid = _queued(spool)
        spool.save_status(qid, QueueStatus(attempts=1, next_attempt=later))
        assert spool.mark_due(qid)
        qids.append(qid)
    assert dict(spool.due_times(lambda q: True)) == dict.fromkeys(qids, later)
    before = time.time()
    taken, spilled = spool.take_due(lambda q: True, limit=2)
    assert len(taken) == 2 and spilled == 3 and os.listdir(tmp_path / "due") == []
    due = dict(spool.due_times(lambda q: True))
    assert {q for q, t in due.items() if t < later} == set(qids) - set(taken)
    assert all(before <= due[q] <= time.time() for q in set(qids) - set(taken))
    spool.close()


# Any text, and what a command line's bytes decode to (undecodable ones as lone surrogates).
_texts = st.text(max_size=12) | st.binary(max_size=12).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)


@given(
    sender=_texts,
    recipients=st.lists(
        st.builds(Recipient, _texts, _texts, st.none() | _texts, st.none() | _texts),
        min_size=1,
        max_size=3,
    ),
    arrival=st.floats(allow_nan=False, allow_infinity=False),
    client_name=st.none() | _texts,
    flags=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_envelope_line_is_json_dumps_text(
    sender: str,
    recipients: list[Recipient],
    arrival: float,
    client_name: str | None,
    flags: list[bool],
) -> None:
    """The envelope line (orjson's, or json's for text orjson refuses) is the text json.dumps
    gave before, but for the exponent of a float too large or small for plain digits (orjson
    writes 1e16, json 1e+16; no arrival time has one), and reads back as the envelope, through
    orjson and through json alike (queues written by either version read alike)."""
    env = Envelope("Q1", sender, recipients, arrival, "192.0.2.1", client_name, helo=sender)
    env.body_8bit, env.smtputf8, env.is_bounce, env.postmaster_notify = flags
    data = dict(env.__dict__)
    data["recipients"] = [r.__dict__ for r in recipients]
    if not env.postmaster_notify:
        del data["postmaster_notify"]
    line = env.to_line()
    if arrival == 0 or 1e-4 <= abs(arrival) < 1e16:  # repr() without an exponent
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        assert line == (
            b'{"crc":"' + UNSEALED + b'",' + body[1:].encode("utf-8", "surrogateescape") + b"\n"
        )
    assert Envelope.from_line(line) == env
    as_json = json.loads(line.decode("utf-8", "surrogateescape"))
    assert {k: v for k, v in as_json.items() if k not in ("crc", "len")} == data


def test_envelope_line_of_an_undecodable_address_is_jsons() -> None:
    """An address byte that is not UTF-8 (kept as a surrogate escape) is what orjson refuses:
    the line is then json's, with the byte itself, and reads back as the envelope."""
    raw = b"caf\xe9@example.org".decode("utf-8", "surrogateescape")
    env = Envelope("Q1", raw, [Recipient(raw, f"<{raw}>")], 1764691234.5, "192.0.2.1")
    line = env.to_line()
    assert b"caf\xe9@example.org" in line
    assert Envelope.from_line(line) == env


def test_a_message_left_to_a_queue_pass_loses_its_spare_name_once_queue_is_on_disk(
    tmp_path: Path,
) -> None:
    """The scheduler had no room for a message just committed over a spare: a queue pass,
    maybe another worker's, delivers it. Its spare/ name (known to this process only) must go
    now, or a crash after that delivery would find it sealed and queue the message again."""
    spool = Spool(tmp_path)
    _delivered(spool, b"Subject: first\r\n\r\nx\r\n")
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: left\r\n\r\nto a pass\r\n")
    queued = asyncio.run(spool.commit(msg, lock=True))
    queued.close()  # what the scheduler does when its window is full
    assert spool.has_spare_name(queued.qid)
    spool.settle_spare_name(queued.qid)
    assert not spool.has_spare_name(queued.qid)
    assert not any((tmp_path / "spare").iterdir())
    assert (tmp_path / "queue" / queued.qid).stat().st_nlink == 1
    spool.settle_spare_name(queued.qid)  # twice, or for a message with none: nothing
    # Delivered elsewhere, then a crash: nothing comes back.
    os.unlink(tmp_path / "queue" / queued.qid)
    spool.close()
    spool = Spool(tmp_path)
    assert spool.recover() == []
    spool.close()


def _deferred(spool: Spool) -> str:
    """A queued message with a status file (one attempt recorded), not in any process's
    hands: what a drain claims and delivers."""
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: deferred\r\n\r\nx\r\n")
    asyncio.run(spool.commit(msg))
    qid = msg.envelope.qid
    spool.save_status(qid, QueueStatus(attempts=1))
    return qid


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_with_the_cleaner_a_delivered_message_leaves_queue_at_once_and_is_freed_by_it(
    tmp_path: Path,
) -> None:
    """The daemon's spool: a delivered deferred message (no spare room) is out of queue/ when
    ``finish`` returns, queue file and status file alike, counted as gone; the thread
    unlinks both from trash/; a claim of it finds nothing."""
    spool = Spool(tmp_path)
    spool.SPARE_MAX = 0  # a drain: the spares are full
    spool.start_cleaner()
    assert spool._cleaner is not None
    qids = [_deferred(spool) for _ in range(20)]
    left = spool.moves[spool.LEFT]
    for qid in qids:
        msg = spool.claim(qid)
        assert msg is not None
        spool.finish(msg)
        assert msg.fd is None
        assert not (tmp_path / "queue" / qid).exists()
        assert not (tmp_path / "queue" / f"{qid}.st").exists()
        assert spool.claim(qid) is None
    assert spool.moves[spool.LEFT] == left + 20
    assert _entries(tmp_path / "queue") == []
    spool.close()  # waits for the backlog
    assert _entries(tmp_path / "trash") == []


def test_a_cleaner_without_room_leaves_the_unlinks_to_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At ``Cleaner.MAX`` names waiting nothing more is renamed into trash/: the backlog (and
    the memory it takes) is bounded, the unlink done where it was before."""
    from mailgate.queue import cleaner

    monkeypatch.setattr(cleaner.Cleaner, "MAX", 0)
    spool = Spool(tmp_path)
    spool.SPARE_MAX = 0
    spool.start_cleaner()
    qid = _deferred(spool)
    msg = spool.claim(qid)
    assert msg is not None
    spool.finish(msg)
    assert _entries(tmp_path / "queue") == [] and _entries(tmp_path / "trash") == []
    spool.close()


def test_without_the_cleaner_files_are_unlinked_in_place(tmp_path: Path) -> None:
    """A queue tool's spool (``mailgate delete``, ``flush``) starts no thread: it unlinks."""
    spool = Spool(tmp_path)
    spool.SPARE_MAX = 0
    qid = _deferred(spool)
    msg = spool.claim(qid)
    assert msg is not None
    spool.finish(msg)
    assert _entries(tmp_path / "queue") == [] and _entries(tmp_path / "trash") == []
    spool.close()


def test_a_recycled_files_status_file_goes_through_the_cleaner(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.start_cleaner()
    qid = _deferred(spool)
    msg = spool.claim(qid)
    assert msg is not None
    spool.finish(msg)  # kept as a spare: its status file is freed all the same
    assert _entries(tmp_path / "queue") == []
    assert len(_entries(tmp_path / "spare")) == 1
    spool.close()
    assert _entries(tmp_path / "trash") == []


def test_what_a_crash_left_in_trash_is_delivered_mail_dropped_at_start(tmp_path: Path) -> None:
    """A process that ended before its cleaner unlinked everything leaves delivered files in
    trash/, sealed ones too: start-up recovery removes them and queues none of them."""
    spool = Spool(tmp_path)
    qid = _deferred(spool)
    os.rename(tmp_path / "queue" / qid, tmp_path / "trash" / qid)  # as _drop does
    os.rename(tmp_path / "queue" / f"{qid}.st", tmp_path / "trash" / f"{qid}.st")
    spool.close()
    spool = Spool(tmp_path)
    assert spool.recover_incoming() == 0
    assert _entries(tmp_path / "trash") == [] and _entries(tmp_path / "queue") == []
    spool.close()


def test_a_cleaner_empties_trash_when_it_starts(tmp_path: Path) -> None:
    """A worker the master forks in place of a dead one finds the dead one's delivered files
    in trash/ (no start-up recovery runs then): its cleaner unlinks them, and still unlinks
    what its own spool puts there afterwards."""
    spool = Spool(tmp_path)
    left = _deferred(spool)
    os.rename(tmp_path / "queue" / left, tmp_path / "trash" / left)  # as the dead one's _drop
    os.rename(tmp_path / "queue" / f"{left}.st", tmp_path / "trash" / f"{left}.st")
    spool.start_cleaner()
    qid = _deferred(spool)
    msg = spool.claim(qid)
    assert msg is not None
    spool.finish(msg)
    spool.close()
    assert _entries(tmp_path / "trash") == [] and _entries(tmp_path / "queue") == []


# -- the body's size, as Sendmail's mailq shows it ------------------------------------------------


def test_body_size_is_sendmails_df_file() -> None:
    # After the empty line, CR LF counted as Sendmail's df file has it: one LF.
    assert body_size(b"Subject: x\r\n\r\nline one\r\nline two\r\n") == 18
    assert body_size(b"\r\nno header section\r\n") == 18  # the content opens with the empty line
    assert body_size(b"Subject: x\r\n") == 0  # no body at all
    assert body_size(b"Subject: x\r\n\r\n") == 0
    assert body_size(b"Subject: x\r\n\r\nbare\nLF\r\n\r\n") == 9  # a bare LF stays one byte


@given(
    st.lists(
        st.sampled_from([b"Subject: x\r\n", b"\r\n", b"\r", b"\n", b"ab", b"\r\n\r\n", b"."]),
        max_size=30,
    ),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_the_body_counted_as_it_streams_in_is_body_sizes(
    parts: list[bytes], cuts: list[int]
) -> None:
    """However the content arrives in writes (an empty line or a CR LF split between two),
    the count kept while receiving is what ``body_size`` finds in the whole content."""
    content = b"".join(parts)
    # No file is made: the counting is all there is to it.
    msg = IncomingMessage(_NoSpool(), Envelope("Q1", "a@example.org", [], 0.0))  # type: ignore[arg-type]
    pos = 0
    for n in itertools.cycle(cuts):
        if pos >= len(content):
            break
        msg._count_body(content[pos : pos + n])
        pos += n
    assert msg.body_size == body_size(content)


class _NoSpool:
    incoming_dir = "/nonexistent"


def test_the_body_size_goes_into_the_status_file_and_old_entries_fall_back(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", fsync="threads")
    small = b"Subject: x\r\n\r\n" + b"line\r\n" * 3
    big = b"Subject: y\r\n\r\n" + b"x" * 98 + b"\r\n" + b"y" * 70_000 + b"\r\n"  # > the first read

    async def commit(content: bytes) -> str:
        incoming = spool.open_incoming(envelope(spool))
        incoming.write(content[:5])
        incoming.write(content[5:])
        queued = await spool.commit(incoming)
        assert queued.status.body_size == body_size(content)
        spool.save_status(queued.qid, queued.status)  # as a deferral writes it
        queued.close()
        return queued.qid

    qids = [asyncio.run(commit(small)), asyncio.run(commit(big))]
    for qid, content in zip(qids, (small, big), strict=True):
        st = spool.load_status(qid)
        assert st.body_size == body_size(content)
        assert json.loads((spool.queue / f"{qid}.st").read_bytes())["body_size"] == st.body_size
        assert QueueStatus.from_json(st.to_json()).body_size == st.body_size
        peeked = spool.peek(qid)
        assert peeked is not None and peeked[0].body_size == body_size(content)
    # A status file of an older version has no body_size: a message that fits the first
    # read is counted from it exactly, a larger one is its bytes after the header section.
    for qid in qids:
        raw = json.loads((spool.queue / f"{qid}.st").read_bytes())
        del raw["body_size"]
        (spool.queue / f"{qid}.st").write_text(json.dumps(raw))
    sizes = [m.body_size for m in (spool.load(q) for q in qids) if m is not None]
    assert sizes == [body_size(small), len(big) - len(b"Subject: y\r\n\r\n")]
    spool.close()
