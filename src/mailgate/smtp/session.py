"""The SMTP session core: the verbs, the transaction, and the policy they ask.

No transport and no clock here. Each verb handler returns its :class:`Answer` (the reply, and
whether it counts as a bad command, is an RCPT answer, ends the session or starts TLS); the
connection loop in ``smtp/server.py`` writes it, counts, throttles and closes, as chasquid's
``conn.go`` does. Everything a transaction holds lives in :class:`Transaction`, so a reset is
one assignment. What the session needs from the running gateway is the narrow
:class:`SessionHost` it declares here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mailgate import maillog, metrics, tls
from mailgate.address import AddressError, Mailbox, canon_domain, normalize, parse_path_arg
from mailgate.policy import (
    Client,
    ConnectDecision,
    Decision,
    check_recipient,
    check_sender,
    sender_domain_reply,
)
from mailgate.queue.spool import (
    Envelope,
    IncomingMessage,
    QueuedMessage,
    Recipient,
    Spool,
    SpoolError,
)
from mailgate.reply import Reply
from mailgate.smtp import dsn_params
from mailgate.smtp.headers import (
    MAX_HEADER_BYTES,
    MAX_HOPS,
    HeaderScanner,
    StampFacts,
    rfc2822_date,
    stamp,
)
from mailgate.smtp.protocol import Command, declared_size_refusal
from mailgate.snapshot import Snapshot

if TYPE_CHECKING:
    from mailgate.milter.chain import MilterChain

HELP_TEXT = (
    "This is mailgate\n"
    "Topics:\n"
    "    HELO    EHLO    MAIL    RCPT    DATA\n"
    "    RSET    NOOP    QUIT    HELP    VRFY\n"
    "    EXPN    VERB    ETRN\n"
    "For more on a topic, HELP <topic>.\n"
    "For local information send email to Postmaster at your site.\n"
    "End of HELP info"
)
# HELP <topic>, in our words; an unknown topic gets Sendmail's 504.
HELP_TOPICS = {
    "HELO": ("HELO <hostname>", "Introduce yourself."),
    "EHLO": ("EHLO <hostname>", "Introduce yourself, and ask for the extensions offered."),
    "MAIL": (
        "MAIL FROM:<sender> [ <parameters> ]",
        "Start a message from <sender> (<> for a bounce).",
        "Parameters: SIZE=<bytes> BODY=7BIT|8BITMIME RET=FULL|HDRS ENVID=<id> SMTPUTF8",
    ),
    "RCPT": (
        "RCPT TO:<recipient> [ <parameters> ]",
        "Add a recipient of the message; repeat for more.",
        "Parameters: NOTIFY=NEVER|SUCCESS,FAILURE,DELAY ORCPT=<type>;<address>",
    ),
    "DATA": ("DATA", "Send the message, ended by a line holding only a dot."),
    "RSET": ("RSET", "Forget the message being given, keep the session."),
    "NOOP": ("NOOP", "Do nothing."),
    "QUIT": ("QUIT", "End the session."),
    "HELP": ("HELP [ <topic> ]", "This help, or the topic's."),
    "VRFY": ("VRFY <recipient>", "Not answered here: RCPT says whether mail is taken."),
    "EXPN": ("EXPN <list>", "Lists are not expanded here."),
    "VERB": ("VERB", "Verbose mode is not offered here."),
    "ETRN": (
        "ETRN <domain> | @<domain>",
        "Try now what waits for <domain> (with @: and its subdomains).",
    ),
    "STARTTLS": ("STARTTLS", "Encrypt the session, where EHLO offers it."),
}

# Sendmail's restricted mode (early talkers, Connect: refusals) still serves these.
_ALLOWED_WHEN_REFUSED = frozenset({"HELO", "EHLO", "NOOP", "RSET", "QUIT"})
# The HELO/EHLO replies made, by what they say (a client says EHLO at every connection).
_HELLO_REPLIES: dict[tuple[str, str, str | None, bool, bool, int], Reply] = {}
_HELLO_REPLIES_KEPT = 4096
_NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage; try again later")
# RFC 6531 §3.4: a UTF-8 address only in a transaction that asked for SMTPUTF8 (Postfix's
# words); else the next hop would get it without being asked whether it can take one.
UNDECLARED_UTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")


class SessionHost(Protocol):
    """What a session needs of the running gateway, and nothing more."""

    @property
    def spool(self) -> Spool: ...

    def count(self, slot: int) -> None:
        """Add one to a word of this process's metrics row (``metrics.py``)."""
        ...

    def milter_counts(self, name: str) -> metrics.MilterCounts:
        """Where the verdicts and failures of the ``[[milter]]`` named ``name`` count."""
        ...

    async def domain_resolves(self, domain: str) -> str: ...

    def flush_domain(self, domain: str, *, subdomains: bool = False) -> None: ...

    def message_queued(self, queued: QueuedMessage) -> None: ...

    @property
    def quiet(self) -> bool:
        """No other session in this process: a wait on the loop holds up no other client
        (the commit's fsync may then be made on it, ``Spool.commit(inline=True)``)."""
        ...


