"""Async DNS resolver for mailgate: MX, A/AAAA and PTR lookups with a TTL cache.

Built on dnspython's ``dns.asyncresolver``. Errors are mapped to three outcomes that mail
handling cares about: the name does not exist (``DnsNotFound``), the answer cannot be had right
now (``DnsTempError``), or the domain explicitly accepts no mail (``NullMx``, RFC 7505).
Every host lookup is DNS: ``/etc/hosts`` is never consulted (sendmail-semantics §18.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = [
    "DnsError",
    "DnsNotFound",
    "DnsTempError",
    "NullMx",
    "PtrResult",
    "Resolver",
    "parse_nameserver",
]

CACHE_SIZE = 10_000
MAX_TTL = 86_400.0  # a bogus huge TTL must not pin an answer for ever
DEFAULT_NEGATIVE_TTL = 60.0  # negative answer without an SOA to take the TTL from
MAX_NEGATIVE_TTL = 3_600.0  # RFC 2308 suggests capping negative caching at hours; stay short
MAX_PTR_NAMES = 10  # bound the forward-confirmation work a hostile PTR set can cause


class DnsError(Exception):
    """Base of all resolver errors."""


class DnsTempError(DnsError):
    """Timeout, SERVFAIL, or no nameserver answered: try again later."""


class DnsNotFound(DnsError):
    """NXDOMAIN (or a name that cannot exist)."""


class NullMx(DnsError):
    """The domain publishes the RFC 7505 null MX ``0 .``: it accepts no mail."""


# Sendmail's ${client_resolve}: the PTR found and resolving back, none, a temporary failure,
# or a name that does not resolve back to the address.
PtrStatus = Literal["OK", "FAIL", "TEMP", "FORGED"]
# Whether a sender's domain resolves (MX, A or AAAA): yes, no, or not known now.
Resolves = Literal["yes", "no", "temp"]


@dataclass(frozen=True)
class PtrResult:
    status: PtrStatus
    name: str | None  # the PTR name (without trailing dot) when one was found


def parse_nameserver(value: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"`` or ``"[v6]:port"`` (a bare IPv6 has no port) → (ip, port)."""
    host, port = value, 53
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p)
    ipaddress.ip_address(host)  # ValueError for a name: a resolver needs an address
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {value!r}")
    return host, port


