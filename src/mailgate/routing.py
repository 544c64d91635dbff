"""Recipient → routes, as Sendmail's rulesets 3 and 0 decide them, over one immutable snapshot.

Order (semantics §1, §5–§8): domaintable rewrites the domain; a local domain (class w) goes
through virtusertable, then aliases, then the local mailer; any other domain goes to the
mailertable (exact, leading-dot parents, ``.``) and, failing that, to the domain's MX hosts.
Address literals never consult the mailertable. Pure functions: no DNS, no I/O but the
``local_user`` callback (passwd / maildir folder) and ``:include:`` files.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mailgate.address import Mailbox
from mailgate.tables import Tables
from mailgate.tables.aliases import read_include
from mailgate.tables.mailertable import SMTP_MAILERS, UUCP_MAILERS, MailerRoute, NextHop
from mailgate.tables.maps import ErrorValue, TableError, parse_error_value
from mailgate.tables.virtusers import DETAIL_SEP

MAX_DEPTH = 10  # aliases and virtusertable results that point at each other
REMOTE_ROUTES_KEPT = 4096  # recipients whose remote route a routing context remembers


@dataclass(frozen=True)
class Route:
    """Where one recipient goes.

    ``mailer`` is Sendmail's mailer name (``esmtp``, ``smtp``, ``relay``, ``uucp-dom``,
    ``local``) or one of ``*file*``, ``prog``, ``error``, and ``alias`` (a local name that
    aliases expand later; only returned when expansion is not asked for, at RCPT time).
    """

    mailer: str
    address: str  # the recipient to use: RCPT TO for SMTP, the user for local, path, command
    hops: tuple[NextHop, ...] = ()
    error: ErrorValue | None = None
    via: str = ""  # which table entry decided, for `mailgate route` and logs

    @property
    def is_smtp(self) -> bool:
        return self.mailer in SMTP_MAILERS

    @property
    def is_uucp(self) -> bool:
        return self.mailer in UUCP_MAILERS

    @property
    def is_remote(self) -> bool:
        """Handed to another system (SMTP or UUCP): ``address`` is the recipient it gets."""
        return self.is_smtp or self.is_uucp

    # Cached (in the instance's __dict__, which a frozen dataclass still has): the attempt,
    # the SMTP mailer, the log line and the status ask a route for them ten times a message.
    @cached_property
    def host(self) -> str:
        """The next hop as Sendmail's ``-bt`` shows it: ``[host]`` when MX is not used."""
        parts = []
        for hop in self.hops:
            literal = f"ipv6:{hop.host}" if ":" in hop.host else hop.host
            text = hop.host if hop.mx else f"[{literal}]"
            parts.append(f"{text}:{hop.port}" if hop.port else text)
        return ":".join(parts)

    @cached_property
    def target(self) -> str:
        """A stable key for delivery bookkeeping: the same target is delivered once."""
        return f"{self.mailer}:{self.host}:{self.address}"


@dataclass(frozen=True)
class RoutingContext:
    tables: Tables
    class_w: frozenset[str]  # local-host-names plus our own names and [ip] literals
    local_user: Callable[[str], str | None]  # the account / maildir name a local part reaches
    # Recipient (local part, domain) → its route, for recipients of non-local domains only:
    # that route is a pure function of the tables and the address, and each message asks for
    # it twice (the RCPT check, the delivery plan), as Postfix's resolver clients cache theirs.
    # Local recipients are not kept: ``local_user`` reads passwd and maildir folders.
    remote_routes: dict[tuple[str, str], Route] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def is_local(self, domain: str) -> bool:
        return domain == "" or domain in self.class_w


def class_w(tables: Tables, hostname: str, listen_ips: list[str]) -> frozenset[str]:
    """Sendmail's class w: local-host-names, $j, the short name, localhost, our [ip] literals."""
    names = set(tables.local_names)
    names.update({hostname, hostname.split(".")[0], "localhost", "localhost.localdomain"})
    for ip in [*listen_ips, "127.0.0.1", "::1"]:
        if ip in ("0.0.0.0", "::"):
            continue
        names.add(f"[ipv6:{ip}]" if ":" in ip else f"[{ip}]")
    return frozenset(n.lower() for n in names)


# A local name that is neither an alias nor an account (one value: policy asks ``is``).
UNKNOWN_USER = ErrorValue(550, "5.1.1", "User unknown")