@dataclass(slots=True)
class Answer:
    """A verb's answer, for the connection loop to act on. (Not frozen: several are made per
    message, and a frozen dataclass sets each field through ``object.__setattr__``; see
    docs/design.md, "CPU per message".)"""

    reply: Reply
    bad: bool = False  # counts towards max_bad_commands
    rcpt: bool = False  # an answer to RCPT: BadRcptThrottle applies to it
    refused: bool = False  # with rcpt: the recipient was refused
    close: bool = False  # the session ends after this reply
    starttls: bool = False  # TLS starts after this reply (a 220)


@dataclass
class Transaction:
    """From MAIL to the end of DATA (or RSET); DATA fills in the second half."""

    sender: str
    sender_mailbox: Mailbox
    params: dict[str, str | None]
    # Made at MAIL, as Sendmail does: the filters' ``i`` from MAIL on, the maillog's
    # ``<qid>:`` on the transaction's RCPT refusals and on its from= line if DATA never comes.
    qid: str
    recipients: list[Recipient] = field(default_factory=list)
    discard: bool = False
    body_8bit: bool = False
    smtputf8: bool = False
    msg: IncomingMessage | None = None  # the spool file, from DATA on
    headers: HeaderScanner | None = None  # the header section until it is complete
    msgid: str | None = None
    hops: int = 0
    write_error: OSError | None = None


def _as_written(arg: str, raw: str) -> str:
    """The address as the client wrote it in MAIL/RCPT: Sendmail's replies quote it with
    angle brackets only if the client used them (semantics: conventions)."""
    _, _, rest = arg.partition(":")
    return f"<{raw}>" if rest.lstrip().startswith("<") else raw


