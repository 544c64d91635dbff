"""The connection to one filter, as an asyncio protocol: the I/O edge of ``milter/session.py``.

``FilterClient.open`` connects and negotiates within ``connect_timeout``; ``event`` writes an
event and, when the event is answered, waits for its verdict within ``read_timeout``
(``eom_timeout`` for the end of message, which a progress reply starts again); ``replies``
does the same for the end of message but hands out the modifications as they arrive, so a new
body streams through without being held. A write is waited for (within ``send_timeout``) only
when the socket's buffer fills up. Every failure (refused connection, timeout, closed socket,
protocol error) is a :class:`MilterFailure` naming the stage, what went wrong and its reason
(the metrics' label); the connection is closed then, and nothing more is sent on it.

Why a protocol and not streams: an event is one round trip, several per message, and each
costs what it does on the loop. The filter's bytes go straight from ``data_received`` into
the session's packet reader (no StreamReader buffer, no copy out of it), a wait is one future,
and the timeouts are one timer per connection that is re-armed only when it fires before the
deadline has passed (a wait sets the deadline; it does not make a timer, as
``asyncio.timeout`` would: timeouts are seconds, waits fractions of a millisecond).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Literal, cast

from mailgate.config import MilterSettings
from mailgate.milter import codec
from mailgate.milter.codec import MilterProtocolError
from mailgate.milter.session import FilterSession, Outgoing, Stage

PENDING_MAX = 256 * 1024  # unanswered events held back, and the socket buffer, at most
_PROGRESS = codec.parse_reply(ord("p"), b"")  # the one Progress the codec hands out


def _no_clock() -> float:
    raise RuntimeError("no loop: the filter connection was not opened")


# Why a filter failed, as the metrics count it (mailgate_milter_failures_total's reason).
FailureReason = Literal["connect", "timeout", "closed", "protocol", "io"]
FAILURE_REASONS: tuple[FailureReason, ...] = ("connect", "timeout", "closed", "protocol", "io")
_CLOSED_BY_PEER = (ConnectionResetError, BrokenPipeError)


class MilterFailure(Exception):
    """The filter cannot be used any more for this session."""

    def __init__(self, stage: Stage, problem: str, reason: FailureReason) -> None:
        super().__init__(f"{problem}, where={stage}")
        self.stage = stage
        self.problem = problem
        self.reason: FailureReason = reason


class FilterClient(asyncio.Protocol):
    """One filter, for one SMTP session."""

    def __init__(self, settings: MilterSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.session = FilterSession(
            {
                codec.CONNECT: settings.connect_macros,
                codec.HELO: settings.helo_macros,
                codec.MAIL: settings.mail_macros,
                codec.RCPT: settings.rcpt_macros,
                codec.DATA: settings.data_macros,
                codec.EOH: settings.eoh_macros,
                codec.BODYEOB: settings.eom_macros,
            }
        )
        self.transport: asyncio.Transport | None = None
        self.reused = False  # taken from the idle connections (milter/pool.py), not opened
        self.pending = bytearray()  # events not answered, not written yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = _no_clock
        self._broken: tuple[str, FailureReason] | None = None  # seen outside a wait
        self._waiter: asyncio.Future[codec.Reply | None] | None = None  # None: look again
        self._received = 0  # data_received calls (for "timeout before/during data read")
        self._deadline = 0.0
        self._timeout = 0.0  # the wait's, for the progress replies data_received reads
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timed_out = False
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        return self.transport is not None

    # -- the protocol's callbacks ------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # A write is waited for only when more than this is left unsent in its buffer.
        self.transport.set_write_buffer_limits(high=PENDING_MAX)

    def data_received(self, data: bytes) -> None:
        """The filter's bytes; the reply a wait is for, once whole, completes it here (the
        waiting task gets it as the future's result, and parses nothing more itself)."""
        self._received += 1
        session = self.session
        try:
            session.receive_data(data)
            waiter = self._waiter
            if waiter is None or waiter.done():
                return  # a reply that comes between two waits is read by the next one
            reply = session.next_reply()
            while reply is _PROGRESS:
                self._deadline = self._clock() + self._timeout
                reply = session.next_reply()
        except MilterProtocolError as exc:
            self._broken = (f"protocol error: {exc}", "protocol")
            self._wake()
            return
        if reply is not None:
            waiter.set_result(reply)

    def eof_received(self) -> bool | None:
        if self._broken is None:
            self._broken = ("connection closed by filter", "closed")
        self._wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._broken is None:
            if isinstance(exc, OSError) and not isinstance(exc, _CLOSED_BY_PEER):
                self._broken = (f"connection error: {exc.strerror or exc}", "io")
            else:
                self._broken = ("connection closed by filter", "closed")
        self._wake()
        self._resume()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resume()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- connecting ----------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and negotiate, both within ``connect_timeout``."""
        sock = self.settings.socket
        loop = self._loop = asyncio.get_running_loop()
        self._clock = loop.time
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                if sock.kind == "unix":
                    await loop.create_unix_connection(lambda: self, sock.path)
                else:
                    await loop.create_connection(lambda: self, sock.host, sock.port)
        except TimeoutError:
            raise MilterFailure(Stage.CONNECT, "timeout connecting to filter", "connect") from None
        except OSError as exc:
            # By errno: asyncio's own loop (the sendmail command's) words its strerror
            # "Connect call failed (…)" where uvloop's is the system's "Connection refused".
            why = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
            raise MilterFailure(
                Stage.CONNECT, f"error connecting to filter: {why}", "connect"
            ) from None
        if self._write(self.session.negotiate(), Stage.NEGOTIATE):
            await self._drain(Stage.NEGOTIATE)
        await self._next(Stage.NEGOTIATE, self.settings.connect_timeout)

    # -- events --------------------------------------------------------------------------------
    async def event(self, out: Outgoing, stage: Stage) -> codec.Verdict | None:
        """Send one event; its verdict if it is answered (a progress reply just waits on).
        An event that is not answered waits in ``pending`` and goes out with the next one
        (or at ``PENDING_MAX``): a filter that answers nothing before the end of the message
        gets it all in a few writes, as Postfix's buffered stream does."""
        data = out.data
        if not data:
            return None
        if not out.reply:
            self.pending += data
            if len(self.pending) >= PENDING_MAX and self._write(b"", stage):
                await self._drain(stage)
            return None
        if self._write(data, stage):
            await self._drain(stage)
        reply = await self._next(stage, self.settings.read_timeout)
        assert isinstance(reply, codec.Verdict)  # the session allows nothing else here
        return reply

    async def replies(self, out: Outgoing) -> AsyncIterator[codec.Reply]:
        """The end of message: send it, then each reply up to and with the verdict."""
        if self._write(out.data, Stage.EOM):
            await self._drain(Stage.EOM)
        session = self.session
        while True:
            yield await self._next(Stage.EOM, self.settings.eom_timeout)
            if session.awaiting is None:
                return

    def _write(self, data: bytes, stage: Stage) -> bool:
        """``pending`` and ``data`` in one write (one system call, usually); True if the
        socket's buffer is full and the caller must ``_drain`` before going on."""
        transport = self.transport
        if transport is None:
            raise MilterFailure(stage, "connection to filter closed", "closed")
        if self._broken is not None:
            raise self._fail(stage, *self._broken)
        if self.pending:
            data, self.pending = bytes(self.pending) + data, bytearray()
        transport.write(data)
        return self._paused

    async def _drain(self, stage: Stage) -> None:
        assert self._loop is not None
        while self._paused and self.transport is not None and self._broken is None:
            self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(self.settings.send_timeout):
                    await self._drained
            except TimeoutError:
                raise self._fail(stage, "timeout writing to filter", "timeout") from None
            finally:
                self._drained = None
        if self._broken is not None:
            raise self._fail(stage, *self._broken)

    async def _next(self, stage: Stage, timeout: float) -> codec.Reply:
        """The next reply to ``stage`` within ``timeout`` from now; a progress reply moves
        the deadline on and is not handed out."""
        loop, session = self._loop, self.session
        assert loop is not None
        self._deadline = loop.time() + timeout
        self._timeout = timeout
        received = self._received
        while True:
            if session.reader.pending:  # come already (the rest of an earlier read)
                try:
                    reply = session.next_reply()
                except MilterProtocolError as exc:
                    raise self._fail(stage, f"protocol error: {exc}", "protocol") from None
                if reply is _PROGRESS:
                    self._deadline = loop.time() + timeout
                    continue
                if reply is not None:
                    return reply
            if self._broken is not None:
                raise self._fail(stage, *self._broken)
            if self.transport is None:
                raise MilterFailure(stage, "connection to filter closed", "closed")
            if self._timer is None or self._timer_at > self._deadline:
                self._arm(self._deadline)
            waiter: asyncio.Future[codec.Reply | None] = loop.create_future()
            self._waiter = waiter
            try:
                reply = await waiter
            finally:
                self._waiter = None
            if reply is not None:
                return reply  # completed by data_received
            if self._timed_out:
                self._timed_out = False
                when = "during" if self._received != received else "before"
                raise self._fail(stage, f"timeout {when} data read", "timeout")

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """The one timer: a wait past its deadline times out; one whose deadline moved on
        gets the timer again; with no wait, the timer is not re-armed."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        assert self._loop is not None
        if self._loop.time() >= self._deadline:
            self._timed_out = True
            waiter.set_result(None)
        else:
            self._arm(self._deadline)

    def _fail(self, stage: Stage, problem: str, reason: FailureReason) -> MilterFailure:
        self.close()
        return MilterFailure(stage, problem, reason)

    # -- ending ----------------------------------------------------------------------------------
    def send_nowait(self, data: bytes) -> None:
        """ABORT and QUIT, which are not answered: written (after what is pending), not
        waited for."""
        transport = self.transport
        if data and transport is not None and self._broken is None:
            data, self.pending = bytes(self.pending) + data, bytearray()
            transport.write(data)

    def close(self) -> None:
        transport, self.transport = self.transport, None
        self.session.open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if transport is not None:
            transport.close()

    def quit(self) -> None:
        """The SMTP session is over: QUIT, and close."""
        self.send_nowait(self.session.quit())
        self.close()

    # -- kept for the next SMTP session (milter/pool.py) -----------------------------------------
    def reusable(self) -> bool:
        """Could the connection serve another SMTP session: up, never broken, no reply
        due, the filter's session open (not accepted or refused for good) and between
        transactions?"""
        s = self.session
        return (
            self.transport is not None
            and self._broken is None
            and self._waiter is None
            and s.open
            and s.awaiting is None
            and not s.in_message
        )

    def quit_new_connection(self) -> None:
        """QUIT_NC (after what is pending): the filter's session ends, the connection
        stays for the next one, whose first event is CONNECT."""
        self.send_nowait(self.session.quit_new_connection())
        self._received = 0
