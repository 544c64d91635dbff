"""One delivery attempt of one queued message, in four named phases:

- ``plan``: route every pending recipient again with the tables in force now (a reload
  changes where queued mail goes), drop the targets already done, and batch the rest by
  mailer and next hop, so each hop gets one transaction carrying all its recipients;
- ``deliver_all``: every batch at once, each through its ``Mailer`` (``delivery.mailers``);
- ``log_outcomes``: the maillog's ``to=`` lines of each batch, Sendmail's (``to_lines``);
- ``record``: the outcomes into the message's per-recipient status;
  failures are bounced (``delivery.notify``), then ``settle`` marks the recipients whose
  every target is done, and return receipts go out;
- ``decide``: ``Done | Expire | Warn | RetryAt``, which ``act`` carries out: the message is
  finished (its file kept as a spare or removed), its remaining recipients bounced, a delay
  warning sent, or its status written (fsync'd) and its next attempt returned.

The attempt owns the ``QueuedMessage`` it is given (hot from a commit) or claims (from the
spool): its open, locked descriptor is released when the attempt ends, whatever happens. A
message on hold (``mailgate hold``) is looked at under that lock and left alone: the caller
forgets it until ``mailgate release`` marks it due.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mailgate import maillog
from mailgate.config import Config
from mailgate.delivery import Job, Mailer, Outcome, Status, notify
from mailgate.delivery.mailers import build_mailers
from mailgate.delivery.smtp import ConnectionCache, DestinationLimits
from mailgate.dns import Resolver
from mailgate.dsn import DsnRecipient, interval_text
from mailgate.metrics import Row as MetricsRow
from mailgate.metrics import local_row
from mailgate.queue.spool import (
    HELD_DUE,
    CorruptEntry,
    EntryLocked,
    QueuedMessage,
    QueueStatus,
    RcptStatus,
    Recipient,
    Spool,
)
from mailgate.routing import Route, resolve
from mailgate.snapshot import Snapshot


@dataclass
class DeliveryContext:
    """What attempts share: the spool, DNS, the tables in force, where new reports go."""

    spool: Spool
    resolver: Resolver
    snapshot: Callable[[], Snapshot]  # the tables in force now
    queued: Callable[[QueuedMessage], None]  # a report was queued: take it on (it is yours)
    transcript: Callable[[str], None] | None = None  # `mailgate flush -v`: the SMTP dialogue
    # The daemon: another runner has the message; it stays on disk, due again at that time
    # (``QueueFeeder.outside``), rather than in the scheduler's window.
    elsewhere: Callable[[str, float], None] | None = None
    connections: ConnectionCache | None = None  # the daemon reuses next-hop connections
    limits: DestinationLimits = field(default_factory=DestinationLimits)  # per next hop
    metrics: MetricsRow = field(default_factory=local_row)  # the daemon's counts: our row
    # The mailer registry (``delivery.mailers``); tests give fakes.
    make_mailers: Callable[[Config, DeliveryContext], dict[str, Mailer]] = build_mailers
    _mailers: tuple[Snapshot, Resolver, dict[str, Mailer]] | None = field(default=None, repr=False)

    def mailers(self, snap: Snapshot) -> dict[str, Mailer]:
        """The mailers for ``snap``, made once per snapshot (and resolver)."""
        made = self._mailers
        if made is None or made[0] is not snap or made[1] is not self.resolver:
            made = self._mailers = (snap, self.resolver, self.make_mailers(snap.config, self))
        return made[2]


def retry_delay(attempts: int, retry_min: float, run_interval: float) -> float:
    """Doubling back-off from ``retry_min``, capped by the queue run interval, ±10 % jitter
    so a queue full of mail for one dead host does not retry in lock-step."""
    base = min(run_interval, retry_min * (2 ** max(0, attempts - 1)))
    return float(base * random.uniform(0.9, 1.1))


# -- the attempt --------------------------------------------------------------------------------
async def attempt(
    ctx: DeliveryContext, qid: str, message: QueuedMessage | None = None
) -> float | None:
    """Try every pending recipient of ``qid`` once; ``message``: it, hot from its commit (this
    attempt then owns it). Returns the next attempt time, or None when done."""
    if message is None:
        try:
            message = ctx.spool.claim(qid)
        except EntryLocked:
            # Another runner (``mailgate flush``, another worker) has it: look again later
            # unless it is gone.
            if not (ctx.spool.queue / qid).exists():
                return None
            again = time.time() + 60
            if ctx.elsewhere is None:
                return again
            ctx.elsewhere(qid, again)
            return None
        except CorruptEntry as exc:
            ctx.spool.quarantine(qid, exc.reason)
            return None
        if message is None:
            return None  # delivered meanwhile
        if message.status.held:
            # ``mailgate hold`` set it under this lock after the message was scheduled:
            # never attempted while held; ``release`` schedules it again.
            message.close()
            ctx.spool.set_due(qid, HELD_DUE)  # written by an older version: passes skip it
            maillog.held_skipped(qid)
            return None
    with message:
        return await _attempt(ctx, message)


async def _attempt(ctx: DeliveryContext, msg: QueuedMessage) -> float | None:
    snap = ctx.snapshot()
    started = time.time()
    planned = plan(msg, snap, ctx.mailers(snap))
    delivered = await deliver_all(msg, planned)
    now = time.time()
    log_outcomes(msg, delivered, started, now, ctx.metrics)
    recorded = record(msg.status, [result for batch in delivered for result in batch])
    if recorded.failed:
        # In the attempt in which the message expires, what fails now and what expires with
        # it go back in one report, as Sendmail returns an envelope once per queue run.
        expiring = now - msg.envelope.arrival >= snap.config.queue.max_age
        expired = still_pending(msg.status, planned) if expiring else []
        if await notify.bounce(
            ctx,
            snap,
            msg,
            [(j.rcpt, notify.failed(j, o)) for j, o in recorded.failed]
            + expiry_reports(msg, expired, now),
            reason=recorded.failed[0][1].stat,
        ):
            log_expired(ctx, snap, msg, expired, now)
            for rcpt in expired:
                msg.status.of(rcpt.address).status = RcptStatus.FAILED
        else:
            # No room for the bounce (the disk is full): those recipients stay pending, to
            # be failed and bounced at the next attempt, rather than dropped with no bounce.
            unrecord(msg.status, recorded.failed)
    settle(msg.status, planned)
    if recorded.receipts:
        await notify.send_receipts(
            ctx, snap, msg, [notify.receipt(j, o) for j, o in recorded.receipts]
        )
    return await act(ctx, snap, msg, decide(msg, snap.config, now), now)


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Jobs for one ``deliver`` call of one mailer (one next hop, or one local target)."""

    mailer: Mailer
    jobs: list[Job]


