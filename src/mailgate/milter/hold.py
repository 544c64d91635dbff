"""Where a quarantined message goes: out of delivery, with its reason, for the admin.

The one place that puts a message on hold for the milters (a filter's QUARANTINE, or the
``quarantine`` default action). For now it moves the committed queue entry to
``spool/hold/<qid>`` with ``<qid>.reason`` beside it, a folder the daemon never delivers
from; the queue tools' hold (``mailgate hold``: the reason kept in the message's status
file, ``mailgate release`` to let it go) replaces this function's body once both are in
main, and nothing else changes. The message is committed first: a hold never loses it (a
crash between the move and the removal of its incoming/ name delivers it at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from mailgate import maillog
from mailgate.queue.spool import QueuedMessage, Spool


async def hold_message(spool: Spool, queued: QueuedMessage, reason: str) -> bool:
    """Keep ``queued`` (committed, its lock held) out of delivery; its lock is released.
    False if it could not be moved: it stays queued (and undelivered until a queue run).
    The moves and their fsyncs run in a thread: the event loop never waits for the disk."""
    qid = queued.qid
    held = spool.root / "hold"
    try:
        await asyncio.to_thread(_move, spool, qid, held, reason)
    except OSError as exc:
        maillog.spool_error(qid, f"cannot put the message on hold: {exc.strerror or exc}")
        queued.close()
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spool.incoming / qid)  # its second name: the hold/ entry is on disk
    queued.close()
    maillog.milter_held(qid, held)
    return True


def _move(spool: Spool, qid: str, held: Path, reason: str) -> None:
    held.mkdir(mode=0o700, exist_ok=True)
    (held / f"{qid}.reason").write_text(reason + "\n", encoding="utf-8", errors="replace")
    os.rename(spool.queue / qid, held / qid)
    _fsync_dir(held)
    _fsync_dir(spool.queue)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
