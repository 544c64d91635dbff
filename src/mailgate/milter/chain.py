"""The filters of one SMTP session, in their configured order: what the SMTP session calls.

One ``MilterChain`` per SMTP session that has filters (none is made otherwise: the session's
``milter`` stays None and costs one attribute check per command). Its hooks:

- ``attach`` (``smtp/server.py``, the connect stage, after our own access check): opens a
  connection to each filter, negotiates, sends CONNECT. A refusal becomes the session's
  connect refusal (MAIL, RCPT and DATA refused, as for access ``Connect: REJECT``);
  ``shutdown`` is 421 instead of the greeting.
- ``command`` (``Session.command``, after our own answer): HELO/EHLO, MAIL, RCPT, DATA and
  unknown commands go to the filters when we accepted them (ours first, as Postfix); a
  filter's refusal replaces our answer; RSET aborts the filters' message.
- ``end_of_message`` (``Session.data_end``, before the commit): the header and body, streamed
  from the spool file, then the end of message to each filter in turn; their changes are
  applied (``milter/message.py``) before the fsync and the 250, a refusal means nothing is
  spooled; ``hold`` after the commit for a quarantined message (``milter/hold.py``).
- ``abort`` (a transaction ended without its end of message) and ``close`` (QUIT, the
  connection gone).

Several filters compose in order: each event goes to each filter that wants it until one
refuses (the first refusal wins, later filters do not see that event), and at the end of the
message each filter sees the message as the earlier ones changed it. A filter that fails
(cannot be reached, times out, breaks the protocol) gets its ``default_action`` from the stage
where it failed on, for the rest of the session, as Postfix does: ``accept`` forgets it,
``tempfail`` and ``reject`` refuse every later transaction, ``quarantine`` holds every later
message, ``shutdown`` is 421 and the end of the session. Every filter's verdict at every stage
goes through ``_verdict`` (the maillog's ``milter=…, action=…`` line at level debug, and
``mailgate_milter_verdicts_total``), a failure through ``_failed`` (``Milter (name): …`` and
``mailgate_milter_failures_total``). A RCPT we refused goes to the filters that negotiated
SMFIP_RCPT_REJ (``_rejected_rcpt``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

from mailgate import __version__, maillog, metrics
from mailgate.address import AddressError, Mailbox, parse_path_arg
from mailgate.config import MilterSettings
from mailgate.milter import codec, pool
from mailgate.milter.client import FilterClient, MilterFailure
from mailgate.milter.codec import Step
from mailgate.milter.hold import hold_message
from mailgate.milter.message import EditError, MessageEdit
from mailgate.milter.session import NOTHING, FilterSession, Outgoing, Stage, smtp_reply
from mailgate.queue.spool import QueuedMessage, Recipient
from mailgate.reply import Reply
from mailgate.routing import resolve
from mailgate.smtp.protocol import Command
from mailgate.smtp.session import Answer

if TYPE_CHECKING:
    import asyncio.transports

    from mailgate.smtp.session import Session, SessionHost, Transaction

# What Sendmail answers for a filter's plain REJECT and TEMPFAIL (srvrsmtp.c, milter.c).
_REJECTED: Final = Reply(550, "5.7.1", "Command rejected")
_REJECTED_DATA: Final = Reply(554, "5.7.1", "Command rejected")
_TEMPFAILED: Final = Reply(451, "4.3.2", "Please try again later")
# What a failed filter's default action answers (Postfix's milter8_comm_error texts).
_FAILED_TEMPFAIL: Final = Reply(451, "4.7.1", "Service unavailable - try again later")
_FAILED_REJECT: Final = Reply(550, "5.5.0", "Service unavailable")
_NO_STORAGE: Final = Reply(452, "4.3.1", "Insufficient system storage; try again later")
_CONTENT_STAGES: Final = frozenset({Stage.HEADER, Stage.EOH, Stage.BODY, Stage.EOM})
# A verdict's name in the metrics (mailgate_milter_verdicts_total's verdict label).
_VERDICT_LABELS: Final = {
    "c": "continue",
    "a": "accept",
    "r": "reject",
    "t": "tempfail",
    "y": "replycode",
    "d": "discard",
    "s": "skip",
    "f": "shutdown",
}
_VERDICT_WORDS: Final = {
    "c": "continue",
    "a": "accepted",
    "t": "tempfail",
    "d": "discard",
    "s": "skip",
    "f": "shutdown",
}


@dataclass(slots=True)
class _Effect:
    """What one event's answers mean for the SMTP session (None from a hook: nothing)."""

    kind: Literal["refuse", "discard", "close"]
    reply: Reply | None = None


