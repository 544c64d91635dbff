"""MAILER(uucp): mailertable ``uucp:``, ``uucp-old:``, ``suucp:``, ``uucp-new:``, ``uucp-dom:``
and ``uucp-uudom:`` hand the message to ``uux``, as Sendmail's cf/mailer/uucp.m4 mailers do.

Each mailer is uucp.m4's ``M`` line: ``P=/usr/bin/uux`` (``[uucp] uux``), ``A=uux - -r -a$g
-gC $h!rmail ($u)`` (``[uucp] args``), ``M=100000`` (``[uucp] max_size``), and by name:

=================  ==========  ==================  ==================
mailer             F=          sender (S=)         recipient (R=)
=================  ==========  ==================  ==================
uucp, uucp-old     DFMhuUd     FromU: node!...     EnvToU: domain!user
suucp, uucp-new    mDFMhuUd    FromU               EnvToU
uucp-dom           mDFMhud     EnvFromUD: u@d      EnvToSMTP: user@domain
uucp-uudom         mDFMhud     EnvFromUUD: d!u     EnvToSMTP
=================  ==========  ==================  ==================

``$h`` is the mailertable host; ``$g`` the envelope sender rewritten by S=, ``$u`` each
recipient by R=, then both by ruleset 4 (``u@h.UUCP`` is ``h!u``). F=m puts up to 100
recipients (Sendmail's default ``r=``) in one uux call, one ``($u)`` word each; without it
each recipient has its own call. stdin gets Sendmail's From_ line (F=U: ``From user  date
remote from node``, else ``From $g $d``; no ``Return-Path:``, F has no P) and the message
with LF line ends, ``From `` lines left as they are (no F=E). Date:, From: and Message-Id:
(F=DFM) were added when the message was received. The exit status is judged as the program
mailer's (``delivery.sysexits``). Headers are not rewritten (docs/design.md: UUCP).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mailgate.config import Config
from mailgate.delivery import Job, Outcome, Status
from mailgate.delivery.local import LocalDeliveryError
from mailgate.delivery.pipe import SAFE_PATH, find_program, run_mailer
from mailgate.queue.spool import QueuedMessage
from mailgate.reply import Reply
from mailgate.routing import Route
from mailgate.tables import Tables
from mailgate.tables.mailertable import UUCP_MAILERS
from mailgate.tables.maps import TableWarning

if TYPE_CHECKING:
    from mailgate.delivery.attempt import DeliveryContext

__all__ = [
    "FLAVOURS",
    "MAX_RCPT",
    "Flavour",
    "UucpMailer",
    "from_line",
    "recipient_argument",
    "sender_argument",
    "uux_argv",
    "uux_warnings",
]

MAX_RCPT = 100  # Sendmail's DEFAULT_MAX_RCPT, the r= of a mailer that names none
MAILER_DAEMON = "MAILER-DAEMON"  # $n, the null sender's name
SENT = Reply(250, "2.0.0", "")  # logged "stat=Sent", as Sendmail's "250 2.0.0 Sent"
_NODE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a host after %1 substitution
_UNSPLITTABLE = Reply(553, "5.1.3", "White space in a UUCP address")


@dataclass(frozen=True)
class Flavour:
    """What distinguishes uucp.m4's mailers."""

    multi: bool  # F=m: several recipients in one uux call
    uucp_from: bool  # F=U: the From_ line says "remote from" our node
    sender: Literal["FromU", "EnvFromUD", "EnvFromUUD"]  # S=
    bang_recipient: bool  # R=EnvToU (domain!user), else EnvToSMTP (user@domain)


_OLD = Flavour(multi=False, uucp_from=True, sender="FromU", bang_recipient=True)
_NEW = Flavour(multi=True, uucp_from=True, sender="FromU", bang_recipient=True)
FLAVOURS: dict[str, Flavour] = {
    "uucp": _OLD,
    "uucp-old": _OLD,
    "suucp": _NEW,
    "uucp-new": _NEW,
    "uucp-dom": Flavour(multi=True, uucp_from=False, sender="EnvFromUD", bang_recipient=False),
    "uucp-uudom": Flavour(multi=True, uucp_from=False, sender="EnvFromUUD", bang_recipient=False),
}
assert set(FLAVOURS) == UUCP_MAILERS


