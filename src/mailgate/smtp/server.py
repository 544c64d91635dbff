"""One SMTP connection on the wire: the asyncio transport, TLS, timeouts, and the one loop
that turns protocol events into session answers and writes them.

``SmtpServerProtocol`` is cheap per connection (an ``asyncio.Protocol``, no stream objects, no
thread) plus one task that walks through the protocol's events in order, so pipelined
commands are answered in order and the replies of a pipelined group leave in one write. It is
the only writer to the transport. The verbs and the transaction are the session core's
(``smtp/session.py``); this module counts bad commands, throttles refused recipients, closes,
applies the timeouts (shorter under stress) and swaps in TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable
from typing import Protocol

from mailgate import maillog, metrics, tls
from mailgate.milter import chain as milter_chain
from mailgate.policy import Client, ConnectDecision, connect_decision
from mailgate.reply import Reply
from mailgate.smtp.deadline import DeadlineWaits
from mailgate.smtp.limits import PER_IP_REFUSAL, Admission
from mailgate.smtp.listener import DIRECT, Arrival
from mailgate.smtp.protocol import (
    NEED_DATA,
    BadCommand,
    Command,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataFailed,
    Event,
    ServerConnection,
    Wait,
)
from mailgate.smtp.session import Answer, Session, SessionHost
from mailgate.smtp.tls_stream import TlsStream
from mailgate.snapshot import Snapshot

PAUSE_READING_AT = 256 * 1024  # unparsed pipelined input we hold before we stop reading
FLUSH_AT = 64 * 1024  # replies held back for one write before they go out anyway
_NOT_CONNECTED = Client("0.0.0.0")  # the client until connection_made knows its address

CONNECT_DECISIONS_KEPT = 4096  # clients whose connect decision a snapshot remembers
_GREETED = metrics.connection("greeted")
_STOPPING = metrics.connection("stopping")


class ServerHost(SessionHost, Protocol):
    """What a connection needs of the running gateway, beyond what its session needs."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def stressed(self) -> bool: ...

    @property
    def timeouts(self) -> tuple[float, float]:
        """The command and DATA timeouts in force now (shorter under stress)."""
        ...

    def session_started(self, connection: SmtpServerProtocol) -> None: ...

    def session_ended(self, connection: SmtpServerProtocol) -> None: ...

    @property
    def admission(self) -> Admission: ...

    async def lookup_client(self, client: Client) -> Client: ...

    def known_client(self, client: Client) -> Client | None:
        """``lookup_client``'s answer if it needs no lookup (a loopback client), else None."""
        ...


def _connect_decision(client: Client, snap: Snapshot) -> ConnectDecision:
    """``policy.connect_decision``, remembered per snapshot (a client connects again and
    again: the access lookups were made at each connection)."""
    known = snap.connect_decisions
    decision = known.get(client)
    if decision is None:
        if len(known) >= CONNECT_DECISIONS_KEPT:
            known.clear()
        decision = known[client] = connect_decision(client, snap.tables, snap.config)
    return decision


class _Closing(Exception):
    """The session must end after the replies already queued."""