class _Filter:
    """One configured filter in this session, and what its failure left behind."""

    __slots__ = ("client", "counts", "failed", "hold_all", "name", "session", "settings")

    def __init__(self, settings: MilterSettings, counts: metrics.MilterCounts) -> None:
        self.settings = settings
        self.name = settings.name
        self.counts = counts
        # A connection kept from an earlier session (reuse_connections), or a new one.
        self.client = pool.take(settings) or FilterClient(settings)
        self.session: FilterSession = self.client.session  # read by every event: no property
        self.failed: Reply | None = None  # tempfail / reject default action: every event
        self.hold_all = False  # quarantine default action: every message

    def usable(self, stage: Stage) -> bool:
        return self.client.transport is not None and self.session.wants(stage)


def applies(settings: MilterSettings, local: tuple[str, int]) -> bool:
    """Does the filter serve the listener this session came in on?"""
    if settings.listen is None:
        return True
    ip, port = local
    return any(p == port and (h == ip or h in ("0.0.0.0", "::")) for h, p in settings.listen)


def filters_for(settings: list[MilterSettings], host: SessionHost) -> list[_Filter]:
    """A session's filters, each with where its counts go."""
    return [_Filter(s, host.milter_counts(s.name)) for s in settings]


async def attach(
    session: Session,
    transport: asyncio.transports.BaseTransport,
    proxied: tuple[str, int] | None = None,
) -> Reply | None:
    """Give ``session`` its filters (those of its listener), connected and told of the
    client (``proxied``: the client a PROXY header named, whose address and port the filters
    get, never the proxy's). A reply to send instead of the greeting, then close (a
    ``shutdown``), or None."""
    peer = proxied or transport.get_extra_info("peername") or ("0.0.0.0", 0)
    local = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
    local_ip = local[0][7:] if local[0].startswith("::ffff:") else local[0]
    settings = [m for m in session.snap.config.milter if applies(m, (local_ip, local[1]))]
    if not settings:
        return None
    chain = MilterChain(
        session, filters_for(settings, session.host), int(peer[1]), local_ip, local[1]
    )
    session.milter = chain
    effect = await chain.connect()
    client = session.client
    host = client.verified_name or f"[{client.ip}]"
    if effect is None:
        return None
    if effect.kind == "close":
        maillog.milter_connect_refused(host, client.ip, "shutdown")
        chain.close()
        return effect.reply
    assert effect.reply is not None
    what = "temp failing commands" if effect.reply.is_temporary else "rejecting commands"
    maillog.milter_connect_refused(host, client.ip, what)
    session.host.count(metrics.rejection("milter"))
    session.connect = replace(session.connect, refusal=effect.reply)
    # As Sendmail after a connect-stage refusal (it stops milterizing the session): the
    # filters are done with it, and HELO is ours to answer (a failed filter's default action
    # was taken again at HELO, refusing EHLO; MAIL, RCPT and DATA get the refusal).
    chain.close(keep=False)
    session.milter = None
    return None


