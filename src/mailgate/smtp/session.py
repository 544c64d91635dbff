"""One SMTP connection: feeds the sans-IO protocol, asks policy, streams DATA to the spool.

Runs as an ``asyncio.Protocol`` (cheap per connection: no stream objects, no thread) plus one
task that walks through the protocol's events in order, so pipelined commands are answered in
order and replies of a pipelined group leave in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailgate import maillog, tls
from mailgate.address import AddressError, Mailbox, canon_domain, normalize, parse_path_arg
from mailgate.policy import (
    Client,
    Decision,
    check_recipient,
    check_sender,
    client_may_relay,
    connect_refusal,
    sender_domain_reply,
)
from mailgate.queue.spool import Envelope, IncomingMessage, Recipient, SpoolError
from mailgate.reply import Reply
from mailgate.smtp import dsn_params
from mailgate.smtp.protocol import (
    BadCommand,
    Command,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataFailed,
    ServerConnection,
)
from mailgate.smtp.tls_stream import TlsStream

if TYPE_CHECKING:
    from mailgate.daemon import Gateway
    from mailgate.snapshot import Snapshot

MAX_HEADER_BYTES = 32768  # Sendmail's MaxHeadersLength with DOMAIN(generic)
MAX_HOPS = 25  # Sendmail's MaxHopCount
PAUSE_READING_AT = 256 * 1024  # unparsed pipelined input we hold before we stop reading
FLUSH_AT = 64 * 1024  # replies held back for one write before they go out anyway

HELP_TEXT = (
    "This is mailgate\n"
    "Topics:\n"
    "    HELO    EHLO    MAIL    RCPT    DATA\n"
    "    RSET    NOOP    QUIT    HELP    VRFY\n"
    "    EXPN    VERB    ETRN\n"
    "For local information send email to Postmaster at your site.\n"
    "End of HELP info"
)


@dataclass
class Transaction:
    sender: str
    sender_mailbox: Mailbox
    params: dict[str, str | None]
    recipients: list[Recipient] = field(default_factory=list)
    discard: bool = False
    body_8bit: bool = False
    smtputf8: bool = False


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def rfc2822_date(ts: float) -> str:
    """The RFC 5322 date of ``ts`` (to the second, as mail dates are), cached per second."""
    return _date_of_second(int(ts))


def _as_written(arg: str, raw: str) -> str:
    """The address as the client wrote it in MAIL/RCPT: Sendmail's replies quote it with
    angle brackets only if the client used them (semantics: conventions)."""
    _, _, rest = arg.partition(":")
    return f"<{raw}>" if rest.lstrip().startswith("<") else raw


_ALLOWED_WHEN_REFUSED = frozenset({"HELO", "EHLO", "NOOP", "RSET", "QUIT"})


class _Closing(Exception):
    """The session must end after the reply already queued."""


class HeaderScanner:
    """Holds the header section (bounded) so that we can add headers and read Message-Id.

    The section ends at the empty line or at the first line that is neither a field nor a
    continuation (as Sendmail ends it). Lines are looked at once each, as they complete, so
    the limit (MAX_HEADER_BYTES of field lines) is the same however the bytes arrive."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self.too_large = False
        self.pos = 0  # the header lines so far are buf[:pos]
        self.rest = b""

    def feed(self, data: bytes) -> bytes | None:
        """The header section once it is complete (what follows it is in ``self.rest``)."""
        if self.too_large:
            return None  # keep memory bounded; the message is refused at its end
        self.buf += data
        buf = self.buf
        while True:
            nl = buf.find(b"\r\n", self.pos)
            if nl < 0:
                break
            line = bytes(buf[self.pos:nl])
            if not line:
                return self._split(nl + 2)  # the empty line ends the section
            if not (self.pos and line[:1] in (b" ", b"\t")) and not _is_header_line(line):
                # The body starts here; with no field line before it there is no section.
                return self._split(nl + 2 if self.pos else 0)
            self.pos = nl + 2
            if self.pos > MAX_HEADER_BYTES:
                self._overflow()
                return None
        partial = bytes(buf[self.pos:])
        if self.pos + len(partial) > MAX_HEADER_BYTES and _may_be_header_line(partial):
            self._overflow()
        return None

    def _overflow(self) -> None:
        self.too_large = True
        self.buf = bytearray()

    def _split(self, cut: int) -> bytes:
        self.done = True
        head = bytes(self.buf[:cut])
        self.rest = bytes(self.buf[cut:])
        self.buf = bytearray()
        return head