@functools.lru_cache(maxsize=1024)  # every delivery to a [bracketed] next hop asks it
def _ip_literal(host: str) -> str | None:
    """The normalised address if ``host`` is an IP literal (``[..]`` and ``IPv6:`` allowed)."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h[:5].lower() == "ipv6:":
        h = h[5:]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return None


def _to_name(name: str) -> dns.name.Name:
    """An absolute DNS name; DnsNotFound for names that cannot exist."""
    text = name.strip().rstrip(".")
    if not text:
        raise DnsNotFound(f"empty domain name {name!r}")
    try:
        return dns.name.from_text(text + ".")
    except (dns.exception.DNSException, UnicodeError) as e:
        raise DnsNotFound(f"invalid domain name {name!r}: {e}") from None


def _host_text(name: Any) -> str:
    """A target name as text, lower-case, no trailing dot; the root stays ``"."``."""
    text = name.to_text(omit_final_dot=True) if isinstance(name, dns.name.Name) else str(name)
    return text.lower().rstrip(".") or "."


def _negative_ttl(response: Any) -> float:
    """RFC 2308: the negative TTL is min(SOA TTL, SOA minimum) from the authority section."""
    if response is not None:
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))
    return DEFAULT_NEGATIVE_TTL


class _Cache:
    """LRU of (name, rdtype) → (expiry, records | negative error), bounded in size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()

    def get(self, key: tuple[str, int]) -> Any:
        hit = self._data.get(key)
        if hit is None:
            return None
        expiry, value = hit
        if expiry <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        self._data[key] = (time.monotonic() + min(ttl, MAX_TTL), value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Resolver:
    """Async resolver with a shared TTL cache and de-duplication of concurrent lookups."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        timeout: float = 5.0,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.timeout = timeout
        if nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            try:
                res = dns.asyncresolver.Resolver()
            except dns.exception.DNSException:
                # No usable /etc/resolv.conf: a local caching resolver is the usual setup.
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = ["127.0.0.1"]
        res.cache = None  # our own cache also keeps NXDOMAIN and knows our key normalisation
        res.lifetime = timeout  # the whole lookup, across retries and nameservers
        res.timeout = min(2.0, timeout)  # per try, so a lost UDP packet is retried in time
        self._res = res
        self._cache = _Cache(cache_size)
        self._inflight: dict[tuple[str, int], asyncio.Future[tuple[Any, ...]]] = {}

    # -- the one place that talks to dnspython -------------------------------------------------

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Any, ...]:
        """Records of one type (parsed), () for NODATA; DnsNotFound / DnsTempError."""
        qname = _to_name(name)
        key = (qname.to_text().lower(), rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if isinstance(cached, type) and issubclass(cached, DnsError):
                raise cached(f"{name}: {dns.rdatatype.to_text(rdtype)} does not exist (cached)")
            return cached  # type: ignore[no-any-return]
        fut = self._inflight.get(key)
        if fut is None or fut.get_loop() is not asyncio.get_running_loop():
            fut = asyncio.ensure_future(self._query(qname, rdtype, key))
            self._inflight[key] = fut
            fut.add_done_callback(functools.partial(self._done, key))
        # shield: one caller giving up must not cancel the lookup the others wait for.
        return await asyncio.shield(fut)

    def _done(self, key: tuple[str, int], fut: asyncio.Future[tuple[Any, ...]]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: all waiters may have gone away

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, key: tuple[str, int]
    ) -> tuple[Any, ...]:
        what = f"{qname.to_text(omit_final_dot=True)}/{dns.rdatatype.to_text(rdtype)}"
        try:
            # Belt and braces over dnspython's own lifetime: our timeout bounds the lookup.
            async with asyncio.timeout(self.timeout + 0.5):
                answer = await self._res.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False
                )
        except dns.resolver.NXDOMAIN as e:
            # dnspython leaves NXDOMAIN.responses() unannotated: it maps names to messages.
            responses: dict[Any, Any] = e.responses() if hasattr(e, "responses") else {}  # type: ignore[no-untyped-call]
            response = next(iter(responses.values()), None) if responses else None
            self._cache.put(key, DnsNotFound, _negative_ttl(response))
            raise DnsNotFound(f"{what}: no such domain (NXDOMAIN)") from None
        except dns.resolver.YXDOMAIN:
            raise DnsNotFound(f"{what}: name too long after DNAME substitution") from None
        except (TimeoutError, dns.exception.Timeout):
            raise DnsTempError(f"{what}: timed out after {self.timeout:g}s") from None
        except dns.resolver.NoNameservers as e:
            raise DnsTempError(f"{what}: no nameserver answered ({e})") from None
        except dns.exception.DNSException as e:
            raise DnsTempError(f"{what}: {e}") from None
        except OSError as e:
            raise DnsTempError(f"{what}: {e}") from None
        rrset = answer.rrset
        if rrset is None:
            self._cache.put(key, (), _negative_ttl(answer.response))
            return ()
        records: tuple[Any, ...]
        if rdtype == dns.rdatatype.MX:
            records = tuple(sorted((r.preference, _host_text(r.exchange)) for r in rrset))
        elif rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            records = tuple(r.address for r in rrset)
        elif rdtype == dns.rdatatype.PTR:
            records = tuple(_host_text(r.target) for r in rrset)
        else:
            records = tuple(r.to_text() for r in rrset)
        self._cache.put(key, records, answer.expiration - time.time())
        return records

    # -- public API ----------------------------------------------------------------------------

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX records sorted by preference (hosts lower-case, no trailing dot; null MX host
        is ``"."``); [] when the domain exists without MX."""
        return list(await self._lookup(domain, dns.rdatatype.MX))

    async def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of a host; an IP literal is returned as is, without DNS."""
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        results = await asyncio.gather(
            self._lookup(host, dns.rdatatype.A),
            self._lookup(host, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        found: list[str] = []
        errors: list[BaseException] = []
        for r in results:
            if isinstance(r, BaseException):
                errors.append(r)
            else:
                found.extend(r)
        if found:
            return found  # one family answering is enough to deliver
        for e in errors:
            if not isinstance(e, DnsError):
                raise e
        temp = [e for e in errors if isinstance(e, DnsTempError)]
        if temp:
            raise temp[0]
        if errors:
            raise errors[0]
        return []

    async def ptr_names(self, ip: str) -> list[str]:
        """The PTR names of an address, as they are (not forward-confirmed: ``ptr`` does
        that); [] when it has none. DnsNotFound, DnsTempError; ValueError for no address."""
        addr = ipaddress.ip_address(ip.strip("[]"))
        names = await self._lookup(addr.reverse_pointer, dns.rdatatype.PTR)
        return [n for n in names if n != "."]

    async def ptr(self, ip: str) -> PtrResult:
        """Forward-confirmed reverse DNS of a client address (Sendmail's ``${client_resolve}``).

        The whole check (PTR, then the names' addresses) takes at most the DNS timeout.
        """
        try:
            addr = ipaddress.ip_address(ip.strip("[]"))
        except ValueError:
            return PtrResult("FAIL", None)
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                names = await self._lookup(addr.reverse_pointer, dns.rdatatype.PTR)
        except DnsNotFound:
            return PtrResult("FAIL", None)
        except (DnsTempError, TimeoutError):
            return PtrResult("TEMP", None)
        names = tuple(n for n in names if n != ".")
        if not names:
            return PtrResult("FAIL", None)
        rdtype = dns.rdatatype.A if addr.version == 4 else dns.rdatatype.AAAA
        try:
            # Concurrently, so that the check costs about one lookup's latency.
            async with asyncio.timeout_at(deadline):
                checks = await asyncio.gather(
                    *(self._lookup(n, rdtype) for n in names[:MAX_PTR_NAMES]),
                    return_exceptions=True,
                )
        except TimeoutError:
            return PtrResult("TEMP", names[0])
        temp = False
        for name, got in zip(names, checks, strict=False):
            if isinstance(got, DnsTempError):
                temp = True
            elif isinstance(got, BaseException):
                if not isinstance(got, DnsError):
                    raise got
            elif any(_same_ip(a, addr) for a in got):
                return PtrResult("OK", name)
        return PtrResult("TEMP" if temp else "FORGED", names[0])

    async def domain_resolves(self, domain: str) -> Resolves:
        """``"yes"`` if the domain has MX, A or AAAA records, ``"no"`` if not, else ``"temp"``.
        An address literal resolves if it has a PTR name, as Sendmail's canonify finds one
        (``user@[192.0.2.1]`` without one: 553 5.1.8). The whole check takes at most the DNS
        timeout, as :meth:`ptr`."""
        literal = _ip_literal(domain)
        try:
            async with asyncio.timeout(self.timeout):
                if literal is not None:
                    return "yes" if await self.ptr_names(literal) else "no"
                if await self.mx(domain) or await self.addresses(domain):
                    return "yes"
        except DnsNotFound:
            return "no"
        except (DnsTempError, TimeoutError):
            # An MX failure is not masked by a later A lookup: answering "temp" at once also
            # keeps the cost of a dead nameserver to one timeout.
            return "temp"
        return "no"

    async def mail_exchangers(self, domain: str) -> list[list[str]]:
        """Hosts to try, grouped by MX preference, each group in random order (RFC 5321 5.1).

        No MX but an address: the implicit MX ``[[domain]]``. NullMx for ``0 .``;
        DnsNotFound when the domain has neither MX nor address records.
        """
        records = await self.mx(domain)
        real = [(p, h) for p, h in records if h != "."]
        if records and not real:
            raise NullMx(f"{domain} does not accept mail (null MX)")
        if not real:
            if await self.addresses(domain):
                return [[_host_text(domain)]]
            raise DnsNotFound(f"{domain}: no MX and no address records")
        groups: dict[int, list[str]] = {}
        for pref, host in real:
            group = groups.setdefault(pref, [])
            if host not in group:
                group.append(host)
        out = []
        for pref in sorted(groups):
            group = groups[pref]
            random.shuffle(group)  # equal preference: spread the load (RFC 5321 5.1)
            out.append(group)
        return out


def _same_ip(text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(text) == addr
    return False
