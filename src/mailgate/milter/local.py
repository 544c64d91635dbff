"""The filters of local submission: ``[submission] milters`` (Postfix's ``non_smtpd_milters``).

A message from the sendmail command goes through the ``[[milter]]`` filters named there, in
that order, before it is committed, as the SMTP session of a client at localhost would: the
same ``MilterChain`` gets CONNECT (``localhost``, 127.0.0.1), HELO ``localhost``, MAIL, a RCPT
per recipient, DATA, the header, the body and the end of message, with the same macros and
the same handling of verdicts, changes and failures (``default_action``). What differs is
who hears the answer: the caller of the sendmail command, at once (an exit status and the
reply on standard error, as for its other refusals), where Postfix's pickup could only bounce
or hold mail it had already taken. The chain is given a real ``smtp.session.Session`` (no
connection behind it) so that none of its code is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate import metrics
from mailgate.address import Mailbox
from mailgate.config import MilterSettings
from mailgate.milter.chain import MilterChain, filters_for
from mailgate.policy import Client, ConnectDecision
from mailgate.queue.spool import Envelope, IncomingMessage, QueuedMessage, Recipient, Spool
from mailgate.reply import Reply
from mailgate.smtp.protocol import Command
from mailgate.smtp.session import Answer, Session, Transaction
from mailgate.snapshot import Snapshot

_OK = Answer(Reply(250, "2.0.0", "ok"))
_NAME = "localhost"


class _LocalHost:
    """What the chain's session needs of a host, in the sendmail command's process: the
    spool, and a metrics row of its own (nobody scrapes the command's counts)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.row = metrics.local_row()

    def count(self, slot: int) -> None:
        self.row.inc(slot)

    def milter_counts(self, name: str) -> metrics.MilterCounts:
        return self.row.milter(name)

    async def domain_resolves(self, domain: str) -> str:
        return "yes"  # never asked: the session's own MAIL checks do not run here

    def flush_domain(self, domain: str, *, subdomains: bool = False) -> None:
        return None

    def message_queued(self, queued: QueuedMessage) -> None:
        return None

    quiet = False  # never asked: the command commits the message itself


@dataclass
class LocalOutcome:
    """What the filters decided about the message: ``refusal`` (nothing is queued),
    ``discarded`` (nothing is queued, the caller is told it went), else ``msg`` to commit
    (rewritten if they changed it), on hold for ``hold_reason`` if one quarantined it."""

    msg: IncomingMessage
    refusal: Reply | None = None
    discarded: bool = False
    hold_reason: str | None = None


def chosen(snap: Snapshot) -> list[MilterSettings]:
    """The filters ``[submission] milters`` names, in its order (config.py checked them)."""
    by_name = {m.name: m for m in snap.config.milter}
    return [by_name[name] for name in snap.config.submission.milters]


class LocalFilters:
    """The filters of one submission, in two steps: ``envelope`` before the spool file is
    made (so that recipients they refuse are not in its envelope line), ``message`` once it
    is written, before the commit; ``close`` at the end, whatever happened."""

    def __init__(
        self, snap: Snapshot, spool: Spool, client: Client, settings: list[MilterSettings]
    ) -> None:
        host = _LocalHost(spool)
        connect = ConnectDecision(refusal=None, discard=False, greet_pause=0.0, may_relay=True)
        self.session = Session(host, snap, client, connect, before_wait=lambda: None)
        self.chain = MilterChain(self.session, filters_for(settings, host), 0, client.ip, 0)
        self.session.milter = self.chain
        self.refused: list[tuple[Recipient, Reply]] = []  # refused at RCPT; the others go on

    async def envelope(self, env: Envelope) -> Reply | None:
        """CONNECT, HELO, MAIL and each RCPT; a refusal of the whole message, or None. The
        recipients they refuse leave ``env.recipients`` for ``refused``."""
        session, chain = self.session, self.chain
        effect = await chain.connect()
        if effect is not None:
            return effect.reply
        session.helo = _NAME
        answer = await chain.command(session, Command("HELO", _NAME), _OK)
        if not answer.reply.is_positive:
            return answer.reply
        local, at, domain = env.sender.rpartition("@")
        sender = Mailbox(local, domain) if at else Mailbox(env.sender, "")
        tx = session.tx = Transaction(env.sender, sender, {}, env.qid)
        answer = await chain.command(session, Command("MAIL", f"FROM:<{env.sender}>"), _OK)
        if not answer.reply.is_positive:
            return answer.reply
        for rcpt in env.recipients:
            tx.recipients.append(rcpt)
            answer = await chain.command(
                session, Command("RCPT", f"TO:<{rcpt.address}>"), Answer(_OK.reply, rcpt=True)
            )
            if answer.close:
                return answer.reply
            if not answer.reply.is_positive:
                self.refused.append((rcpt, answer.reply))
        env.recipients[:] = tx.recipients
        return None

    async def message(self, msg: IncomingMessage) -> LocalOutcome:
        """DATA, the header and body, the end of message, for ``msg`` (written, not
        committed, made with the envelope ``envelope`` left)."""
        session, chain = self.session, self.chain
        outcome = LocalOutcome(msg)
        tx = session.tx
        assert tx is not None
        tx.msg = msg
        answer = await chain.command(session, Command("DATA", ""), Answer(Reply(354, None, "")))
        if answer.reply.code != 354:
            outcome.refusal = answer.reply
            return outcome
        final = await chain.end_of_message(session, tx)
        outcome.msg = tx.msg
        if final is not None:
            if final.reply.is_positive:
                outcome.discarded = True
            else:
                outcome.refusal = final.reply
        elif tx.discard:
            outcome.discarded = True  # a filter discarded it at MAIL or RCPT
        outcome.hold_reason = chain.hold_reason
        return outcome

    def close(self) -> None:
        self.chain.close(keep=False)  # the command's one loop ends: nothing to keep for