class MilterChain:
    def __init__(
        self,
        session: Session,
        filters: list[_Filter],
        client_port: int,
        local_ip: str,
        local_port: int,
    ) -> None:
        self.smtp = session
        self.filters = filters
        self.hostname = session.snap.config.hostname
        self.hold_reason: str | None = None  # set by the end of message, used by ``hold``
        client = session.client
        self.macros: dict[str, str] = {
            "j": self.hostname,
            "{daemon_name}": "MTA",  # Sendmail's DaemonPortOptions Name (maillog daemon=MTA)
            "{daemon_addr}": local_ip,
            "{daemon_port}": str(local_port),
            "{if_addr}": local_ip,
            "v": f"mailgate {__version__}",
            "_": session.relay_text,
            "{client_addr}": client.ip,
            "{client_name}": client.verified_name or f"[{client.ip}]",
            "{client_port}": str(client_port),
            "{client_ptr}": client.ptr_name or "unknown",
            "{client_resolve}": client.ptr_status,
        }
        self.client_port = client_port

    # -- the events ----------------------------------------------------------------------------
    async def connect(self) -> _Effect | None:
        async def open_one(f: _Filter) -> MilterFailure | None:
            try:
                await f.client.open()
            except MilterFailure as exc:
                return exc
            return None

        # All at once: one filter's connect timeout does not add to the next one's. A
        # connection kept from an earlier session is open already.
        closed = [f for f in self.filters if not f.client.connected]
        if len(closed) == 1:
            failures = [await open_one(closed[0])]
        else:
            failures = await asyncio.gather(*(open_one(f) for f in closed))
        for f, failure in zip(closed, failures, strict=True):
            if failure is not None:
                effect = self._failed(f, failure, None)
                if effect is not None:
                    return effect
        client = self.smtp.client
        family = codec.FAMILY_INET6 if ":" in client.ip else codec.FAMILY_INET
        hostname = client.verified_name or f"[{client.ip}]"
        return await self._event(
            Stage.CONNECT,
            None,
            lambda s: s.connect(self.macros, hostname, family, self.client_port, client.ip),
        )

    async def command(self, session: Session, cmd: Command, answer: Answer) -> Answer:
        """Our ``answer`` to ``cmd``, or the filters' refusal of what we accepted."""
        verb = cmd.verb
        if verb in ("HELO", "EHLO"):
            return await self._helo(session, answer)
        if verb == "MAIL":
            return await self._mail(session, answer)
        if verb == "RCPT":
            if not answer.reply.is_positive:
                return await self._rejected_rcpt(session, cmd, answer)
            return await self._rcpt(session, answer)
        if verb == "DATA":
            return await self._data(session, answer)
        if verb == "RSET":
            self.abort()
        elif answer.reply.code == 500:  # not a command we know: UNKNOWN
            line = cmd.line or f"{cmd.verb} {cmd.arg}".strip()  # as the client wrote it
            effect = await self._event(Stage.UNKNOWN, None, lambda s: s.unknown(self.macros, line))
            if effect is not None and effect.reply is not None:
                return self._answer(effect, bad=True)
        return answer

    async def _helo(self, session: Session, answer: Answer) -> Answer:
        if not answer.reply.is_positive or session.helo is None:
            return answer
        self.abort()  # a HELO ends the transaction (Postfix aborts the filters' message)
        tls = session.tls
        if tls is not None:
            self.macros["{tls_version}"] = tls.version
            self.macros["{cipher}"] = tls.cipher
            self.macros["{cipher_bits}"] = str(tls.bits)
        helo = session.helo
        effect = await self._event(Stage.HELO, None, lambda s: s.helo(self.macros, helo))
        if effect is None:
            return answer
        maillog.milter_reject(None, f"helo={helo}", effect.reply)
        session.helo, session.esmtp = None, False
        return self._answer(effect)

    async def _mail(self, session: Session, answer: Answer) -> Answer:
        tx = session.tx
        if tx is None or not answer.reply.is_positive:
            return answer
        mailer, host = self._route(tx.sender_mailbox)
        self.macros.update(
            {"{mail_addr}": tx.sender, "{mail_host}": host, "{mail_mailer}": mailer, "i": tx.qid}
        )
        args = [f"<{tx.sender}>", *(k if v is None else f"{k}={v}" for k, v in tx.params.items())]
        effect = await self._event(Stage.MAIL, tx.qid, lambda s: s.mail(self.macros, args))
        if effect is None:
            return answer
        if effect.kind == "discard":
            maillog.milter_discard(tx.qid, f"from=<{tx.sender}>")
            tx.discard = True
            return answer
        maillog.milter_reject(tx.qid, f"from=<{tx.sender}>", effect.reply)
        session.tx = None
        self.abort()
        return self._answer(effect)

    async def _rcpt(self, session: Session, answer: Answer) -> Answer:
        tx = session.tx
        if tx is None or not answer.reply.is_positive or answer.refused:
            return answer
        rcpt = tx.recipients[-1]
        mailer, host = self._route(rcpt.mailbox)
        self.macros.update(
            {"{rcpt_addr}": rcpt.address, "{rcpt_host}": host, "{rcpt_mailer}": mailer}
        )
        args = [f"<{rcpt.address}>", *_rcpt_params(rcpt)]
        effect = await self._event(Stage.RCPT, tx.qid, lambda s: s.rcpt(self.macros, args))
        if effect is None:
            return answer
        if effect.kind == "discard":
            maillog.milter_discard(tx.qid, f"to=<{rcpt.address}>")
            tx.discard = True
            return answer
        maillog.milter_reject(tx.qid, f"to=<{rcpt.address}>", effect.reply)
        tx.recipients.pop()
        return self._answer(effect, rcpt=True, refused=True)

    async def _rejected_rcpt(self, session: Session, cmd: Command, answer: Answer) -> Answer:
        """A recipient we refused, to the filters that asked for those (SMFIP_RCPT_REJ), as
        Sendmail and Postfix send it: ``{rcpt_mailer}`` ``error``, ``{rcpt_host}`` our
        reply's enhanced code, ``{rcpt_addr}`` its text. Our refusal stands whatever they
        answer (it is logged and counted); only a filter that ends the session (421, or a
        failure with ``default_action = "shutdown"``) changes it."""
        tx = session.tx
        if tx is None or not any(
            f.session.steps & Step.RCPT_REJ for f in self.filters if f.usable(Stage.RCPT)
        ):
            return answer
        try:
            raw, params = parse_path_arg(cmd.arg, "TO")
        except AddressError:
            return answer  # not a recipient at all: nothing to tell
        if not raw:
            return answer
        reply = answer.reply
        macros = {
            **self.macros,
            "{rcpt_addr}": reply.text.split("\n", 1)[0],
            "{rcpt_host}": reply.enhanced or "",
            "{rcpt_mailer}": "error",
        }
        args = [f"<{raw}>", *(k if v is None else f"{k}={v}" for k, v in params.items())]
        effect = await self._event(
            Stage.RCPT,
            tx.qid,
            lambda s: s.rcpt(macros, args) if s.steps & Step.RCPT_REJ else NOTHING,
        )
        if effect is not None and effect.kind == "close":
            return self._answer(effect, rcpt=True, refused=True)
        return answer

    async def _data(self, session: Session, answer: Answer) -> Answer:
        tx = session.tx
        if tx is None or tx.msg is None or answer.reply.code != 354:
            return answer
        qid = tx.qid
        effect = await self._event(Stage.DATA, qid, lambda s: s.data(self.macros))
        if effect is None:
            return answer
        if effect.kind == "discard":
            maillog.milter_discard(qid, "cmd=data")
            tx.discard = True
            return answer
        maillog.milter_reject(qid, "cmd=data", effect.reply)
        tx.msg.discard()
        session.tx = None
        self.abort()
        return self._answer(effect)

    def _route(self, mailbox: Mailbox) -> tuple[str, str]:
        """(mailer, host) of an address, as Sendmail's ``{rcpt_mailer}`` / ``{rcpt_host}``
        (and ``{mail_…}``) give the delivery agent and next hop it resolves to: the
        mailertable's (``smtp``, ``[10.0.0.5]``; ``relay``, ``hub.example.com``), else
        ``esmtp`` and the domain (MX); ``local`` and the domain for a local one."""
        domain = mailbox.domain
        routing = self.smtp.snap.routing
        if not domain or routing.is_local(domain):
            return "local", domain
        routes = resolve(mailbox, routing, expand=False)
        if len(routes) != 1:
            return "local", domain  # a mailertable local: whose aliases fan out
        route = routes[0]
        if route.mailer == "error":  # Sendmail's $h of the error mailer: the status
            return "error", (route.error.dsn if route.error else None) or ""
        if not route.is_remote:
            return "local", domain  # a mailertable local:
        return route.mailer, route.host or domain

    def _answer(self, effect: _Effect, **flags: bool) -> Answer:
        """The filters' refusal as our answer; counted (metrics: rejections, reason milter)."""
        assert effect.reply is not None
        self.smtp.host.count(metrics.rejection("milter"))
        return Answer(effect.reply, close=effect.kind == "close", **flags)

    # -- the end of the message ----------------------------------------------------------------
    async def end_of_message(self, session: Session, tx: Transaction) -> Answer | None:
        """Before the commit: the filters see the message and may change, refuse, discard or
        quarantine it. An answer ends the transaction without a commit (a refusal, or the
        250 of a discarded message); None: commit ``tx.msg`` (maybe rewritten)."""
        msg = tx.msg
        assert msg is not None
        qid = msg.envelope.qid
        if tx.discard:
            self.abort()  # ours to discard (access DISCARD): the filters are not asked
            return None
        self.hold_reason = next(
            (f"milter {f.name} unavailable" for f in self.filters if f.hold_all), None
        )
        if not any(f.failed is not None or f.usable(Stage.EOM) for f in self.filters):
            self._message_done()
            return None
        session.before_wait()
        if tx.msgid:
            self.macros["{msg_id}"] = tx.msgid
        edit = MessageEdit(msg, self.smtp.snap.routing.is_local)
        try:
            for f in self.filters:
                if f.failed is not None:
                    effect: _Effect | None = _Effect("refuse", f.failed)
                else:
                    effect = await self._message_to(f, edit)
                if effect is not None:
                    return self._eom_answer(qid, effect)
            if edit.changed:
                if not edit.envelope.recipients:  # every recipient deleted: nothing to deliver
                    return self._eom_answer(qid, _Effect("discard"))
                try:
                    tx.msg = edit.write(session.host.spool)
                except OSError as exc:
                    maillog.spool_error(qid, f"cannot write the filtered message: {exc}")
                    return Answer(_NO_STORAGE)
            return None
        finally:
            edit.close()
            self._message_done()

    async def _message_to(self, f: _Filter, edit: MessageEdit) -> _Effect | None:
        """One filter's pass over the message: header, body, end of message and its changes
        (kept only if its verdict keeps the message)."""
        if not f.usable(Stage.EOM):
            return None
        edit.begin()
        try:
            effect, quarantine = await self._feed(f, edit)
        except (MilterFailure, EditError, OSError) as exc:
            edit.rollback()
            if isinstance(exc, MilterFailure):
                failure = exc
            else:
                f.client.close()
                if isinstance(exc, EditError):
                    failure = MilterFailure(Stage.EOM, f"protocol error: {exc}", "protocol")
                else:
                    failure = MilterFailure(Stage.EOM, f"spool read error: {exc}", "io")
            return self._failed(f, failure, edit.qid)
        if effect is not None:
            edit.rollback()
            return effect
        edit.commit()
        if quarantine is not None:
            maillog.milter_quarantine(edit.qid, f.name, quarantine)
            self.hold_reason = quarantine
        return None

    async def _feed(self, f: _Filter, edit: MessageEdit) -> tuple[_Effect | None, str | None]:
        s, client, qid = f.session, f.client, edit.qid
        if not s.declines(Stage.HEADER):
            for field in edit.visible_fields():
                effect = self._verdict(
                    f,
                    Stage.HEADER,
                    qid,
                    await client.event(s.header(field.name, field.value), Stage.HEADER),
                )
                if effect is not None or not s.wants(Stage.EOM):
                    return effect, None
        effect = self._verdict(f, Stage.EOH, qid, await client.event(s.eoh(self.macros), Stage.EOH))
        if effect is not None:
            return effect, None
        if not s.declines(Stage.BODY):
            for chunk in edit.body_chunks(s.chunk_size):
                if not s.wants(Stage.BODY):
                    break
                effect = self._verdict(
                    f, Stage.BODY, qid, await client.event(s.body(chunk), Stage.BODY)
                )
                if effect is not None:
                    return effect, None
        if not s.wants(Stage.EOM):
            return None, None  # it accepted the message before its end
        quarantine = None
        async for reply in client.replies(s.end_of_message(self.macros)):
            if isinstance(reply, codec.Verdict):
                return self._verdict(f, Stage.EOM, qid, reply, quarantine is not None), quarantine
            if isinstance(reply, codec.Quarantine):
                quarantine = reply.reason or f"milter {f.name}"
            elif isinstance(reply, codec.AddHeader):
                edit.add_header(reply.name, s.header_value(reply.value))
            elif isinstance(reply, codec.InsertHeader):
                edit.insert_header(reply.index, reply.name, s.header_value(reply.value))
            elif isinstance(reply, codec.ChangeHeader):
                value = s.header_value(reply.value) if reply.value else ""
                edit.change_header(reply.index, reply.name, value)
            elif isinstance(reply, codec.ChangeSender):
                edit.change_sender(reply.address, reply.args)
            elif isinstance(reply, codec.AddRecipient):
                edit.add_recipient(reply.address, reply.args)
            elif isinstance(reply, codec.DeleteRecipient):
                edit.delete_recipient(reply.address)
            elif isinstance(reply, codec.ReplaceBody):
                edit.replace_body(reply.chunk, self.smtp.host.spool)
        raise MilterFailure(Stage.EOM, "no verdict", "protocol")  # cannot be: replies end so

    def _eom_answer(self, qid: str, effect: _Effect) -> Answer:
        if effect.kind == "discard":
            maillog.milter_discard(qid, "data")
            self.smtp.host.count(metrics.MESSAGES_DISCARDED)
            return Answer(Reply(250, "2.0.0", f"{qid} Message accepted for delivery"))
        maillog.milter_reject(qid, "data", effect.reply)
        return self._answer(effect)

    async def hold(self, queued: QueuedMessage) -> None:
        """After the commit of a quarantined message: on hold instead of delivered."""
        reason, self.hold_reason = self.hold_reason or "quarantined", None
        self.smtp.host.count(metrics.MESSAGES_RECEIVED)  # acknowledged and queued, if held
        await hold_message(self.smtp.host.spool, queued, reason)

    # -- sending one event to every filter ------------------------------------------------------
    async def _event(
        self, stage: Stage, qid: str | None, build: Callable[[FilterSession], Outgoing]
    ) -> _Effect | None:
        """``stage`` to each filter in turn until one refuses; a failed filter's default
        action stands for it."""
        waited = False
        for f in self.filters:
            if f.failed is not None:
                return _Effect("refuse", f.failed)
            if not f.usable(stage):
                continue
            out = build(f.session)
            if out.reply and not waited:
                self.smtp.before_wait()  # replies already due go out before we wait
                waited = True
            try:
                verdict = await f.client.event(out, stage)
            except MilterFailure as exc:
                effect = self._failed(f, exc, qid)
            else:
                effect = self._verdict(f, stage, qid, verdict)
                if not f.session.open:
                    f.client.close()  # done with the whole connection (as Postfix, no QUIT)
            if effect is not None:
                return effect
        return None

    def _verdict(
        self,
        f: _Filter,
        stage: Stage,
        qid: str | None,
        verdict: codec.Verdict | None,
        quarantined: bool = False,
    ) -> _Effect | None:
        """A filter's answer to one event as its effect on the SMTP session; logged and
        counted (every verdict of every filter passes here). ``quarantined``: the end of
        message's verdict came after a quarantine request, and counts as a quarantine."""
        if verdict is None:
            return None  # not answered (a no-reply step)
        kind = verdict.kind
        if kind == "c" and not quarantined:  # the usual answer: what the rest comes to for it
            f.counts.verdict(stage, "continue")
            maillog.milter_verdict(qid, f.name, stage, "continue")
            return None
        f.counts.verdict(
            stage, "quarantine" if quarantined and kind in "ac" else _VERDICT_LABELS[kind]
        )
        effect: _Effect | None = None
        if kind == "r":
            effect = _Effect("refuse", _REJECTED_DATA if stage in _CONTENT_STAGES else _REJECTED)
        elif kind == "t":
            effect = _Effect("refuse", _TEMPFAILED)
        elif kind == "y":
            reply = smtp_reply(verdict.reply or "")
            effect = _Effect("close" if reply.code == 421 else "refuse", reply)
        elif kind == "d":
            effect = _Effect("discard")
        elif kind == "f":
            effect = _Effect("close", self._shutdown())
        word = _VERDICT_WORDS.get(kind) or f"reject={effect.reply if effect else ''}"
        maillog.milter_verdict(qid, f.name, stage, word)
        if effect is not None and effect.kind == "close":
            self._close_all()
        return effect

    def _failed(self, f: _Filter, failure: MilterFailure, qid: str | None) -> _Effect | None:
        """``f`` cannot be used any more: its default action, from this stage on."""
        f.client.close()
        action = f.settings.default_action
        maillog.milter_failed(qid, f.name, failure.problem, failure.stage, action)
        maillog.milter_verdict(qid, f.name, failure.stage, "failed")
        f.counts.verdict(failure.stage, "failed")
        f.counts.failure(failure.reason)
        if action == "accept":
            return None
        if action == "quarantine":
            f.hold_all = True
            self.hold_reason = f"milter {f.name} unavailable"
            return None
        if action == "shutdown":
            self._close_all()
            return _Effect("close", self._shutdown())
        f.failed = _FAILED_TEMPFAIL if action == "tempfail" else _FAILED_REJECT
        return _Effect("refuse", f.failed)

    def _shutdown(self) -> Reply:
        return Reply(421, "4.7.0", f"{self.hostname} closing connection")

    # -- ending ----------------------------------------------------------------------------------
    def _message_done(self) -> None:
        for f in self.filters:
            f.session.in_message = f.session.message_accepted = f.session.skip_body = False

    def abort(self) -> None:
        """The transaction ended before its end of message (RSET, a refusal, a failure)."""
        for f in self.filters:
            if f.client.connected:
                f.client.send_nowait(f.session.abort())

    def _close_all(self) -> None:
        for f in self.filters:
            f.client.quit()

    def close(self, keep: bool = True) -> None:
        """QUIT, or the connection is gone: each filter gets QUIT and its socket closes, or,
        for a filter with ``reuse_connections`` and ``keep``, QUIT_NC and its connection is
        kept for a later session (``milter/pool.py``)."""
        for f in self.filters:
            if keep:
                pool.release(f.client)
            else:
                f.client.quit()


def _rcpt_params(rcpt: Recipient) -> list[str]:
    params = []
    if rcpt.notify:
        params.append(f"NOTIFY={rcpt.notify}")
    if rcpt.orcpt:
        params.append(f"ORCPT={rcpt.orcpt}")
    return params