class Session:
    """One client's SMTP session, past the connect stage."""

    def __init__(
        self,
        host: SessionHost,
        snapshot: Snapshot,
        client: Client,
        connect: ConnectDecision,
        *,
        before_wait: Callable[[], None],
    ) -> None:
        self.host = host
        self.snap = snapshot
        self.client = client
        self.connect = connect
        # Called before an answer waits (DNS, the fsync): replies already due go out first.
        self.before_wait = before_wait
        self.relay_text = maillog.relay_name(client.ip, client.ptr_name, client.ptr_status == "OK")
        self.helo: str | None = None
        self.esmtp = False
        self.tls: tls.Session | None = None
        self.early_talker = False
        self.tx: Transaction | None = None
        self.last_verb = ""  # for Sendmail's "lost input channel … after rcpt"
        self.issued = False  # MAIL, EXPN, VRFY or ETRN came (else "did not issue" at the end)
        self.ended = False  # the session's last lines are written (QUIT, or the close)
        # Sendmail's envelope between transactions: the queue id a refused MAIL is logged
        # with (and the next transaction takes), and that refused sender, whose from= line
        # comes at RSET or the session's end unless a MAIL is accepted first.
        self.envelope_qid: str | None = None
        self.refused_sender: str | None = None
        # The session's filters ([[milter]]), set at the connect stage; None without any.
        self.milter: MilterChain | None = None
        # Committed and answered, not yet handed to its first attempt: that waits until the
        # reply after the 250 is out (``hand_over``), see data_end. Its from= line is
        # logged once the 250 is written (``log_unsent``), or at the hand-over.
        self.unsent: QueuedMessage | None = None
        self._unsent_msgid: str | None = None
        self._unsent_logged = True

    # -- the connect stage ---------------------------------------------------------------------
    def greeting(self) -> Answer:
        if self.connect.closes:
            assert self.connect.refusal is not None
            return Answer(self.connect.refusal, close=True)
        hostname = self.snap.config.hostname
        return Answer(
            Reply(220, None, f"{hostname} ESMTP mailgate ready; {rfc2822_date(time.time())}")
        )

    def early_talk(self, seconds: int) -> Answer:
        """The client spoke before the greeting: every later command but the harmless ones is
        refused (Sendmail's greet_pause)."""
        self.early_talker = True
        self.host.count(metrics.connection("early_talker"))
        self.host.count(metrics.rejection("early_talker"))
        maillog.early_talker(self.relay_text, self.client.ip, seconds)
        return Answer(Reply(554, None, f"{self.snap.config.hostname} ESMTP not accepting messages"))

    def _refused_stage(self) -> Reply | None:
        if self.early_talker:
            return Reply(550, "5.0.0", "Command rejected")
        return self.connect.refusal

    # -- commands ------------------------------------------------------------------------------
    async def command(self, cmd: Command, *, pipelined: int = 0) -> Answer:
        """The answer to one command; ``pipelined`` is how many bytes the client sent behind
        it that are not read yet (DATA must have none)."""
        got = self.answer_to(cmd, pipelined=pipelined)
        return got if isinstance(got, Answer) else await got

    def answer_to(self, cmd: Command, *, pipelined: int = 0) -> Answer | Awaitable[Answer]:
        """``command``, answered at once when nothing needs waiting for (every verb but a
        MAIL whose sender domain must be looked up, and anything the filters must hear):
        the connection loop then needs no coroutine, nor a hop through its task."""
        verb = cmd.verb
        handler = _HANDLERS.get(verb)
        got: Answer | Awaitable[Answer]
        if handler is None:
            line = _shortened(cmd.line or f"{verb} {cmd.arg}".rstrip())  # as written
            got = Answer(Reply(500, "5.5.1", f'Command unrecognized: "{line}"'), bad=True)
        else:
            self.last_verb = verb  # a name of ours, never the client's text
            refused = self._refused_stage()
            if refused is not None and verb not in _ALLOWED_WHEN_REFUSED:
                return Answer(refused, bad=True)
            got = self.data(cmd.arg, pipelined) if verb == "DATA" else handler(self, cmd.arg)
        if self.milter is not None:  # the filters see what we accepted (milter/chain.py)
            return self._filtered(cmd, got)
        return got

    async def _filtered(self, cmd: Command, got: Answer | Awaitable[Answer]) -> Answer:
        assert self.milter is not None
        answer = got if isinstance(got, Answer) else await got
        return await self.milter.command(self, cmd, answer)

    def _hello(self, arg: str, esmtp: bool) -> Answer:
        cfg = self.snap.config
        if not arg:
            return Answer(
                Reply(501, "5.0.0", f"{'EHLO' if esmtp else 'HELO'} requires domain address"),
                bad=True,
            )
        if not cfg.smtp.allow_bogus_helo and (len(arg) > 256 or not _HELO_NAME.fullmatch(arg)):
            return Answer(_INVALID_HELO)
        if self.tx is not None or self.refused_sender is not None:
            self._log_unfinished()  # as RSET: Sendmail logs the transaction it ends
        self.helo = arg.split()[0]
        self.esmtp = esmtp
        self.tx = None
        starttls = cfg.tls.server_context is not None and self.tls is None
        key = (
            cfg.hostname,
            self.client.ip,
            self.client.verified_name,
            esmtp,
            starttls,
            cfg.smtp.max_message_size,
        )
        known = _HELLO_REPLIES.get(key)
        if known is not None:
            return Answer(known)
        if len(_HELLO_REPLIES) >= _HELLO_REPLIES_KEPT:
            _HELLO_REPLIES.clear()
        reply = _HELLO_REPLIES[key] = self._hello_reply(esmtp, starttls)
        return Answer(reply)

    def _hello_reply(self, esmtp: bool, starttls: bool) -> Reply:
        cfg = self.snap.config
        who = (
            f"{self.client.verified_name} [{self.client.ip}]"
            if self.client.verified_name
            else f"[{self.client.ip}]"
        )
        greeting = f"{cfg.hostname} Hello {who}, pleased to meet you"
        if not esmtp:
            return Reply(250, None, greeting)
        size = cfg.smtp.max_message_size
        lines = [
            greeting,
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
            "8BITMIME",
            f"SIZE {size}" if size else "SIZE",
            "DSN",
            "SMTPUTF8",
            "ETRN",
        ]
        if starttls:
            lines.append("STARTTLS")
        lines.append("HELP")
        return Reply(250, None, "\n".join(lines))

    def mail(self, arg: str) -> Answer | Awaitable[Answer]:
        self.issued = True
        cfg = self.snap.config
        if self.tx is not None:
            return Answer(Reply(503, "5.5.0", "Sender already specified"))
        try:
            raw, params = parse_path_arg(arg, "FROM")
            mailbox = normalize(raw, self.snap.routing.is_local) if raw else Mailbox("", "")
        except AddressError as exc:
            return Answer(exc.reply, bad=True)
        problem = self._check_mail_params(params)
        if problem is not None:
            if problem.code == 552:
                self.host.count(metrics.rejection("size"))
            return Answer(problem)
        if not raw.isascii() and "SMTPUTF8" not in params:
            return Answer(UNDECLARED_UTF8)
        problem = self._storage_refusal(params.get("SIZE"))
        if problem is not None:
            return Answer(problem)
        shown = _as_written(arg, raw)
        decision = check_sender(raw, mailbox, self.snap.tables, cfg, shown=shown)
        if (
            decision is None
            and cfg.smtp.check_sender_domain
            and mailbox.domain
            and not self.snap.routing.is_local(mailbox.domain)
        ):
            return self._mail_after_lookup(raw, mailbox, params, shown)
        return self._mail_decided(raw, mailbox, params, shown, decision)

    async def _mail_after_lookup(
        self, raw: str, mailbox: Mailbox, params: dict[str, str | None], shown: str
    ) -> Answer:
        """MAIL, once the sender's domain is known to resolve (or not)."""
        self.before_wait()
        resolves = await self.host.domain_resolves(mailbox.domain)
        reply = sender_domain_reply(raw, mailbox, resolves, shown=shown)
        decision = Decision(reply, logged_reject=not reply.is_positive, reason="sender_domain")
        return self._mail_decided(raw, mailbox, params, shown, decision)

    def _mail_decided(
        self,
        raw: str,
        mailbox: Mailbox,
        params: dict[str, str | None],
        shown: str,
        decision: Decision | None,
    ) -> Answer:
        if decision is None:
            decision = Decision(Reply(250, "2.1.0", f"{shown}... Sender ok"))
        qid = self._envelope()
        sender = str(mailbox) if raw else ""
        if decision.logged_reject:
            maillog.reject(qid, "check_mail", f"<{raw}>", self.relay_text, str(decision.reply))
            self._count_refusal(decision)
        if decision.accepted:
            self.envelope_qid = self.refused_sender = None  # the transaction's now
            self.tx = Transaction(
                sender,
                mailbox,
                params,
                qid,
                discard=decision.discard or self.connect.discard,
                body_8bit=(params.get("BODY") or "").upper() == "8BITMIME",
                smtputf8="SMTPUTF8" in params,
            )
        else:
            self.refused_sender = sender
        return Answer(decision.reply)

    def _envelope(self) -> str:
        """The queue id of the envelope the next MAIL fills, made once."""
        if self.envelope_qid is None:
            self.envelope_qid = self.host.spool.new_qid()
        return self.envelope_qid

    def _count_refusal(self, decision: Decision) -> None:
        if decision.reason is not None:
            self.host.count(metrics.rejection(decision.reason))

    def _storage_refusal(self, size: str | None = None) -> Reply | None:
        """Postfix's answer while the spool's file system is below ``[queue] min_free``, or
        would be with the message announced by SIZE= (checked already: digits only)."""
        if self.host.spool.room_for(int(size) if size else 0, self.snap.config.queue.min_free):
            return None
        self.host.count(metrics.rejection("storage"))
        return Reply(452, "4.3.1", "Insufficient system storage")

    def _check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        limit = self.snap.config.smtp.max_message_size
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return Reply(501, "5.5.4", f"Bad SIZE parameter {value or ''}".rstrip())
                if limit and int(value) > limit:
                    return declared_size_refusal(limit)
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", f"Unknown BODY type {value}")
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            elif key in dsn_params.MAIL_CHECKS:
                problem = dsn_params.MAIL_CHECKS[key](value)
                if problem is not None:
                    return problem
            else:
                return Reply(555, "5.5.4", f"{key} parameter unrecognized")
        return None

    def rcpt(self, arg: str) -> Answer:
        cfg = self.snap.config
        tx = self.tx
        if tx is None:
            return Answer(Reply(503, "5.0.0", "Need MAIL before RCPT"))
        try:
            raw, params = parse_path_arg(arg, "TO")
            if not raw:
                raise AddressError(Reply(553, "5.0.0", "<>... User address required"))
            mailbox = normalize(raw, self.snap.routing.is_local)
        except AddressError as exc:
            return Answer(exc.reply, rcpt=True, refused=True)
        if not tx.smtputf8 and not raw.isascii():
            return Answer(UNDECLARED_UTF8, rcpt=True, refused=True)
        for key, value in params.items():
            check = dsn_params.RCPT_CHECKS.get(key)
            problem = (
                check(value) if check else Reply(555, "5.5.4", f"{key} parameter unrecognized")
            )
            if problem is not None:
                return Answer(problem, rcpt=True, refused=True)
        if len(tx.recipients) >= cfg.smtp.max_recipients:
            return Answer(Reply(452, "4.5.3", "Too many recipients"), rcpt=True)
        decision = check_recipient(
            raw,
            mailbox,
            self.client,
            self.connect.may_relay,
            self.snap.routing,
            cfg,
            shown=_as_written(arg, raw),
            discarding=tx.discard,
        )
        if decision.logged_reject:
            if decision.reason == "recipient":
                # Refused by its route (an unknown user, an error: entry): Sendmail's parse
                # of the address refuses it, before any ruleset, and logs its reply's words.
                maillog.address_refused(tx.qid, decision.reply.text)
            else:
                reply = str(decision.reply)
                maillog.reject(tx.qid, "check_rcpt", f"<{raw}>", self.relay_text, reply)
            self._count_refusal(decision)
        accepted = decision.accepted  # a property of a property: asked once
        if accepted:
            if decision.discard:
                tx.discard = True
            notify = params.get("NOTIFY")
            tx.recipients.append(
                Recipient(
                    str(mailbox), raw, notify.upper() if notify else None, params.get("ORCPT")
                )
            )
        return Answer(decision.reply, rcpt=True, refused=not accepted)

    def data(self, arg: str, pipelined: int) -> Answer:
        """DATA: the protocol enters the content on our 354 and only then (``send``)."""
        tx = self.tx
        if tx is None:
            return Answer(Reply(503, "5.0.0", "Need MAIL command"))
        if not tx.recipients:
            return Answer(Reply(503, "5.0.0", "Need RCPT (recipient)"))
        if arg:
            return Answer(Reply(501, "5.5.4", "DATA takes no arguments"))
        refused = self._storage_refusal()  # full since MAIL: the transaction stays
        if refused is not None:
            return Answer(refused)
        if pipelined and self.snap.config.smtp.forbid_unauth_pipelining:
            # RFC 2920 3.1: DATA ends a pipelined group; bytes behind it were sent before the
            # client could see our 354, so it does not wait for replies (a spam engine, or a
            # smuggling attempt). Postfix 3.9 refuses it the same way.
            maillog.improper_pipelining(self.relay_text, pipelined)
            self.host.count(metrics.event("improper_pipelining"))
            self.host.count(metrics.rejection("protocol"))
            self.tx = None
            return Answer(Reply(554, "5.5.0", "Error: SMTP protocol synchronization"), close=True)
        spool = self.host.spool
        envelope = Envelope(
            qid=tx.qid,
            sender=tx.sender,
            recipients=tx.recipients,
            arrival=time.time(),
            client_ip=self.client.ip,
            client_name=self.client.ptr_name,
            helo=self.helo,
            proto=self._proto(),
            body_8bit=tx.body_8bit,
            smtputf8=tx.smtputf8,
            envid=tx.params.get("ENVID"),
            ret=(tx.params.get("RET") or "").upper() or None,
        )
        tx.msg = spool.open_incoming(envelope)  # no file yet: nothing to fail here
        tx.headers = HeaderScanner()
        return Answer(_GO_AHEAD)

    # -- message content -----------------------------------------------------------------------
    def data_chunk(self, data: bytes) -> None:
        tx = self.tx
        if tx is None or tx.msg is None:
            return
        scanner = tx.headers
        if scanner is not None:
            head = scanner.feed(data)
            if head is None:
                return
            self._write_head(tx, head, scanner.pos)
            data = scanner.rest
            tx.headers = None
        if data:
            try:
                tx.msg.write(data)
            except OSError as exc:
                tx.write_error = exc

    def _write_head(self, tx: Transaction, head: bytes, fields_end: int | None = None) -> None:
        assert tx.msg is not None
        cfg = self.snap.config
        env = tx.msg.envelope
        stamped = stamp(
            head,
            StampFacts(
                hostname=cfg.hostname,
                qid=env.qid,
                arrival=env.arrival,
                sender=env.sender,
                recipients=tuple(r.address for r in env.recipients),
                client_ip=self.client.ip,
                client_name=self.client.ptr_name,
                client_verified=self.client.verified_name,
                client_is_loopback=self.client.is_loopback,
                helo=self.helo,
                esmtp=self.esmtp,
                smtputf8=env.smtputf8,
                tls=self.tls.for_received() if self.tls else None,
                authwarnings="authwarnings" in cfg.smtp.privacy,
            ),
            fields_end=fields_end,
        )
        if stamped.warning is not None:
            maillog.auth_warning(cfg.hostname, stamped.warning)
        tx.msgid, tx.hops = stamped.msgid, stamped.hops
        try:
            tx.msg.write(stamped.data)
        except OSError as exc:
            tx.write_error = exc

    async def data_end(self, size: int) -> Answer:
        cfg = self.snap.config
        tx = self.tx
        assert tx is not None and tx.msg is not None
        msg = tx.msg
        if tx.headers is not None:
            scanner = tx.headers
            tx.headers = None
            if scanner.too_large:
                self.host.count(metrics.rejection("content"))
                return self._fail_data(
                    Reply(552, "5.6.0", f"Headers too large ({MAX_HEADER_BYTES} max)")
                )
            # The content ended inside the header section (no body): write what we hold.
            self._write_head(tx, bytes(scanner.buf))
        if tx.hops > MAX_HOPS:
            self.host.count(metrics.rejection("content"))
            return self._fail_data(
                Reply(
                    554,
                    "5.4.6",
                    f"Too many hops {tx.hops} ({MAX_HOPS} max): from "
                    f"<{tx.sender}> via {cfg.hostname}, to "
                    f"<{tx.recipients[0].address}>",
                )
            )
        if tx.write_error is not None:
            self.host.count(metrics.rejection("storage"))
            return self._fail_data(_NO_STORAGE, log=f"cannot write spool file: {tx.write_error}")
        if self.milter is not None:  # the filters' verdict and changes, before the commit
            final = await self.milter.end_of_message(self, tx)
            if final is not None:  # refused, or discarded: nothing is committed
                self._fail_data(final.reply)
                return final
            assert tx.msg is not None
            msg = tx.msg  # maybe rewritten by the filters
        qid = msg.envelope.qid
        self.tx = None
        accepted = Answer(Reply(250, "2.0.0", f"{qid} Message accepted for delivery"))
        if tx.discard:
            msg.discard()
            maillog.discard(qid, "check_mail", f"<{tx.sender}>", self.relay_text)
            self.host.count(metrics.MESSAGES_DISCARDED)
            return accepted
        self.before_wait()
        try:
            queued = await self.host.spool.commit(msg, lock=True, inline=self.host.quiet)
        except SpoolError as exc:
            maillog.spool_error(qid, exc)
            self.host.count(metrics.rejection("storage"))
            return Answer(_NO_STORAGE)
        if self.milter is not None:
            self._log_received(queued, tx.msgid)
            if self.milter.hold_reason is not None:
                await self.milter.hold(queued)  # quarantined: on hold, not delivered
            else:
                self.host.message_queued(queued)
            return accepted
        # The message is safe: its log line and its first attempt need not hold up the 250,
        # nor the client's next command. The attempt's first steps run on this loop for
        # ~0.2 ms, and the client (a QUIT, mostly) would wait behind them; handed over once
        # the next reply is out, at the session's end, or after HOLD_SECONDS of silence (the
        # connection loop says when: ``hand_over``), the attempt runs while the client
        # connects again, and another worker, idle, takes that connection.
        self.hand_over()
        self.unsent, self._unsent_msgid, self._unsent_logged = queued, tx.msgid, False
        return accepted

    HOLD_SECONDS = 0.02  # at most this long between the 250 and the hand-over

    def log_unsent(self) -> None:
        """The 250 is written: the from= line of its message (once)."""
        if self.unsent is not None and not self._unsent_logged:
            self._unsent_logged = True
            self._log_received(self.unsent, self._unsent_msgid)

    def hand_over(self) -> None:
        """Give the message answered last to its first attempt (see data_end)."""
        queued = self.unsent
        if queued is not None:
            self.log_unsent()
            self.unsent = None
            self.host.message_queued(queued)

    def _log_received(self, queued: QueuedMessage, msgid: str | None) -> None:
        envelope = queued.envelope
        maillog.received(
            envelope.qid,
            envelope.sender,
            queued.size,
            len(envelope.recipients),
            msgid,
            envelope.proto,
            self.relay_text,
            "8BITMIME" if envelope.body_8bit else None,
        )

    def _fail_data(self, reply: Reply, log: str | None = None) -> Answer:
        tx = self.tx
        if tx is not None and tx.msg is not None:
            tx.msg.discard()
            if log:
                maillog.spool_error(tx.msg.envelope.qid, log)
        self.tx = None
        if self.milter is not None:
            self.milter.abort()
        return Answer(reply)

    def data_failed(self, reply: Reply, size: int = 0) -> Answer:
        """The content broke a rule (``size``: the bytes it had)."""
        tx = self.tx
        too_big = reply.enhanced == "5.2.3"
        self.host.count(metrics.rejection("size" if too_big else "content"))
        if tx is None:
            maillog.message_refused("NOQUEUE", self.relay_text, reply)
        elif too_big:
            # Sendmail's three lines (logwatch counts the middle one): the from=, the size
            # against MaxMessageSize, and a to= for each recipient with the refusal as stat=.
            self._log_unfinished(size, tx.msgid)
            maillog.size_exceeded(tx.qid, size, self.snap.config.smtp.max_message_size)
            pri = maillog.priority(size, len(tx.recipients), 0)
            for rcpt in tx.recipients:
                maillog.refused_recipient(tx.qid, rcpt.address, pri, reply.text)
        else:
            maillog.message_refused(tx.qid, self.relay_text, reply)
        return self._fail_data(reply)

    def abandon(self) -> None:
        """The connection is gone: a message being received was never acknowledged. (One
        acknowledged and not handed over yet is the caller's to ``hand_over``.)"""
        if self.tx is not None and self.tx.msg is not None:
            self.tx.msg.discard()
        self.tx = None
        if self.milter is not None:
            self.milter.close()

    # -- the other verbs -----------------------------------------------------------------------
    def rset(self, arg: str) -> Answer:
        self._log_unfinished()
        self.tx = None
        return Answer(Reply(250, "2.0.0", "Reset state"))

    def noop(self, arg: str) -> Answer:
        return Answer(Reply(250, "2.0.0", "OK"))

    def quit(self, arg: str) -> Answer:
        self.end(lost=False)
        return Answer(
            Reply(221, "2.0.0", f"{self.snap.config.hostname} closing connection"), close=True
        )

    def help(self, arg: str) -> Answer:
        if not arg:
            return Answer(Reply(214, "2.0.0", HELP_TEXT))
        topic = HELP_TOPICS.get(arg.split()[0].upper())
        if topic is None:
            return Answer(Reply(504, "5.3.0", f'HELP topic "{_shortened(arg)}" unknown'))
        return Answer(Reply(214, "2.0.0", "\n".join((*topic, "End of HELP info"))))

    def vrfy(self, arg: str) -> Answer:
        # novrfy: never confirm or deny a user (semantics §11).
        self._refused_probe("VRFY", arg)
        return Answer(
            Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery (or try finger)")
        )

    def expn(self, arg: str) -> Answer:
        self._refused_probe("EXPN", arg)
        return Answer(Reply(502, "5.7.0", "Sorry, we do not allow this operation"))

    def _refused_probe(self, verb: str, arg: str) -> None:
        """Sendmail's line for a VRFY or EXPN its privacy flags refuse (fail2ban's
        sendmail-reject bans on it)."""
        self.issued = True
        line = _shortened(f"{verb} {arg}".rstrip())
        maillog.probe_rejected(self._envelope(), self.relay_text, line)

    def verb(self, arg: str) -> Answer:
        return Answer(Reply(502, "5.7.0", "Verbose unavailable"))

    def etrn(self, arg: str) -> Answer:
        """RFC 1985: ``ETRN domain`` and ``ETRN @domain`` (the domain and its subdomains);
        ``#queue`` names a queue, and this gateway has a single one."""
        self.issued = True
        node = arg.strip()
        if not node:
            return Answer(Reply(501, "5.5.2", "Parameter required"))
        maillog.etrn(self._envelope(), self.relay_text, _shortened(node))
        if node.startswith("#"):
            return Answer(
                Reply(
                    458,
                    "4.0.0",
                    f"Unable to queue messages for node {node}: "
                    "named queues are not supported; use ETRN domain",
                )
            )
        subdomains = node.startswith("@")
        domain = canon_domain(node[1:] if subdomains else node)
        if domain is None or domain.startswith("["):
            return Answer(
                Reply(
                    501,
                    "5.5.4",
                    f"Syntax error in parameters: {node[:80]!r} is "
                    "not a domain (ETRN domain or ETRN @domain)",
                ),
                bad=True,
            )
        self.host.flush_domain(domain, subdomains=subdomains)
        return Answer(Reply(250, "2.0.0", f"Queuing for node {node} started"))

    def starttls(self, arg: str) -> Answer:
        if self.snap.config.tls.server_context is None:
            return Answer(Reply(502, "5.5.1", "STARTTLS not available"))
        if self.tls is not None:
            return Answer(Reply(503, "5.5.1", "TLS already active"))
        if arg:
            return Answer(Reply(501, "5.5.4", "Syntax error (no parameters allowed)"))
        if self.tx is not None:
            return Answer(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        return Answer(Reply(220, "2.0.0", "Ready to start TLS"), starttls=True)

    def tls_started(self, session: tls.Session) -> None:
        """RFC 3207 4.2: after the handshake the client starts again with EHLO."""
        self.tls = session
        self.helo = None
        self.esmtp = False

    def auth(self, arg: str) -> Answer:
        return Answer(Reply(503, "5.3.3", "AUTH not available"))

    def bdat(self, arg: str) -> Answer:
        return Answer(Reply(502, "5.5.1", "CHUNKING not supported; use DATA"))

    # -- the end -------------------------------------------------------------------------------
    def _log_unfinished(self, size: int = 0, msgid: str | None = None) -> None:
        """Sendmail logs a from= line for a transaction that never got to its 250 (RSET,
        QUIT, a lost connection, content refused for its ``size``), with the recipients it
        had taken; and for a sender it refused, if no MAIL was taken after it."""
        tx = self.tx
        if tx is not None:
            nrcpts = len(tx.recipients)
            proto = self._proto()
            maillog.received(tx.qid, tx.sender, size, nrcpts, msgid, proto, self.relay_text)
        elif self.refused_sender is not None and self.envelope_qid is not None:
            proto = self._proto()
            maillog.received(
                self.envelope_qid, self.refused_sender, 0, 0, None, proto, self.relay_text
            )
            self.envelope_qid = self.refused_sender = None

    def _proto(self) -> str:
        """RFC 3848's name of what the client speaks, as Sendmail's from= lines give it."""
        return ("ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else "")

    def _log_null_connection(self) -> None:
        """Sendmail's line for a session that never asked for anything (a scanner's probe;
        fail2ban's sendmail-reject bans on it in its extra mode). Not for a client refused
        at the connect stage, which has its own line, nor for the local host: its health
        checks would fill the log."""
        if not (
            self.issued
            or self.early_talker
            or self.connect.refusal is not None
            or self.client.is_loopback
            or self.client.unidentified
        ):
            maillog.null_connection(self._envelope(), self.relay_text)

    def connection_closed(self) -> None:
        """The client went away without QUIT."""
        self.end(lost=True)

    def end(self, *, lost: bool) -> None:
        """The session's last lines, once, however it ends (QUIT, the client's close, or
        ours: a timeout, too many bad commands, a stop): a transaction left open, a client
        that asked for nothing, and (``lost``) the connection gone without QUIT."""
        if self.ended:
            return
        self.ended = True
        tx = self.tx
        if lost and tx is not None:
            if tx.msg is not None:  # in the middle of the message
                maillog.premature_eom(tx.qid)
                maillog.unexpected_close(tx.qid, self.relay_text, tx.sender)
            else:
                maillog.lost_input(tx.qid, self.relay_text, self.last_verb.lower())
        # Sendmail's size for a message cut short: what had come of it (and no msgid).
        self._log_unfinished(tx.msg.size if tx is not None and tx.msg is not None else 0)
        self._log_null_connection()


_GO_AHEAD = Reply(354, None, "End data with <CR><LF>.<CR><LF>")  # Sendmail 8.17's words
# Sendmail's HELO check (RFC 1123 5.2.5), unless AllowBogusHELO: ASCII letters, digits and
# "[].-_#:" (a name, an address literal), nothing after a blank, at most MAXNAME (256).
_HELO_NAME = re.compile(r"[A-Za-z0-9\[\].\-_#:]+")
_INVALID_HELO = Reply(501, "5.0.0", "Invalid domain name")

# The verbs, by name (built once: a session is made per connection).
_HANDLERS: dict[str, Callable[[Session, str], Answer | Awaitable[Answer]]] = {
    "HELO": lambda s, arg: s._hello(arg, esmtp=False),
    "EHLO": lambda s, arg: s._hello(arg, esmtp=True),
    "MAIL": Session.mail,
    "RCPT": Session.rcpt,
    "DATA": lambda s, arg: s.data(arg, 0),
    "RSET": Session.rset,
    "NOOP": Session.noop,
    "QUIT": Session.quit,
    "HELP": Session.help,
    "VRFY": Session.vrfy,
    "EXPN": Session.expn,
    "VERB": Session.verb,
    "ETRN": Session.etrn,
    "STARTTLS": Session.starttls,
    "AUTH": Session.auth,
    "BDAT": Session.bdat,
}


def _not_implemented(verb: str) -> Callable[[Session, str], Answer]:
    """RFC 821's SEND, SOML, SAML and TURN: known, never done (Sendmail's CMDUNIMPL), so
    ``502`` where an unknown verb gets ``500``, and not counted as a bad command."""

    def answer(session: Session, arg: str) -> Answer:
        line = _shortened(f"{verb} {arg}".rstrip())
        return Answer(Reply(502, "5.5.1", f'Command not implemented: "{line}"'))

    return answer


def _shortened(line: str) -> str:
    """A client's line as a reply repeats it: Sendmail's shortenstring(line, MAXSHORTSTR),
    its first and last 100 characters around "..." from 203 on."""
    return line if len(line) < 203 else f"{line[:100]}...{line[-100:]}"


_HANDLERS.update((verb, _not_implemented(verb)) for verb in ("SEND", "SOML", "SAML", "TURN"))