def _error(code: int, dsn: str, text: str, via: str = "") -> Route:
    return Route("error", "", error=ErrorValue(code, dsn, text), via=via)


def rewrite_domain(mailbox: Mailbox, tables: Tables) -> Mailbox:
    """domaintable: replace the host part (semantics §7)."""
    if not mailbox.domain or mailbox.is_literal:
        return mailbox
    new = tables.domaintable.rewrite(mailbox.domain)
    return mailbox if new == mailbox.domain else Mailbox(mailbox.local, new)


def resolve(mailbox: Mailbox, ctx: RoutingContext, *, expand: bool = True) -> list[Route]:
    """Routes for one (normalised) recipient; several when aliases fan out."""
    key = (mailbox.local, mailbox.domain)
    known = ctx.remote_routes.get(key)
    if known is not None:
        return [known]
    mb = rewrite_domain(mailbox, ctx.tables)
    if not ctx.is_local(mb.domain):
        entry = None if mb.is_literal else ctx.tables.mailertable.lookup(mb.domain)
        if entry is None or entry.mailer != "local":
            # Neither class w nor the mailertable's local: (which lead to virtusertable,
            # aliases and :include: files): one route, whatever ``expand`` says, and the
            # same for every message. Routes are frozen: the one kept is shared, with its
            # cached host and target.
            route = _remote_route(mb, entry)
            remote = ctx.remote_routes
            if len(remote) >= REMOTE_ROUTES_KEPT:
                remote.clear()
            remote[key] = route
            return [route]
    out: list[Route] = []
    _resolve(mb, ctx, expand, out, set(), 0)
    return out


def _resolve(
    mb: Mailbox, ctx: RoutingContext, expand: bool, out: list[Route], seen: set[str], depth: int
) -> None:
    if depth > MAX_DEPTH:
        out.append(_error(554, "5.4.6", f"Too many levels of aliasing for {mb}"))
        return
    if ctx.is_local(mb.domain):
        _resolve_local(mb, ctx, expand, out, seen, depth)
        return
    entry = None if mb.is_literal else ctx.tables.mailertable.lookup(mb.domain)
    if entry is not None and entry.mailer == "local":
        # mailertable local:[user] hands the recipient to the local mailer: aliases apply.
        _resolve_local_user(entry.user or mb.local, ctx, expand, out, seen, depth)
        return
    _add(out, seen, _remote_route(mb, entry))


def _add(out: list[Route], seen: set[str], route: Route) -> None:
    # Sendmail suppresses duplicate deliveries to the same target within one message.
    if route.mailer == "error" or route.target not in seen:
        seen.add(route.target)
        out.append(route)


def _remote_route(mb: Mailbox, entry: MailerRoute | None) -> Route:
    """A non-local domain: address literal, its mailertable ``entry`` (not ``local``: that is
    the caller's), or MX of the domain."""
    address = str(mb)
    if mb.is_literal:
        literal = mb.domain[1:-1]
        if literal.startswith("ipv6:"):
            literal = literal[5:]
        return Route(
            "esmtp",
            address,
            (NextHop(literal, None, False),),
            via="address literal (mailertable not consulted)",
        )
    if entry is None:
        return Route(
            "esmtp",
            address,
            (NextHop(mb.domain, None, True),),
            via=f"MX of {mb.domain} (no mailertable entry)",
        )
    via = f"mailertable line {entry.line} ({entry.key})"
    if entry.error is not None:
        return Route("error", address, error=entry.error, via=via)
    return Route(entry.mailer, address, entry.hops, via=via)


def _strip_quotes(local: str) -> str:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return local[1:-1]
    return local


def _resolve_local(
    mb: Mailbox, ctx: RoutingContext, expand: bool, out: list[Route], seen: set[str], depth: int
) -> None:
    tables = ctx.tables
    if mb.domain:
        hit = tables.virtusers.lookup(mb.local, mb.domain)
        if hit is not None:
            value, entry = hit
            via = f"virtusertable line {entry.line} ({entry.key})"
            if value.lower().startswith("error:"):
                try:
                    err = parse_error_value(value[6:])
                except ValueError:
                    # Checked at load, but %1/%2 put the sender's text in: "error:%2" with
                    # u+250@dom reads "error:250", which is no error value.
                    err = ErrorValue(550, "5.0.0", value[6:])
                out.append(Route("error", str(mb), error=err, via=via))
                return
            if "@" in value:
                local, _, domain = value.rpartition("@")
                target = Mailbox(local, domain.rstrip(".").lower())
                # Rewritten virtual users are routed without a relay check (semantics §6).
                _resolve(rewrite_domain(target, tables), ctx, expand, out, seen, depth + 1)
                return
            mb = Mailbox(value, "")
    _resolve_local_user(mb.local, ctx, expand, out, seen, depth)


