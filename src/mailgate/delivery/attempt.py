"""One delivery attempt of one queued message: route, deliver, record, bounce, reschedule.

Every recipient is routed again with the tables in force now (a reload changes where queued mail
goes), grouped by next hop so each hop gets one transaction carrying all its recipients, and
the outcome is written back to the spool before the message is forgotten or rescheduled.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailgate import maillog, tls
from mailgate.address import Mailbox
from mailgate.config import DeliverySettings
from mailgate.delivery import smtp as smtp_delivery
from mailgate.delivery.local import LocalDeliveryError, deliver_file, deliver_maildir
from mailgate.delivery.pipe import deliver_program
from mailgate.delivery.smtp import Outcome
from mailgate.dns import Resolver
from mailgate.dsn import DsnRecipient, has_8bit_text, is_receipt, needs_utf8, write_dsn
from mailgate.queue.spool import Envelope, QueuedMessage, Recipient, Spool, SpoolError
from mailgate.reply import Reply
from mailgate.routing import Route, resolve
from mailgate.smtp import dsn_params
from mailgate.smtp.client import Timeouts
from mailgate.snapshot import Snapshot


@dataclass
class DeliveryContext:
    spool: Spool
    resolver: Resolver
    snapshot: Callable[[], Snapshot]  # the tables in force now
    on_new_message: Callable[[str], None]  # a bounce was queued: schedule it
    transcript: Callable[[str], None] | None = None
    # Messages just committed by this process, still holding their delivery lock (an open,
    # flock'ed fd): the first attempt needs no open, lock or re-read of the envelope.
    hot: dict[str, tuple[QueuedMessage, int]] = field(default_factory=dict)
    connections: smtp_delivery.ConnectionCache | None = None  # the daemon reuses connections
    max_hot: int = 1000

    def add_hot(self, msg: QueuedMessage, lock_fd: int) -> bool:
        if len(self.hot) >= self.max_hot:
            return False
        self.hot[msg.envelope.qid] = (msg, lock_fd)
        return True


def mailbox_of(address: str) -> Mailbox:
    local, at, domain = address.rpartition("@")
    if not at:
        return Mailbox(address, "")
    return Mailbox(local, domain)


def retry_delay(attempts: int, retry_min: float, run_interval: float) -> float:
    """Doubling back-off from ``retry_min``, capped by the queue run interval, ±10 % jitter
    so a queue full of mail for one dead host does not retry in lock-step."""
    base = min(run_interval, retry_min * (2 ** max(0, attempts - 1)))
    return base * random.uniform(0.9, 1.1)


def delivery_timeouts(settings: DeliverySettings) -> Timeouts:
    """The SMTP client's timeouts: RFC 5321's, scaled down by a ``command_timeout`` below
    its 5 minutes; the TCP connect timeout is ``connect_timeout`` as configured, not scaled."""
    timeouts = Timeouts()
    if settings.command_timeout < 300:
        timeouts = timeouts.scaled(settings.command_timeout / 300)
    return replace(timeouts, connect=settings.connect_timeout)


def interval_text(seconds: float) -> str:
    """Sendmail's ``pintvl``: "5 days", "4 hours", "1 hour, 30 minutes", "2 seconds"."""
    rest = max(0, round(seconds))
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return ", ".join(parts) or "0 seconds"


def _stat(outcome: Outcome) -> str:
    text = outcome.reply.text.replace("\n", " ")
    if outcome.status == "sent":
        return f"Sent ({text})"
    if outcome.status == "temp":
        return f"Deferred: {outcome.reply}"
    if outcome.reply.code == 550 and outcome.reply.enhanced == "5.1.1":
        return "User unknown"
    return str(outcome.reply)


async def _deliver_local(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, route: Route,
                         rcpt: Recipient) -> Outcome:
    env = msg.envelope
    cfg = snap.config
    try:
        if route.mailer == "local":
            await asyncio.to_thread(
                deliver_maildir, route.address, cfg.local.maildir_root, msg.path, msg.offset,
                hostname=cfg.hostname, return_path=env.sender, delivered_to=rcpt.address)
        elif route.mailer == "*file*":
            await asyncio.to_thread(deliver_file, Path(route.address),
                                    msg.path, msg.offset, return_path=env.sender)
        else:
            await deliver_program(route.address, msg.path, msg.offset, sender=env.sender,
                                  recipient=rcpt.address)
    except LocalDeliveryError as exc:
        return Outcome("temp" if exc.temporary else "perm", exc.reply, "local")
    return Outcome("sent", Reply(250, "2.0.0", "Delivered"), None)