class SmtpServerProtocol(DeadlineWaits, asyncio.Protocol):
    def __init__(self, host: ServerHost, arrival: Arrival = DIRECT) -> None:
        self.host = host
        self.arrival = arrival  # a PROXY header's client, else the socket's peer is
        self.snap: Snapshot = host.snapshot
        cfg = self.snap.config
        self.conn = ServerConnection(
            max_command_line=cfg.smtp.max_command_line,
            max_text_line=cfg.smtp.max_text_line,
            max_message_size=cfg.smtp.max_message_size or None,
        )
        self.transport: asyncio.Transport | None = None
        self.client = _NOT_CONNECTED
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.out: list[bytes] = []
        self.out_size = 0  # bytes in self.out
        self.paused = False  # reading paused: unparsed input over PAUSE_READING_AT
        self.write_paused = False  # the transport's write buffer is over its high mark
        self.writable: asyncio.Future[None] | None = None
        self.closed = False
        self.tls_stream: TlsStream | None = None  # TLS over the plain transport
        self.tls_error: ssl.SSLError | None = None
        self.admitted = False  # counted in the admission's counts (connection_made)
        self.bad_commands = 0
        self.bad_rcpts = 0
        self.flood_logged = False  # the "Possible SMTP RCPT flood" line, once a session
        self.connected_at = time.monotonic()
        self.last_input = self.connected_at  # when bytes last arrived (the DATA timeout)
        self.last_line = self.connected_at  # when a content line last ended (under stress)
        # The daemon is stopping: said (then the connection closes) once no transaction is
        # open, so a message under way is finished first.
        self.closing_reply: Reply | None = None
        # loop() waits for input, and _pump may answer what arrives (in data_received).
        self.parked = False
        self.waiting_since = self.connected_at  # when the last event was taken
        # What _pump leaves to the task: the work it could not do without waiting, the end
        # of the session, or an error (raised in the task, where run() reports it).
        self.pending: Awaitable[None] | None = None
        self.finished = False
        self.failure: Exception | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # PROXY protocol: the client the header named, never the proxy (smtp/listener.py).
        peer = self.arrival.client or transport.get_extra_info("peername") or ("0.0.0.0", 0)
        ip = peer[0]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        # A PROXY LOCAL / UNKNOWN header names no client: the peer is the proxy itself.
        self.client = Client(
            ip, unidentified=self.arrival.proxy is not None and not self.arrival.client
        )
        self.connected_at = time.monotonic()
        # Counted from here only if let in (smtp/limits.py); open() answers a refused one.
        self.admitted = self.host.admission.admit(
            self.client, self.snap.config.smtp.max_connections_per_ip
        )
        # Kept: asyncio.get_running_loop() costs a getpid() system call on each call.
        self.event_loop = loop = asyncio.get_running_loop()
        self.host.session_started(self)
        # The greeting goes out from here when nothing before it must wait; else from run().
        self.task = loop.create_task(self.run(self._greet_at_once()))
        if self.arrival.early:  # PROXY protocol: what the client sent behind the header
            self.data_received(self.arrival.early)

    def data_received(self, data: bytes) -> None:
        self.last_input = time.monotonic()
        if self.tls_stream is not None:
            self._tls_received(data)
        else:
            self.conn.receive_data(data)
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            if self.parked and not self.write_paused and self.session is not None:
                self._pump(self.session)  # wakes the task only if it has work for it
            else:
                wakeup.set_result(None)  # _wake(), inline: once per received block
        if not self.paused and self.conn.pending_bytes > PAUSE_READING_AT and self.transport:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.tls_stream is not None:
            self._tls_received(b"")
        else:
            self.conn.receive_data(b"")
        self._wake()
        # Keep the transport open: a client that half-closes after DATA still gets its 250
        # (run() closes the connection once the protocol reports ConnectionClosed).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self.conn.receive_data(b"")
        self._wake()
        if self.admitted:  # asyncio calls this once per connection
            self.host.admission.release(self.client.ip)
        self.host.session_ended(self)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop taking its commands (their input then
        # fills to PAUSE_READING_AT and reading stops too), so memory stays bounded.
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

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

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    # -- output --------------------------------------------------------------------------------
    def send(self, reply: Reply) -> None:
        """Queue a reply; the protocol sees it too (a 354 starts the message content)."""
        data = self.conn.send(reply)
        self.out.append(data)
        self.out_size += len(data)

    def flush(self) -> None:
        if not self.out:
            return  # each wait flushes; most find the replies gone already
        if self.transport and not self.closed:
            data = b"".join(self.out)
            if self.tls_stream is not None:
                self.tls_stream.send(data)
                data = self.tls_stream.outgoing()
            self.transport.write(data)
        self.out.clear()
        self.out_size = 0

    def drain(self, reply: Reply) -> None:
        """The daemon is stopping: end the transaction in progress, then say ``reply`` and
        close (at once if the client is between transactions)."""
        self.closing_reply = reply
        self._wake()

    def _closing_now(self, session: Session) -> Reply | None:
        """The stop's reply, if the session may be closed now (no transaction open)."""
        return self.closing_reply if session.tx is None else None

    def shut_down(self, reply: Reply) -> None:
        """The daemon is stopping: say so (through TLS if it is on) and close."""
        self.send(reply)
        self.flush()
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is None or self.closed:
            return
        if self.tls_stream is not None and self.tls_error is None:
            with contextlib.suppress(Exception):
                self.transport.write(self.tls_stream.close())
        self.transport.close()

    # -- waiting -------------------------------------------------------------------------------
    async def wait_input(self, timeout: float) -> bool:
        """Wait for more input; False on timeout (one timer for all the connection's waits:
        ``smtp/deadline.py``)."""
        self.flush()
        if self.paused and self.transport:
            self.paused = False
            self.transport.resume_reading()
        loop = self.event_loop
        self._timed_out = False
        self.wakeup = loop.create_future()
        self.arm(loop.time() + timeout)
        try:
            await self.wakeup
        finally:
            self.disarm()
            self.wakeup = None
        return not self._timed_out

    _timed_out = False

    def deadline_expired(self) -> None:
        self._timed_out = True
        self._wake()

    def timeouts_changed(self) -> None:
        """Stress mode began: a session waiting on the old, longer timeout looks again."""
        self._wake()

    async def wait_writable(self, timeout: float) -> bool:
        """Wait until the transport's buffer drains; False on timeout."""
        self.writable = self.event_loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.writable
        except TimeoutError:
            return False
        finally:
            self.writable = None
        return not self.closed

    @property
    def relay_text(self) -> str:
        if self.session is not None:
            return self.session.relay_text
        return maillog.relay_name(self.client.ip, None)

    # -- the connection ------------------------------------------------------------------------
    async def run(self, session: Session | None = None) -> None:
        """The session, greeted already (``session``: ``_greet_at_once``) or not."""
        try:
            if session is None:
                session = await self.open()
            if session is not None:
                await self.loop(session)
        except _Closing:
            pass
        except Exception as exc:  # never let one session's bug kill the daemon
            maillog.session_failed(self.relay_text, exc)
            with contextlib.suppress(Exception):
                self.send(
                    Reply(
                        421,
                        "4.3.0",
                        f"{self.snap.config.hostname} Internal error; closing connection",
                    )
                )
        finally:
            self.stop_timer()
            ended = self.session
            if ended is not None:
                ended.end(lost=False)  # once: a QUIT or the client's close wrote them already
                ended.abandon()
                # The session holds our flush (before_wait): left in place, every connection
                # would end as a reference cycle (with its task, transport and buffers) that
                # only the garbage collector frees.
                self.session = None
            with contextlib.suppress(ssl.SSLError):
                self.flush()
            if ended is not None:
                ended.hand_over()  # the last replies (a 221) are out: the message's attempt
            self._close_transport()

    async def open(self) -> Session | None:
        """The connect stage: admission, the client's PTR, access Connect:, the greet pause,
        then the greeting (or the early talker's 554). None: closed already."""
        if self.closing_reply is not None:  # a node being drained: at once, no lookups
            self.send(self.closing_reply)
            return None
        if not self.admitted:
            self.host.count(metrics.connection("per_ip_limit"))
            self.host.count(metrics.rejection("throttle"))
            # As Sendmail's conncontrol logs it (no PTR lookup for a client refused at once).
            ip = self.client.ip
            maillog.reject(None, "check_relay", f"[{ip}]", f"[{ip}]", str(PER_IP_REFUSAL), ip)
            self.send(PER_IP_REFUSAL)
            return None
        self.client = client = await self.host.lookup_client(self.client)
        decision = _connect_decision(client, self.snap)
        session = self._start_session(client, decision)
        if decision.refusal is None and self.snap.config.milter and self.transport is not None:
            # The filters hear of the client after our own Connect: check (milter/chain.py).
            bye = await milter_chain.attach(session, self.transport, self.arrival.client)
            if bye is not None:
                self.send(bye)
                return None
        if decision.greet_pause > 0:
            # The pause runs from the connect, so the PTR lookup above is part of it.
            remaining = decision.greet_pause - (time.monotonic() - self.connected_at)
            # Input or EOF before the greeting is pre-greeting traffic, as for Sendmail (whose
            # select() sees an EOF as readable); a hang-up ends the pause at once, so the
            # session does not hold its place for it.
            if remaining > 0 and not self._talked_first() and self.closing_reply is None:
                await self.wait_input(remaining)
            if self._talked_first():
                self.send(session.early_talk(int(time.monotonic() - self.connected_at)).reply)
                return session
        if self.closing_reply is not None:
            if decision.refusal is None:
                self.host.count(_STOPPING)
            self.send(self.closing_reply)  # the daemon began to stop during the connect stage
            return None
        if decision.refusal is None:
            self.host.count(_GREETED)
        greeting = session.greeting()
        self.send(greeting.reply)
        return None if greeting.close else session

    def _start_session(self, client: Client, decision: ConnectDecision) -> Session:
        self.session = session = Session(
            self.host, self.snap, client, decision, before_wait=self.flush
        )
        if decision.refusal is not None:
            self.host.count(metrics.connection("access_refused"))
            self.host.count(metrics.rejection("access"))
            # Sendmail's {client_name} $| {client_addr}: a name only if confirmed.
            maillog.reject(
                None,
                "check_relay",
                client.verified_name or f"[{client.ip}]",
                session.relay_text,
                str(decision.refusal),
                client.ip,
            )
        return session

    def _greet_at_once(self) -> Session | None:
        """``open`` without a task step, when no part of the connect stage must wait: the
        client's PTR needs no lookup, no greet pause, no filters to tell, not stopping.
        None: ``open`` does it all."""
        if self.closing_reply is not None or not self.admitted or self.snap.config.milter:
            return None
        client = self.host.known_client(self.client)
        if client is None:
            return None
        decision = _connect_decision(client, self.snap)
        if decision.greet_pause > 0 or decision.closes:
            return None  # a closing refusal is the greeting, and the end: ``open``
        self.client = client
        session = self._start_session(client, decision)
        if decision.refusal is None:
            self.host.count(_GREETED)
        self.send(session.greeting().reply)
        self.flush()
        return session

    def _talked_first(self) -> bool:
        """Input, an EOF or a hang-up before the greeting: pre-greeting traffic."""
        return bool(self.conn.pending_bytes or self.conn.peer_closed or self.closed)

    async def loop(self, session: Session) -> None:
        """Events to answers, in order. Most are answered without this task: while it waits
        for input, ``data_received`` takes what needs no waiting itself (``_pump``); the
        rest, and every wait, are here."""
        conn = self.conn
        self.waiting_since = self.last_input = time.monotonic()
        while True:
            if (failure := self.failure) is not None:
                self.failure = None
                raise failure
            if self.finished:
                return
            work = self.pending
            if work is not None:
                self.pending = None
            else:
                event = conn.next_event()
                if event is NEED_DATA:
                    if not await self._wait_for_input(session):
                        return
                    continue
                work = self._handle(event, session)
            if work is not None:
                await work
            if self.out_size >= FLUSH_AT:
                self.flush()
            if self.write_paused and not await self.wait_writable(
                self.snap.config.smtp.command_timeout
            ):
                maillog.write_timeout(self.relay_text)
                self.host.count(metrics.event("timeout"))
                return

    def _input_timeout(self, session: Session) -> float:
        """Seconds left for the input awaited now. A command must arrive whole within
        command_timeout (a client trickling a byte at a time does not keep the session); DATA
        content is timed per read. Both are measured from a fixed start, so a wake-up (stress
        mode began, a byte arrived) shortens the wait instead of restarting it."""
        command_timeout, data_timeout = self.host.timeouts
        tx = session.tx
        if tx is not None and tx.msg is not None:
            # Under stress, as Postfix's smtpd_per_record_deadline: a content line must be
            # complete within the timeout, so a byte a second does not hold DATA open.
            since = self.last_line if self.host.stressed else self.last_input
            return data_timeout - (time.monotonic() - since)
        return command_timeout - (time.monotonic() - self.waiting_since)

    async def _wait_for_input(self, session: Session) -> bool:
        """Wait until there is input (or work from ``_pump``); False: the session ends."""
        # _closing_now(), inline: asked at every wait.
        if (bye := self.closing_reply) is not None and session.tx is None:
            self.send(bye)
            return False
        timeout = self._input_timeout(session)
        self.parked = True
        try:
            if session.unsent is not None and timeout > session.HOLD_SECONDS:
                # A message waits for the client's next command to be handed over: not
                # longer than this (Session.data_end). Its 250 goes out now, then its log line.
                self.flush()
                session.log_unsent()
                if not await self.wait_input(session.HOLD_SECONDS):
                    session.hand_over()
                return True
            if timeout > 0 and await self.wait_input(timeout):
                return True
        finally:
            self.parked = False
        # Timed out. (A deadline _pump moved later is the one the timer waits for: see
        # smtp/deadline.py.)
        tx = session.tx
        in_data = tx is not None and tx.msg is not None
        maillog.input_timeout(self.relay_text, "DATA" if in_data else "command")
        self.host.count(metrics.event("timeout"))
        self.send(
            Reply(
                421,
                "4.4.2",
                f"{self.snap.config.hostname} Lost input channel: timeout; closing connection",
            )
        )
        return False

    def _pump(self, session: Session) -> None:
        """In ``data_received``, while ``loop`` waits for input: the events answered without
        waiting (every command but a MAIL whose sender domain is looked up, content, most
        refusals) are answered here, a hop through the loop's task fewer each. The first that
        needs waiting (the end of DATA, a throttle, STARTTLS) or ends the session goes to the
        task, which then takes over where this stopped."""
        conn = self.conn
        try:
            while not self.write_paused:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                work = self._handle(event, session)
                if work is not None:
                    self.pending = work
                    break
                if self.finished:
                    break
                if self.out_size >= FLUSH_AT:
                    self.flush()
        except _Closing:
            self.finished = True
        except Exception as exc:  # raised again in the task: run() reports it
            self.failure = exc
        self.flush()
        if (
            self.pending is not None
            or self.finished
            or self.failure is not None
            or self.write_paused
            or self.closing_reply is not None
        ):
            self._wake()
            return
        timeout = self._input_timeout(session)
        if session.unsent is not None:
            timeout = min(timeout, session.HOLD_SECONDS)
        if timeout <= 0:
            self._wake()
        else:
            self.arm(self.event_loop.time() + timeout)  # the wait in progress goes on

    def _handle(self, event: Event | Wait, session: Session) -> Awaitable[None] | None:
        """Answer one event; what must wait (or may raise ``_Closing``) comes back as a
        coroutine for the task to await."""
        self.waiting_since = now = time.monotonic()
        held = session.unsent is not None  # answered a message: handed over after this reply
        work: Awaitable[None] | None = None
        if isinstance(event, DataChunk):
            if 10 in event.data:  # an int needle: no buffer protocol
                self.last_line = now
            session.data_chunk(event.data)
        elif isinstance(event, Command):
            verb = event.verb
            if (bye := self.closing_reply) is not None and session.tx is None and verb != "QUIT":
                self.send(bye)
                raise _Closing
            got = session.answer_to(
                event, pipelined=self.conn.pending_bytes if verb == "DATA" else 0
            )
            if isinstance(got, Answer):
                if got.reply.code == 354:
                    self.last_line = time.monotonic()
                if got.rcpt or got.bad or got.close or got.starttls:
                    work = self.answer(got)
                else:
                    self.send(got.reply)  # nothing comes with it (answer() would only send)
            else:
                work = self._answer_when(got)
        elif isinstance(event, DataEnd):
            return self._answer_when(session.data_end(event.size))
        elif isinstance(event, DataFailed):
            work = self.answer(session.data_failed(event.reply, event.size))
        elif isinstance(event, BadCommand):
            if event.fatal:
                self.refuse_framing(event.reply)
            work = self.answer(Answer(event.reply, bad=True))
        elif isinstance(event, ConnectionClosed):
            if self.tls_error is not None:
                maillog.tls_read_failed(self.relay_text, self.tls_error)
            session.connection_closed()
            self.finished = True
        else:  # PAUSED: the protocol is done with this connection
            self.finished = True
        if held:
            self.flush()  # the reply after a 250: out first, then the message's attempt
            session.hand_over()
        return work

    async def _answer_when(self, answer: Awaitable[Answer]) -> None:
        work = self.answer(await answer)
        if work is not None:
            await work

    def answer(self, answer: Answer) -> Awaitable[None] | None:
        """Write an answer, and do what comes with it: Sendmail's BadRcptThrottle and
        MaxBadRcpts for recipients, the bad command count, the close (``_Closing``), the TLS
        start; the throttle's pause and the TLS handshake come back as a coroutine."""
        smtp = self.snap.config.smtp
        if answer.rcpt:
            # As Sendmail's: the RCPT after the one that reached the threshold is the first
            # slowed down, and logs the flood (a client that stops there is no flood).
            throttled = smtp.bad_rcpt_throttle and self.bad_rcpts >= smtp.bad_rcpt_throttle
            if answer.refused:
                self.bad_rcpts += 1
            if throttled:
                if not self.flood_logged:
                    self.flood_logged = True
                    self.host.count(metrics.event("rcpt_throttled"))
                    maillog.rcpt_flood(self.relay_text)
                return self._throttled(answer)
        return self._answer_now(answer)

    async def _throttled(self, answer: Answer) -> None:
        self.flush()
        await asyncio.sleep(self.snap.config.smtp.bad_rcpt_throttle_delay)
        work = self._answer_now(answer)
        if work is not None:
            await work

    def _answer_now(self, answer: Answer) -> Awaitable[None] | None:
        smtp = self.snap.config.smtp
        if answer.starttls:
            # Plaintext a client pipelined behind STARTTLS must not run inside TLS (RFC 3207
            # 4.2, CVE-2011-0411): dropped before the 220 goes out.
            dropped = self.conn.discard_pending()
            if dropped:
                maillog.starttls_plaintext_dropped(self.relay_text, dropped)
        if answer.bad:
            self.bad_commands += 1
            if self.bad_commands > smtp.max_bad_commands:
                # As Sendmail's MAXBADCOMMANDS: the one over the limit gets this, not its reply.
                self.send(
                    Reply(
                        421,
                        "4.7.0",
                        f"{self.snap.config.hostname} Too many bad commands; closing connection",
                    )
                )
                raise _Closing
        self.send(answer.reply)
        if (
            answer.rcpt
            and answer.refused
            and smtp.max_bad_rcpts
            and self.bad_rcpts >= smtp.max_bad_rcpts
        ):
            self.host.count(metrics.event("bad_rcpt_disconnect"))
            self.send(
                Reply(
                    421,
                    "4.7.0",
                    f"{self.snap.config.hostname} Too many bad recipients; closing connection",
                )
            )
            raise _Closing
        if answer.close:
            raise _Closing
        if answer.starttls:
            return self._start_tls()
        return None

    def refuse_framing(self, reply: Reply) -> None:
        """A command line with a bare CR or LF: answered as Postfix does, logged, closed."""
        self.host.count(metrics.event("bare_newline"))
        self.host.count(metrics.rejection("protocol"))
        maillog.bare_newline(self.relay_text, reply.text)
        self.send(Reply(reply.code, reply.enhanced, f"{self.snap.config.hostname} {reply.text}"))
        raise _Closing

    async def _start_tls(self) -> None:
        """RFC 3207: after the 220, the handshake, then a fresh start (no HELO, no MAIL)."""
        context = self.snap.config.tls.server_context
        assert context is not None and self.session is not None
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
            why = (
                repr(self.tls_error)
                if self.tls_error is not None
                else (
                    "timeout" if not self.closed and not stream.peer_closed else "connection closed"
                )
            )
            maillog.starttls_accept_failed(self.relay_text, why)
            self.host.count(metrics.tls("server", ok=False))
            self.tls_error = self.tls_error or ssl.SSLError(why)
            raise _Closing
        described = tls.describe(stream.ssl_object, verify="NOT")
        self.session.tls_started(described)
        maillog.starttls_server(self.relay_text, described)
        self.host.count(metrics.tls("server", ok=True))