def _resolve_local_user(
    local: str, ctx: RoutingContext, expand: bool, out: list[Route], seen: set[str], depth: int
) -> None:
    name = _strip_quotes(local)
    targets = ctx.tables.aliases.lookup(name)
    user, plus, _detail = name.partition(DETAIL_SEP)
    if targets is None and plus and user:
        # Sendmail's plussed users: user+detail, then user+*, then user, in aliases; not
        # aliased, the account is the user's (its local mailer is given user+detail).
        targets = ctx.tables.aliases.lookup(f"{user}+*")
        if targets is None:
            targets = ctx.tables.aliases.lookup(user)
        name = user
    if (
        targets is None
        and name.lower() in ("postmaster", "mailer-daemon")
        and ctx.local_user(name) is None
    ):
        # RFC 5321 4.5.1: postmaster must exist; Sendmail ships it as an alias to root.
        _resolve_local_user("root", ctx, expand, out, seen, depth + 1)
        return
    if targets is None:
        _add_local_user(name, "local user", ctx, out, seen)
        return
    if not expand:
        _add(out, seen, Route("alias", name, via="aliases"))
        return
    key = f"alias:{name.lower()}"
    if key in seen:
        return
    seen.add(key)
    for t in targets:
        _expand_target(t.kind, t.value, name, ctx, out, seen, depth)


def include_is_safe(path: Path) -> bool:
    """May programs and files named in this ``:include:`` file run? Only if nobody else can
    write it and its owner is root or a user with a real login shell (as Sendmail checks)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_mode & 0o002:
        return False
    if st.st_uid == 0:
        return True
    try:
        shell = pwd.getpwuid(st.st_uid).pw_shell
        shells = Path("/etc/shells").read_text().split()
    except (KeyError, OSError):
        return False
    return shell in shells


def _add_local_user(
    name: str, via: str, ctx: RoutingContext, out: list[Route], seen: set[str]
) -> None:
    user = ctx.local_user(name)
    if user is None:
        out.append(Route("error", "", error=UNKNOWN_USER, via=f"{via}: no such user {name!r}"))
    else:
        _add(out, seen, Route("local", user, via=via))


def _expand_target(
    kind: str,
    value: str,
    name: str,
    ctx: RoutingContext,
    out: list[Route],
    seen: set[str],
    depth: int,
) -> None:
    via = f"aliases ({name})"
    if kind == "program":
        _add(out, seen, Route("prog", value, via=via))
    elif kind == "file":
        _add(out, seen, Route("*file*", value, via=via))
    elif kind == "include":
        try:
            included = read_include(Path(value))
        except (OSError, TableError) as exc:
            out.append(_error(451, "4.3.0", f":include: {value} unreadable: {exc}", via))
            return
        safe = include_is_safe(Path(value))
        for t in included:
            if not safe and t.kind in ("program", "file"):
                # Sendmail runs them as the file's owner: refused for an unsafe owner.
                what = "programs" if t.kind == "program" else "files"
                out.append(
                    _error(
                        550,
                        "5.7.1",
                        f"{t.value}... Address unsafe for mailing to {what} (:include:{value})",
                        via,
                    )
                )
                continue
            _expand_target(t.kind, t.value, name, ctx, out, seen, depth + 1)
    else:
        local, at, domain = value.rpartition("@")
        if not at:
            local, domain = value, ""
        if not domain and local.startswith("\\"):
            # aliases(5): "\user" is the account itself, never aliased again.
            _add_local_user(local[1:], via, ctx, out, seen)
            return
        target = Mailbox(local, domain.rstrip(".").lower())
        if (not target.domain or ctx.is_local(target.domain)) and _strip_quotes(
            target.local
        ).lower() == name.lower():
            # "root: root" style self-reference: deliver to the account itself.
            _add_local_user(name, via, ctx, out, seen)
            return
        _resolve(rewrite_domain(target, ctx.tables), ctx, True, out, seen, depth + 1)