# -- address rewriting: uucp.m4's rulesets, for addresses as the envelope holds them ----------
def _split(address: str) -> tuple[str, str]:
    """``local@domain`` → (local, domain without a trailing dot); no ``@``: domain ""."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.rstrip(".")


def _uucp_host(domain: str) -> str | None:
    """``h`` of a domain ``h.UUCP`` (one label, any case), else None."""
    head, dot, tail = domain.rpartition(".")
    return head if dot and tail.lower() == "uucp" and head and "." not in head else None


def _to_bang(local: str, domain: str, is_local: Callable[[str], bool]) -> str:
    """The rules EnvToU and FromU share: strip a local name ($=w), then ``u@h.UUCP`` and
    ``u@d`` become ``h!u`` and ``d!u``."""
    if not domain or is_local(domain.lower()):
        return local
    return f"{_uucp_host(domain) or domain}!{local}"


def _final(local: str, domain: str) -> str:
    """Ruleset 4 for a domain-form address: UUCP is always presented in old form."""
    host = _uucp_host(domain)
    return f"{host}!{local}" if host else f"{local}@{domain}"


def _env_from_smtp(sender: str, hostname: str) -> tuple[str, str]:
    """EnvFromSMTP: the null sender is $n, an unqualified name gets our $j."""
    local, domain = _split(sender or MAILER_DAEMON)
    return local, domain or hostname


def sender_argument(
    mailer: str,
    sender: str,
    *,
    host: str,
    node: str,
    hostname: str,
    is_local: Callable[[str], bool],
) -> str:
    """``$g``: the envelope sender as ``mailer`` gives it to uux (``-a$g``, the From_ line)
    for a message to ``host`` ($h), from us, ``node`` ($U, else $k) and ``hostname`` ($j)."""
    flavour = FLAVOURS[mailer]
    if flavour.sender == "EnvFromUD":
        return _final(*_env_from_smtp(sender, hostname))
    if flavour.sender == "EnvFromUUD":
        local, domain = _env_from_smtp(sender, hostname)
        return f"{_uucp_host(domain) or domain}!{local}"
    # FromU: errors to mailer-daemon, then UUCP form, relative to $h, else behind our name.
    path = _to_bang(*_split(sender or MAILER_DAEMON), is_local)
    first, bang, rest = path.partition("!")
    if bang and first.lower() == host.lower():
        return rest if "!" in rest else path  # $h!...!user => ...!user; $h!user stays
    return f"{node}!{path}"


def recipient_argument(mailer: str, address: str) -> str:
    """``$u``: a recipient (never of a local domain: those never reach the mailertable) as
    ``mailer`` gives it to uux, inside the parentheses of ``($u)``."""
    local, domain = _split(address)
    if FLAVOURS[mailer].bang_recipient:
        return _to_bang(local, domain, lambda _d: False)
    return _final(local, domain) if domain else local


def from_line(mailer: str, g: str, date: str) -> bytes:
    """Sendmail's putfromline: with F=U and a ``!`` in ``$g``, ``From user  date remote from
    host`` (the path split at its first ``!``); else UnixFromLine, ``From $g $d``."""
    first, bang, rest = g.partition("!")
    text = (
        f"From {rest}  {date} remote from {first}"
        if FLAVOURS[mailer].uucp_from and bang
        else f"From {g} {date}"
    )
    return (text + "\n").encode("utf-8", "surrogateescape")


def uux_argv(args: Sequence[str], *, g: str, h: str, users: Sequence[str]) -> list[str]:
    """The argv of one uux call: ``args`` with ``$g`` and ``$h`` expanded, and the word
    holding ``$u`` once for each of ``users``, as Sendmail's deliver() builds it."""

    def expand(word: str, u: str) -> str:
        return re.sub(r"\$([ghu])", lambda m: {"g": g, "h": h, "u": u}[m[1]], word)

    out: list[str] = []
    for word in args:
        if "$u" in word:
            out += [expand(word, u) for u in users]
        else:
            out.append(expand(word, ""))
    return out