def _may_be_header_line(start: bytes) -> bool:
    """Could a line beginning with ``start`` still turn out to be a field or continuation?"""
    if start[:1] in (b" ", b"\t"):
        return True
    name, colon, _ = start.partition(b":")
    if colon:
        return _is_header_line(start)
    return b" " not in name.rstrip()


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """Unfolded (name, value) pairs of a header section."""
    fields: list[tuple[str, str]] = []
    for raw in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if not raw:
            continue
        if raw[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + raw.strip())
        elif ":" in raw:
            name, _, value = raw.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


def _is_header_line(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and not name[:1].isspace() and b" " not in name.rstrip()


def split_header_section(head: bytes) -> tuple[bytes, bytes]:
    """(header lines, start of the body): the body starts after the empty line, or at the first
    line that is neither a header nor a continuation (where Sendmail also ends the headers)."""
    pos, n = 0, len(head)
    while pos < n:
        nl = head.find(b"\r\n", pos)
        end = n if nl < 0 else nl + 2
        line = head[pos:end].rstrip(b"\r\n")
        if not line:
            return head[:pos], head[end:]
        if not (pos and line[:1] in (b" ", b"\t")) and not _is_header_line(line):
            return head[:pos], head[pos:]
        pos = end
    return head, b""


class SmtpSession(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.snap: Snapshot = gateway.snapshot
        cfg = self.snap.config
        self.conn = ServerConnection(
            max_command_line=cfg.smtp.max_command_line,
            max_text_line=cfg.smtp.max_text_line,
            max_message_size=cfg.smtp.max_message_size or None,
        )
        self.transport: asyncio.Transport | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.out: list[bytes] = []
        self.out_size = 0  # bytes in self.out
        self.write_paused = False  # the transport's write buffer is over its high mark
        self.writable: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.paused = False
        self.closed = False
        self.client = Client("0.0.0.0")
        self.helo: str | None = None
        self.esmtp = False
        self.tx: Transaction | None = None
        self.may_relay = False
        self.connect_refusal: Reply | None = None
        self.discard_all = False
        self.early_talker = False
        self.bad_commands = 0
        self.bad_rcpts = 0
        self.msg: IncomingMessage | None = None
        self.headers: HeaderScanner | None = None
        self.msgid: str | None = None
        self.hops = 0
        self.tls: tls.Session | None = None  # after STARTTLS
        self.tls_stream: TlsStream | None = None  # TLS over the plain transport
        self.tls_error: ssl.SSLError | None = None
        self.handshake: asyncio.Future[None] | None = None
        self.last_input = time.monotonic()  # when bytes last arrived (the DATA timeout)
        self.last_line = self.last_input  # when a content line last ended (under stress)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        ip = peer[0]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        self.client = Client(ip)
        self.connected_at = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.gw.session_started(self)

    def data_received(self, data: bytes) -> None:
        self.last_input = time.monotonic()
        if self.tls_stream is not None:
            self._tls_received(data)
        else:
            self.conn.receive_data(data)
        if not self.paused and self.conn.pending_bytes > PAUSE_READING_AT and self.transport:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self.tls_stream is not None:
            self._tls_received(b"")
        else:
            self.conn.receive_data(b"")
        self._wake()
        # Keep the transport open: a client that half-closes after DATA still gets its 250
        # (run() closes the connection once the protocol reports ConnectionClosed).
        return True

    def _tls_received(self, data: bytes) -> None:
        stream = self.tls_stream
        assert stream is not None
        try:
            plaintext = stream.receive(data)
        except ssl.SSLError as exc:
            self.tls_error = exc
            self.conn.receive_data(b"")  # nothing more can be read from this connection
            return
        finally:
            records = stream.outgoing()
            if records and self.transport is not None and not self.closed:
                self.transport.write(records)
        if plaintext:
            self.conn.receive_data(plaintext)
        if stream.peer_closed:
            self.conn.receive_data(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self.conn.receive_data(b"")
        self._wake()
        self.gw.session_ended(self)

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- output --------------------------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        data = reply.to_bytes()
        self.out.append(data)
        self.out_size += len(data)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop taking its commands (their input then
        # fills to PAUSE_READING_AT and reading stops too), so memory stays bounded.
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    async def wait_writable(self, timeout: float) -> bool:
        """Wait until the transport's buffer drains; False on timeout."""
        self.writable = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.writable
        except TimeoutError:
            return False
        finally:
            self.writable = None
        return not self.closed

    def flush(self) -> None:
        if self.out and self.transport and not self.closed:
            data = b"".join(self.out)
            if self.tls_stream is not None:
                self.tls_stream.send(data)
                data = self.tls_stream.outgoing()
            self.transport.write(data)
        self.out.clear()
        self.out_size = 0

    def shut_down(self, reply: Reply) -> None:
        """The daemon is stopping: say so (through TLS if it is on) and close."""
        self.reply(reply)
        self.flush()
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is None or self.closed:
            return
        if self.tls_stream is not None and self.tls_error is None:
            with contextlib.suppress(Exception):
                self.transport.write(self.tls_stream.close())
        self.transport.close()

    async def wait_input(self, timeout: float) -> bool:
        """Wait for more input; False on timeout."""
        self.flush()
        if self.paused and self.transport:
            self.paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._timed_out = False
        self.wakeup = loop.create_future()
        handle = loop.call_later(timeout, self._wake_timeout)
        try:
            await self.wakeup
        finally:
            handle.cancel()
            self.wakeup = None
        return not self._timed_out

    _timed_out = False

    def _wake_timeout(self) -> None:
        self._timed_out = True
        self._wake()

    def timeouts_changed(self) -> None:
        """Stress mode began: a session waiting on the old, longer timeout looks again."""
        self._wake()

    # -- the session ---------------------------------------------------------------------------
    @property
    def relay_text(self) -> str:
        return maillog.relay_name(self.client.ip, self.client.ptr_name,
                                  self.client.ptr_status == "OK")

    async def run(self) -> None:
        try:
            await self.open()
            await self.loop()
        except _Closing:
            pass
        except Exception as exc:  # never let one session's bug kill the daemon
            maillog.error(f"session with {self.relay_text} failed: {exc!r}")
            with contextlib.suppress(Exception):
                self.reply(Reply(421, "4.3.0", f"{self.snap.config.hostname} Internal error; "
                                               "closing connection"))
        finally:
            if self.msg is not None:
                self.msg.discard()
                self.msg = None
            with contextlib.suppress(ssl.SSLError):
                self.flush()
            self._close_transport()

    async def open(self) -> None:
        cfg = self.snap.config
        tables = self.snap.tables
        limit = self.gw.connection_limit_reply(self)
        if limit is not None:
            self.reply(limit)
            raise _Closing
        self.client = await self.gw.lookup_client(self.client.ip)
        name = self.client.verified_name
        verdict = tables.access.connect(self.client.ip, name)
        if verdict is not None:
            if verdict.action == "DISCARD":
                self.discard_all = True
            self.connect_refusal = connect_refusal(verdict)
            if self.connect_refusal is not None:
                self.gw.count("connect_refused")
                maillog.reject(None, "check_relay", f"{name or ''} {self.client.ip}".strip(),
                               self.relay_text, str(self.connect_refusal))
        self.may_relay = client_may_relay(self.client, tables, cfg.relay_hosts_only)
        pause = cfg.smtp.greet_pause
        if verdict is not None and verdict.action in ("REJECT", "ERROR"):
            pause = 0.0  # clients rejected at Connect are not paused (semantics §10)
        else:
            ms = tables.access.greet_pause(self.client.ip, name)
            if ms is not None:
                pause = ms / 1000.0
        # The pause runs from the connect, so the PTR lookup above is part of it.
        started = self.connected_at
        if pause > 0:
            remaining = pause - (time.monotonic() - started)
            if remaining > 0 and not self.conn.pending_bytes:
                await self.wait_input(remaining)
            if self.conn.pending_bytes or self.closed:
                self.early_talker = True
                self.gw.count("early_talkers")
                maillog.info(
                    f"rejecting commands from {self.relay_text} [{self.client.ip}] due to "
                    f"pre-greeting traffic after {int(time.monotonic() - started)} seconds")
                self.reply(Reply(554, None, f"{cfg.hostname} ESMTP not accepting messages"))
                return
        date = rfc2822_date(time.time())
        self.reply(Reply(220, None, f"{cfg.hostname} ESMTP mailgate ready; {date}"))

    async def loop(self) -> None:
        cfg = self.snap.config
        conn = self.conn
        waiting_since = self.last_input = time.monotonic()
        while True:
            event = conn.next_event()
            if event is None:
                # A command must arrive whole within command_timeout (a client trickling a
                # byte at a time does not keep the session); DATA content is timed per read.
                # Both are measured from a fixed start, so a wake-up (stress mode began, a
                # byte arrived) shortens the wait instead of restarting it.
                command_timeout, data_timeout = self.gw.timeouts()
                now = time.monotonic()
                # Under stress, as Postfix's smtpd_per_record_deadline: a content line must
                # be complete within the timeout, so a byte a second does not hold DATA open.
                data_since = self.last_line if self.gw.stressed else self.last_input
                timeout = data_timeout - (now - data_since) if self.msg is not None \
                    else command_timeout - (now - waiting_since)
                if timeout <= 0 or not await self.wait_input(timeout):
                    what = "DATA" if self.msg is not None else "command"
                    maillog.info(f"timeout waiting for input from {self.relay_text} "
                                 f"during {what}")
                    self.reply(Reply(421, "4.4.2", f"{cfg.hostname} Lost input channel: "
                                                   "timeout; closing connection"))
                    return
                continue
            waiting_since = time.monotonic()
            if isinstance(event, DataChunk):
                if b"\n" in event.data:
                    self.last_line = waiting_since
                self.on_data_chunk(event.data)
            elif isinstance(event, Command):
                await self.on_command(event)
            elif isinstance(event, DataEnd):
                await self.on_data_end(event.size)
            elif isinstance(event, DataFailed):
                self.on_data_failed(event.reply)
            elif isinstance(event, BadCommand):
                if event.fatal:
                    self.refuse_framing(event.reply)
                self.reply(event.reply)
                self.count_bad_command()
            elif isinstance(event, ConnectionClosed):
                if self.tls_error is not None:
                    maillog.info(f"STARTTLS=server, error: read failed={self.tls_error!r}, "
                                 f"relay={self.relay_text}")
                if self.tx is not None or self.helo is not None:
                    self.log_session_end()
                return
            if self.out_size >= FLUSH_AT:
                self.flush()
            if self.write_paused and not await self.wait_writable(cfg.smtp.command_timeout):
                maillog.info(f"timeout writing to {self.relay_text}: the client does not read "
                             "its replies; closing connection")
                return

    def refuse_framing(self, reply: Reply) -> None:
        """A command line with a bare CR or LF: answered as Postfix does, logged, closed."""
        self.gw.count("bare_newline")
        maillog.info(f"{self.relay_text}: {reply.text} in a command line (possible SMTP "
                     "smuggling); closing connection")
        self.reply(Reply(reply.code, reply.enhanced, f"{self.snap.config.hostname} "
                                                     f"{reply.text}"))
        raise _Closing

    def count_bad_command(self) -> None:
        self.bad_commands += 1
        if self.bad_commands >= self.snap.config.smtp.max_bad_commands:
            self.reply(Reply(421, "4.7.0", f"{self.snap.config.hostname} Too many errors; "
                                           "closing connection"))
            raise _Closing

    def log_session_end(self) -> None:
        """Sendmail logs a from= line even for a transaction that never got its DATA."""
        if self.tx is not None:
            maillog.received("NOQUEUE", self.tx.sender, 0, 0, None,
                             "ESMTP" if self.esmtp else "SMTP", self.relay_text)

    # -- commands ------------------------------------------------------------------------------
    async def on_command(self, cmd: Command) -> None:
        handler: Callable[[str], object] | None = getattr(self, "cmd_" + cmd.verb.lower(), None) \
            if cmd.verb.isalpha() else None
        if handler is None:
            verb = cmd.verb[:40]
            self.reply(Reply(500, "5.5.1", f'Command unrecognized: "{verb}"'))
            self.count_bad_command()
            return
        refused = self._refused_stage()
        if refused is not None and cmd.verb not in _ALLOWED_WHEN_REFUSED:
            # Sendmail's restricted mode for early talkers and Connect: refusals: everything
            # but the harmless verbs gets the refusal and counts towards the error limit.
            if cmd.verb == "DATA":
                self.conn.reject_data()
            self.reply(refused)
            self.count_bad_command()
            return
        result = handler(cmd.arg)
        if asyncio.iscoroutine(result):
            await result

    def cmd_helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def cmd_ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> None:
        cfg = self.snap.config
        verb = "EHLO" if esmtp else "HELO"
        if not arg:
            self.reply(Reply(501, "5.0.0", f"{verb} requires domain address"))
            self.count_bad_command()
            return
        self.helo = arg.split()[0]
        self.esmtp = esmtp
        self.tx = None
        who = f"{self.client.verified_name} [{self.client.ip}]" if self.client.verified_name \
            else f"[{self.client.ip}]"
        greeting = f"{cfg.hostname} Hello {who}, pleased to meet you"
        if not esmtp:
            self.reply(Reply(250, None, greeting))
            return
        size = cfg.smtp.max_message_size
        lines = [greeting, "ENHANCEDSTATUSCODES", "PIPELINING", "8BITMIME",
                 f"SIZE {size}" if size else "SIZE", "DSN", "SMTPUTF8", "ETRN"]
        if cfg.tls.server_context is not None and self.tls is None:
            lines.append("STARTTLS")
        lines.append("HELP")
        self.reply(Reply(250, None, "\n".join(lines)))

    def _refused_stage(self) -> Reply | None:
        if self.early_talker:
            return Reply(550, "5.0.0", "Command rejected")
        return self.connect_refusal

    async def cmd_mail(self, arg: str) -> None:
        cfg = self.snap.config
        refused = self._refused_stage()
        if refused is not None:
            self.reply(refused)
            return
        if self.tx is not None:
            self.reply(Reply(503, "5.5.0", "Sender already specified"))
            return
        try:
            raw, params = parse_path_arg(arg, "FROM")
            mailbox = normalize(raw, self.snap.routing.is_local) if raw else Mailbox("", "")
        except AddressError as exc:
            self.reply(exc.reply)
            self.count_bad_command()
            return
        problem = self._check_mail_params(params) or self._storage_refusal(params.get("SIZE"))
        if problem is not None:
            self.reply(problem)
            return
        shown = _as_written(arg, raw)
        decision = check_sender(raw, mailbox, self.snap.tables, cfg, shown=shown)
        if decision is None and cfg.smtp.check_sender_domain and mailbox.domain \
                and not mailbox.is_literal and not self.snap.routing.is_local(mailbox.domain):
            self.flush()
            resolves = await self.gw.domain_resolves(mailbox.domain)
            reply = sender_domain_reply(raw, mailbox, resolves, shown=shown)
            decision = Decision(reply, logged_reject=not reply.is_positive)
        if decision is None:
            decision = Decision(Reply(250, "2.1.0", f"{shown}... Sender ok"))
        if decision.logged_reject:
            maillog.reject(None, "check_mail", f"<{raw}>", self.relay_text, str(decision.reply))
        self.reply(decision.reply)
        if decision.accepted:
            self.tx = Transaction(str(mailbox) if raw else "", mailbox, params,
                                  discard=decision.discard or self.discard_all)
            self.tx.body_8bit = (params.get("BODY") or "").upper() == "8BITMIME"
            self.tx.smtputf8 = "SMTPUTF8" in params

    def _storage_refusal(self, size: str | None = None) -> Reply | None:
        """Postfix's answer while the spool's file system is below ``[queue] min_free``, or
        would be with the message announced by SIZE= (checked already: digits only)."""
        if self.gw.spool.room_for(int(size) if size else 0, self.snap.config.queue.min_free):
            return None
        return Reply(452, "4.3.1", "Insufficient system storage")

    def _check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        limit = self.snap.config.smtp.max_message_size
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return Reply(501, "5.5.4", f"Bad SIZE parameter {value or ''}".rstrip())
                if limit and int(value) > limit:
                    return Reply(552, "5.3.4",
                                 f"Message size exceeds fixed maximum message size ({limit})")
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

    async def cmd_rcpt(self, arg: str) -> None:
        cfg = self.snap.config
        refused = self._refused_stage()
        if refused is not None:
            self.reply(refused)
            return
        if self.tx is None:
            self.reply(Reply(503, "5.0.0", "Need MAIL before RCPT"))
            return
        try:
            raw, params = parse_path_arg(arg, "TO")
            if not raw:
                raise AddressError(Reply(553, "5.0.0", "<>... User address required"))
            mailbox = normalize(raw, self.snap.routing.is_local)
        except AddressError as exc:
            await self._rcpt_reply(exc.reply, refused=True)
            return
        for key, value in params.items():
            check = dsn_params.RCPT_CHECKS.get(key)
            problem = check(value) if check else Reply(555, "5.5.4",
                                                       f"{key} parameter unrecognized")
            if problem is not None:
                await self._rcpt_reply(problem, refused=True)
                return
        if len(self.tx.recipients) >= cfg.smtp.max_recipients:
            await self._rcpt_reply(Reply(452, "4.5.3", "Too many recipients"), refused=False)
            return
        decision = check_recipient(raw, mailbox, self.client, self.may_relay,
                                   self.snap.routing, cfg, shown=_as_written(arg, raw))
        if decision.logged_reject:
            maillog.reject(None, "check_rcpt", f"<{raw}>", self.relay_text, str(decision.reply))
        if decision.accepted:
            if decision.discard:
                self.tx.discard = True
            notify = params.get("NOTIFY")
            self.tx.recipients.append(Recipient(str(mailbox), raw,
                                                notify.upper() if notify else None,
                                                params.get("ORCPT")))
        await self._rcpt_reply(decision.reply, refused=not decision.accepted)

    async def _rcpt_reply(self, reply: Reply, *, refused: bool) -> None:
        """Sendmail's BadRcptThrottle: after N refusals every later RCPT answer waits."""
        smtp = self.snap.config.smtp
        throttled = smtp.bad_rcpt_throttle and self.bad_rcpts >= smtp.bad_rcpt_throttle
        if refused:
            self.bad_rcpts += 1
            if smtp.bad_rcpt_throttle and self.bad_rcpts == smtp.bad_rcpt_throttle:
                self.gw.count("rcpt_throttled")
                maillog.info(f"{self.relay_text}: Possible SMTP RCPT flood, throttling.")
        if throttled:
            self.flush()
            await asyncio.sleep(smtp.bad_rcpt_throttle_delay)
        self.reply(reply)
        if refused and smtp.max_bad_rcpts and self.bad_rcpts >= smtp.max_bad_rcpts:
            self.gw.count("bad_rcpt_disconnects")
            self.reply(Reply(421, "4.7.0", f"{self.snap.config.hostname} Too many bad "
                                           "recipients; closing connection"))
            raise _Closing

    def cmd_data(self, arg: str) -> None:
        refused = self._refused_stage()
        if refused is None and self.tx is None:
            refused = Reply(503, "5.0.0", "Need MAIL command")
        elif refused is None and self.tx is not None and not self.tx.recipients:
            refused = Reply(503, "5.0.0", "Need RCPT (recipient)")
        elif refused is None and arg:
            refused = Reply(501, "5.5.4", "DATA takes no arguments")
        elif refused is None:
            refused = self._storage_refusal()  # full since MAIL: the transaction stays
        if refused is not None:
            self.conn.reject_data()
            self.reply(refused)
            return
        assert self.tx is not None
        if self.conn.pending_bytes and self.snap.config.smtp.forbid_unauth_pipelining:
            # RFC 2920 3.1: DATA ends a pipelined group; bytes behind it were sent before the
            # client could see our 354, so it does not wait for replies (a spam engine, or a
            # smuggling attempt). Postfix 3.9 refuses it the same way.
            maillog.info(f"improper command pipelining after DATA from {self.relay_text}: "
                         f"{self.conn.pending_bytes} bytes sent before the 354")
            self.gw.count("improper_pipelining")
            self.conn.reject_data()
            self.tx = None
            self.reply(Reply(554, "5.5.0", "Error: SMTP protocol synchronization"))
            raise _Closing
        tx = self.tx
        spool = self.gw.spool
        envelope = Envelope(
            qid=spool.new_qid(), sender=tx.sender, recipients=tx.recipients,
            arrival=time.time(), client_ip=self.client.ip, client_name=self.client.ptr_name,
            helo=self.helo, proto=("ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else ""),
            body_8bit=tx.body_8bit,
            smtputf8=tx.smtputf8, envid=tx.params.get("ENVID"),
            ret=(tx.params.get("RET") or "").upper() or None,
        )
        try:
            self.msg = spool.open_incoming(envelope)
        except SpoolError as exc:
            maillog.error(f"cannot accept message: {exc}")
            self.conn.reject_data()
            self.reply(Reply(452, "4.3.1", "Insufficient system storage; try again later"))
            return
        self.headers = HeaderScanner()
        self.msgid = None
        self.hops = 0
        self.conn.max_message_size = self.snap.config.smtp.max_message_size or None
        self.conn.start_data()
        self.last_line = time.monotonic()
        self.reply(Reply(354, None, 'Enter mail, end with "." on a line by itself'))

    def on_data_chunk(self, data: bytes) -> None:
        msg = self.msg
        if msg is None:
            return
        scanner = self.headers
        if scanner is not None and not scanner.done:
            head = scanner.feed(data)
            if head is None:
                return
            self._write_head(msg, head)
            data = scanner.rest
            self.headers = None
        if data:
            try:
                msg.write(data)
            except OSError as exc:
                self.write_error = exc

    write_error: OSError | None = None

    def _write_head(self, msg: IncomingMessage, head: bytes) -> None:
        """Our Received: first, then the client's header section, with Message-Id/Date added."""
        cfg = self.snap.config
        env = msg.envelope
        header, body = split_header_section(head)
        fields = header_fields(header)
        names = {n for n, _ in fields}
        self.hops = sum(1 for n, _ in fields if n == "received")
        for n, v in fields:
            if n == "message-id":
                self.msgid = v
        warnings = self._auth_warnings(cfg.hostname) \
            if "authwarnings" in cfg.smtp.privacy else ""
        if self.client.ptr_name:
            forged = "" if self.client.ptr_status == "OK" else " (may be forged)"
            origin = f"({self.client.ptr_name} [{self.client.ip}]{forged})"
        else:
            origin = f"([{self.client.ip}])"
        helo = self.helo or f"[{self.client.ip}]"
        with_proto = ("UTF8SMTP" if env.smtputf8 else "ESMTP") if self.esmtp else "SMTP"
        date = rfc2822_date(env.arrival)
        recv = f"Received: from {helo} {origin}"
        if self.tls:
            # As Sendmail: the TLS session on a line of its own, and "with ESMTPS".
            recv += f"\r\n\t({self.tls.for_received()})"
            with_proto += "S"
        recv += f"\r\n\tby {cfg.hostname} (mailgate) with {with_proto} id {env.qid}"
        if len(env.recipients) == 1:
            recv += f"\r\n\tfor <{env.recipients[0].address}>"
        recv += f"; {date}\r\n"
        extra = warnings
        if "message-id" not in names:
            self.msgid = f"<{time.strftime('%Y%m%d%H%M', time.gmtime(env.arrival))}." \
                         f"{env.qid}@{cfg.hostname}>"
            extra += f"Message-Id: {self.msgid}\r\n"
        if "date" not in names:
            extra += f"Date: {date}\r\n"
        if "from" not in names:
            # RFC 5322 3.6 requires From:; Sendmail makes it from the envelope sender.
            extra += f"From: {env.sender or 'MAILER-DAEMON@' + cfg.hostname}\r\n"
        try:
            # Keep a headers-only message as it was; otherwise one empty line ends the headers.
            had_blank = head[len(header):len(header) + 2] == b"\r\n"
            sep = b"\r\n" if had_blank or body or not header else b""
            msg.write(recv.encode() + header + extra.encode() + sep + body)
        except OSError as exc:
            self.write_error = exc

    def _auth_warnings(self, hostname: str) -> str:
        """X-Authentication-Warning: where Sendmail's authwarnings adds one (semantics §11)."""
        if self.helo is None:
            text = f"[{self.client.ip}] didn't use HELO protocol"
        elif (self.client.verified_name and not self.client.is_loopback
              and self.helo.lower().rstrip(".") != self.client.verified_name.lower()):
            text = f"Host {self.client.verified_name} [{self.client.ip}] claimed to be {self.helo}"
        else:
            return ""
        maillog.info(f"Authentication-Warning: {hostname}: {text}")
        return f"X-Authentication-Warning: {hostname}: {text}\r\n"

    async def on_data_end(self, size: int) -> None:
        cfg = self.snap.config
        msg, tx = self.msg, self.tx
        assert msg is not None and tx is not None
        if self.headers is not None:
            scanner = self.headers
            self.headers = None
            if scanner.too_large:
                self._fail_data(Reply(552, "5.6.0",
                                      f"Headers too large ({MAX_HEADER_BYTES} max)"))
                return
            # The content ended inside the header section (no body): write what we hold.
            self._write_head(msg, bytes(scanner.buf))
        if self.hops > MAX_HOPS:
            self._fail_data(Reply(554, "5.4.6", f"Too many hops {self.hops} ({MAX_HOPS} max): "
                                                f"from <{tx.sender}> via {cfg.hostname}, to "
                                                f"<{tx.recipients[0].address}>"))
            return
        if self.write_error is not None:
            self._fail_data(Reply(452, "4.3.1", "Insufficient system storage; try again later"),
                            log=f"cannot write spool file: {self.write_error}")
            return
        qid = msg.envelope.qid
        self.msg = None
        self.tx = None
        relay = self.relay_text
        if tx.discard:
            msg.discard()
            maillog.discard(qid, "check_mail", f"<{tx.sender}>", relay)
            self.reply(Reply(250, "2.0.0", f"{qid} Message accepted for delivery"))
            return
        self.flush()
        try:
            queued = await self.gw.spool.commit(msg, lock=True)
        except SpoolError as exc:
            maillog.error(f"{qid}: {exc}")
            self.reply(Reply(452, "4.3.1", "Insufficient system storage; try again later"))
            return
        maillog.received(qid, tx.sender, msg.size, len(tx.recipients), self.msgid,
                         msg.envelope.proto, relay)
        self.reply(Reply(250, "2.0.0", f"{qid} Message accepted for delivery"))
        self.gw.message_queued(queued)

    def _fail_data(self, reply: Reply, log: str | None = None) -> None:
        if self.msg is not None:
            self.msg.discard()
            if log:
                maillog.error(f"{self.msg.envelope.qid}: {log}")
            self.msg = None
        self.tx = None
        self.write_error = None
        self.reply(reply)

    def on_data_failed(self, reply: Reply) -> None:
        maillog.info(f"{self.msg.envelope.qid if self.msg else 'NOQUEUE'}: message from "
                     f"{self.relay_text} refused: {reply}")
        self.headers = None
        self._fail_data(reply)

    def cmd_rset(self, arg: str) -> None:
        self.tx = None
        self.reply(Reply(250, "2.0.0", "Reset state"))

    def cmd_noop(self, arg: str) -> None:
        self.reply(Reply(250, "2.0.0", "OK"))

    def cmd_quit(self, arg: str) -> None:
        if self.tx is not None:
            self.log_session_end()
        self.reply(Reply(221, "2.0.0", f"{self.snap.config.hostname} closing connection"))
        raise _Closing

    def cmd_help(self, arg: str) -> None:
        self.reply(Reply(214, "2.0.0", HELP_TEXT))

    def cmd_vrfy(self, arg: str) -> None:
        # novrfy: never confirm or deny a user (semantics §11).
        self.reply(Reply(252, "2.5.2", "Cannot VRFY user; try RCPT to attempt delivery "
                                       "(or try finger)"))

    def cmd_expn(self, arg: str) -> None:
        self.reply(Reply(502, "5.7.0", "Sorry, we do not allow this operation"))

    def cmd_verb(self, arg: str) -> None:
        self.reply(Reply(502, "5.7.0", "Verbose unavailable"))

    def cmd_etrn(self, arg: str) -> None:
        """RFC 1985: ``ETRN domain`` and ``ETRN @domain`` (the domain and its subdomains);
        ``#queue`` names a queue, and this gateway has a single one."""
        node = arg.strip()
        if not node:
            self.reply(Reply(501, "5.5.2", "Parameter required"))
            return
        if node.startswith("#"):
            self.reply(Reply(458, "4.0.0", f"Unable to queue messages for node {node}: "
                                           "named queues are not supported; use ETRN domain"))
            return
        subdomains = node.startswith("@")
        domain = canon_domain(node[1:] if subdomains else node)
        if domain is None or domain.startswith("["):
            self.reply(Reply(501, "5.5.4", f"Syntax error in parameters: {node[:80]!r} is "
                                           "not a domain (ETRN domain or ETRN @domain)"))
            self.count_bad_command()
            return
        self.gw.flush_domain(domain, subdomains=subdomains)
        self.reply(Reply(250, "2.0.0", f"Queuing for node {node} started"))

    def cmd_starttls(self, arg: str) -> Awaitable[None] | None:
        context = self.snap.config.tls.server_context
        if context is None:
            self.reply(Reply(502, "5.5.1", "STARTTLS not available"))
        elif self.tls is not None:
            self.reply(Reply(503, "5.5.1", "TLS already active"))
        elif arg:
            self.reply(Reply(501, "5.5.4", "Syntax error (no parameters allowed)"))
        elif self.tx is not None:
            self.reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
        else:
            return self._start_tls(context)
        return None

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """RFC 3207: 220, the handshake, then a fresh start: no HELO, no transaction."""
        dropped = self.conn.discard_pending()
        if dropped:
            maillog.info(f"STARTTLS=server, relay={self.relay_text}: {dropped} bytes of "
                         "plaintext pipelined after STARTTLS discarded")
        self.reply(Reply(220, "2.0.0", "Ready to start TLS"))
        self.flush()
        # From here on every byte received is TLS: no await between the discard and this.
        self.tls_stream = stream = TlsStream(context)
        if self.paused and self.transport:
            self.paused = False
            self.transport.resume_reading()
        deadline = time.monotonic() + min(60.0, self.snap.config.smtp.command_timeout)
        while not stream.handshake_done and self.tls_error is None and not self.closed:
            if self.conn.pending_bytes:
                break  # cannot be: plaintext only comes after the handshake
            if stream.peer_closed or not await self.wait_input(deadline - time.monotonic()):
                break
        if not stream.handshake_done:
            why = repr(self.tls_error) if self.tls_error is not None else (
                "timeout" if not self.closed and not stream.peer_closed
                else "connection closed")
            maillog.info(f"STARTTLS=server, error: accept failed={why}, "
                         f"relay={self.relay_text}")
            self.tls_error = self.tls_error or ssl.SSLError(why)
            raise _Closing
        self.tls = tls.describe(stream.ssl_object, verify="NOT")
        maillog.info(f"STARTTLS=server, relay={self.relay_text}, {self.tls.for_maillog()}")
        self.helo = None
        self.esmtp = False

    def cmd_auth(self, arg: str) -> None:
        self.reply(Reply(503, "5.3.3", "AUTH not available"))

    def cmd_bdat(self, arg: str) -> None:
        self.reply(Reply(502, "5.5.1", "CHUNKING not supported; use DATA"))