async def attempt(ctx: DeliveryContext, qid: str) -> float | None:
    """Try every pending recipient once. Returns the next attempt time, or None when done."""
    hot = ctx.hot.pop(qid, None)
    if hot is not None:
        msg, lock_fd = hot
        msg.fd = lock_fd
        holder = [lock_fd]
        try:
            return await _attempt_locked(ctx, msg, holder)
        finally:
            if holder:
                os.close(lock_fd)
    spool = ctx.spool
    with spool.locked(qid) as mine:
        if not mine:
            # Another runner (``mailgate flush``) has it: look again later unless it is gone.
            return time.time() + 60 if (spool.queue / qid).exists() else None
        loaded = spool.load(qid)
        if loaded is None:
            return None
        return await _attempt_locked(ctx, loaded)


def _remove(spool: Spool, msg: QueuedMessage, lock_fds: list[int] | None) -> None:
    """Forget a finished message. On the event loop: a rename (or an unlink and a close) is
    quicker than a hand-off to a thread."""
    # A status file exists only once an attempt has been recorded (attempts ≥ 1).
    status_file = msg.status.attempts > 0
    if lock_fds and spool.recycle(msg.envelope.qid, lock_fds[0], msg.offset + msg.size,
                                  status_file=status_file):
        lock_fds.pop(0)  # the spool keeps the file open for the next message
    else:
        spool.remove(msg.envelope.qid, status_file=status_file)
    while lock_fds:
        os.close(lock_fds.pop())


