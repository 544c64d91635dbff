"""Reports to the sender of a queued message: bounces, delay warnings and return receipts
(RFC 3464, written by ``dsn``), queued into the spool like received mail and handed to the
scheduler (``DeliveryContext.queued``); they are not counted as received.

As Sendmail's: a bounce lists every recipient that failed in one attempt (or expired); a
message from the null sender (a bounce, ours or another MTA's) cannot be returned, so its
failure goes to ``postmaster`` instead (a double bounce, "postmaster notify"), and the failure
of a postmaster notify is only logged, never reported again. Each report queued has its
maillog line: ``<qid>: <report qid>: DSN: <reason>`` or ``...: postmaster notify: <reason>``.

The thread rule of the spool holds here: the report is *built* in a worker thread (its
boundary check and its copy of the original read a whole message, up to 50 MB, from disk),
``BLOCK`` bytes at a time, and each batch is *written* into its ``IncomingMessage`` on the
loop. So the spare-file pool, which a spilling write takes a file from, is only ever touched
on the loop, and memory stays bounded by one batch plus the spool's write buffer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from mailgate import maillog
from mailgate.delivery import Job, Outcome
from mailgate.dsn import (
    DsnRecipient,
    dsn_stream,
    has_8bit_text,
    is_receipt,
    needs_utf8,
    warning_subject,
)
from mailgate.queue.spool import Envelope, QueuedMessage, Recipient, SpoolError
from mailgate.smtp import dsn_params
from mailgate.snapshot import Snapshot

if TYPE_CHECKING:
    from mailgate.delivery.attempt import DeliveryContext

BLOCK = 256 * 1024  # bytes of a report built per thread hop


def failed(job: Job, outcome: Outcome) -> DsnRecipient:
    """A recipient that failed for good in this attempt."""
    rcpt, route = job.rcpt, job.route
    return DsnRecipient(
        address=route.address if route.is_remote else rcpt.address,
        original=rcpt.original,
        status=outcome.dsn,
        diagnostic=outcome.reply.text if outcome.local else str(outcome.reply),
        local=outcome.local,
        remote_mta=outcome.remote_mta,
        last_attempt=time.time(),
        transcript=outcome.transcript,
        orcpt=dsn_params.orcpt_text(rcpt.orcpt) if rcpt.orcpt else None,
    )


def receipt(job: Job, outcome: Outcome) -> DsnRecipient:
    """NOTIFY=SUCCESS answered by us: the next hop does not do DSN (SMTP), or cannot (UUCP),
    or we delivered here."""
    route = job.route
    return replace(
        failed(job, outcome),
        action="relayed" if route.is_remote else "delivered",
        diagnostic=str(outcome.reply) if route.is_smtp else None,
        transcript=(),
    )


def late(
    rcpt: Recipient,
    last_error: str | None,
    now: float,
    *,
    warning: bool,
    retry_until: float | None = None,
) -> DsnRecipient:
    """A recipient still pending: expired (``warning`` False) or delayed (tried until
    ``retry_until``)."""
    return DsnRecipient(
        address=rcpt.address,
        original=rcpt.original,
        status="4.4.7",
        diagnostic=last_error or None,
        remote_mta=None,
        action="delayed" if warning else "failed",
        last_attempt=now,
        retry_until=retry_until if warning else None,
    )


def wants(rcpt: Recipient, kind: str) -> bool:
    """Does ``rcpt``'s NOTIFY= (RFC 3461) ask for a report of ``kind``? No NOTIFY: failures
    and delays yes, successes no."""
    if kind == "SUCCESS":
        return bool(rcpt.notify and "SUCCESS" in rcpt.notify)
    return not rcpt.notify or kind in rcpt.notify.upper()


async def bounce(
    ctx: DeliveryContext,
    snap: Snapshot,
    msg: QueuedMessage,
    recipients: Sequence[tuple[Recipient, DsnRecipient]],
    reason: str,
) -> bool:
    """Return failed recipients, those whose NOTIFY asks for it, in one report: to the
    sender, or to the postmaster for a message from the null sender; a postmaster notify that
    failed is logged only. False (logged) when the spool cannot take the report (a full
    disk): the caller keeps those recipients pending."""
    env = msg.envelope
    if env.postmaster_notify:
        maillog.postmaster_notify_failed(env.qid, reason)
        return True
    wanted = [d for r, d in recipients if wants(r, "FAILURE")]
    if not wanted:
        return True
    double = not env.sender
    if double and not snap.config.queue.double_bounce_address:
        maillog.double_bounce_dropped(env.qid, reason)  # Sendmail's empty DoubleBounceAddress
        return True
    try:
        report_qid = await queue_dsn(ctx, snap, msg, wanted, to_postmaster=double)
    except (OSError, SpoolError) as exc:
        maillog.bounce_queue_failed(env.qid, exc)
        return False
    if double:
        maillog.postmaster_notified(env.qid, report_qid, reason)
    else:
        maillog.dsn_created(env.qid, report_qid, reason)
    return True


async def send_receipts(
    ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, receipts: list[DsnRecipient]
) -> None:
    env = msg.envelope
    if not env.sender or env.is_bounce:
        return
    try:
        receipt_qid = await queue_dsn(ctx, snap, msg, receipts)
    except (OSError, SpoolError) as exc:
        # The message is delivered; delivering it again for want of a receipt is worse.
        maillog.receipt_queue_failed(env.qid, exc)
    else:
        maillog.dsn_created(env.qid, receipt_qid, "Return receipt")


async def warn(
    ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, recipients: list[DsnRecipient]
) -> bool:
    """A delay warning; False (logged) if it could not be queued (try at the next attempt)."""
    after = snap.config.queue.warn_after
    try:
        warning_qid = await queue_dsn(ctx, snap, msg, recipients, warning_after=after)
    except (OSError, SpoolError) as exc:
        maillog.warning_queue_failed(msg.envelope.qid, exc)
        return False
    maillog.dsn_created(msg.envelope.qid, warning_qid, warning_subject(after))
    return True


def _take(blocks: Iterator[bytes], limit: int) -> list[bytes]:
    """Up to ``limit`` bytes of ``blocks`` (at least one block, if any is left). In a worker
    thread: it reads the original message."""
    out: list[bytes] = []
    size = 0
    for block in blocks:
        out.append(block)
        size += len(block)
        if size >= limit:
            break
    return out


async def queue_dsn(
    ctx: DeliveryContext,
    snap: Snapshot,
    msg: QueuedMessage,
    recipients: list[DsnRecipient],
    warning_after: float | None = None,
    *,
    to_postmaster: bool = False,
) -> str:
    """Write a DSN for ``msg`` into the spool, commit it and hand it to ``ctx.queued``; its
    queue id. To the sender, or with ``to_postmaster`` (a double bounce) to
    ``[queue] double_bounce_address``: by default ``postmaster``, a local name that the
    aliases file may send elsewhere (root gets it when it has no alias and no mailbox).
    Raises OSError or SpoolError when the spool cannot take it (nothing is left)."""
    cfg = snap.config
    env = msg.envelope
    spool = ctx.spool
    # RFC 6533: a report on internationalised mail is itself internationalised and goes
    # with SMTPUTF8; one that carries 8-bit text (the original, a UTF-8 reply) with 8BITMIME.
    international = env.smtputf8 or needs_utf8(env.sender, recipients)
    to = cfg.queue.double_bounce_address if to_postmaster else env.sender
    bounce_env = Envelope(
        qid=spool.new_qid(),
        sender="",
        recipients=[Recipient(to, to)],
        arrival=time.time(),
        client_ip="127.0.0.1",
        client_name=cfg.hostname,
        helo=cfg.hostname,
        proto="local",
        is_bounce=True,
        postmaster_notify=to_postmaster,
        smtputf8=international,
        body_8bit=international or env.body_8bit or has_8bit_text(recipients),
    )
    # RET=FULL or HDRS as the sender asked; without RET, a failure returns the whole message
    # and a return receipt only its headers (RFC 3461 4.3), as Sendmail.
    ret = (env.ret or "").upper()
    _message_id, blocks = dsn_stream(
        hostname=cfg.hostname,
        queue_id=env.qid,
        arrival=env.arrival,
        client=maillog.relay_name(env.client_ip, env.client_name),
        sender=env.sender,
        recipients=recipients,
        original_path=msg.path,
        original_offset=msg.offset,
        return_headers_only=ret == "HDRS" or (is_receipt(recipients) and ret != "FULL"),
        warning_after=warning_after,
        envid=dsn_params.xtext_decode(env.envid) if env.envid else None,
        international=international,
        postmaster=(to if "@" in to else f"{to}@{cfg.hostname}") if to_postmaster else None,
    )
    incoming = spool.open_incoming(bounce_env)
    try:
        while batch := await asyncio.to_thread(_take, blocks, BLOCK):
            for block in batch:
                incoming.write(block)  # on the loop: a spill may take a spare file
    except BaseException:
        # A bounce cut short (ENOSPC) leaves no partial file behind to hold disk space.
        incoming.discard()
        raise
    queued = await spool.commit(incoming, lock=True)  # which removes the file if it fails
    ctx.queued(queued)
    return bounce_env.qid
