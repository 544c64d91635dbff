"""Deliver one message to one SMTP next hop (a mailertable route or the domain's MX hosts).

Resolves the hop list to addresses (MX in preference order, equal preferences shuffled by the
resolver; bracketed hosts without MX), then tries them in order until one takes the
transaction. Connection failures and 4xx on the whole transaction move on to the next address;
per-recipient answers are final for this attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
) -> dict[str, Outcome]:
    """Deliver ``message`` to ``recipients`` (all sharing ``route``); one Outcome each."""
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

        try:
            client = await SmtpClient.connect(
                cand.ip, cand.port, helo_name=helo_name, use_ehlo=True, timeouts=timeouts,
                source_address=source_address, transcript=record)
        except SmtpClientError as exc:
            reply = exc.reply or Reply(451, "4.4.1", f"Connection refused by [{cand.ip}]")
            last = Outcome("temp" if exc.temporary or reply.is_temporary else "perm", reply,
                           relay, f"[{cand.ip}]", tuple(lines))
            continue  # even a 554 greeting: another address of the hop may serve
        try:
            result = await client.send(
                env.sender, recipients, message.path, message.offset, size=message.size,
                body_8bit=env.body_8bit, smtputf8=env.smtputf8)
        except SmtpClientError as exc:
            await client.close()
            reply = exc.reply or Reply(451, "4.4.2", f"Connection to [{cand.ip}] lost")
            last = Outcome("temp", reply, relay, f"[{cand.ip}]", tuple(lines))
            continue
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
            outcomes[r.address] = Outcome(status, r.reply, relay, f"[{cand.ip}]", tuple(lines))
        for addr in recipients:
            outcomes.setdefault(addr, Outcome("temp", result.mail_reply, relay, f"[{cand.ip}]",
                                              tuple(lines)))
        return outcomes
    return _failure(last, recipients)
