"""Pure SMTP-stage decisions (semantics §3, §4, §12): tables snapshot + facts → reply.

Nothing here does I/O: DNS answers (the client's PTR, the sender domain check) are facts the
session gathers first and passes in.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from mailgate.address import Mailbox, RouteError, routed_hosts
from mailgate.config import Config
from mailgate.dns import PtrStatus
from mailgate.metrics import RejectReason
from mailgate.reply import Reply
from mailgate.routing import UNKNOWN_USER, RoutingContext, resolve, rewrite_domain
from mailgate.tables import Tables
from mailgate.tables.access import Verdict

ACCESS_DENIED = Reply(550, "5.7.1", "Access denied")


@dataclass(frozen=True)
class Client:
    ip: str
    ptr_status: PtrStatus = "FAIL"  # semantics: ${client_resolve}
    ptr_name: str | None = None
    # A PROXY v2 LOCAL or v1 UNKNOWN connection: the proxy's own (``ip`` is the proxy's),
    # its client unknown. It is served, as a health check must be, but its address is not a
    # client's: it never relays, and is not the local host, even from a proxy on this host.
    unidentified: bool = False

    @property
    def verified_name(self) -> str | None:
        return self.ptr_name if self.ptr_status == "OK" else None

    @property
    def is_loopback(self) -> bool:
        return not self.unidentified and _is_localhost(self.ip)


@functools.lru_cache(maxsize=4096)
def _is_localhost(ip: str) -> bool:
    # Only the local host itself, as Sendmail's localhost; other 127.x are ordinary clients.
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr) in ("127.0.0.1", "::1")


class Decision(NamedTuple):
    """A MAIL or RCPT verdict. A NamedTuple, as Reply is: immutable and hashable as a frozen
    dataclass, made at a fraction of the cost (two per message)."""

    reply: Reply
    discard: bool = False  # accept, then throw the whole message away (access DISCARD)
    logged_reject: bool = False  # a refusal worth a ruleset=… reject= log line
    reason: RejectReason | None = None  # why, for the metrics (with logged_reject)
    exit: int | None = None  # an error: entry's sysexits status (ErrorValue.exit)

    @property
    def accepted(self) -> bool:
        return self.reply.is_positive


def in_class(domain: str, names: frozenset[str], exact: bool) -> bool:
    if domain in names:
        return True
    if exact:
        return False
    parts = domain.split(".")
    return any(".".join(parts[i:]) in names for i in range(1, len(parts)))


def client_may_relay(client: Client, tables: Tables, relay_hosts_only: bool) -> bool:
    """Semantics §3.3: IP RELAY, verified PTR name RELAY or in class R, or the local host."""
    if client.unidentified:
        return False
    if client.is_loopback:
        return True
    name = client.verified_name
    if tables.access.client_relay(client.ip, name, relay_hosts_only):
        return True
    return name is not None and in_class(name.lower(), tables.relay_domains, relay_hosts_only)


def connect_refusal(verdict: Verdict | None) -> Reply | None:
    """What MAIL/RCPT/DATA get from a client refused by a Connect: entry (greeting still 220)."""
    if verdict is None:
        return None
    if verdict.action == "REJECT":
        return ACCESS_DENIED
    if verdict.action == "ERROR" and verdict.error is not None:
        return verdict.error.reply(None)
    return None


@dataclass(frozen=True)
class ConnectDecision:
    """What the connect stage decides for a client (semantics §4 Connect:, §10, §3.3)."""

    refusal: Reply | None  # what MAIL, RCPT and DATA get (Connect: REJECT / ERROR)
    discard: bool  # Connect: DISCARD: every message is accepted and thrown away
    greet_pause: float  # seconds to hold the greeting back (early talkers are refused)
    may_relay: bool

    @property
    def closes(self) -> bool:
        """Sendmail says a check_relay refusal that is a 421 instead of the greeting, and
        closes the connection (any other is the answer to each later command)."""
        return self.refusal is not None and self.refusal.code == 421


def connect_decision(client: Client, tables: Tables, config: Config) -> ConnectDecision:
    """access ``Connect:`` (and untagged) for the client's IP and verified name, the greet
    pause (``GreetPause:`` overrides ``[smtp] greet_pause``; none for a refused client), and
    whether it may relay."""
    name = client.verified_name
    verdict = tables.access.connect(client.ip, name)
    refusal = connect_refusal(verdict)
    if verdict is not None and verdict.action in ("REJECT", "ERROR"):
        pause = 0.0  # clients rejected at Connect are not paused (semantics §10)
    else:
        ms = tables.access.greet_pause(client.ip, name)
        pause = config.smtp.greet_pause if ms is None else ms / 1000.0
    return ConnectDecision(
        refusal,
        verdict is not None and verdict.action == "DISCARD",
        pause,
        client_may_relay(client, tables, config.relay_hosts_only),
    )


def _canonical(domain: str, config: Config) -> str:
    """The domain as Sendmail's canonify leaves it for the access lookups: ``localhost`` is
    $j (sendmail -bt: ``root@localhost`` → ``root<@gateway.example.com.>``), so an entry for
    ``root@$j`` also covers ``root@localhost``."""
    return config.hostname if domain == "localhost" else domain


def check_sender(
    raw: str, mailbox: Mailbox, tables: Tables, config: Config, *, shown: str | None = None
) -> Decision | None:
    """access From: (semantics §4) and the qualified-sender rule. None = go on to DNS checks."""
    shown = shown or f"<{raw}>"  # as the client wrote it: brackets only if it used them
    if mailbox.is_null:
        return Decision(Reply(250, "2.1.0", "<>... Sender ok"))
    verdict = tables.access.sender(mailbox.local, _canonical(mailbox.domain, config))
    if verdict is not None:
        if verdict.action == "REJECT":
            return Decision(
                Reply(550, "5.7.1", f"{shown}... Access denied"),
                logged_reject=True,
                reason="access",
            )
        if verdict.action == "ERROR" and verdict.error is not None:
            return Decision(verdict.error.reply(shown), logged_reject=True, reason="access")
        if verdict.action == "DISCARD":
            return Decision(Reply(250, "2.1.0", f"{shown}... Sender ok"), discard=True)
        if verdict.action in ("OK", "RELAY"):
            # Sendmail's $={Accept}: either accepts the sender, its domain unchecked (an
            # internal domain listed RELAY need not be in DNS). Relaying is not granted.
            return Decision(Reply(250, "2.1.0", f"{shown}... Sender ok"))
    if not mailbox.domain and config.smtp.require_qualified_sender:
        return Decision(
            Reply(553, "5.5.4", f"{shown}... Domain name required for sender address {raw}"),
            logged_reject=True,
            reason="sender",
        )
    return None


def sender_domain_reply(
    raw: str, mailbox: Mailbox, resolves: str, *, shown: str | None = None
) -> Reply:
    """The reply once the sender domain's DNS answer ("yes" / "no" / "temp") is known."""
    if resolves == "no":
        return Reply(
            553,
            "5.1.8",
            f"{shown or f'<{raw}>'}... Domain of sender address {mailbox} does not exist",
        )
    if resolves == "temp":
        return Reply(451, "4.1.8", f"Domain of sender address {mailbox} does not resolve")
    return Reply(250, "2.1.0", f"{shown or f'<{raw}>'}... Sender ok")


