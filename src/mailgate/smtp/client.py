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
from mailgate.smtp.downgrade import Plan, Scanner
from mailgate.smtp.dsn_params import orcpt_ascii

__all__ = [
    "RecipientResult",
    "SmtpClient",
    "SmtpClientError",
    "Timeouts",
    "TransactionResult",
]

CHUNK = 64 * 1024
READ_LIMIT = 64 * 1024  # StreamReader buffer; a reply line must fit well inside it
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


@dataclass
class TransactionResult:
    mail_reply: Reply
    rcpt: list[RecipientResult]  # one per recipient, in order


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
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeouts: Timeouts,
        transcript: Callable[[str], None] | None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeouts = timeouts
        self._transcript = transcript
        peer = writer.get_extra_info("peername")
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
    ) -> SmtpClient:
        """Connect, read the 220 greeting and say EHLO (HELO if EHLO is refused).

        With ``tls_context``, STARTTLS when the server offers it (opportunistic, Postfix's
        ``may``): a refused STARTTLS leaves the session in clear, a failed handshake is tried
        again at once on a new connection in clear.

        ``host`` should be an address: name resolution is the caller's (DNS) business.
        """
        timeouts = timeouts or Timeouts()
        if transcript is not None:
            transcript(f"Connecting to [{host}]:{port}...")
        try:
            async with asyncio.timeout(timeouts.connect):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    limit=READ_LIMIT,
                    local_addr=(source_address, 0) if source_address else None,
                )
        except TimeoutError:
            raise SmtpClientError(
                f"connect to [{host}]:{port} timed out", stage="connect", timed_out=True
            ) from None
        except OSError as e:
            raise SmtpClientError(
                f"connect to [{host}]:{port}: {e.strerror or e}", stage="connect"
            ) from None
        client = cls(reader, writer, timeouts=timeouts, transcript=transcript)
        try:
            await client._handshake(helo_name, tls_context)
        except SmtpClientError as exc:
            client._abort()
            if exc.stage != "starttls":
                raise
            if transcript is not None:
                transcript(f"{exc}; trying again without TLS")
            clear = await cls.connect(
                host,
                port,
                helo_name=helo_name,
                timeouts=timeouts,
                source_address=source_address,
                transcript=transcript,
            )
            clear.tls_failure = str(exc)
            return clear
        except BaseException:
            client._abort()
            raise
        return client

    async def _handshake(self, helo_name: str, tls_context: ssl.SSLContext | None = None) -> None:
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
        reply = await self._command(f"EHLO {helo_name}", self.timeouts.command, "ehlo")
        if reply.code == 250:
            self.esmtp = True
            self.helo_reply = reply
            self.extensions = _parse_extensions(reply)
            if tls_context is not None and "STARTTLS" in self.extensions:
                await self._starttls(tls_context, helo_name)
            return
        if not reply.is_permanent:
            raise SmtpClientError(
                f"EHLO refused: {reply}", reply=reply, temporary=True, stage="ehlo"
            )
        # 5xx: an old server that knows only HELO (RFC 5321 3.2).
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
                await self._writer.start_tls(context)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise SmtpClientError(
                f"TLS handshake with [{self.peer[0]}] failed: {exc!r}",
                temporary=True,
                stage="starttls",
            ) from None
        self.tls = tls.describe(self._writer.get_extra_info("ssl_object"), verify="NO")
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
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._writer.wait_closed()

    def _abort(self) -> None:
        """Drop the connection at once: its state is unknown, it must not be reused."""
        self._closed = True
        transport = self._writer.transport
        with contextlib.suppress(Exception):
            transport.abort()

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
        for addr in (sender, *recipients):
            if "\r" in addr or "\n" in addr:
                raise ValueError(f"address not fit for an SMTP command: {addr!r}")
        if not recipients:
            raise ValueError("no recipients")
        if smtputf8 and "SMTPUTF8" not in self.extensions:
            # Postfix's answer: we cannot downgrade UTF-8 addresses, so this is final.
            return _all_failed(NO_SMTPUTF8, recipients)
        limit = self.size_limit
        if size is not None and limit is not None and size > limit:
            return _all_failed(
                Reply(552, "5.3.4", f"Message size exceeds remote limit of {limit} bytes"),
                recipients,
            )
        try:
            if self._need_rset:
                await self.reset()
            self._need_rset = True  # until the transaction is seen to its end
            params = []
            if size is not None and "SIZE" in self.extensions:
                params.append(f"SIZE={size}")
            if body_8bit and "8BITMIME" in self.extensions:
                params.append("BODY=8BITMIME")
            if smtputf8:
                params.append("SMTPUTF8")
            rcpt_params: list[str] = [""] * len(recipients)
            if self.passes_dsn:
                params += [f"RET={ret}"] if ret else []
                params += [f"ENVID={envid}"] if envid else []
                for i, (notify, orcpt) in enumerate(dsn or ()):
                    if orcpt and not smtputf8:
                        orcpt = orcpt_ascii(orcpt)
                    rcpt_params[i] = "".join(
                        [f" NOTIFY={notify}" if notify else "", f" ORCPT={orcpt}" if orcpt else ""]
                    )
            mail_cmd = " ".join([f"MAIL From:<{sender}>", *params])
            rcpt_cmds = [f"RCPT To:<{r}>{x}" for r, x in zip(recipients, rcpt_params, strict=True)]
            if self.pipelining:
                result = await self._envelope_pipelined(mail_cmd, rcpt_cmds, recipients)
            else:
                result = await self._envelope_stepwise(mail_cmd, rcpt_cmds, recipients)
            if isinstance(result, TransactionResult):
                return result
            mail_reply, rcpt_replies, data_reply = result
            if data_reply.code == 354:
                data_reply = await self._send_body(
                    body,
                    body_offset,
                    line_limit=line_limit,
                    downgrade="8BITMIME" not in self.extensions,
                )
            # After the end-of-data reply the transaction is over whatever the reply (RFC 5321
            # 4.1.1.4); after a refused DATA command it may not be, so RSET before the next.
            self._need_rset = not self._data_sent
            return TransactionResult(
                mail_reply,
                [
                    RecipientResult(addr, data_reply if r.is_positive else r)
                    for addr, r in zip(recipients, rcpt_replies, strict=True)
                ],
            )
        except BaseException:
            self._abort()
            raise

    async def _envelope_pipelined(
        self, mail_cmd: str, rcpt_cmds: list[str], recipients: Sequence[str]
    ) -> TransactionResult | tuple[Reply, list[Reply], Reply]:
        """RFC 2920: MAIL, RCPTs and DATA in one write, then the replies in order."""
        self._data_sent = False
        for cmd in (mail_cmd, *rcpt_cmds, "DATA"):
            self._log(f">>> {cmd}")
        self._writer.write(
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
            self._need_rset = True
            return _all_failed(mail_reply, recipients, mail_reply=mail_reply)
        if not any(r.is_positive for r in rcpt_replies):
            if data_reply.code == 354:
                # A server accepting DATA with no recipients: end the empty message to stay
                # in step; with no recipients it delivers nothing.
                self._log(">>> .")
                self._writer.write(b".\r\n")
                await self._drain(self.timeouts.data_block, "data")
                await self._read_checked(self.timeouts.data_end, "data_end")
            self._need_rset = True
            return TransactionResult(
                mail_reply,
                [RecipientResult(a, r) for a, r in zip(recipients, rcpt_replies, strict=True)],
            )
        return mail_reply, rcpt_replies, data_reply

    async def _envelope_stepwise(
        self, mail_cmd: str, rcpt_cmds: list[str], recipients: Sequence[str]
    ) -> TransactionResult | tuple[Reply, list[Reply], Reply]:
        self._data_sent = False
        mail_reply = await self._command_checked(mail_cmd, self.timeouts.mail, "mail")
        if mail_reply.code // 100 != 2:
            return _all_failed(mail_reply, recipients, mail_reply=mail_reply)
        rcpt_replies = [
            await self._command_checked(c, self.timeouts.rcpt, "rcpt") for c in rcpt_cmds
        ]
        if not any(r.is_positive for r in rcpt_replies):
            return TransactionResult(
                mail_reply,
                [RecipientResult(a, r) for a, r in zip(recipients, rcpt_replies, strict=True)],
            )
        data_reply = await self._command_checked("DATA", self.timeouts.data_init, "data")
        return mail_reply, rcpt_replies, data_reply

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
                out = data.replace(b"\n.", b"\n..")
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
                self._writer.write(out)
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
        if not self._writer.transport.get_write_buffer_size():
            return  # all handed to the kernel: nothing to wait for (the usual case)
        try:
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise SmtpClientError(
                f"timeout writing ({stage})", stage=stage, timed_out=True
            ) from None
        except OSError as e:
            raise SmtpClientError(f"connection lost ({stage}): {e}", stage=stage) from None

    async def _command(self, line: str, timeout: float, stage: str) -> Reply:
        self._check_open()
        self._log(f">>> {line}")
        self._writer.write(line.encode("utf-8") + b"\r\n")
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
        """Read one (possibly multiline) reply."""
        lines: list[str] = []
        code = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self._reader.readuntil(b"\n")
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
        except TimeoutError:
            raise SmtpClientError(
                f"timeout waiting for reply to {stage}", stage=stage, timed_out=True
            ) from None
        except asyncio.IncompleteReadError:
            raise SmtpClientError(f"connection closed by peer in {stage}", stage=stage) from None
        except asyncio.LimitOverrunError:
            raise SmtpClientError(f"reply line too long in {stage}", stage=stage) from None
        except OSError as e:
            raise SmtpClientError(f"connection lost in {stage}: {e}", stage=stage) from None
        enhanced, first = split_enhanced(lines[0])
        texts = [first]
        for more in lines[1:]:
            # Continuation lines usually repeat the enhanced code; Reply.lines() re-adds it.
            code_of_line, rest = split_enhanced(more)
            texts.append(rest if enhanced is not None and code_of_line == enhanced else more)
        return Reply(code, enhanced, "\n".join(texts))


def _parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) to their parameters; the first line is the greeting."""
    ext: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext


def _all_failed(
    reply: Reply, recipients: Sequence[str], *, mail_reply: Reply | None = None
) -> TransactionResult:
    return TransactionResult(mail_reply or reply, [RecipientResult(r, reply) for r in recipients])