# -- the mailer ---------------------------------------------------------------------------------
class UucpMailer:
    """The six UUCP mailers: one batch per message and host; each uux call's outcome is that
    of every recipient it carried; ``relay=`` is the host, as Sendmail logs ``$h``."""

    def __init__(self, cfg: Config, ctx: DeliveryContext) -> None:
        self.cfg = cfg
        self._ctx = ctx

    def batch_key(self, route: Route) -> str:
        return route.host

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        mailer, host = jobs[0].route.mailer, jobs[0].route.host
        limit = self.cfg.uucp.max_size
        if limit and msg.size > limit:
            # deliver(): over the mailer's M=, EX_UNAVAILABLE with 5.3.4; uux never runs.
            too_big = Reply(552, "5.3.4", f"Message is too large; {limit} bytes max")
            return [Outcome(Status.PERM, too_big, host) for _ in jobs]
        outcomes: dict[int, Outcome] = {}
        users: list[tuple[int, str]] = []
        for i, job in enumerate(jobs):
            user = recipient_argument(mailer, job.route.address)
            if any(c.isspace() for c in user):
                # uux joins its words and splits them again: "(a b)" would not stay one
                # recipient (Sendmail passes it, and the remote rmail gets garbage).
                outcomes[i] = Outcome(Status.PERM, _UNSPLITTABLE, host)
            else:
                users.append((i, user))
        per_call = MAX_RCPT if FLAVOURS[mailer].multi else 1
        for start in range(0, len(users), per_call):
            chunk = users[start : start + per_call]
            try:
                await self._uux(msg, mailer, host, [u for _i, u in chunk])
            except LocalDeliveryError as exc:
                status = Status.TEMP if exc.temporary else Status.PERM
                outcomes.update(
                    (i, Outcome(status, exc.reply, host, call=start)) for i, _u in chunk
                )
            else:
                outcomes.update(
                    (i, Outcome(Status.SENT, SENT, host, call=start)) for i, _u in chunk
                )
        return [outcomes[i] for i in range(len(jobs))]

    async def _uux(self, msg: QueuedMessage, mailer: str, host: str, users: list[str]) -> None:
        """One uux call for ``users`` (their ``$u``); LocalDeliveryError when it fails."""
        if not _NODE.fullmatch(host):  # "%1" of an exact key is empty: the admin's to fix
            raise LocalDeliveryError(
                Reply(451, "4.3.5", f"mailertable gives {mailer} no UUCP node name: {host!r}")
            )
        settings = self.cfg.uucp
        program = find_program(settings.uux)
        if program is None:
            raise LocalDeliveryError(
                Reply(451, "4.3.0", f"Cannot exec {settings.uux}: not in PATH")
            )
        g = sender_argument(
            mailer,
            msg.envelope.sender,
            host=host,
            node=settings.node,
            hostname=self.cfg.hostname,
            is_local=self._ctx.snapshot().routing.is_local,
        )
        argv = uux_argv(
            settings.args,
            g=g,
            h=host,
            users=users,
        )
        env = {"PATH": SAFE_PATH, "HOME": "/"}
        if "TZ" in os.environ:  # Sendmail passes TZ on, for the programs' timestamps
            env["TZ"] = os.environ["TZ"]
        await run_mailer(
            argv,
            from_line(mailer, g, time.asctime()),
            msg.path,
            msg.offset,
            name=mailer,
            env=env,
            executable=program,
        )


def uux_warnings(tables: Tables, cfg: Config) -> list[TableWarning]:
    """For ``mailgate check``: mailertable lines of UUCP mailers while uux cannot be run (the
    mail waits in the queue, deferred, until it can)."""
    uux = cfg.uucp.uux
    program = find_program(uux)
    if program is not None and os.access(program, os.X_OK):
        return []
    mt = tables.mailertable
    out = []
    for key in mt.domain_keys():
        route = mt.route_for_key(key)
        if route is not None and route.mailer in UUCP_MAILERS:
            out.append(
                TableWarning(
                    mt.path or "mailertable",
                    route.line,
                    f"{key}: {route.mailer} runs {uux}, which "
                    f"{'is not in PATH' if program is None else 'is not there or not executable'}"
                    ": its mail is deferred until it is (install uucp, or set [uucp] uux)",
                )
            )
    return out
