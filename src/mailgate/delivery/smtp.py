"""The SMTP mailer: deliver one message to one next hop (a mailertable route or the domain's
MX hosts), at most ``queue.max_per_destination`` transactions at once per next hop.

Resolves the hop list to addresses (MX in preference order, equal preferences shuffled by the
resolver; bracketed hosts without MX), then tries them in order until one takes the
transaction. Connection failures and 4xx on the whole transaction move on to the next address;
per-recipient answers are final for this attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mailgate import maillog, metrics, tls
from mailgate.config import Config, DeliverySettings
from mailgate.delivery import Job, Outcome, Status
from mailgate.dns import DnsError, DnsNotFound, DnsTempError, NullMx, Resolver
from mailgate.queue.spool import QueuedMessage
from mailgate.reply import Reply
from mailgate.routing import Route
from mailgate.smtp import dsn_params
from mailgate.smtp.client import SmtpClient, SmtpClientError, Timeouts, TransactionResult

if TYPE_CHECKING:
    from mailgate.delivery.attempt import DeliveryContext


@dataclass(frozen=True)
class Candidate:
    name: str
    ip: str
    port: int


def _loops_back(mx_groups: list[list[str]], me: str) -> list[list[str]] | None:
    """Drop our own MX and every one at or below its preference (RFC 5321 5.1); None = loop."""
    for i, group in enumerate(mx_groups):
        if any(h.rstrip(".").lower() == me for h in group):
            return mx_groups[:i] or None
    return mx_groups


async def candidates(
    route: Route, resolver: Resolver, hostname: str, default_port: int = 25
) -> list[Candidate]:
    """Addresses to try, in order. Raises DnsError subclasses for the caller to judge."""
    out: list[Candidate] = []
    temp_error: Exception | None = None
    for hop in route.hops:
        port = hop.port or default_port
        try:
            if hop.mx:
                groups = await resolver.mail_exchangers(hop.host)
                kept = _loops_back(groups, hostname)
                if kept is None:
                    raise _MailLoop(hop.host)
                names = [h for g in kept for h in g]
            else:
                names = [hop.host]
            for name in names:
                try:
                    ips = await resolver.addresses(name)
                except DnsNotFound:
                    continue
                except DnsTempError as exc:
                    temp_error = exc
                    continue
                out.extend(Candidate(name.rstrip("."), ip, port) for ip in ips)
        except DnsTempError as exc:
            temp_error = exc
    if not out and temp_error is not None:
        raise temp_error
    return out


class _MailLoop(Exception):
    pass


class ConnectionCache:
    """Idle connections to next-hop addresses, reused by the next message for the same one.

    A gateway relays bursts to a handful of internal servers; reusing the connection saves the
    TCP handshake, greeting, EHLO and QUIT for every message but the first. Idle connections
    are closed after ``idle_timeout`` seconds, and none is used for more than ``max_uses``
    transactions (as Postfix's connection cache does).
    """

    def __init__(
        self, idle_timeout: float = 5.0, max_idle_per_peer: int = 32, max_uses: int = 100
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self.max_uses = max_uses
        self._idle: dict[tuple[str, int, str], list[tuple[SmtpClient, asyncio.TimerHandle]]] = {}
        self._uses: dict[int, int] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, key: tuple[str, int, str]) -> SmtpClient | None:
        stack = self._idle.get(key)
        while stack:
            client, timer = stack.pop()
            timer.cancel()
            if not client.closed:
                return client
        return None

    def put(self, key: tuple[str, int, str], client: SmtpClient) -> bool:
        uses = self._uses.get(id(client), 0) + 1
        stack = self._idle.setdefault(key, [])
        if client.closed or uses >= self.max_uses or len(stack) >= self.max_idle_per_peer:
            self._uses.pop(id(client), None)
            return False
        self._uses[id(client)] = uses
        timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, key, client)
        stack.append((client, timer))
        return True

    def _expire(self, key: tuple[str, int, str], client: SmtpClient) -> None:
        stack = self._idle.get(key, [])
        for i, (c, _timer) in enumerate(stack):
            if c is client:
                del stack[i]
                break
        self._uses.pop(id(client), None)
        task = asyncio.get_running_loop().create_task(client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def forget(self, client: SmtpClient) -> None:
        self._uses.pop(id(client), None)

    async def close_all(self) -> None:
        for stack in self._idle.values():
            for client, timer in stack:
                timer.cancel()
                await client.quit()
        self._idle.clear()
        self._uses.clear()


class DestinationLimits:
    """Deliveries in progress per next hop, at most ``limit`` at once (Postfix's
    ``default_destination_concurrency_limit``, 20 by default, Sendmail has none): a burst for
    one internal server does not open ``max_deliveries`` connections to it, and a slow hop
    cannot take every delivery slot from the others. Waiters are served first come, first
    served. Loop-only. It outlives reloads (the limit is read at each acquire), so a reload
    never lets more in at once."""

    def __init__(self) -> None:
        self._busy: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def busy(self, destination: str) -> int:
        return self._busy.get(destination, 0)

    async def acquire(self, destination: str, limit: int) -> None:
        busy = self._busy.get(destination, 0)
        if busy < limit and not self._waiting.get(destination):
            self._busy[destination] = busy + 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(destination, deque()).append(waiter)
        try:
            await waiter  # release() counted us in
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(destination)  # woken and cancelled at once: pass the slot on
            else:
                queue = self._waiting.get(destination)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[destination]
            raise

    def release(self, destination: str) -> None:
        queue = self._waiting.get(destination)
        while queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[destination]
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it: the count stays
                return
        busy = self._busy.get(destination, 0) - 1
        if busy > 0:
            self._busy[destination] = busy
        else:
            self._busy.pop(destination, None)


def delivery_timeouts(settings: DeliverySettings) -> Timeouts:
    """The SMTP client's timeouts: RFC 5321's, scaled down by a ``command_timeout`` below
    its 5 minutes; the TCP connect timeout is ``connect_timeout`` as configured, not scaled."""
    timeouts = Timeouts()
    if settings.command_timeout < 300:
        timeouts = timeouts.scaled(settings.command_timeout / 300)
    return replace(timeouts, connect=settings.connect_timeout)


def _no_reply(exc: SmtpClientError, ip: str) -> Reply:
    """What to report for a failure that brought no SMTP reply, in Sendmail's words: a peer
    that accepted the connection and then went silent or away did not refuse it."""
    if exc.timed_out:
        return Reply(
            451, "4.4.1" if exc.stage == "connect" else "4.4.2", f"Connection timed out with [{ip}]"
        )
    if exc.stage == "connect":
        return Reply(451, "4.4.1", f"Connection refused by [{ip}]")
    return Reply(451, "4.4.2", f"Connection to [{ip}] lost")


def _host_unknown(what: str) -> Outcome:
    return Outcome(
        Status.PERM,
        Reply(550, "5.1.2", f"Host unknown (Name server: {what}: host not found)"),
        local=True,
    )


def _dns_failure(exc: Exception, what: str, hostname: str) -> Outcome:
    """The outcome for every recipient of a hop whose addresses could not be found."""
    if isinstance(exc, _MailLoop):
        return Outcome(
            Status.PERM,
            Reply(
                554,
                "5.3.5",
                f"MX list for {what} points back to "
                f"{hostname}; mail loops back to me "
                "(MX problem?)",
            ),
            local=True,
        )
    if isinstance(exc, NullMx):
        return Outcome(
            Status.PERM,
            Reply(556, "5.1.10", f"Domain {what} does not accept mail (null MX)"),
            local=True,
        )
    if isinstance(exc, DnsNotFound):
        return _host_unknown(what)
    return Outcome(
        Status.TEMP,
        Reply(451, "4.4.3", f"Name server: {what}: host name lookup failure"),
        local=True,
    )


class _Attempt:
    """One transaction with one candidate address: the dialogue lines for the DSN, and the
    facts every Outcome of it repeats."""

    def __init__(self, cand: Candidate, transcript: Callable[[str], None] | None) -> None:
        self.cand = cand
        self.relay = maillog.next_hop_name(cand.name, cand.ip)
        self.lines: list[str] = []
        self._transcript = transcript

    def record(self, line: str) -> None:
        self.lines.append(line)
        if self._transcript is not None:
            self._transcript(line)

    def outcome(
        self, status: Status, reply: Reply, *, dsn_passed: bool = False, local: bool = False
    ) -> Outcome:
        return Outcome(
            status, reply, self.relay, f"[{self.cand.ip}]", tuple(self.lines), dsn_passed, local
        )

    def from_reply(
        self, reply: Reply, *, dsn_passed: bool = False, at_rcpt: bool = False
    ) -> Outcome:
        return Outcome.from_reply(
            reply,
            self.relay,
            f"[{self.cand.ip}]",
            tuple(self.lines),
            dsn_passed=dsn_passed,
            at_rcpt=at_rcpt,
        )


class SmtpMailer:
    """Sendmail's ``smtp``/``esmtp``/``smtp8``/``dsmtp``/``relay`` mailers: one transaction
    per message and next hop with all its recipients."""

    def __init__(self, cfg: Config, ctx: DeliveryContext) -> None:
        self.resolver: Resolver = ctx.resolver
        self.cache: ConnectionCache | None = ctx.connections
        self.metrics = ctx.metrics
        self.limits: DestinationLimits = ctx.limits
        self.transcript = ctx.transcript
        self.hostname = cfg.hostname
        self.helo_name = cfg.helo_name
        self.timeouts = delivery_timeouts(cfg.delivery)
        self.source_address = cfg.delivery.bind_address
        self.default_port = cfg.delivery.port
        self.tls_context: ssl.SSLContext | None = (
            tls.client_context() if cfg.tls.delivery == "may" else None
        )
        self.line_length_limit = cfg.delivery.line_length_limit
        self.max_per_destination = cfg.queue.max_per_destination

    def batch_key(self, route: Route) -> str:
        return route.host  # one transaction per next hop

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        route = jobs[0].route
        first: dict[str, Job] = {}  # one RCPT per address, whatever led to it
        for job in jobs:
            first.setdefault(job.route.address, job)
        dsn = [
            (j.rcpt.notify, dsn_params.orcpt_for(j.rcpt.orcpt, j.rcpt.original))
            for j in first.values()
        ]
        destination = route.host
        await self.limits.acquire(destination, self.max_per_destination)
        try:
            outcomes = await self.to_hop(msg, route, list(first), dsn)
        finally:
            self.limits.release(destination)
        return [outcomes[job.route.address] for job in jobs]

    async def to_hop(
        self,
        message: QueuedMessage,
        route: Route,
        recipients: Sequence[str],
        dsn: Sequence[tuple[str | None, str | None]] | None = None,
    ) -> dict[str, Outcome]:
        """Deliver ``message`` to ``recipients`` (all sharing ``route``); one Outcome each.
        ``dsn``: NOTIFY and ORCPT for each recipient, passed on to a next hop that offers
        DSN."""
        what = route.hops[0].host if route.hops else "?"
        try:
            cands = await candidates(route, self.resolver, self.hostname, self.default_port)
        except (_MailLoop, DnsError) as exc:
            return dict.fromkeys(recipients, _dns_failure(exc, what, self.hostname))
        if not cands:
            return dict.fromkeys(recipients, _host_unknown(what))
        last = Outcome(
            Status.TEMP, Reply(451, "4.4.1", f"Connection refused by {what}"), local=True
        )
        for cand in cands:
            result = await self._try_candidate(message, cand, recipients, dsn, route.mailer)
            if isinstance(result, Outcome):
                last = result  # this address did not take it: the next may
                continue
            return result
        return dict.fromkeys(recipients, last)

    async def _connect(self, at: _Attempt, mailer: str) -> SmtpClient:
        cand = at.cand
        client = await SmtpClient.connect(
            cand.ip,
            cand.port,
            helo_name=self.helo_name,
            timeouts=self.timeouts,
            source_address=self.source_address,
            transcript=at.record,
            tls_context=self.tls_context,
            ehlo_if_esmtp=mailer == "smtp",  # the others are F=a: EHLO always
        )
        if client.tls is not None:
            maillog.starttls_client(at.relay, client.tls)
            self.metrics.inc(metrics.tls("client", ok=True))
        elif client.tls_failure is not None:
            maillog.starttls_client_failed(at.relay, client.tls_failure)
            self.metrics.inc(metrics.tls("client", ok=False))
        return client

    async def _try_candidate(
        self,
        message: QueuedMessage,
        cand: Candidate,
        recipients: Sequence[str],
        dsn: Sequence[tuple[str | None, str | None]] | None,
        mailer: str = "esmtp",
    ) -> dict[str, Outcome] | Outcome:
        """One address of the hop: its outcome per recipient, or one Outcome when the
        transaction did not happen there (connection failure, refusal, 4xx to MAIL)."""
        at = _Attempt(cand, self.transcript)
        # A connection opened by the smtp mailer may have said HELO: kept apart.
        key = (cand.ip, cand.port, self.helo_name if mailer != "smtp" else f"{self.helo_name} smtp")
        client = self.cache.get(key) if self.cache is not None else None
        reused = client is not None
        if client is not None:
            client.set_transcript(at.record)
        env = message.envelope
        while True:
            if client is None:
                try:
                    client = await self._connect(at, mailer)
                except SmtpClientError as exc:
                    # Even a 554 greeting: another address of the hop may serve.
                    reply = exc.reply or _no_reply(exc, cand.ip)
                    return at.outcome(
                        Status.TEMP if exc.temporary or reply.is_temporary else Status.PERM,
                        reply,
                        local=exc.reply is None,
                    )
            try:
                result = await client.send(
                    env.sender,
                    recipients,
                    message.path if message.fd is None else message.fd,
                    message.offset,
                    size=message.size,
                    body_8bit=env.body_8bit,
                    smtputf8=env.smtputf8,
                    ret=env.ret,
                    envid=env.envid,
                    dsn=dsn,
                    line_limit=self.line_length_limit,
                )
                break
            except SmtpClientError as exc:
                await client.close()
                if self.cache is not None:
                    self.cache.forget(client)
                client = None
                if reused:
                    reused = False  # the cached connection had gone stale: once more, fresh
                    continue
                return at.outcome(
                    Status.TEMP, exc.reply or _no_reply(exc, cand.ip), local=exc.reply is None
                )
        client.set_transcript(None)
        if self.cache is None or not self.cache.put(key, client):
            try:
                await client.quit()
            except SmtpClientError:
                await client.close()
        if result.mail_reply.is_temporary:
            # The whole transaction failed here: another MX may take it.
            return at.outcome(Status.TEMP, result.mail_reply)
        return self._per_recipient(at, result, recipients, dsn_passed=client.passes_dsn)

    @staticmethod
    def _per_recipient(
        at: _Attempt, result: TransactionResult, recipients: Sequence[str], *, dsn_passed: bool
    ) -> dict[str, Outcome]:
        outcomes = {
            r.address: at.from_reply(r.reply, dsn_passed=dsn_passed, at_rcpt=r.at_rcpt)
            for r in result.rcpt
        }
        for addr in recipients:
            outcomes.setdefault(addr, at.outcome(Status.TEMP, result.mail_reply))
        return outcomes