@dataclass
class Plan:
    pending: list[Recipient]  # the envelope recipients not done before this attempt
    targets_of: dict[str, list[str]]  # pending recipient → every target it routes to now
    batches: list[Batch]


def plan(msg: QueuedMessage, snap: Snapshot, mailers: dict[str, Mailer]) -> Plan:
    """Route the pending recipients; a target done (for any recipient) is not delivered again,
    and one that two recipients share is delivered once."""
    status = msg.status
    done = status.done_targets()
    pending = status.pending(msg.envelope.recipients)
    targets_of: dict[str, list[str]] = {}
    planned: set[str] = set()
    batches: dict[tuple[str, str], Batch] = {}
    for rcpt in pending:
        routes = resolve(rcpt.mailbox, snap.routing, expand=True)
        targets_of[rcpt.address] = [r.target for r in routes]
        for route in routes:
            # root@localhost and postmaster may both end at root: one delivery, as Sendmail.
            if route.target in done or route.target in planned:
                continue
            planned.add(route.target)
            mailer = mailers[route.mailer]
            key = (route.mailer, mailer.batch_key(route))
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = Batch(mailer, [])
            batch.jobs.append(Job(rcpt, route))
    return Plan(pending, targets_of, list(batches.values()))


# -- deliver ------------------------------------------------------------------------------------
Results = list[tuple[Job, Outcome]]
"""What one ``deliver`` call (one SMTP transaction, one uux…) did: each job's outcome."""


async def deliver_all(msg: QueuedMessage, planned: Plan) -> list[Results]:
    """Every batch at once; each batch's results, in the plan's order."""
    batches = planned.batches
    if len(batches) == 1:  # the usual case: no task to gather
        outcomes = [await batches[0].mailer.deliver(msg, batches[0].jobs)]
    else:
        outcomes = await asyncio.gather(*(b.mailer.deliver(msg, b.jobs) for b in batches))
    return [
        list(zip(batch.jobs, outs, strict=True))
        for batch, outs in zip(batches, outcomes, strict=True)
    ]


