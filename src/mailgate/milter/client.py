"""The connection to one filter, on asyncio streams: the I/O edge of ``milter/session.py``.

``FilterClient.open`` connects and negotiates within ``connect_timeout``; ``event`` writes an
event (each write drained within ``send_timeout``) and, when the event is answered, reads
until its verdict within ``read_timeout`` (``eom_timeout`` for the end of message, which a
progress reply starts again); ``replies`` does the same for the end of message but hands out
the modifications as they arrive, so a new body streams through without being held. Every
failure (refused connection, timeout, closed socket, protocol error) is a
:class:`MilterFailure` naming the stage and what went wrong; the connection is closed then,
and nothing more is sent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from mailgate.config import MilterSettings
from mailgate.milter import codec
from mailgate.milter.codec import MilterProtocolError
from mailgate.milter.session import FilterSession, Outgoing, Stage

READ_SIZE = 64 * 1024
PENDING_MAX = 256 * 1024  # unanswered events held back, and the socket buffer, at most


class MilterFailure(Exception):
    """The filter cannot be used any more for this session."""

    def __init__(self, stage: Stage, problem: str) -> None:
        super().__init__(f"{problem}, where={stage}")
        self.stage = stage
        self.problem = problem


class FilterClient:
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
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending = bytearray()  # events not answered, not written yet

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def open(self) -> None:
        """Connect and negotiate, both within ``connect_timeout``."""
        sock = self.settings.socket
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                if sock.kind == "unix":
                    self.reader, self.writer = await asyncio.open_unix_connection(sock.path)
                else:
                    self.reader, self.writer = await asyncio.open_connection(sock.host, sock.port)
        except TimeoutError:
            raise MilterFailure(Stage.CONNECT, "timeout connecting to filter") from None
        except OSError as exc:
            raise MilterFailure(
                Stage.CONNECT, f"error connecting to filter: {exc.strerror or exc}"
            ) from None
        await self._write(self.session.negotiate(), Stage.NEGOTIATE)
        deadline = time.monotonic() + self.settings.connect_timeout
        async for _ in self._replies(Stage.NEGOTIATE, deadline):
            pass

    async def event(self, out: Outgoing, stage: Stage) -> codec.Verdict | None:
        """Send one event; its verdict if it is answered (a progress reply just waits on).
        An event that is not answered waits in ``pending`` and goes out with the next one
        (or at ``PENDING_MAX``): a filter that answers nothing before the end of the message
        gets it all in a few writes, as Postfix's buffered stream does."""
        if not out.sent:
            return None
        if not out.reply:
            self.pending += out.data
            if len(self.pending) >= PENDING_MAX:
                await self._write(b"", stage)
            return None
        await self._write(out.data, stage)
        verdict = None
        async for reply in self._replies(stage, time.monotonic() + self.settings.read_timeout):
            assert isinstance(reply, codec.Verdict)  # the session allows nothing else here
            verdict = reply
        return verdict

    async def replies(self, out: Outgoing) -> AsyncIterator[codec.Reply]:
        """The end of message: send it, then each reply up to and with the verdict."""
        await self._write(out.data, Stage.EOM)
        async for reply in self._replies(Stage.EOM, time.monotonic() + self.settings.eom_timeout):
            yield reply

    async def _write(self, data: bytes, stage: Stage) -> None:
        """``pending`` and ``data`` in one write; waited for (within ``send_timeout``) only
        when the socket's buffer fills up: the usual event is one system call, no wait."""
        writer = self.writer
        if writer is None:
            raise MilterFailure(stage, "connection to filter closed")
        if self.pending:
            data, self.pending = bytes(self.pending) + data, bytearray()
        try:
            writer.write(data)
            if writer.transport.get_write_buffer_size() < PENDING_MAX:
                return
            async with asyncio.timeout(self.settings.send_timeout):
                await writer.drain()
        except TimeoutError:
            self.close()
            raise MilterFailure(stage, "timeout writing to filter") from None
        except OSError as exc:
            self.close()
            raise MilterFailure(stage, f"write error: {exc.strerror or exc}") from None

    async def _replies(self, stage: Stage, deadline: float) -> AsyncIterator[codec.Reply]:
        """Replies to ``stage`` until it is answered; a progress reply moves the deadline
        (the end of message's, ``eom_timeout``), and is not handed out."""
        reader = self.reader
        session = self.session
        assert reader is not None
        read_any = False
        try:
            while True:
                reply = session.next_reply()
                if reply is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        data = await reader.read(READ_SIZE)
                    if not data:
                        raise MilterFailure(stage, "connection closed by filter")
                    read_any = True
                    session.receive_data(data)
                    continue
                if isinstance(reply, codec.Progress):
                    timeout = (
                        self.settings.eom_timeout
                        if stage is Stage.EOM
                        else self.settings.read_timeout
                    )
                    deadline = time.monotonic() + timeout
                    continue
                yield reply
                if session.awaiting is None:
                    return
        except MilterFailure:
            self.close()
            raise
        except TimeoutError:
            self.close()
            when = "during" if read_any else "before"
            raise MilterFailure(stage, f"timeout {when} data read") from None
        except MilterProtocolError as exc:
            self.close()
            raise MilterFailure(stage, f"protocol error: {exc}") from None
        except OSError as exc:
            self.close()
            raise MilterFailure(stage, f"read error: {exc.strerror or exc}") from None

    def send_nowait(self, data: bytes) -> None:
        """ABORT and QUIT, which are not answered: written (after what is pending), not
        waited for."""
        if data and self.writer is not None:
            data, self.pending = bytes(self.pending) + data, bytearray()
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(data)

    def close(self) -> None:
        writer, self.writer = self.writer, None
        self.session.open = False
        if writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def quit(self) -> None:
        """The SMTP session is over: QUIT, and close."""
        self.send_nowait(self.session.quit())
        self.close()
