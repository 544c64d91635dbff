"""Deliver one message to one SMTP next hop (a mailertable route or the domain's MX hosts).

Resolves the hop list to addresses (MX in preference order, equal preferences shuffled by the
resolver; bracketed hosts without MX), then tries them in order until one takes the
transaction. Connection failures and 4xx on the whole transaction move on to the next address;
per-recipient answers are final for this attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailgate import maillog
from mailgate.dns import DnsNotFound, DnsTempError, NullMx, Resolver
from mailgate.queue.spool import QueuedMessage
from mailgate.reply import Reply
from mailgate.routing import Route
from mailgate.smtp.client import SmtpClient, SmtpClientError, Timeouts


@dataclass
class Outcome:
    """What happened to one recipient in one attempt."""

    status: str  # "sent" | "temp" | "perm"
    reply: Reply
    relay: str | None = None  # "host [ip]" as Sendmail logs it
    remote_mta: str | None = None
    transcript: tuple[str, ...] = ()
    dsn_passed: bool = False  # the next hop took our DSN parameters: its DSNs, not ours

    @property
    def dsn(self) -> str:
        if self.reply.enhanced:
            return self.reply.enhanced
        return {"sent": "2.0.0", "temp": "4.0.0", "perm": "5.0.0"}[self.status]


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


async def candidates(route: Route, resolver: Resolver, hostname: str,
                     default_port: int = 25) -> list[Candidate]:
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

    def __init__(self, idle_timeout: float = 5.0, max_idle_per_peer: int = 32,
                 max_uses: int = 100) -> None:
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
        timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, key,
                                                      client)
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


def _no_reply(exc: SmtpClientError, ip: str) -> Reply:
    """What to report for a failure that brought no SMTP reply, in Sendmail's words: a peer
    that accepted the connection and then went silent or away did not refuse it."""
    if exc.timed_out:
        return Reply(451, "4.4.1" if exc.stage == "connect" else "4.4.2",
                     f"Connection timed out with [{ip}]")
    if exc.stage == "connect":
        return Reply(451, "4.4.1", f"Connection refused by [{ip}]")
    return Reply(451, "4.4.2", f"Connection to [{ip}] lost")


def _failure(outcome: Outcome, recipients: Sequence[str]) -> dict[str, Outcome]:
    return dict.fromkeys(recipients, outcome)


async def deliver(
    message: QueuedMessage,
    route: Route,
    recipients: Sequence[str],
    *,
    resolver: Resolver,
    hostname: str,
    helo_name: str,
    timeouts: Timeouts,
    source_address: str | None = None,
    default_port: int = 25,
    transcript: Callable[[str], None] | None = None,
    cache: ConnectionCache | None = None,
    dsn: Sequence[tuple[str | None, str | None]] | None = None,
    tls_context: ssl.SSLContext | None = None,
    line_length_limit: int = 998,
) -> dict[str, Outcome]:
    """Deliver ``message`` to ``recipients`` (all sharing ``route``); one Outcome each.
    ``dsn``: NOTIFY and ORCPT for each recipient, passed on to a next hop that offers DSN.
    ``tls_context``: STARTTLS to a next hop that offers it. ``line_length_limit``: longer
    lines are folded on the way out (0: never)."""
    what = route.hops[0].host if route.hops else "?"
    try:
        cands = await candidates(route, resolver, hostname, default_port)
    except _MailLoop:
        return _failure(Outcome("perm", Reply(554, "5.3.5", f"MX list for {what} points back "
                                                            f"to {hostname}; mail loops back "
                                                            "to me (MX problem?)")), recipients)
    except NullMx:
        return _failure(Outcome("perm", Reply(556, "5.1.10", f"Domain {what} does not accept "
                                                             "mail (null MX)")), recipients)
    except DnsNotFound:
        return _failure(Outcome("perm", Reply(550, "5.1.2", f"Host unknown (Name server: "
                                                            f"{what}: host not found)")),
                        recipients)
    except DnsTempError:
        return _failure(Outcome("temp", Reply(451, "4.4.3", f"Name server: {what}: host name "
                                                            "lookup failure")), recipients)
    if not cands:
        return _failure(Outcome("perm", Reply(550, "5.1.2", f"Host unknown (Name server: "
                                                            f"{what}: host not found)")),
                        recipients)
    env = message.envelope
    last = Outcome("temp", Reply(451, "4.4.1", f"Connection refused by {what}"))
    for cand in cands:
        relay = f"{cand.name}. [{cand.ip}]" if cand.name != cand.ip else f"[{cand.ip}]"
        lines: list[str] = []

        def record(line: str, _lines: list[str] = lines) -> None:
            _lines.append(line)
            if transcript is not None:
                transcript(line)

        key = (cand.ip, cand.port, helo_name)
        client = cache.get(key) if cache is not None else None
        reused = client is not None
        if client is not None:
            client.set_transcript(record)
        result = None
        while result is None:
            if client is None:
                try:
                    client = await SmtpClient.connect(
                        cand.ip, cand.port, helo_name=helo_name, use_ehlo=True,
                        timeouts=timeouts, source_address=source_address, transcript=record,
                        tls_context=tls_context)
                    if client.tls is not None:
                        maillog.info(f"STARTTLS=client, relay={relay}, "
                                     f"{client.tls.for_maillog()}")
                    elif client.tls_failure is not None:
                        maillog.info(f"STARTTLS=client, error: {client.tls_failure}, "
                                     f"relay={relay}; going on in clear")
                except SmtpClientError as exc:
                    reply = exc.reply or _no_reply(exc, cand.ip)
                    last = Outcome("temp" if exc.temporary or reply.is_temporary else "perm",
                                   reply, relay, f"[{cand.ip}]", tuple(lines))
                    break
            try:
                result = await client.send(
                    env.sender, recipients, message.path if message.fd is None else message.fd,
                    message.offset, size=message.size,
                    body_8bit=env.body_8bit, smtputf8=env.smtputf8,
                    ret=env.ret, envid=env.envid, dsn=dsn, line_limit=line_length_limit)
            except SmtpClientError as exc:
                await client.close()
                if cache is not None:
                    cache.forget(client)
                client = None
                if reused:
                    reused = False  # the cached connection had gone stale: once more, fresh
                    continue
                reply = exc.reply or _no_reply(exc, cand.ip)
                last = Outcome("temp", reply, relay, f"[{cand.ip}]", tuple(lines))
                break
        if result is None or client is None:
            continue  # even a 554 greeting: another address of the hop may serve
        client.set_transcript(None)
        if cache is None or not cache.put(key, client):
            try:
                await client.quit()
            except SmtpClientError:
                await client.close()
        if result.mail_reply.is_temporary:
            last = Outcome("temp", result.mail_reply, relay, f"[{cand.ip}]", tuple(lines))
            continue  # the whole transaction failed here: another MX may take it
        outcomes: dict[str, Outcome] = {}
        for r in result.rcpt:
            status = "sent" if r.reply.is_positive else ("temp" if r.reply.is_temporary
                                                         else "perm")
            outcomes[r.address] = Outcome(status, r.reply, relay, f"[{cand.ip}]", tuple(lines),
                                          dsn_passed=client.passes_dsn)
        for addr in recipients:
            outcomes.setdefault(addr, Outcome("temp", result.mail_reply, relay, f"[{cand.ip}]",
                                              tuple(lines)))
        return outcomes
    return _failure(last, recipients)
