"""Delivery: what one attempt hands a mailer and what a mailer gives back.

A ``Mailer`` delivers one message to a batch of ``Job``s (recipient + route) and returns one
``Outcome`` per job. Every mailer (SMTP, UUCP, Maildir, mbox file, program, error) is behind
this one interface and is found by its Sendmail name (``Route.mailer``) in
``delivery.mailers``; the attempt (``delivery.attempt``) never asks which kind it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from mailgate.reply import Reply

if TYPE_CHECKING:
    from mailgate.queue.spool import QueuedMessage, Recipient
    from mailgate.routing import Route


class Status(StrEnum):
    """One recipient's result in one attempt."""

    SENT = "sent"
    TEMP = "temp"  # try again later
    PERM = "perm"  # failed for good: bounce


_DEFAULT_DSN = {Status.SENT: "2.0.0", Status.TEMP: "4.0.0", Status.PERM: "5.0.0"}


@dataclass
class Outcome:
    """What happened to one recipient in one attempt."""

    status: Status
    reply: Reply
    relay: str | None = None  # "host [ip]" as Sendmail logs it
    remote_mta: str | None = None
    transcript: tuple[str, ...] = ()
    dsn_passed: bool = False  # the next hop took our DSN parameters: its DSNs, not ours
    # No peer said it (a refused connection, a timeout, a DNS failure): the reply is ours,
    # and stat= says its text alone, as Sendmail ("Deferred: Connection refused by [ip]").
    local: bool = False
    # Refused at RCPT: its own to= line, before the transaction's, as Sendmail logs it then.
    at_rcpt: bool = False
    # Which program run of its batch it came from (uux takes at most 100 recipients, one
    # without F=m): each is a delivery of Sendmail's, with its own to= line.
    call: int = 0

    @classmethod
    def from_reply(
        cls,
        reply: Reply,
        relay: str | None = None,
        remote_mta: str | None = None,
        transcript: tuple[str, ...] = (),
        *,
        dsn_passed: bool = False,
        at_rcpt: bool = False,
    ) -> Outcome:
        """The outcome a reply means: 2xx/3xx sent, 4xx temporary, 5xx permanent."""
        status = (
            Status.SENT if reply.is_positive else Status.TEMP if reply.is_temporary else Status.PERM
        )
        return cls(status, reply, relay, remote_mta, transcript, dsn_passed, at_rcpt=at_rcpt)

    @property
    def dsn(self) -> str:
        return self.reply.enhanced or _DEFAULT_DSN[self.status]

    @property
    def stat(self) -> str:
        """What maillog's ``stat=`` says (and mailq, and the status file's last errors)."""
        if self.status is Status.SENT:
            text = self.reply.text.replace("\n", " ")
            return f"Sent ({text})" if text else "Sent"
        if self.status is Status.TEMP:
            return f"Deferred: {self.reply.text if self.local else self.reply}"
        if self.reply.code == 550 and self.reply.enhanced == "5.1.1":
            return "User unknown"
        return self.reply.text if self.local else str(self.reply)


@dataclass(slots=True)
class Job:
    """One target to deliver: the envelope recipient it is for and where it goes. (Not
    frozen: made per target and attempt; see docs/design.md, "CPU per message".)"""

    rcpt: Recipient
    route: Route


class Mailer(Protocol):
    """A delivery agent (Sendmail's mailer): SMTP, UUCP, Maildir, mbox file, program, error."""

    def batch_key(self, route: Route) -> str:
        """Jobs of one message whose routes share this key go to one ``deliver`` call (one
        SMTP transaction per next hop; one call per target for the local mailers)."""
        ...

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        """Deliver ``msg`` for ``jobs`` (one batch); one Outcome per job, in order. Never
        raises for a delivery failure: that is an Outcome."""
        ...
