"""``mailgate drain --handover HOST:PORT``: the mail a drained node could not deliver by its
deadline, relayed to another node, so that a node can be retired with an empty queue.

Run by the command after the daemon has exited (nothing else delivers from the spool then; a
message another runner holds is skipped all the same). Each queued message goes in one SMTP
transaction with its envelope as queued (sender, pending recipients, their DSN parameters)
and its content as received, our ``Received:`` included, through the SMTP mailer every
delivery uses. Only acceptance changes the queue: a recipient the other node takes is done,
and a message with none left is removed; a refusal, temporary or not, is logged like any
attempt and leaves the recipient queued here, never bounced (the other node refusing to
relay is a configuration fault, not the sender's). Held mail stays: the admin put it aside.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from mailgate import maillog
from mailgate.delivery import Job, Status
from mailgate.delivery.attempt import DeliveryContext, finish, log_outcomes
from mailgate.delivery.smtp import SmtpMailer
from mailgate.queue.spool import CorruptEntry, EntryLocked, QueuedMessage, RcptStatus, Recipient
from mailgate.routing import Route
from mailgate.tables.mailertable import NextHop


@dataclass
class Handover:
    """What a handover did."""

    sent: list[str] = field(default_factory=list)  # queue ids handed over whole
    kept: list[str] = field(default_factory=list)  # still queued here (some or all recipients)


def route_to(host: str, port: int, rcpt: Recipient) -> Route:
    return Route("relay", rcpt.address, hops=(NextHop(host, port, mx=False),), via="handover")


async def hand_over(ctx: DeliveryContext, host: str, port: int) -> Handover:
    """Every message in the queue, one after the other, to ``host:port``."""
    snap = ctx.snapshot()
    mailer = SmtpMailer(snap.config, ctx)
    done = Handover()
    for qid in list(ctx.spool.qids()):
        try:
            msg = ctx.spool.claim(qid)
        except (EntryLocked, CorruptEntry):
            done.kept.append(qid)  # another runner has it / for the admin to look at
            continue
        if msg is None:
            continue  # delivered meanwhile
        with msg:
            if msg.status.held:
                done.kept.append(qid)
            elif await _one(ctx, mailer, msg, host, port):
                done.sent.append(qid)
            else:
                done.kept.append(qid)
    maillog.handover_done(f"[{host}]:{port}", len(done.sent), len(done.kept))
    return done


async def _one(
    ctx: DeliveryContext, mailer: SmtpMailer, msg: QueuedMessage, host: str, port: int
) -> bool:
    """True when no recipient is left here."""
    status = msg.status
    jobs = [Job(r, route_to(host, port, r)) for r in status.pending(msg.envelope.recipients)]
    if jobs:
        started = time.time()
        results = list(zip(jobs, await mailer.deliver(msg, jobs), strict=True))
        log_outcomes(msg, [results], started, time.time(), ctx.metrics)
        for job, outcome in results:
            if outcome.status is Status.SENT:
                state = status.of(job.rcpt.address)
                state.targets[job.route.target] = RcptStatus.SENT
                state.status = RcptStatus.SENT
                state.last_error = None
    if status.pending(msg.envelope.recipients):
        await asyncio.to_thread(ctx.spool.save_status, msg.qid, status)
        return False
    finish(ctx, msg)
    return True
