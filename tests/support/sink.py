"""A hand-written SMTP sink on loopback for tests (asyncio in a background thread).

Written by hand rather than with aiosmtpd so that it can observe how commands arrive on the wire
(which read each command came in, to check PIPELINING) and can misbehave on demand.

    with SinkServer() as sink:
        sink.rcpt_reply["bad@example.com"] = "550 5.1.1 No such user"
        ... deliver ...
        [msg] = sink.wait_for(1, timeout=5)

To play an unreliable next hop: ``greeting = "421 ..."`` (or ``greeting_for[ip]``, that
client's alone: one node's way to this hop is down), ``mail_reply`` / ``rcpt_reply`` /
``rcpt_default_reply`` / ``data_reply`` with 4xx or 5xx, ``hang("greeting")`` (accept and say
nothing) or ``hang("ehlo")`` (220, then silence), ``close_in_data = n`` (drop the connection
after n bytes of content), ``stall_in_data = n`` (stop reading there); ``normal()`` makes it
a well-behaved server again. A transaction cut short by the sink is recorded with
``completed=False`` and its ``data_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from types import TracebackType

from tests.support.wait import wait_until


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # after dot-unstuffing, CRLF line ends; b"" when the sink discards data
    peer: str  # client IP
    helo: str
    size: int = 0  # length of the (unstuffed) data, also when discarded
    sha256: str = ""  # of the unstuffed data
    mail_options: list[str] = field(default_factory=list)  # e.g. ["SIZE=123", "BODY=8BITMIME"]
    pipelined: bool = False  # MAIL, RCPTs and DATA arrived in one read
    connection: int = 0  # serial number of the connection it came on (1, 2, ...)
    tls: str | None = None  # the TLS version, when it came through STARTTLS


@dataclass
class SinkTransaction:
    """Every MAIL transaction seen, including those that never reached the content."""

    mail_from: str
    rcpt_tos: list[str]  # accepted recipients
    rcpt_refused: list[str]
    pipelined: bool
    connection: int
    mail_options: list[str] = field(default_factory=list)
    completed: bool = False  # content received and 250 given
    data_size: int = 0  # content bytes received (when the sink cut it short: how far it got)


def _addr(arg: str) -> tuple[str, list[str]]:
    """Split ``FROM:<a@b> SIZE=1`` / ``TO:<a@b>`` into the address and the parameters."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return rest[1:], []
        return rest[1:end], rest[end + 1 :].split()
    parts = rest.split()
    return (parts[0] if parts else ""), parts[1:]