def relay_denied(rcpt: str, client: Client) -> Reply:
    """Semantics §18.4: one text per code, the code and DSN kept per PTR status."""
    if client.ptr_status == "TEMP":
        return Reply(
            450,
            "4.4.0",
            f"{rcpt}... Relaying temporarily denied. Cannot resolve PTR record for {client.ip}",
        )
    if client.ptr_status == "FAIL":
        return Reply(
            550, "5.7.1", f"{rcpt}... Relaying denied. IP name lookup failed [{client.ip}]"
        )
    if client.ptr_status == "FORGED":
        return Reply(
            550,
            "5.7.1",
            f"{rcpt}... Relaying denied. IP name possibly forged {client.ptr_name or ''}".rstrip(),
        )
    return Reply(550, "5.7.1", f"{rcpt}... Relaying denied")


def relayed_domain(domain: str, ctx: RoutingContext, relay_hosts_only: bool) -> bool:
    """Semantics §3.1–3.2: a local name, class R, or access ``To:``/untagged RELAY."""
    tables = ctx.tables
    return (
        ctx.is_local(domain)
        or in_class(domain, tables.relay_domains, relay_hosts_only)
        or tables.access.recipient_domain_relay(domain, relay_hosts_only)
    )


def may_relay_to(mailbox: Mailbox, ctx: RoutingContext, relay_hosts_only: bool) -> bool:
    """May a client without relay permission send to ``mailbox``? Its domain must be relayed
    and so must every host that sender-specified routing in its local part names
    (``u%other@dom``, ``other!u@dom``, ``"u@other"@dom``): the next hop may well honour that
    routing. Sendmail without FEATURE(loose_relay_check) strips the relayed domain and checks
    the rest again; Postfix's allow_untrusted_routing = no. A route that names no valid host
    is not relayed: nobody can tell where a next hop would take it."""
    if not relayed_domain(mailbox.domain, ctx, relay_hosts_only):
        return False
    try:
        hosts = routed_hosts(mailbox.local)
    except RouteError:
        return False
    return all(relayed_domain(host, ctx, relay_hosts_only) for host in hosts)


