"""The mailer registry: Sendmail's mailer name (``Route.mailer``) → the ``Mailer`` that delivers.

Adding a mailer (LMTP, uucp, a milter quarantine) is a class with ``batch_key`` and
``deliver`` (``delivery.Mailer``) and one line in ``MAILERS``; the attempt does not change.
Routing decides which name a recipient gets (``routing``, ``tables.mailertable``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mailgate.config import Config
from mailgate.delivery import Job, Mailer, Outcome, Status
from mailgate.delivery.local import FileMailer, MaildirMailer
from mailgate.delivery.pipe import ProgramMailer
from mailgate.delivery.smtp import SmtpMailer
from mailgate.queue.spool import QueuedMessage
from mailgate.reply import Reply
from mailgate.routing import SMTP_MAILERS, Route

if TYPE_CHECKING:
    from mailgate.delivery.attempt import DeliveryContext


class ErrorMailer:
    """Sendmail's ``error`` mailer (``error:`` entries in mailertable, virtusertable,
    aliases): the reply the entry names, nothing sent."""

    def __init__(self, cfg: Config, ctx: object) -> None:
        pass

    def batch_key(self, route: Route) -> str:
        return route.target

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        out = []
        for job in jobs:
            err = job.route.error
            reply = (
                err.reply(f"<{job.rcpt.address}>")
                if err is not None
                else Reply(554, "5.3.0", "Mailer error")
            )
            out.append(Outcome(Status.TEMP if reply.is_temporary else Status.PERM, reply))
        return out


MailerFactory = Callable[[Config, "DeliveryContext"], Mailer]

MAILERS: dict[str, MailerFactory] = {
    **dict.fromkeys(sorted(SMTP_MAILERS), SmtpMailer),  # smtp, esmtp, smtp8, dsmtp, relay
    "local": MaildirMailer,
    "*file*": FileMailer,
    "prog": ProgramMailer,
    "error": ErrorMailer,
}


def build_mailers(cfg: Config, ctx: DeliveryContext) -> dict[str, Mailer]:
    """One mailer of each kind for ``cfg`` (the names of one kind share it)."""
    made: dict[MailerFactory, Mailer] = {}
    out: dict[str, Mailer] = {}
    for name, factory in MAILERS.items():
        if factory not in made:
            made[factory] = factory(cfg, ctx)
        out[name] = made[factory]
    return out