# -- record -------------------------------------------------------------------------------------
def log_outcomes(
    msg: QueuedMessage,
    delivered: list[Results],
    started: float,
    now: float,
    counts: MetricsRow,
) -> None:
    """The maillog's ``to=`` lines of each batch (`to_lines`), and each target's count in
    the metrics."""
    env = msg.envelope
    delay = now - env.arrival
    pri = maillog.priority(msg.size, len(env.recipients), msg.status.attempts)
    for results in delivered:
        for job, outcome in results:
            route = job.route
            failed_hop = route.host if route.is_smtp and outcome.status is not Status.SENT else None
            counts.delivery(route.mailer, outcome.status.value, delay, failed_hop)
        for addresses, route, outcome in to_lines(results):
            maillog.deliveries(
                env.qid,
                addresses,
                delay=delay,
                xdelay=now - started,
                mailer=route.mailer,
                relay=outcome.relay,
                dsn=outcome.dsn,
                stat=outcome.stat,
                reply=str(outcome.reply)
                if route.is_smtp and outcome.relay and not outcome.local
                else None,
                pri=pri,
                ctladdr=None,
            )


def to_lines(results: Results) -> list[tuple[list[str], Route, Outcome]]:
    """The ``to=`` lines of one batch as Sendmail writes those of one delivery: the
    recipients that had the same outcome on one line, in the batch's order, each address
    once (two recipients may have reached the same RCPT); a recipient refused at RCPT on a
    line of its own, before the others (Sendmail logs it when the refusal comes). Each line
    with its addresses and the route and outcome of its first."""
    alone: list[tuple[list[str], Route, Outcome]] = []
    joined: dict[tuple[object, ...], tuple[list[str], Route, Outcome]] = {}
    seen: set[str] = set()
    for job, outcome in results:
        route = job.route
        # an error route names the address it refuses, or none (an unknown local user)
        address = (
            (route.address or job.rcpt.address)
            if route.is_remote or route.mailer == "error"
            else job.rcpt.address
        )
        if address in seen:
            continue
        seen.add(address)
        if outcome.at_rcpt:
            alone.append(([address], route, outcome))
            continue
        # what the line says (the mailer, relay=, and dsn=, reply= and stat=: the reply's),
        # within one run of the mailer
        key = (
            outcome.call,
            route.mailer,
            outcome.relay,
            outcome.status,
            outcome.reply,
            outcome.local,
        )
        line = joined.get(key)
        if line is None:
            joined[key] = ([address], route, outcome)
        else:
            line[0].append(address)
    return alone + list(joined.values())


@dataclass
class Recorded:
    failed: list[tuple[Job, Outcome]] = field(default_factory=list)  # to bounce
    receipts: list[tuple[Job, Outcome]] = field(default_factory=list)  # NOTIFY=SUCCESS, ours


def record(status: QueueStatus, results: list[tuple[Job, Outcome]]) -> Recorded:
    """The outcomes into ``status``: a target sent or failed is done; a temporary failure is
    the recipient's last error."""
    out = Recorded()
    for job, outcome in results:
        state = status.of(job.rcpt.address)
        if outcome.status is Status.SENT:
            state.targets[job.route.target] = RcptStatus.SENT
            if notify.wants(job.rcpt, "SUCCESS") and not outcome.dsn_passed:
                out.receipts.append((job, outcome))
        elif outcome.status is Status.PERM:
            state.targets[job.route.target] = RcptStatus.FAILED
            out.failed.append((job, outcome))
            status.last_message = outcome.stat
        else:
            state.last_error = outcome.stat
            status.last_message = outcome.stat
    return out


def unrecord(status: QueueStatus, failed: list[tuple[Job, Outcome]]) -> None:
    """Those failures were not bounced: their targets are not done."""
    for job, _outcome in failed:
        status.of(job.rcpt.address).targets.pop(job.route.target, None)


def still_pending(status: QueueStatus, planned: Plan) -> list[Recipient]:
    """The recipients ``settle`` would leave pending: a target of theirs is not done."""
    done = status.done_targets()
    return [r for r in planned.pending if not all(t in done for t in planned.targets_of[r.address])]


def settle(status: QueueStatus, planned: Plan) -> None:
    """A pending recipient whose every target is done (here, before, or for another
    recipient) is done: FAILED if one of them failed, else SENT."""
    done = status.done_targets()
    for rcpt in planned.pending:
        targets = planned.targets_of[rcpt.address]
        if not all(t in done for t in targets):
            continue
        state = status.of(rcpt.address)
        for t in targets:
            state.targets.setdefault(t, done[t])
        failed = any(done[t] is RcptStatus.FAILED for t in targets)
        state.status = RcptStatus.FAILED if failed else RcptStatus.SENT
        state.last_error = None


# -- decide -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    """No recipient is pending: the message is finished."""


@dataclass(frozen=True)
class Expire:
    """Queued longer than ``max_age``: bounce what is pending (4.4.7)."""

    pending: list[Recipient]


@dataclass(frozen=True)
class RetryAt:
    at: float


@dataclass(frozen=True)
class Warn(RetryAt):
    """Retry at ``at``, and first tell the sender it is late (``warn_after``, once);
    ``pending``: those whose NOTIFY asks for it (maybe none)."""

    pending: list[Recipient]