async def _attempt_locked(ctx: DeliveryContext, msg: QueuedMessage,
                          lock_fds: list[int] | None = None) -> float | None:
    """``lock_fds``: the delivery lock's descriptor, closed with the removal."""
    snap = ctx.snapshot()
    cfg = snap.config
    env, st = msg.envelope, msg.status
    started = time.time()
    pending = [r for r in env.recipients if f"rcpt:{r.address}" not in st.done]
    work: list[tuple[Recipient, Route]] = []
    targets_of: dict[str, list[str]] = {}
    queued_targets: set[str] = set()
    for rcpt in pending:
        routes = resolve(mailbox_of(rcpt.address), snap.routing, expand=True)
        targets_of[rcpt.address] = [r.target for r in routes]
        for r in routes:
            # root@localhost and postmaster may both end at root: one delivery, as Sendmail.
            if r.target not in st.done and r.target not in queued_targets:
                queued_targets.add(r.target)
                work.append((rcpt, r))

    results: list[tuple[Recipient, Route, Outcome]] = []
    smtp_groups: dict[tuple[str, str], list[tuple[Recipient, Route]]] = {}
    jobs = []
    for rcpt, route in work:
        if route.mailer == "error" and route.error is not None:
            reply = route.error.reply(f"<{rcpt.address}>")
            status = "temp" if reply.is_temporary else "perm"
            results.append((rcpt, route, Outcome(status, reply)))
        elif route.is_smtp:
            smtp_groups.setdefault((route.mailer, route.host), []).append((rcpt, route))
        else:
            jobs.append(_local_job(ctx, snap, msg, rcpt, route, results))
    timeouts = delivery_timeouts(cfg.delivery)
    for group in smtp_groups.values():
        jobs.append(_smtp_job(ctx, snap, msg, group, timeouts, results))
    await asyncio.gather(*jobs)

    now = time.time()
    failed: list[tuple[Recipient, Route, Outcome]] = []
    receipts: list[DsnRecipient] = []
    for rcpt, route, outcome in results:
        maillog.delivery(
            env.qid, route.address if route.is_smtp or route.mailer == "error" else rcpt.address,
            delay=now - env.arrival, xdelay=now - started, mailer=route.mailer,
            relay=outcome.relay, dsn=outcome.dsn, stat=_stat(outcome),
            reply=str(outcome.reply) if route.is_smtp and outcome.relay else None,
            ctladdr=None)
        if outcome.status == "sent":
            st.done[route.target] = "sent"
            if rcpt.notify and "SUCCESS" in rcpt.notify and not outcome.dsn_passed:
                receipts.append(_receipt(rcpt, route, outcome))
        elif outcome.status == "perm":
            st.done[route.target] = "failed"
            failed.append((rcpt, route, outcome))
            st.last_message = _stat(outcome)
        else:
            st.errors[rcpt.address] = _stat(outcome)
            st.last_message = _stat(outcome)
    for rcpt in pending:
        if all(t in st.done for t in targets_of[rcpt.address]):
            st.done[f"rcpt:{rcpt.address}"] = "done"
            st.errors.pop(rcpt.address, None)

    if failed and not await _bounced(ctx, snap, msg, [_failed_recipient(r, rt, o)
                                                       for r, rt, o in failed],
                                     reason=failed[0][2]):
        # No room for the bounce (the disk is full): those recipients stay pending, to be
        # failed and bounced at the next attempt, rather than dropped with no bounce at all.
        for rcpt, route, _outcome in failed:
            st.done.pop(route.target, None)
            st.done.pop(f"rcpt:{rcpt.address}", None)
    if receipts and env.sender and not env.is_bounce:
        try:
            receipt_qid = await queue_dsn(ctx, snap, msg, receipts)
        except (OSError, SpoolError) as exc:
            # The message is delivered; delivering it again for want of a receipt is worse.
            maillog.error(f"{env.qid}: cannot queue the return receipt: {exc}")
        else:
            maillog.dsn_created(env.qid, receipt_qid, "Return receipt")

    remaining = [r for r in env.recipients if f"rcpt:{r.address}" not in st.done]
    if not remaining:
        _remove(ctx.spool, msg, lock_fds)
        return None
    if now - env.arrival >= cfg.queue.max_age:
        text = f"Cannot send message for {interval_text(cfg.queue.max_age)}"
        expired = []
        for rcpt in remaining:
            last = st.errors.get(rcpt.address, "")
            expired.append(DsnRecipient(
                address=rcpt.address, original=rcpt.original, status="4.4.7",
                diagnostic=last or None, remote_mta=None, last_attempt=now))
            maillog.delivery(env.qid, rcpt.address, delay=now - env.arrival, xdelay=0,
                             mailer="esmtp", relay=None, dsn="4.4.7", stat=text)
        if await _bounced(ctx, snap, msg, expired,
                          reason=Outcome("perm", Reply(554, "4.4.7", text))):
            _remove(ctx.spool, msg, lock_fds)
            return None
        # The bounce could not be queued: the message stays, and expires again next time.
    if (not st.warned and cfg.queue.warn_after and now - env.arrival >= cfg.queue.warn_after
            and env.sender and not env.is_bounce):
        st.warned = True
        warn = [DsnRecipient(address=r.address, original=r.original, status="4.4.7",
                                diagnostic=st.errors.get(r.address), remote_mta=None,
                                action="delayed", last_attempt=now)
                for r in remaining if not r.notify or "DELAY" in r.notify.upper()]
        if warn:
            try:
                await queue_dsn(ctx, snap, msg, warn,
                                warning_hours=int(cfg.queue.warn_after // 3600) or 1)
            except (OSError, SpoolError) as exc:
                st.warned = False  # the next attempt tries again
                maillog.error(f"{env.qid}: cannot queue the delay warning: {exc}")
    st.attempts += 1
    st.last_attempt = now
    st.next_attempt = now + retry_delay(st.attempts, cfg.queue.retry_min, cfg.queue.run_interval)
    try:
        await asyncio.to_thread(ctx.spool.save_status, env.qid, st)
    except OSError as exc:
        # The status on disk stays as it was (it is replaced whole or not at all); what this
        # attempt delivered may be delivered again (at-least-once, as after a crash here). The
        # message keeps its back-off rather than the scheduler's 5 minutes after an error.
        maillog.error(f"{env.qid}: cannot record the delivery status: {exc}")
    return st.next_attempt


async def _local_job(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, rcpt: Recipient,
                     route: Route, results: list[tuple[Recipient, Route, Outcome]]) -> None:
    results.append((rcpt, route, await _deliver_local(ctx, snap, msg, route, rcpt)))


async def _smtp_job(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage,
                    group: list[tuple[Recipient, Route]], timeouts: Timeouts,
                    results: list[tuple[Recipient, Route, Outcome]]) -> None:
    cfg = snap.config
    route = group[0][1]
    first_rcpt: dict[str, Recipient] = {}
    for rcpt, rt in group:
        first_rcpt.setdefault(rt.address, rcpt)
    addresses = list(first_rcpt)
    dsn = [(r.notify, dsn_params.orcpt_for(r.orcpt, r.original)) for r in first_rcpt.values()]
    outcomes = await smtp_delivery.deliver(
        msg, route, addresses, resolver=ctx.resolver, hostname=cfg.hostname,
        helo_name=cfg.helo_name, timeouts=timeouts, source_address=cfg.delivery.bind_address,
        default_port=cfg.delivery.port,
        transcript=ctx.transcript, cache=ctx.connections, dsn=dsn,
        tls_context=tls.client_context() if cfg.tls.delivery == "may" else None,
        line_length_limit=cfg.delivery.line_length_limit)
    for rcpt, rt in group:
        results.append((rcpt, rt, outcomes[rt.address]))


def _failed_recipient(rcpt: Recipient, route: Route, outcome: Outcome) -> DsnRecipient:
    return DsnRecipient(
        address=route.address if route.is_smtp else rcpt.address,
        original=rcpt.original,
        status=outcome.dsn,
        diagnostic=str(outcome.reply),
        remote_mta=outcome.remote_mta,
        last_attempt=time.time(),
        transcript=outcome.transcript,
        orcpt=dsn_params.orcpt_text(rcpt.orcpt) if rcpt.orcpt else None,
    )


def _receipt(rcpt: Recipient, route: Route, outcome: Outcome) -> DsnRecipient:
    """NOTIFY=SUCCESS answered by us: the next hop does not do DSN, or we delivered here."""
    return replace(_failed_recipient(rcpt, route, outcome),
                   action="relayed" if route.is_smtp else "delivered",
                   diagnostic=str(outcome.reply) if route.is_smtp else None, transcript=())


async def _bounced(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage,
                   failed: list[DsnRecipient], reason: Outcome) -> bool:
    """``bounce``; False (logged) when the spool cannot take the bounce, e.g. a full disk."""
    try:
        await bounce(ctx, snap, msg, failed, reason=reason)
    except (OSError, SpoolError) as exc:
        maillog.error(f"{msg.envelope.qid}: cannot queue the bounce, will try again: {exc}")
        return False
    return True


async def bounce(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage,
                 failed: list[DsnRecipient], reason: Outcome) -> None:
    """Return failed recipients to the sender; never for a message from the null sender."""
    env = msg.envelope
    wanted = [f for f, r in zip(failed, _recipients_for(env, failed), strict=True)
              if r is None or not r.notify or "FAILURE" in r.notify.upper()]
    if not env.sender or env.is_bounce:
        maillog.info(f"{env.qid}: bounce for null sender not sent: {_stat(reason)}")
        return
    if not wanted:
        return
    bounce_qid = await queue_dsn(ctx, snap, msg, wanted)
    maillog.dsn_created(env.qid, bounce_qid, _stat(reason))


def _recipients_for(env: Envelope, failed: list[DsnRecipient]) -> list[Recipient | None]:
    by_original = {r.original: r for r in env.recipients}
    by_address = {r.address: r for r in env.recipients}
    return [by_original.get(f.original or "") or by_address.get(f.address) for f in failed]


async def queue_dsn(ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage,
                    recipients: list[DsnRecipient], warning_hours: int | None = None) -> str:
    """Write a DSN for ``msg`` into the spool and commit it like any received message."""
    cfg = snap.config
    env = msg.envelope
    spool = ctx.spool
    # RFC 6533: a report on internationalised mail is itself internationalised and goes
    # with SMTPUTF8; one that carries 8-bit text (the original, a UTF-8 reply) with 8BITMIME.
    international = env.smtputf8 or needs_utf8(env.sender, recipients)
    bounce_env = Envelope(
        qid=spool.new_qid(), sender="", recipients=[Recipient(env.sender, env.sender)],
        arrival=time.time(), client_ip="127.0.0.1", client_name=cfg.hostname,
        helo=cfg.hostname, proto="local", is_bounce=True, smtputf8=international,
        body_8bit=international or env.body_8bit or has_8bit_text(recipients),
    )
    incoming = spool.open_incoming(bounce_env)
    client = maillog.relay_name(env.client_ip, env.client_name)

    # RET=FULL or HDRS as the sender asked; without RET, a failure returns the whole message
    # and a return receipt only its headers (RFC 3461 4.3), as Sendmail.
    ret = (env.ret or "").upper()
    headers_only = ret == "HDRS" or (is_receipt(recipients) and ret != "FULL")

    def write() -> None:
        write_dsn(incoming, hostname=cfg.hostname, queue_id=env.qid, arrival=env.arrival,
                  client=client, sender=env.sender, recipients=recipients,
                  original_path=msg.path, original_offset=msg.offset,
                  return_headers_only=headers_only, warning_hours=warning_hours,
                  envid=dsn_params.xtext_decode(env.envid) if env.envid else None,
                  international=international)

    try:
        await asyncio.to_thread(write)
    except BaseException:
        # A bounce cut short (ENOSPC) leaves no partial file behind to hold disk space.
        incoming.discard()
        raise
    await spool.commit(incoming)  # which removes the file itself if it fails
    ctx.on_new_message(bounce_env.qid)
    return bounce_env.qid
