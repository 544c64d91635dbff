"""``mailgate check-dns``: what the DNS must say for mail to reach this gateway, checked.

1. each served domain's MX points to the gateway's names (and, when several of them are
   listed, at one preference, or one of them gets all the mail while it answers);
2. each name has A/AAAA records, all of them addresses the gateway listens on;
3. each of those addresses has a PTR naming one of the gateway's names, which resolves back
   to it (forward-confirmed reverse DNS: many receivers refuse mail from an address
   without it, and Sendmail's own ``${client_resolve}`` is this check);
4. each address answers SMTP on the port with the expected banner (``220 <one of the names>``).

One :class:`Finding` per check (``OK``, ``WARN`` or ``FAIL``), in that order. DNS through
``dns.Resolver`` (the config's ``[dns]`` nameservers); the banner through a plain connection
that reads the greeting and says QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Literal

from mailgate.dns import DnsError, DnsNotFound, DnsTempError, Resolver
from mailgate.tables import Tables

Status = Literal["OK", "WARN", "FAIL"]
_IP_KEY = re.compile(r"[0-9.]+|ipv6:.*", re.IGNORECASE)
MAX_BANNER = 64 * 1024  # bytes of greeting read at most


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str  # "MX example.com", "A mx.example.com", "PTR 192.0.2.1", "SMTP 192.0.2.1:25"
    text: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.check}: {self.text}"


@dataclass(frozen=True)
class Gateway:
    names: tuple[str, ...]  # lower case, no trailing dot; the host name first
    addresses: frozenset[str] | None  # where it listens; None: every address (not compared)
    port: int  # where the banner is asked
    timeout: float  # for the banner, greet pause included


def served_domains(tables: Tables) -> list[str]:
    """The domains this gateway takes mail for: local-host-names, relay-domains, mailertable
    domains (not its ``.sub`` and ``.`` keys, nor ``error:`` ones) and access RELAY domains."""
    found = {n for n in tables.local_names if not n.startswith("[")}
    found |= tables.relay_domains
    mailertable = tables.mailertable
    for key in mailertable.domain_keys():
        route = mailertable.route_for_key(key)
        if not key.startswith(".") and route is not None and route.mailer != "error":
            found.add(key)
    for tag in ("to", ""):
        for _, key, verdict in tables.access.entries(tag):
            if verdict.action == "RELAY" and "@" not in key and not _IP_KEY.fullmatch(key):
                found.add(key.rstrip("."))
    return sorted(found)


def _hosts(records: Iterable[tuple[int, str]]) -> str:
    return ", ".join(f"{host} ({pref})" for pref, host in records)


async def check(resolver: Resolver, gateway: Gateway, domains: list[str]) -> AsyncIterator[Finding]:
    names = gateway.names
    others: dict[str, None] = {}  # MX hosts that are not ours, in order
    for domain in domains:
        async for finding in _check_mx(resolver, domain, names, others):
            yield finding
    for host in others:
        try:
            if not await resolver.addresses(host):
                yield Finding("FAIL", f"A {host}", "no A/AAAA record: mail cannot go there")
        except DnsError as exc:
            yield Finding("FAIL", f"A {host}", _why(exc))
    ours: dict[str, str] = {}  # each address the names give → the first name giving it
    for name in names:
        async for finding in _check_name(resolver, name, gateway, ours):
            yield finding
    for address in [*ours, *sorted((gateway.addresses or frozenset()) - set(ours))]:
        yield await _check_ptr(resolver, address, names)
    for address, name in ours.items():
        yield await _check_banner(address, name, gateway)


def _why(exc: DnsError) -> str:
    if isinstance(exc, DnsNotFound):
        return "no such name (NXDOMAIN)"
    if isinstance(exc, DnsTempError):
        return f"lookup failed: {exc}"
    return str(exc)


async def _check_mx(
    resolver: Resolver, domain: str, names: tuple[str, ...], others: dict[str, None]
) -> AsyncIterator[Finding]:
    check = f"MX {domain}"
    try:
        records = await resolver.mx(domain)
    except DnsError as exc:
        yield Finding("FAIL", check, _why(exc))
        return
    if not records:
        if domain in names:
            yield Finding("OK", check, "none: mail comes by the name's own address (below)")
        else:
            yield Finding("FAIL", check, "no MX record: mail would go to the domain's address")
        return
    real = [(p, h) for p, h in records if h != "."]
    if not real:
        yield Finding("FAIL", check, "null MX (0 .): the domain says it takes no mail")
        return
    mine = [(p, h) for p, h in real if h in names]
    foreign = [(p, h) for p, h in real if h not in names]
    others.update(dict.fromkeys(h for _, h in foreign))  # they need an address all the same
    if not mine:
        yield Finding("FAIL", check, f"{_hosts(real)}: none is this gateway ({', '.join(names)})")
        return
    yield Finding("OK", check, _hosts(mine))
    if foreign:
        first = " and gets the mail first" if foreign[0][0] < mine[0][0] else ""
        yield Finding(
            "WARN",
            check,
            f"also {_hosts(foreign)}, not this gateway: it must relay to it{first}",
        )
    if len(mine) > 1:
        prefs = {p for p, _ in mine}
        if len(prefs) == 1:
            yield Finding("OK", f"{check} preference", f"equal ({mine[0][0]}) for all")
        else:
            yield Finding(
                "WARN",
                f"{check} preference",
                f"unequal: {_hosts(mine)}: the lowest gets all the mail while it answers",
            )


async def _check_name(
    resolver: Resolver, name: str, gateway: Gateway, ours: dict[str, str]
) -> AsyncIterator[Finding]:
    check = f"A {name}"
    try:
        found = await resolver.addresses(name)
    except DnsError as exc:
        yield Finding("FAIL", check, _why(exc))
        return
    if not found:
        yield Finding("FAIL", check, "no A/AAAA record")
        return
    listening = gateway.addresses
    if listening is None:
        yield Finding(
            "WARN",
            check,
            f"{', '.join(found)}: not compared: the gateway listens on every address "
            "(give --address)",
        )
    else:
        strangers = [a for a in found if a not in listening]
        if strangers:
            yield Finding(
                "FAIL",
                check,
                f"{', '.join(strangers)}: not an address this gateway listens on "
                f"({', '.join(sorted(listening))})",
            )
        else:
            yield Finding("OK", check, ", ".join(found))
    for address in found:
        if listening is None or address in listening:
            ours.setdefault(address, name)


async def _check_ptr(resolver: Resolver, address: str, names: tuple[str, ...]) -> Finding:
    check = f"PTR {address}"
    try:
        pointed = await resolver.ptr_names(address)
    except DnsError as exc:
        if isinstance(exc, DnsNotFound):
            return Finding("FAIL", check, "no PTR record")
        return Finding("FAIL", check, _why(exc))
    if not pointed:
        return Finding("FAIL", check, "no PTR record")
    mine = [n for n in pointed if n in names]
    if not mine:
        return Finding(
            "FAIL",
            check,
            f"{', '.join(pointed)}: not one of this gateway's names ({', '.join(names)})",
        )
    back: list[str] = []
    for name in mine:
        try:
            back = await resolver.addresses(name)
        except DnsError:
            continue
        if any(_same(a, address) for a in back):
            return Finding("OK", check, f"{name}, which resolves back to {address}")
    return Finding(
        "FAIL",
        check,
        f"{mine[0]} does not resolve back to {address} ({', '.join(back) or 'no address'})",
    )


def _same(a: str, b: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    return False


async def _check_banner(address: str, name: str, gateway: Gateway) -> Finding:
    host = f"[{address}]" if ":" in address else address
    check = f"SMTP {host}:{gateway.port}"
    try:
        async with asyncio.timeout(gateway.timeout):
            reader, writer = await asyncio.open_connection(address, gateway.port)
            try:
                banner = await _greeting(reader)
                writer.write(b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return Finding("FAIL", check, f"no banner within {gateway.timeout:g} s")
    except OSError as exc:  # asyncio's strerror is "Connect call failed (address)"
        return Finding("FAIL", check, os.strerror(exc.errno) if exc.errno else str(exc))
    first = banner.splitlines()[0] if banner else ""
    words = first[4:].split()
    if not first.startswith("220"):
        return Finding("FAIL", check, f"refuses mail: {first or 'nothing'}")
    if not words or words[0].lower().rstrip(".") not in gateway.names:
        return Finding("FAIL", check, f"{first}: not this gateway's banner (220 {name} …)")
    return Finding("OK", check, first)


async def _greeting(reader: asyncio.StreamReader) -> str:
    """The greeting, all its lines (``220-…`` continues, ``220 …`` ends)."""
    lines: list[str] = []
    size = 0
    while size < MAX_BANNER:
        raw = await reader.readline()
        if not raw:
            break
        size += len(raw)
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if line[3:4] != "-":
            break
    return "\n".join(lines)
