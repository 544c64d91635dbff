"""FEATURE(mailertable): recipient domain → mailer and next hops (semantics §5, §18.1).

Lookup order for ``a.b.c``: ``a.b.c``, then ``.b.c``, ``.c`` (leading-dot keys match proper
subdomains only), then ``.``. ``%1`` in the value is the part of the domain the leading-dot key
did not cover. Unlike Sendmail, a purely numeric item after a host is that host's TCP port.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace

from mailgate.address import is_valid_domain
from mailgate.tables.maps import (
    EntryTable,
    ErrorValue,
    MapEntry,
    TableError,
    TableWarning,
    parse_error_value,
)

__all__ = [
    "SMTP_MAILERS",
    "UUCP_MAILERS",
    "MailerRoute",
    "MailerTable",
    "NextHop",
    "parse_mailer_value",
]

# MAILER(smtp)'s mailers. smtp opens with HELO, the others with EHLO; relay is for a smart host.
SMTP_MAILERS = frozenset({"smtp", "esmtp", "smtp8", "dsmtp", "relay"})
# MAILER(uucp)'s (cf/mailer/uucp.m4; delivery.uucp): uucp = uucp-old, suucp = uucp-new.
UUCP_MAILERS = frozenset({"uucp", "uucp-old", "suucp", "uucp-new", "uucp-dom", "uucp-uudom"})
# A UUCP node name as uux takes it before "!rmail" (``%1`` allowed, as in any host).
_UUCP_HOST = re.compile(r"(?:[A-Za-z0-9_]|%1)(?:[A-Za-z0-9._-]|%1)*")


@dataclass(frozen=True)
class NextHop:
    """One next hop: ``mx`` False when written ``[host]`` (no MX lookup); ``port`` None = 25.
    A UUCP mailer's one hop is its neighbour's node name, as written (``mx`` True, no port)."""

    host: str
    port: int | None
    mx: bool

    def __str__(self) -> str:
        shown = self.host if self.mx else f"[{_bracket(self.host)}]"
        return f"{shown}:{self.port}" if self.port is not None else shown


def _bracket(host: str) -> str:
    return f"IPv6:{host}" if ":" in host else host


@dataclass(frozen=True)
class MailerRoute:
    """A mailertable entry as it applies to one domain (``%1`` already substituted)."""

    mailer: str  # an SMTP_MAILERS or UUCP_MAILERS name, local or error
    hops: tuple[NextHop, ...]
    user: str | None  # local: the user; None = the recipient's own local part
    error: ErrorValue | None
    key: str
    line: int


def _split_hosts(text: str) -> list[str]:
    """Split ``a:[IPv6:2001:db8::1]:2525`` at colons outside brackets."""
    items: list[str] = []
    depth = 0
    start = 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        elif c == ":" and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {text!r}")
    items.append(text[start:])
    return items


def _hop(item: str) -> NextHop:
    if item.startswith("["):
        if not item.endswith("]"):
            raise ValueError(f"junk after ']' in {item!r}")
        inner = item[1:-1]
        if inner[:5].lower() == "ipv6:":
            try:
                return NextHop(str(ipaddress.IPv6Address(inner[5:])), None, False)
            except ValueError:
                raise ValueError(f"{item!r} is not a valid IPv6 address") from None
        if inner.replace(".", "").isdigit():
            try:
                return NextHop(str(ipaddress.IPv4Address(inner)), None, False)
            except ValueError:
                raise ValueError(f"{item!r} is not a valid IPv4 address") from None
        host = inner
        mx = False
    else:
        host = item
        mx = True
    # "%1" is validated as if it were a label; on an exact match it is empty (Sendmail's
    # ".relay.example.com"), which is the admin's business, not a syntax error.
    if not is_valid_domain(host.replace("%1", "x")):
        raise ValueError(f"{item!r} is not a valid host name")
    return NextHop(host.lower().rstrip("."), None, mx)


def _hops(text: str) -> tuple[NextHop, ...]:
    hops: list[NextHop] = []
    after_port = False
    for item in _split_hosts(text):
        item = item.strip()
        if not item:
            raise ValueError("empty host (\"::\" or a trailing ':')")
        if item.isdigit():
            # mailgate's port syntax (§18.1): a number after a host is that host's port.
            if not hops or after_port:
                raise ValueError(f"port {item} does not follow a host")
            port = int(item)
            if not 1 <= port <= 65535:
                raise ValueError(f"port {item} out of range 1-65535")
            hops[-1] = replace(hops[-1], port=port)
            after_port = True
            continue
        hops.append(_hop(item))
        after_port = False
    return tuple(hops)


def parse_mailer_value(value: str, key: str = "", line: int = 0) -> MailerRoute:
    """Parse a mailertable value (``mailer:host...``); raises ValueError when malformed."""
    mailer, colon, rest = value.partition(":")
    mailer_l = mailer.lower()
    if not colon:
        raise ValueError(f"{value!r} has no mailer (write e.g. smtp:{value})")
    rest = rest.strip()
    if mailer_l in SMTP_MAILERS:
        if not rest:
            raise ValueError(f"{mailer}: needs a host")
        return MailerRoute(mailer_l, _hops(rest), None, None, key, line)
    if mailer_l == "local":
        return MailerRoute("local", (), rest or None, None, key, line)
    if mailer_l == "error":
        # Without a DSN, Sendmail's error mailer has no $@ to exit with: EX_UNAVAILABLE.
        error = parse_error_value(rest, keyword=False, default_exit=os.EX_UNAVAILABLE)
        return MailerRoute("error", (), None, error, key, line)
    if mailer_l in UUCP_MAILERS:
        return MailerRoute(mailer_l, (_uucp_hop(mailer, rest),), None, None, key, line)
    raise ValueError(
        f"unknown mailer {mailer!r} (expected smtp, esmtp, smtp8, dsmtp, relay, local, error,"
        " uucp, uucp-old, suucp, uucp-new, uucp-dom or uucp-uudom)"
    )


def _uucp_hop(mailer: str, host: str) -> NextHop:
    """A UUCP mailer's host (``$h`` of ``$h!rmail``): one node name, its case kept (F=h)."""
    if not host:
        raise ValueError(f"{mailer}: needs a host (the UUCP neighbour that gets the mail)")
    if host.startswith("["):
        raise ValueError(f"{mailer}: {host!r}: a UUCP host is a node name, not an address")
    if ":" in host:
        raise ValueError(f"{mailer}: takes one UUCP host, not a list or a port ({host!r})")
    if not _UUCP_HOST.fullmatch(host):
        raise ValueError(f"{mailer}: {host!r} is not a UUCP node name")
    return NextHop(host, None, True)


