"""The spool: commit is fsync(file) + rename + fsync(dir) before it returns; recovery; locking."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from mailgate.queue.spool import Envelope, QueueStatus, Recipient, Spool


def envelope(spool: Spool, sender: str = "a@example.org") -> Envelope:
    return Envelope(qid=spool.new_qid(), sender=sender,
                    recipients=[Recipient("b@example.net", "B@Example.NET")],
                    arrival=time.time(), client_ip="192.0.2.1")


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_commit_fsyncs_file_and_directory_before_returning(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd_path(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    msg = spool.open_incoming(envelope(spool))
    msg.write(b"Subject: x\r\n\r\nbody\r\n")
    qid = msg.envelope.qid
    asyncio.run(spool.commit(msg))
    # The message file was flushed while still in incoming/, then queue/ itself.
    assert synced[0] == str(tmp_path / "incoming" / qid)
    assert synced[-1] == str(tmp_path / "queue")
    assert (tmp_path / "queue" / qid).exists()
    assert not (tmp_path / "incoming" / qid).exists()
    loaded = spool.load(qid)
    assert loaded is not None
    assert loaded.envelope.sender == "a@example.org"
    assert loaded.envelope.recipients[0].original == "B@Example.NET"
    with open(loaded.path, "rb") as f:
        f.seek(loaded.offset)
        assert f.read() == b"Subject: x\r\n\r\nbody\r\n"
    assert loaded.size == len(b"Subject: x\r\n\r\nbody\r\n")
    spool.close()


def test_concurrent_commits_share_directory_fsyncs(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    dir_syncs = 0
    real_fsync = os.fsync

    def slow_dir_fsync(fd: int) -> None:
        nonlocal dir_syncs
        if fd_path(fd) == str(tmp_path / "queue"):
            dir_syncs += 1
            time.sleep(0.02)  # a slow disk: renames pile up behind the flush in flight
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_dir_fsync)

    async def many() -> None:
        msgs = []
        for _ in range(50):
            m = spool.open_incoming(envelope(spool))
            m.write(b"x\r\n")
            msgs.append(m)
        await asyncio.gather(*(spool.commit(m) for m in msgs))

    asyncio.run(many())
    assert len(list(spool.qids())) == 50
    assert 1 <= dir_syncs < 50
    spool.close()


def test_recover_drops_unacknowledged_and_quarantines_corrupt(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    half = spool.open_incoming(envelope(spool))
    half.write(b"partial" * (half.SPILL_AT // 7 + 1))  # big enough to reach the disk
    assert half.path.exists()
    good = spool.open_incoming(envelope(spool))
    good.write(b"x\r\n")
    spool.commit_sync(good)
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
    spool.commit_sync(msg)
    qid = msg.envelope.qid
    st = QueueStatus(done={"rcpt:b@example.net": "done"}, errors={"x@y": "Deferred: 451"},
                     attempts=2, next_attempt=123.0)
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
    spool.commit_sync(msg)
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


def test_commit_failure_is_reported_and_leaves_nothing(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mailgate.queue.spool import SpoolError

    spool = Spool(tmp_path)
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