Decision = Done | Expire | Warn | RetryAt


def decide(msg: QueuedMessage, cfg: Config, now: float) -> Decision:
    pending = msg.status.pending(msg.envelope.recipients)
    if not pending:
        return Done()
    if now - msg.envelope.arrival >= cfg.queue.max_age:
        return Expire(pending)
    return retry(msg, cfg, now, pending)


def retry(msg: QueuedMessage, cfg: Config, now: float, pending: list[Recipient]) -> Warn | RetryAt:
    """When to try ``pending`` again (the back-off of this many attempts), and whether to
    warn the sender first."""
    env, status, queue = msg.envelope, msg.status, cfg.queue
    at = now + retry_delay(status.attempts + 1, queue.retry_min, queue.run_interval)
    if (
        not status.warned
        and queue.warn_after
        and now - env.arrival >= queue.warn_after
        and env.sender
        and not env.is_bounce
    ):
        return Warn(at, [r for r in pending if notify.wants(r, "DELAY")])
    return RetryAt(at)


async def act(
    ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, decision: Decision, now: float
) -> float | None:
    """Carry out ``decision``; the next attempt time, or None when the message is finished."""
    if isinstance(decision, Expire):
        if await expire(ctx, snap, msg, decision.pending, now):
            finish(ctx, msg)
            return None
        # The bounce could not be queued: the message stays, and expires again next time.
        decision = retry(msg, snap.config, now, decision.pending)
    if isinstance(decision, Done):
        finish(ctx, msg)
        return None
    if isinstance(decision, Warn):
        msg.status.warned = True
        if decision.pending and not await notify.warn(
            ctx,
            snap,
            msg,
            [
                notify.late(
                    r,
                    msg.status.last_error(r.address),
                    now,
                    warning=True,
                    retry_until=msg.envelope.arrival + snap.config.queue.max_age,
                )
                for r in decision.pending
            ],
        ):
            msg.status.warned = False  # the next attempt tries again
    return await reschedule(ctx, msg, now, decision.at)


def finish(ctx: DeliveryContext, msg: QueuedMessage) -> None:
    """Delivered or bounced: out of the queue, and the last line of its queue id's life."""
    ctx.spool.finish(msg)
    maillog.removed(msg.qid)


async def expire(
    ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, pending: list[Recipient], now: float
) -> bool:
    """Bounce every pending recipient as undeliverable in time; False if it could not be."""
    log_expired(ctx, snap, msg, pending, now)
    return await notify.bounce(
        ctx,
        snap,
        msg,
        expiry_reports(msg, pending, now),
        reason=expiry_text(
            snap
        ),  # Sendmail's "<qid>: <bounce qid>: DSN: Cannot send message for 5 days"
    )


def expiry_text(snap: Snapshot) -> str:
    return f"Cannot send message for {interval_text(snap.config.queue.max_age)}"


def expiry_reports(
    msg: QueuedMessage, pending: list[Recipient], now: float
) -> list[tuple[Recipient, DsnRecipient]]:
    return [
        (r, notify.late(r, msg.status.last_error(r.address), now, warning=False)) for r in pending
    ]


def log_expired(
    ctx: DeliveryContext, snap: Snapshot, msg: QueuedMessage, pending: list[Recipient], now: float
) -> None:
    """Each expired recipient's ``to=`` line (4.4.7), as Sendmail logs it before the DSN."""
    env = msg.envelope
    text = expiry_text(snap)
    for rcpt in pending:
        ctx.metrics.delivery("esmtp", Status.PERM.value, now - env.arrival, None)
        maillog.deliveries(
            env.qid,
            [rcpt.address],
            delay=now - env.arrival,
            xdelay=0,
            mailer="esmtp",
            relay=None,
            dsn="4.4.7",
            stat=text,
            pri=maillog.priority(msg.size, len(env.recipients), msg.status.attempts),
        )


async def reschedule(ctx: DeliveryContext, msg: QueuedMessage, now: float, at: float) -> float:
    """Count the attempt and write the status (fsync'd, in a thread); ``at`` is returned."""
    status = msg.status
    status.attempts += 1
    status.last_attempt = now
    status.next_attempt = at
    try:
        await asyncio.to_thread(ctx.spool.save_status, msg.qid, status)
    except OSError as exc:
        # The status on disk stays as it was (it is replaced whole or not at all); what this
        # attempt delivered may be delivered again (at-least-once, as after a crash here). The
        # message keeps its back-off rather than the scheduler's 5 minutes after an error.
        maillog.status_write_failed(msg.qid, exc)
    return at
