"""Outbound SMTP client for delivery: EHLO/HELO, PIPELINING, streaming DATA, connection reuse.

One ``SmtpClient`` is one TCP connection to one next hop. ``send`` runs one mail transaction and
reports a reply per recipient; failures that make the connection unusable (refused, timeouts,
421, garbage, peer gone) raise ``SmtpClientError`` and close the connection.

The message is streamed from the spool file in 64 KiB chunks with dot-stuffing, so a message's
size does not show in memory use. On the way, lines over ``line_limit`` octets are folded and,
to a server without 8BITMIME, 8-bit MIME parts become quoted-printable (smtp/body.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from mailgate import tls
from mailgate.reply import Reply, parse_reply_line, split_enhanced
from mailgate.smtp.body import OutgoingContent
from mailgate.smtp.deadline import DeadlineWaits
from mailgate.smtp.downgrade import Plan, Scanner
from mailgate.smtp.dsn_params import orcpt_ascii
from mailgate.smtp.search import find as _find

__all__ = [
    "RecipientResult",
    "SmtpClient",
    "SmtpClientError",
    "Timeouts",
    "TransactionResult",
]

CHUNK = 64 * 1024
READ_LIMIT = 64 * 1024  # unread input held before reading pauses; a reply line must fit in it
MAX_REPLY_LINE = 4096  # RFC 5321 allows 512; be lenient, but not unboundedly
MAX_REPLY_LINES = 1000  # a multiline reply that never ends is an attack, not a reply

NO_SMTPUTF8 = Reply(553, "5.6.7", "Remote server does not support SMTPUTF8")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait per stage, defaults from RFC 5321 4.5.3.2."""

    connect: float = 30.0
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    command: float = 300.0  # EHLO, HELO, RSET, QUIT: not in 4.5.3.2, same as MAIL

    def scaled(self, factor: float) -> Timeouts:
        """All timeouts multiplied by ``factor`` (tests use tiny ones)."""
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)})


@dataclass
class RecipientResult:
    address: str
    reply: Reply  # the RCPT reply if refused, else the reply that ended the DATA phase
    at_rcpt: bool = False  # the reply is its RCPT's refusal


@dataclass
class TransactionResult:
    mail_reply: Reply
    rcpt: list[RecipientResult]  # one per recipient, in order


@dataclass(frozen=True, slots=True)
class _Replies:
    """The envelope's replies: MAIL, one per RCPT (the MAIL refusal for each when MAIL was
    refused), and DATA's; ``data`` None when there is no DATA phase (MAIL refused, or no
    recipient accepted)."""

    mail: Reply
    rcpt: list[Reply]
    data: Reply | None

    def result(self, recipients: Sequence[str], final: Reply | None) -> TransactionResult:
        """``final`` (the reply that ended the DATA phase) for each accepted recipient, its
        own refusal for every other."""
        sent = self.mail.is_positive  # else each "RCPT reply" is MAIL's refusal
        results = []
        for a, r in zip(recipients, self.rcpt, strict=True):
            if final is not None and r.is_positive:
                results.append(RecipientResult(a, final))
            else:
                results.append(RecipientResult(a, r, at_rcpt=sent))
        return TransactionResult(self.mail, results)