def _canon_key(key: str) -> str | None:
    k = key.lower()
    if k == ".":
        return k
    if k.endswith("."):
        k = k[:-1]
    bare = k[1:] if k.startswith(".") else k
    if not bare or not is_valid_domain(bare) or bare.startswith("["):
        return None
    return k


class MailerTable(EntryTable):
    """Parsed mailertable: canonical key → route template (``%1`` not yet substituted)."""

    def __init__(self, path: str = "") -> None:
        super().__init__(path)
        self._routes: dict[str, MailerRoute] = {}
        self.entries: list[MapEntry] = []

    def _add(self, e: MapEntry) -> None:
        k = e.key.lower()
        if k.startswith("[") and k.rstrip(".").endswith("]"):
            # Sendmail never looks address literals up here; keep the line, say it is dead.
            self.warnings.append(
                TableWarning(
                    self.path,
                    e.line,
                    f"{e.key} is never used: address literals bypass the mailertable",
                )
            )
            return
        canon = _canon_key(e.key)
        if canon is None:
            raise TableError(self.path, e.line, f"{e.key!r} is not a domain, .domain or '.'")
        try:
            route = parse_mailer_value(e.value, e.key, e.line)
        except ValueError as exc:
            raise TableError(self.path, e.line, f"{e.key}: {exc}") from None
        first = self._routes.get(canon)
        if self._is_duplicate(e, first.line if first is not None else None):
            return
        self._routes[canon] = route
        self.entries.append(e)

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: str) -> bool:
        return key.lower() in self._routes

    def domain_keys(self) -> list[str]:
        return list(self._routes)

    def route_for_key(self, key: str) -> MailerRoute | None:
        """The entry stored under a canonical key (for lint), ``%1`` unsubstituted."""
        return self._routes.get(key)

    def lookup(self, domain: str) -> MailerRoute | None:
        """The route for a recipient domain, or None (deliver by MX to the domain itself)."""
        d = domain.lower()
        if d.endswith("."):
            d = d[:-1]
        if not d:
            return None
        routes = self._routes
        hit = routes.get(d)
        if hit is not None:
            return _subst(hit, "")
        # ".b.c" for "a.b.c": %1 is the part the key did not cover ("a").
        i = d.find(".")
        while i >= 0:
            hit = routes.get(d[i:])
            if hit is not None:
                return _subst(hit, d[:i])
            i = d.find(".", i + 1)
        hit = routes.get(".")
        if hit is not None:
            return _subst(hit, d)
        return None


def _subst(route: MailerRoute, pct1: str) -> MailerRoute:
    if not any("%" in h.host for h in route.hops) and not (route.user and "%" in route.user):
        return route
    hops = tuple(replace(h, host=_pct(h.host, pct1)) for h in route.hops)
    user = _pct(route.user, pct1) if route.user is not None else None
    return replace(route, hops=hops, user=user)


def _pct(text: str, pct1: str) -> str:
    """Sendmail's map_rewrite: ``%1`` → the uncovered part, ``%%`` → ``%``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%" and i + 1 < len(text):
            n = text[i + 1]
            if n == "1":
                out.append(pct1)
                i += 2
                continue
            if n == "%":
                out.append("%")
                i += 2
                continue
        out.append(c)
        i += 1
    return "".join(out)