def check_recipient(
    raw: str,
    mailbox: Mailbox,
    client: Client,
    client_relays: bool,
    ctx: RoutingContext,
    config: Config,
    *,
    shown: str | None = None,
    discarding: bool = False,
) -> Decision:
    """Relay check, then the route check (error: entries, unknown local users). In a
    ``discarding`` transaction (access DISCARD for the client or the sender) an unknown user
    is taken too, as Sendmail's recipient() checks none for a discarded envelope: a client
    we throw away learns nothing of our users."""
    shown = shown or f"<{raw}>"
    tables = ctx.tables
    final = rewrite_domain(mailbox, tables)
    if config.access.blocklist_recipients:
        verdict = tables.access.recipient(
            final.local, _canonical(final.domain, config), is_local=ctx.is_local(final.domain)
        )
        if verdict is not None:
            if verdict.action == "REJECT":  # Sendmail's words for a blocklisted recipient
                return Decision(
                    Reply(550, "5.2.1", f"{shown}... Mailbox disabled for this recipient"),
                    logged_reject=True,
                    reason="access",
                )
            if verdict.action == "ERROR" and verdict.error is not None:
                return Decision(verdict.error.reply(shown), logged_reject=True, reason="access")
            if verdict.action == "DISCARD":
                return Decision(Reply(250, "2.1.5", f"{shown}... Recipient ok"), discard=True)
    if not client_relays and not may_relay_to(final, ctx, config.relay_hosts_only):
        # Sendmail parses the address (ruleset 0, the mailertable in it) before check_rcpt:
        # a mailertable error: entry answers first, relayed domain or not. A refusal
        # either way, so it can never open a relay.
        entry = None
        if not final.is_literal and not ctx.is_local(final.domain):
            entry = tables.mailertable.lookup(final.domain)
        if entry is not None and entry.error is not None:
            return Decision(
                entry.error.reply(shown),
                logged_reject=True,
                reason="recipient",
                exit=entry.error.exit,
            )
        return Decision(relay_denied(shown, client), logged_reject=True, reason="relay")
    # Routed here only for the refusals (error: entries, unknown users); delivery routes
    # again with the tables in force then.
    for route in resolve(final, ctx, expand=False):
        if route.mailer == "error" and route.error is not None:
            if discarding and route.error is UNKNOWN_USER:
                continue
            return Decision(
                route.error.reply(shown),
                logged_reject=True,
                reason="recipient",
                exit=route.error.exit,
            )
    return Decision(Reply(250, "2.1.5", f"{shown}... Recipient ok"))