class _Wire(DeadlineWaits, asyncio.Protocol):
    """The connection's bytes: what the server sent, kept until the client reads a line of
    it, and the flow control of what the client sends.

    A protocol of our own rather than asyncio's streams: a reply is read from the buffer with
    a ``find``, and the client waits (one future per wait, one timer moved on from wait to
    wait: ``smtp/deadline.py``) only when no whole line has arrived yet, where
    ``StreamReader.readuntil`` under ``asyncio.timeout`` cost a timeout context, its
    rescheduling and a coroutine per line: four to six lines a message.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False  # the server closed its side, or the connection is gone
        self.lost: Exception | None = None  # why the connection was lost, if it failed
        self.reading_paused = False
        self.writing_paused = False
        self._waiter: asyncio.Future[bool] | None = None  # for input, or for the drain
        # Kept: asyncio.get_running_loop() costs a getpid() system call on each call.
        self.event_loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.event_loop.create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * READ_LIMIT and not self.reading_paused and self.transport:
            # Bounded memory: a server sending while we send the content is read later.
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # half-open, as asyncio's streams keep it: our QUIT may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self.writing_paused = False
        self._wake()
        self.stop_timer()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter, True)

    # -- for the client ------------------------------------------------------------------------
    async def wait(self, deadline: float) -> bool:
        """Until something happens (input, EOF, the drain) or ``deadline`` (loop time);
        False when the deadline came first."""
        loop = self.event_loop
        if deadline - loop.time() <= 0:
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        self.arm(deadline)
        try:
            return await waiter
        finally:
            self.disarm()
            self._waiter = None

    def deadline_expired(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter, False)

    def take_line(self) -> bytes | None:
        """The next whole line (through its LF) if it has arrived, else None."""
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if self.reading_paused and len(buf) <= READ_LIMIT and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return line


def _settle(waiter: asyncio.Future[bool], woken: bool) -> None:
    if not waiter.done():
        waiter.set_result(woken)


class SmtpClientError(Exception):
    """The connection failed as a whole; ``temporary`` says whether to retry later."""

    def __init__(
        self,
        message: str,
        *,
        reply: Reply | None = None,
        temporary: bool = True,
        stage: str = "",
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.temporary = temporary
        self.stage = stage
        self.timed_out = timed_out  # the peer went silent (as opposed to refusing or closing)


class SmtpClient:
    """An SMTP connection to a next hop; create with ``await SmtpClient.connect(...)``."""

    def __init__(
        self,
        wire: _Wire,
        *,
        timeouts: Timeouts,
        transcript: Callable[[str], None] | None,
    ) -> None:
        assert wire.transport is not None
        self._wire = wire
        self._transport: asyncio.Transport = wire.transport
        self.timeouts = timeouts
        self._transcript = transcript
        peer = self._transport.get_extra_info("peername")
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self.greeting = Reply(0, None, "")
        self.helo_reply = Reply(0, None, "")
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.tls: tls.Session | None = None  # after STARTTLS
        self.tls_failure: str | None = None  # why this connection is in clear after all
        self._closed = False
        self._need_rset = False  # a transaction was left open at the server
        self._data_sent = False  # the current transaction got as far as the content

    # -- connection ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        helo_name: str,
        timeouts: Timeouts | None = None,
        source_address: str | None = None,
        transcript: Callable[[str], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
        ehlo_if_esmtp: bool = False,
    ) -> SmtpClient:
        """Connect, read the 220 greeting and say EHLO (HELO if EHLO is refused).

        ``ehlo_if_esmtp``: Sendmail's ``smtp`` mailer (no ``F=a``), which says EHLO only to
        a server whose greeting has the word ``ESMTP`` in it (its ``esmtp_check``), else
        HELO at once.

        With ``tls_context``, STARTTLS when the server offers it (opportunistic, Postfix's
        ``may``): a refused STARTTLS leaves the session in clear, a failed handshake is tried
        again at once on a new connection in clear.

        ``host`` should be an address: name resolution is the caller's (DNS) business.
        """
        timeouts = timeouts or Timeouts()
        try:
            return await cls._connect_once(
                host,
                port,
                helo_name,
                timeouts,
                source_address,
                transcript,
                tls_context,
                ehlo_if_esmtp,
            )
        except SmtpClientError as exc:
            if exc.stage != "starttls":
                raise
            failure = str(exc)
        if transcript is not None:
            transcript(f"{failure}; trying again without TLS")
        clear = await cls._connect_once(
            host, port, helo_name, timeouts, source_address, transcript, None, ehlo_if_esmtp
        )
        clear.tls_failure = failure
        return clear

    @classmethod
    async def _connect_once(
        cls,
        host: str,
        port: int,
        helo_name: str,
        timeouts: Timeouts,
        source_address: str | None,
        transcript: Callable[[str], None] | None,
        tls_context: ssl.SSLContext | None,
        ehlo_if_esmtp: bool,
    ) -> SmtpClient:
        """One TCP connection and its handshake; a failed one is dropped at once."""
        wire = await _open(host, port, timeouts.connect, source_address, transcript)
        client = cls(wire, timeouts=timeouts, transcript=transcript)
        try:
            await client._greeting()
            # Sendmail looks for the word, case and all, anywhere in the greeting's lines.
            esmtp = not ehlo_if_esmtp or "ESMTP" in client.greeting.text
            if esmtp and await client._ehlo(helo_name):
                if tls_context is not None and "STARTTLS" in client.extensions:
                    await client._starttls(tls_context, helo_name)
            else:
                await client._helo(helo_name)
        except BaseException:
            client._abort()
            raise
        return client

    async def _greeting(self) -> None:
        self.greeting = await self._read_reply(self.timeouts.greeting, "greeting")
        if self.greeting.code != 220:
            # RFC 5321 3.1: a 554 greeting still expects QUIT; be polite, then give up.
            with contextlib.suppress(SmtpClientError):
                await self._command("QUIT", self.timeouts.command, "quit")
            raise SmtpClientError(
                f"host refused to talk to us: {self.greeting}",
                reply=self.greeting,
                temporary=not self.greeting.is_permanent,
                stage="greeting",
            )

    async def _ehlo(self, helo_name: str) -> bool:
        """EHLO; False when the server refuses it for good (5xx): it may still know HELO."""
        reply = await self._command(f"EHLO {helo_name}", self.timeouts.command, "ehlo")
        if reply.code == 250:
            self.esmtp = True
            self.helo_reply = reply
            self.extensions = _parse_extensions(reply)
            return True
        if not reply.is_permanent:
            raise SmtpClientError(
                f"EHLO refused: {reply}", reply=reply, temporary=True, stage="ehlo"
            )
        return False

    async def _helo(self, helo_name: str) -> None:
        """An old server that knows only HELO (RFC 5321 3.2)."""
        reply = await self._command(f"HELO {helo_name}", self.timeouts.command, "helo")
        if reply.code != 250:
            raise SmtpClientError(
                f"HELO refused: {reply}",
                reply=reply,
                temporary=not reply.is_permanent,
                stage="helo",
            )
        self.helo_reply = reply

    async def _starttls(self, context: ssl.SSLContext, helo_name: str) -> None:
        reply = await self._command("STARTTLS", self.timeouts.command, "starttls")
        if reply.code != 220:
            return  # refused: opportunistic TLS carries on in clear
        self._log("--- TLS handshake")
        try:
            async with asyncio.timeout(self.timeouts.command):
                transport = await asyncio.get_running_loop().start_tls(
                    self._transport, self._wire, context, server_hostname=None
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise SmtpClientError(
                f"TLS handshake with [{self.peer[0]}] failed: {exc!r}",
                temporary=True,
                stage="starttls",
            ) from None
        if transport is None:  # the connection went away during the handshake
            raise SmtpClientError(
                f"TLS handshake with [{self.peer[0]}] failed: connection closed",
                temporary=True,
                stage="starttls",
            )
        # From here the TLS transport is the connection; the plain one is underneath it.
        self._transport = self._wire.transport = transport
        self.tls = tls.describe(transport.get_extra_info("ssl_object"), verify="NO")
        # RFC 3207 4.2: what the server said before TLS no longer counts.
        reply = await self._command(f"EHLO {helo_name}", self.timeouts.command, "ehlo")
        if reply.code != 250:
            raise SmtpClientError(
                f"EHLO after STARTTLS refused: {reply}",
                reply=reply,
                temporary=not reply.is_permanent,
                stage="ehlo",
            )
        self.helo_reply = reply
        self.extensions = _parse_extensions(reply)

    @property
    def closed(self) -> bool:
        return self._closed

    def set_transcript(self, transcript: Callable[[str], None] | None) -> None:
        """Where the dialogue goes from now on (a reused connection serves a new delivery)."""
        self._transcript = transcript

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def passes_dsn(self) -> bool:
        """The server takes the DSN parameters: its DSNs replace ours (RFC 3461 5.2)."""
        return "DSN" in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE limit (RFC 1870), None if not offered or unlimited."""
        value = self.extensions.get("SIZE", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def reset(self) -> None:
        """RSET, so that the connection can carry another transaction."""
        self._check_open()
        try:
            reply = await self._command("RSET", self.timeouts.command, "rset")
        except BaseException:
            self._abort()
            raise
        if reply.code != 250:
            self._abort()
            raise SmtpClientError(f"RSET refused: {reply}", reply=reply, stage="rset")
        self._need_rset = False

    async def quit(self) -> None:
        """Say QUIT and close; errors are irrelevant at this point."""
        if self._closed:
            return
        with contextlib.suppress(SmtpClientError, OSError):
            await self._command("QUIT", min(self.timeouts.command, 30.0), "quit")
        await self.close()

    async def close(self) -> None:
        """Close without QUIT."""
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._wire.closed

    def _abort(self) -> None:
        """Drop the connection at once: its state is unknown, it must not be reused."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._transport.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise SmtpClientError("connection is closed", stage="closed")

    # -- mail transaction ----------------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        body: Path | int,
        body_offset: int,
        *,
        size: int | None = None,
        body_8bit: bool = False,
        smtputf8: bool = False,
        ret: str | None = None,
        envid: str | None = None,
        dsn: Sequence[tuple[str | None, str | None]] | None = None,
        line_limit: int = 998,
    ) -> TransactionResult:
        """One transaction: MAIL, RCPTs, DATA with the content of ``body`` (a file, or an open
        descriptor of one) from ``body_offset`` to its end (CRLF line ends expected).

        ``ret``, ``envid`` and ``dsn`` (NOTIFY and ORCPT per recipient) are the DSN parameters
        (RFC 3461), sent when the server offers DSN (see ``passes_dsn``). Lines longer than
        ``line_limit`` octets are broken with CRLF SPACE (0: never). To a server without
        8BITMIME, 8-bit content is converted (RFC 6152 3), declared ``body_8bit`` or not.
        ``size`` is sent as given: the size of the message as queued, as Postfix sends it,
        even when folding or the conversion make the content longer (RFC 1870's SIZE is the
        client's estimate; the server counts what arrives)."""
        self._check_open()
        _check_envelope(sender, recipients)
        refusal = self._refusal_before_mail(size, smtputf8)
        if refusal is not None:
            return TransactionResult(refusal, [RecipientResult(r, refusal) for r in recipients])
        try:
            if self._need_rset:
                await self.reset()
            self._need_rset = True  # until the transaction is seen to its end
            mail_cmd = self._mail_command(sender, size, body_8bit, smtputf8, ret, envid)
            rcpt_cmds = self._rcpt_commands(recipients, dsn, smtputf8)
            exchange = self._envelope_pipelined if self.pipelining else self._envelope_stepwise
            replies = await exchange(mail_cmd, rcpt_cmds)
            final = replies.data
            if final is not None and final.code == 354:
                final = await self._send_body(
                    body,
                    body_offset,
                    line_limit=line_limit,
                    downgrade="8BITMIME" not in self.extensions,
                )
            # After the end-of-data reply the transaction is over whatever the reply (RFC 5321
            # 4.1.1.4); short of it (MAIL, every RCPT or DATA refused) it may not be, so RSET
            # before the next.
            self._need_rset = not self._data_sent
            return replies.result(recipients, final)
        except BaseException:
            self._abort()
            raise

    def _refusal_before_mail(self, size: int | None, smtputf8: bool) -> Reply | None:
        """Why this server cannot take the message at all, known from its EHLO: no MAIL then."""
        if smtputf8 and "SMTPUTF8" not in self.extensions:
            # Postfix's answer: we cannot downgrade UTF-8 addresses, so this is final.
            return NO_SMTPUTF8
        limit = self.size_limit
        if size is not None and limit is not None and size > limit:
            return Reply(552, "5.3.4", f"Message size exceeds remote limit of {limit} bytes")
        return None

    def _mail_command(
        self,
        sender: str,
        size: int | None,
        body_8bit: bool,
        smtputf8: bool,
        ret: str | None,
        envid: str | None,
    ) -> str:
        """MAIL with the parameters this server takes (SIZE, BODY, SMTPUTF8, RET, ENVID)."""
        params = []
        if size is not None and "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if body_8bit and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        if self.passes_dsn:
            params += [f"RET={ret}"] if ret else []
            params += [f"ENVID={envid}"] if envid else []
        return " ".join([f"MAIL From:<{sender}>", *params])

    def _rcpt_commands(
        self,
        recipients: Sequence[str],
        dsn: Sequence[tuple[str | None, str | None]] | None,
        smtputf8: bool,
    ) -> list[str]:
        """One RCPT per recipient, with NOTIFY and ORCPT to a server that takes DSN."""
        params = [""] * len(recipients)
        if self.passes_dsn:
            for i, (notify, orcpt) in enumerate(dsn or ()):
                if orcpt and not smtputf8:
                    orcpt = orcpt_ascii(orcpt)
                params[i] = "".join(
                    [f" NOTIFY={notify}" if notify else "", f" ORCPT={orcpt}" if orcpt else ""]
                )
        return [f"RCPT To:<{r}>{x}" for r, x in zip(recipients, params, strict=True)]

    async def _envelope_pipelined(self, mail_cmd: str, rcpt_cmds: list[str]) -> _Replies:
        """RFC 2920: MAIL, RCPTs and DATA in one write, then the replies in order."""
        self._data_sent = False
        for cmd in (mail_cmd, *rcpt_cmds, "DATA"):
            self._log(f">>> {cmd}")
        self._transport.write(
            "".join(f"{c}\r\n" for c in (mail_cmd, *rcpt_cmds, "DATA")).encode("utf-8")
        )
        # Read before draining: with many recipients the server's replies could otherwise fill
        # both socket buffers while we wait for it to read (the RFC 2920 deadlock). The
        # transport keeps sending in the background meanwhile.
        mail_reply = await self._read_checked(self.timeouts.mail, "mail")
        rcpt_replies = [await self._read_checked(self.timeouts.rcpt, "rcpt") for _ in rcpt_cmds]
        data_reply = await self._read_checked(self.timeouts.data_init, "data")
        await self._drain(self.timeouts.data_init, "data")
        if mail_reply.code // 100 != 2:
            self._expect_not(data_reply, 354, "DATA accepted after MAIL was refused")
            return _Replies(mail_reply, [mail_reply] * len(rcpt_cmds), None)
        if not any(r.is_positive for r in rcpt_replies):
            if data_reply.code == 354:
                # A server accepting DATA with no recipients: end the empty message to stay
                # in step; with no recipients it delivers nothing.
                self._log(">>> .")
                self._transport.write(b".\r\n")
                await self._drain(self.timeouts.data_block, "data")
                await self._read_checked(self.timeouts.data_end, "data_end")
            return _Replies(mail_reply, rcpt_replies, None)
        return _Replies(mail_reply, rcpt_replies, data_reply)

    async def _envelope_stepwise(self, mail_cmd: str, rcpt_cmds: list[str]) -> _Replies:
        """Without PIPELINING: each command waits for its reply; no RCPT after a refused
        MAIL, no DATA when no recipient was accepted."""
        self._data_sent = False
        mail_reply = await self._command_checked(mail_cmd, self.timeouts.mail, "mail")
        if mail_reply.code // 100 != 2:
            return _Replies(mail_reply, [mail_reply] * len(rcpt_cmds), None)
        rcpt_replies = [
            await self._command_checked(c, self.timeouts.rcpt, "rcpt") for c in rcpt_cmds
        ]
        if not any(r.is_positive for r in rcpt_replies):
            return _Replies(mail_reply, rcpt_replies, None)
        data_reply = await self._command_checked("DATA", self.timeouts.data_init, "data")
        return _Replies(mail_reply, rcpt_replies, data_reply)

    async def _send_body(
        self, body: Path | int, body_offset: int, *, line_limit: int, downgrade: bool
    ) -> Reply:
        """Stream the content (folded, converted: smtp/body.py) dot-stuffed, then ``.``;
        return the end-of-data reply."""
        self._data_sent = True
        tail = b""  # the last two bytes sent, to know whether the content ended with CRLF
        at_line_start = True
        # Plain reads of 64 KiB from a local (page-cached) file take microseconds; an
        # executor round trip per chunk would cost more than it saves.
        fd = body if isinstance(body, int) else os.open(body, os.O_RDONLY | os.O_CLOEXEC)
        try:
            plan = await self._downgrade_plan(fd, body_offset) if downgrade else None
            content = OutgoingContent(line_limit=line_limit, plan=plan)
            pos = body_offset
            while True:
                chunk = os.pread(fd, CHUNK, pos)
                pos += len(chunk)
                # A short read of a regular (spool) file is its end: the terminator goes in
                # the same write as the last chunk.
                last = len(chunk) < CHUNK
                try:
                    data = content.feed(chunk) + (content.end() if last else b"")
                except Exception as exc:  # a bug in a transform must not kill the delivery
                    raise SmtpClientError(
                        f"cannot prepare the content: {exc!r}", stage="data_block"
                    ) from exc
                # Stuff after any LF, not only CRLF: a bare LF followed by "." must not look
                # like an end of data to a lenient server (SMTP smuggling).
                out = data.replace(b"\n.", b"\n..") if _find(data, b"\n.") >= 0 else data
                if at_line_start and data[:1] == b".":
                    out = b"." + out
                if data:
                    at_line_start = data[-1:] == b"\n"
                    tail = (tail + data)[-2:]
                if last:
                    if tail and tail != b"\r\n":
                        out += b"\r\n"
                    self._log(">>> .")
                    out += b".\r\n"
                self._transport.write(out)
                await self._drain(self.timeouts.data_block, "data_block")
                if last:
                    break
                if content.converting:
                    await asyncio.sleep(0)  # Python work per line: let other sessions run
        finally:
            if not isinstance(body, int):
                os.close(fd)
        reply = await self._read_checked(self.timeouts.data_end, "data_end")
        if reply.code // 100 not in (2, 4, 5):
            raise SmtpClientError(f"unexpected reply to end of data: {reply}", stage="data_end")
        return reply

    async def _downgrade_plan(self, fd: int, offset: int) -> Plan | None:
        """For a server without 8BITMIME: what to convert, None if the content is 7-bit.

        A first pass over the file (smtp/downgrade.py says why): an ASCII check at C speed,
        then, only if there are 8-bit octets, the MIME scan. Either reads the page cache."""
        pos = offset
        while True:
            chunk = os.pread(fd, CHUNK, pos)
            if not chunk:
                return None
            if not chunk.isascii():
                break
            pos += len(chunk)
        scanner = Scanner()
        pos = offset
        while chunk := os.pread(fd, CHUNK, pos):
            pos += len(chunk)
            try:
                scanner.feed(chunk)
            except Exception as exc:
                raise SmtpClientError(
                    f"cannot scan the content: {exc!r}", stage="data_block"
                ) from exc
            await asyncio.sleep(0)
        plan = scanner.end()
        if not plan.converts:
            return None
        self._log("--- no 8BITMIME here: 8-bit MIME parts sent as quoted-printable")
        return plan

    # -- wire ----------------------------------------------------------------------------------

    def _log(self, line: str) -> None:
        if self._transcript is not None:
            self._transcript(line)

    async def _drain(self, timeout: float, stage: str) -> None:
        """Wait while the transport holds more than its high-water mark, as
        ``StreamWriter.drain`` does; under it (the usual case: the kernel took it all) at
        once. A connection lost meanwhile is an error; one lost before shows at the read."""
        wire = self._wire
        if not wire.writing_paused:
            return
        deadline = wire.event_loop.time() + timeout
        while wire.writing_paused:
            if not await wire.wait(deadline):
                raise SmtpClientError(f"timeout writing ({stage})", stage=stage, timed_out=True)
        if wire.closed.done():
            why = wire.lost or "Connection lost"
            raise SmtpClientError(f"connection lost ({stage}): {why}", stage=stage)

    async def _command(self, line: str, timeout: float, stage: str) -> Reply:
        self._check_open()
        self._log(f">>> {line}")
        self._transport.write(line.encode("utf-8") + b"\r\n")
        await self._drain(timeout, stage)
        return await self._read_reply(timeout, stage)

    async def _command_checked(self, line: str, timeout: float, stage: str) -> Reply:
        reply = await self._command(line, timeout, stage)
        return self._check(reply, stage)

    async def _read_checked(self, timeout: float, stage: str) -> Reply:
        return self._check(await self._read_reply(timeout, stage), stage)

    def _check(self, reply: Reply, stage: str) -> Reply:
        """421 closes the connection; codes outside 2xx-5xx are a protocol error."""
        if reply.code == 421:
            raise SmtpClientError(
                f"server closing connection: {reply}", reply=reply, temporary=True, stage=stage
            )
        if stage == "data":
            ok = reply.code == 354 or 400 <= reply.code < 600
        else:
            ok = 200 <= reply.code < 300 or 400 <= reply.code < 600
        if not ok:
            raise SmtpClientError(f"unexpected reply to {stage}: {reply}", stage=stage)
        return reply

    def _expect_not(self, reply: Reply, code: int, what: str) -> None:
        if reply.code == code:
            raise SmtpClientError(f"{what}: {reply}", stage="data")

    async def _read_reply(self, timeout: float, stage: str) -> Reply:
        """Read one (possibly multiline) reply, within ``timeout`` seconds."""
        lines: list[str] = []
        code = 0
        wire = self._wire
        deadline = 0.0  # set at the first wait: a reply that has arrived already needs none
        timed_out = False
        while True:
            raw = wire.take_line()
            if raw is None:
                if len(wire.buf) > READ_LIMIT:
                    raise SmtpClientError(f"reply line too long in {stage}", stage=stage)
                if wire.lost is not None:
                    raise SmtpClientError(f"connection lost in {stage}: {wire.lost}", stage=stage)
                if wire.eof:
                    raise SmtpClientError(f"connection closed by peer in {stage}", stage=stage)
                if timed_out:
                    raise SmtpClientError(
                        f"timeout waiting for reply to {stage}", stage=stage, timed_out=True
                    )
                if not deadline:
                    deadline = wire.event_loop.time() + timeout
                timed_out = not await wire.wait(deadline)
                continue  # what arrived, even at the deadline, is looked at first
            if len(raw) > MAX_REPLY_LINE:
                raise SmtpClientError(
                    f"reply line too long ({len(raw)} bytes) in {stage}", stage=stage
                )
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self._log(f"<<< {line}")
            try:
                line_code, last, text = parse_reply_line(line)
            except ValueError:
                raise SmtpClientError(
                    f"garbage in reply to {stage}: {line[:100]!r}", stage=stage
                ) from None
            if lines and line_code != code:
                raise SmtpClientError(
                    f"inconsistent codes in multiline reply to {stage}", stage=stage
                )
            code = line_code
            lines.append(text)
            if last:
                break
            if len(lines) >= MAX_REPLY_LINES:
                raise SmtpClientError(f"endless reply to {stage}", stage=stage)
        enhanced, first = split_enhanced(lines[0])
        texts = [first]
        for more in lines[1:]:
            # Continuation lines usually repeat the enhanced code; Reply.lines() re-adds it.
            code_of_line, rest = split_enhanced(more)
            texts.append(rest if enhanced is not None and code_of_line == enhanced else more)
        return Reply(code, enhanced, "\n".join(texts))


async def _open(
    host: str,
    port: int,
    timeout: float,
    source_address: str | None,
    transcript: Callable[[str], None] | None,
) -> _Wire:
    """The TCP connection to ``[host]:port``; failures as SmtpClientError (stage "connect")."""
    if transcript is not None:
        transcript(f"Connecting to [{host}]:{port}...")
    wire = _Wire()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().create_connection(
                lambda: wire,
                host,
                port,
                local_addr=(source_address, 0) if source_address else None,
            )
        return wire
    except TimeoutError:
        raise SmtpClientError(
            f"connect to [{host}]:{port} timed out", stage="connect", timed_out=True
        ) from None
    except OSError as e:
        raise SmtpClientError(
            f"connect to [{host}]:{port}: {e.strerror or e}", stage="connect"
        ) from None


def _check_envelope(sender: str, recipients: Sequence[str]) -> None:
    for addr in (sender, *recipients):
        if "\r" in addr or "\n" in addr:
            raise ValueError(f"address not fit for an SMTP command: {addr!r}")
    if not recipients:
        raise ValueError("no recipients")


def _parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) to their parameters; the first line is the greeting."""
    ext: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext
