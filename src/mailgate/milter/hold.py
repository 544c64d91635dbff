"""Where a quarantined message goes: the hold queue, with its reason, for the admin.

The one place that puts a message on hold for the milters (a filter's QUARANTINE, or the
``quarantine`` default action), with the queue tools' hold (``mailgate hold``): the reason in
the message's status file (``QueueStatus.hold``), written under the delivery lock the commit
handed over. A held message is never attempted; ``mailgate mailq`` shows it with ``!`` and its
``QUARANTINE:`` line, ``mailgate release`` lets it go. The message is committed first: a hold
never loses it (a crash before its status file is written delivers it at the next start).
"""

from __future__ import annotations

import asyncio

from mailgate import maillog
from mailgate.queue.spool import QueuedMessage, Spool


async def hold_message(spool: Spool, queued: QueuedMessage, reason: str) -> bool:
    """Put ``queued`` (committed, its lock held) on hold; its lock is released. False if the
    status file could not be written: it stays queued, as any message, and is logged. The
    write and its fsync run in a thread: the event loop never waits for the disk."""
    queued.status.hold = reason
    try:
        await asyncio.to_thread(spool.save_status, queued.qid, queued.status)
    except OSError as exc:
        maillog.spool_error(queued.qid, f"cannot put the message on hold: {exc.strerror or exc}")
        return False
    finally:
        queued.close()
    maillog.placed_on_hold(queued.qid, reason)
    return True
