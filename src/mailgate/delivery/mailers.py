"""The mailer registry: Sendmail's mailer name (``Route.mailer``) → the ``Mailer`` that delivers.

Every mailer but SMTP delivers one target at a time and has one shape, ``TargetMailer``:
``deliver_one`` says how to deliver one job and raises ``LocalDeliveryError`` when it fails;
batching, outcomes and the thread hop of blocking file I/O are the base's. Adding such a
mailer (LMTP to a local socket, a quarantine folder) is one small subclass here and its line
in ``MAILERS``; a mailer that takes batches (SMTP: one transaction per next hop,
``delivery/smtp.py``; UUCP: several recipients in one uux call, ``delivery/uucp.py``) implements
``delivery.Mailer`` itself. The attempt does not change.
Routing decides which name a recipient gets (``routing``, ``tables.mailertable``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailgate.config import Config
from mailgate.delivery import Job, Mailer, Outcome, Status
from mailgate.delivery.local import LocalDeliveryError, deliver_file, deliver_maildir
from mailgate.delivery.pipe import deliver_program
from mailgate.delivery.smtp import SmtpMailer
from mailgate.delivery.uucp import UucpMailer
from mailgate.queue.spool import QueuedMessage
from mailgate.reply import Reply
from mailgate.routing import Route
from mailgate.tables.mailertable import SMTP_MAILERS, UUCP_MAILERS

if TYPE_CHECKING:
    from mailgate.delivery.attempt import DeliveryContext

DELIVERED = Reply(250, "2.0.0", "Delivered")


class TargetMailer:
    """A mailer that delivers each target on its own: every target is its own batch, and
    every job one ``deliver_one``, whose ``LocalDeliveryError`` is the job's outcome."""

    relay: str | None = "local"  # what a failure's maillog line gives as relay=

    def __init__(self, cfg: Config, ctx: DeliveryContext) -> None:
        self.cfg = cfg  # of the snapshot this mailer was made for (DeliveryContext.mailers)

    def batch_key(self, route: Route) -> str:
        return route.target

    async def deliver(self, msg: QueuedMessage, jobs: Sequence[Job]) -> list[Outcome]:
        return [await self._outcome(msg, job) for job in jobs]

    async def _outcome(self, msg: QueuedMessage, job: Job) -> Outcome:
        try:
            await self.deliver_one(msg, job)
        except LocalDeliveryError as exc:
            return Outcome(Status.TEMP if exc.temporary else Status.PERM, exc.reply, self.relay)
        return Outcome(Status.SENT, DELIVERED)

    async def deliver_one(self, msg: QueuedMessage, job: Job) -> None:
        """Deliver ``msg`` to ``job``'s target; raise LocalDeliveryError if it fails."""
        raise NotImplementedError


class MaildirMailer(TargetMailer):
    """Sendmail's ``local`` mailer: ``<maildir_root>/<user>/new/``, in a worker thread."""

    async def deliver_one(self, msg: QueuedMessage, job: Job) -> None:
        await asyncio.to_thread(
            deliver_maildir,
            job.route.address,
            self.cfg.local.maildir_root,
            msg.path,
            msg.offset,
            hostname=self.cfg.hostname,
            return_path=msg.envelope.sender,
            delivered_to=job.rcpt.address,
        )


class FileMailer(TargetMailer):
    """Sendmail's ``*file*`` mailer (an alias ``/path``): mbox append, in a worker thread."""

    async def deliver_one(self, msg: QueuedMessage, job: Job) -> None:
        await asyncio.to_thread(
            deliver_file,
            Path(job.route.address),
            msg.path,
            msg.offset,
            return_path=msg.envelope.sender,
        )


class ProgramMailer(TargetMailer):
    """Sendmail's ``prog`` mailer (an alias ``"|command"``)."""

    async def deliver_one(self, msg: QueuedMessage, job: Job) -> None:
        await deliver_program(
            job.route.address,
            msg.path,
            msg.offset,
            sender=msg.envelope.sender,
            recipient=job.rcpt.address,
        )


class ErrorMailer(TargetMailer):
    """Sendmail's ``error`` mailer (``error:`` entries in mailertable, virtusertable,
    aliases): the reply the entry names, nothing sent."""

    relay = None

    async def deliver_one(self, msg: QueuedMessage, job: Job) -> None:
        err = job.route.error
        raise LocalDeliveryError(
            err.reply(f"<{job.rcpt.address}>")
            if err is not None
            else Reply(554, "5.3.0", "Mailer error")
        )


MailerFactory = Callable[[Config, "DeliveryContext"], Mailer]

MAILERS: dict[str, MailerFactory] = {
    **dict.fromkeys(sorted(SMTP_MAILERS), SmtpMailer),  # smtp, esmtp, smtp8, dsmtp, relay
    **dict.fromkeys(sorted(UUCP_MAILERS), UucpMailer),  # uucp(-old), suucp/uucp-new, uucp-(uu)dom
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