class _Session:
    def __init__(
        self,
        sink: SinkServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        serial: int,
    ) -> None:
        self.sink = sink
        self.reader = reader
        self.writer = writer
        self.serial = serial
        self.buf = bytearray()
        self.pos = 0
        self.batch = 0  # number of the read that delivered the current data
        peer = writer.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.helo = ""
        self.tls: str | None = None
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpts: list[str] = []
        self.refused: list[str] = []
        self.batches: set[int] = set()

    async def read_line(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos : i + 1])
                self.pos = i + 1
                return line
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            data = await self.reader.read(65536)
            if not data:
                return None
            self.batch += 1
            self.buf += data

    async def send(self, line: str) -> None:
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await self.writer.drain()

    async def stage(self, name: str) -> bool:
        """Apply a configured delay / drop for a stage; False when the connection is dropped."""
        delay = self.sink.delays.get(name)
        if delay:
            await asyncio.sleep(delay)
        if self.sink.close_at == name:
            self.writer.close()
            return False
        return True

    async def run(self) -> None:
        sink = self.sink
        if not await self.stage("greeting"):
            return
        greeting = sink.greeting_for.get(self.peer, sink.greeting)
        await self.send(greeting)
        if not greeting.startswith("220"):
            self.writer.close()
            return
        while True:
            raw = await self.read_line()
            if raw is None:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            sink._record_command(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb in ("MAIL", "RCPT", "DATA"):
                self.batches.add(self.batch)
            if not await self.stage(verb.lower()):
                return
            if verb == "EHLO":
                if not sink.ehlo_supported:
                    await self.send("502 5.5.2 Command not recognized")
                    continue
                self.helo = arg
                self.reset()
                ext = [f"250-{sink.hostname} Hello"]
                ext += [
                    f"250-{e}" for e in sink._extensions() if not (self.tls and e == "STARTTLS")
                ]
                ext[-1] = ext[-1].replace("250-", "250 ", 1)
                await self.send("\r\n".join(ext))
            elif verb == "HELO":
                self.helo = arg
                self.reset()
                await self.send(f"250 {sink.hostname} Hello")
            elif verb == "MAIL":
                if self.mail_from is not None:
                    await self.send("503 5.5.1 Nested MAIL command")
                    continue
                addr, opts = _addr(arg)
                reply = sink.mail_reply or "250 2.1.0 Ok"
                if reply.startswith("2"):
                    self.mail_from, self.mail_options = addr, opts
                await self.send(reply)
            elif verb == "RCPT":
                if self.mail_from is None:
                    await self.send("503 5.5.1 Need MAIL command")
                    continue
                addr, _ = _addr(arg)
                reply = sink.rcpt_reply.get(addr) or sink.rcpt_reply.get(addr.lower())
                reply = reply or sink.rcpt_default_reply or "250 2.1.5 Ok"
                (self.rcpts if reply.startswith("2") else self.refused).append(addr)
                await self.send(reply)
            elif verb == "DATA":
                if self.mail_from is None:
                    await self.send("503 5.5.1 Need MAIL command")
                    continue
                if sink.data_cmd_reply:
                    await self.send(sink.data_cmd_reply)
                    continue
                if not self.rcpts:
                    # RFC 2920: DATA after all RCPTs failed gets 554 and no 354.
                    self._record_transaction(completed=False)
                    await self.send("554 5.5.1 No valid recipients")
                    self.reset()
                    continue
                await self.send("354 End data with <CR><LF>.<CR><LF>")
                if not await self.read_data():
                    return
            elif verb == "RSET":
                if self.mail_from is not None:
                    self._record_transaction(completed=False)
                self.reset()
                await self.send("250 2.0.0 Ok")
            elif verb == "STARTTLS" and sink.tls_context is not None and self.tls is None:
                await self.send("220 2.0.0 Ready to start TLS")
                del self.buf[:]
                self.pos = 0
                try:
                    await self.writer.start_tls(sink.tls_context)
                except (OSError, ssl.SSLError):
                    return
                ssl_object = self.writer.get_extra_info("ssl_object")
                self.tls = ssl_object.version() if ssl_object else "?"
                self.helo = ""
                self.reset()
            elif verb == "NOOP":
                await self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                await self.send("221 2.0.0 Bye")
                self.writer.close()
                return
            else:
                await self.send("502 5.5.2 Command not recognized")

    async def read_data(self) -> bool:
        sink = self.sink
        keep = not sink.discard_data
        parts: list[bytes] = []
        digest = hashlib.sha256()
        size = 0
        while True:
            line = await self.read_line()
            if line is None:
                return False
            if line == b".\r\n" or line == b".\n":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            digest.update(line)
            if keep:
                parts.append(line)
            if sink.close_in_data is not None and size >= sink.close_in_data:
                # Gone in the middle of the content: the final dot is never answered.
                self._record_transaction(completed=False, data_size=size)
                self.writer.close()
                return False
            if sink.stall_in_data is not None and size >= sink.stall_in_data:
                # Stops reading: the client's writes block once the socket buffers are full.
                self._record_transaction(completed=False, data_size=size)
                await asyncio.sleep(sink.HANG)
                return False
        if not await self.stage("data_end"):
            self._record_transaction(completed=False, data_size=size)
            return False
        reply = sink.data_reply or "250 2.0.0 Ok: queued"
        if reply.startswith("2"):
            assert self.mail_from is not None
            msg = SinkMessage(
                mail_from=self.mail_from,
                rcpt_tos=list(self.rcpts),
                data=b"".join(parts),
                peer=self.peer,
                helo=self.helo,
                tls=self.tls,
                size=size,
                sha256=digest.hexdigest(),
                mail_options=list(self.mail_options),
                pipelined=len(self.batches) == 1,
                connection=self.serial,
            )
            self._record_transaction(completed=True, data_size=size)
            sink._record_message(msg)
        else:
            self._record_transaction(completed=False, data_size=size)
        self.reset()
        await self.send(reply)
        return True

    def _record_transaction(self, *, completed: bool, data_size: int = 0) -> None:
        assert self.mail_from is not None
        self.sink._record_transaction(
            SinkTransaction(
                mail_from=self.mail_from,
                rcpt_tos=list(self.rcpts),
                rcpt_refused=list(self.refused),
                pipelined=len(self.batches) == 1,
                connection=self.serial,
                mail_options=list(self.mail_options),
                completed=completed,
                data_size=data_size,
            )
        )


class SinkServer:
    """SMTP server that stores what it receives; behaviour attributes may change at any time."""

    HANG = 3600.0  # seconds a hung stage waits: longer than any client timeout in the tests

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, hostname: str = "sink.test"
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        # Behaviour, settable at runtime.
        self.greeting = f"220 {hostname} ESMTP sink"
        self.greeting_for: dict[str, str] = {}  # client IP -> its greeting instead
        self.rcpt_reply: dict[str, str] = {}
        self.rcpt_default_reply: str | None = None  # for recipients not in rcpt_reply
        self.mail_reply: str | None = None
        self.data_reply: str | None = None  # reply after the content (end of data)
        self.data_cmd_reply: str | None = None  # refuse the DATA command itself with this
        self.ehlo_supported = True
        self.pipelining = True
        self.eightbitmime = True
        self.smtputf8 = False
        self.size: int | None = 0  # SIZE advertised (0 = no limit given); None = not advertised
        self.extra_extensions: list[str] = []
        self.tls_context: ssl.SSLContext | None = None  # set: STARTTLS is offered
        self.delays: dict[str, float] = {}  # stage ("greeting", "mail", "data_end", ...) -> seconds
        self.close_at: str | None = None  # drop the connection at this stage
        self.discard_data = False  # keep only size and sha256 (large-message tests)
        self.close_in_data: int | None = None  # drop the connection after this much content
        self.stall_in_data: int | None = None  # stop reading after this much content
        # Observations.
        self.messages: list[SinkMessage] = []
        self.transactions: list[SinkTransaction] = []
        self.commands: list[str] = []  # every command line received, without CRLF
        self.connections = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def hang(self, stage: str) -> None:
        """Go silent at ``stage`` ("greeting": accept and say nothing; "ehlo": 220, then no
        answer; "data": no 354; "data_end": the content read, never answered)."""
        self.delays[stage] = self.HANG

    def normal(self) -> None:
        """Behave as a healthy server again (sessions already hung stay hung)."""
        self.greeting = f"220 {self.hostname} ESMTP sink"
        self.greeting_for.clear()
        self.rcpt_reply.clear()
        self.rcpt_default_reply = None
        self.mail_reply = self.data_reply = self.data_cmd_reply = None
        self.delays.clear()
        self.close_at = None
        self.close_in_data = self.stall_in_data = None

    def _extensions(self) -> list[str]:
        ext: list[str] = []
        if self.pipelining:
            ext.append("PIPELINING")
        if self.size is not None:
            ext.append(f"SIZE {self.size}" if self.size else "SIZE")
        if self.eightbitmime:
            ext.append("8BITMIME")
        if self.smtputf8:
            ext.append("SMTPUTF8")
        if self.tls_context is not None:
            ext.append("STARTTLS")
        ext += self.extra_extensions
        ext.append("ENHANCEDSTATUSCODES")
        return ext

    # -- observations (called from the server thread) -----------------------------------------

    def _record_command(self, line: str) -> None:
        with self._cond:
            self.commands.append(line)

    def _record_transaction(self, t: SinkTransaction) -> None:
        with self._cond:
            self.transactions.append(t)
            self._cond.notify_all()

    def _record_message(self, m: SinkMessage) -> None:
        with self._cond:
            self.messages.append(m)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[SinkMessage]:
        """Block until at least ``count`` messages arrived; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout=timeout):
                raise TimeoutError(f"sink got {len(self.messages)} of {count} messages")
            return list(self.messages)

    def with_subject(self, subject: str) -> list[SinkMessage]:
        needle = f"\r\nSubject: {subject}\r\n".encode()
        return [m for m in list(self.messages) if needle in m.data]

    def wait_subject(
        self, subject: str, count: int = 1, timeout: float = 15.0
    ) -> list[SinkMessage]:
        """The messages with this Subject once there are ``count`` of them."""
        return wait_until(
            lambda: len(found := self.with_subject(subject)) >= count and found,
            lambda: (
                f"{count} message(s) with subject {subject!r} at {self.hostname} "
                f"(got {len(self.with_subject(subject))})"
            ),
            timeout,
        )

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.transactions.clear()
            self.commands.clear()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        with self._cond:
            self.connections += 1
            serial = self.connections
        try:
            await _Session(self, reader, writer, serial).run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    def start(self) -> None:
        """Start serving (again, on the same port after ``stop()``)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                try:
                    self._server = await asyncio.start_server(
                        self._handle, self.host, self.port, reuse_address=True
                    )
                    self.port = self._server.sockets[0].getsockname()[1]
                except BaseException as e:
                    error.append(e)
                finally:
                    ready.set()

            loop.run_until_complete(boot())
            if not error:
                loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="SinkServer", daemon=True)
        self._thread.start()
        if not ready.wait(10) or error:
            self._thread.join(5)
            raise RuntimeError(f"sink failed to start: {error}")

    def stop(self) -> None:
        """Close the listener and every open connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(5)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> SinkServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
