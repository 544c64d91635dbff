"""The queue tools that change messages — ``mailgate hold``, ``release``, ``delete``,
``requeue`` — and the wake-up signal that tells the running daemon.

Each runs in its own process, safe while the daemon runs, because the message's delivery lock
decides (``Spool.lock_entry``): a tool changes a message only while holding it, so never while
an attempt (the daemon's or ``mailgate flush``'s) has it, and an attempt that comes after reads
what the tool wrote. A message being delivered right now is waited for (``wait`` seconds, then
left unchanged and reported), never changed under the attempt.

- hold: the reason goes into the status file (``QueueStatus.hold``), written under the lock.
  The daemon may have the message scheduled in memory; its attempt looks at the status under
  the same lock, skips a held message and forgets it.
- release: clears it (and makes it due now in the status file), then marks it due
  (``Spool.mark_due``) and the caller wakes the daemon (``wake_daemon``).
- delete: removes the files under the lock, and logs ``<qid>: removed`` (Postfix's line).
- requeue: routes are not stored (each attempt routes the pending recipients with the tables
  in force, ``delivery.attempt.plan``), so requeueing is making the message due now: a
  marker, no lock, nothing of the message changed. A held message stays held.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from mailgate import maillog, pidfile
from mailgate.queue.spool import DUE_SIGNAL, CorruptEntry, EntryLocked, Spool


class Outcome(StrEnum):
    DONE = "done"
    UNCHANGED = "unchanged"  # already so: held (hold, requeue) or not held (release)
    NOT_FOUND = "not found"
    BUSY = "busy"  # a runner held the lock for the whole wait
    UNREADABLE = "unreadable"  # its envelope cannot be read: left for the daemon
    FAILED = "failed"  # the status could not be written (the disk is full…)


class Result(NamedTuple):
    qid: str
    outcome: Outcome
    detail: str = ""  # FAILED: why


Change = Callable[[Spool, str, float], Outcome]


def hold(spool: Spool, qid: str, wait: float, reason: str = "") -> Outcome:
    msg = spool.claim(qid, wait=wait) if spool.valid_qid(qid) else None
    if msg is None:
        return Outcome.NOT_FOUND
    with msg:
        if msg.status.held:
            return Outcome.UNCHANGED
        msg.status.hold = reason
        spool.save_status(qid, msg.status)
    maillog.placed_on_hold(qid, reason)
    return Outcome.DONE


def release(spool: Spool, qid: str, wait: float) -> Outcome:
    msg = spool.claim(qid, wait=wait) if spool.valid_qid(qid) else None
    if msg is None:
        return Outcome.NOT_FOUND
    with msg:
        if not msg.status.held:
            return Outcome.UNCHANGED
        msg.status.hold = None
        # Due now on disk too: a daemon that missed the marker takes it on at its next scan.
        msg.status.next_attempt = time.time()
        spool.save_status(qid, msg.status)
    spool.mark_due(qid)
    maillog.released_from_hold(qid)
    return Outcome.DONE


def delete(spool: Spool, qid: str, wait: float) -> Outcome:
    """Without reading the envelope, so that an unreadable entry can be deleted too."""
    fd = spool.lock_entry(qid, wait=wait) if spool.valid_qid(qid) else None
    if fd is None:
        return Outcome.NOT_FOUND
    try:
        spool.delete(qid)
    finally:
        os.close(fd)
    maillog.deleted(qid)
    return Outcome.DONE


def requeue(spool: Spool, qid: str, wait: float = 0.0) -> Outcome:
    """``wait`` is not used: requeueing changes nothing of the message, so takes no lock."""
    if not spool.valid_qid(qid):
        return Outcome.NOT_FOUND
    if spool.load_status(qid).held:  # read without the lock: only to say so
        return Outcome.UNCHANGED
    if not spool.mark_due(qid):
        return Outcome.NOT_FOUND
    maillog.requeued(qid)
    return Outcome.DONE


def apply(spool: Spool, change: Change, qids: Iterable[str], wait: float) -> Iterator[Result]:
    """``change`` each of ``qids``: first all without waiting, then those a runner had, each
    waited for until ``wait`` seconds after that first pass. Only locked messages are kept
    for the second pass (a few hundred at most: the daemon's attempts in progress and its
    fresh messages waiting for a slot), so ``qids`` may be the whole queue, streamed."""
    busy = []
    for qid in qids:
        result = _one(spool, change, qid, 0.0)
        if result.outcome is Outcome.BUSY:
            busy.append(qid)
        else:
            yield result
    deadline = time.monotonic() + wait
    for qid in busy:
        yield _one(spool, change, qid, max(0.0, deadline - time.monotonic()))


def _one(spool: Spool, change: Change, qid: str, wait: float) -> Result:
    try:
        return Result(qid, change(spool, qid, wait))
    except EntryLocked:
        return Result(qid, Outcome.BUSY)
    except CorruptEntry:
        return Result(qid, Outcome.UNREADABLE)
    except OSError as exc:
        return Result(qid, Outcome.FAILED, exc.strerror or str(exc))


def wake_daemon(pid_file: Path | None) -> int | None:
    """Send ``DUE_SIGNAL`` to the daemon that holds ``pid_file`` (the master forwards it to
    its workers); its pid, or None when there is none to tell: no pid file, or one no daemon
    holds (not running, or a stale file: ``pidfile.inspect``), or one still starting (it
    reads ``due/`` once started). Untold, a daemon reads ``due/`` at its next queue run."""
    if pid_file is None:
        return None
    holder = pidfile.inspect(pid_file)
    if not holder.running or holder.pid is None:
        return None
    try:
        os.kill(holder.pid, DUE_SIGNAL)
    except OSError:  # gone since, or not ours to signal
        return None
    return holder.pid
