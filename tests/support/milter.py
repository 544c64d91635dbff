"""A small filter of our own on loopback, for the replies and changes real filters do not make.

It speaks the filter side of the milter protocol with kilter.protocol's codec (an
implementation independent of ours, so every packet the gateway sends is read by someone
else's code), one thread per connection, and does what its script says:

    with TestMilter(eom=[km.AddHeader("X-Test", b"yes")]) as milter:
        ... settings: socket = milter.socket ...
        milter.events("Header")  # what it was sent, as kilter messages

- ``actions`` / ``protocol`` / ``macros``: its answer to OPTNEG;
- ``replies``: the answer to each event by kilter class name (``"EnvelopeFrom"``: a list of
  messages; default ``Continue``), ``rcpt_replies`` per recipient address;
- ``eom``: the changes it sends at end of message, before ``eom_verdict`` (default ``Accept``);
- ``progress``: progress replies sent at end of message, ``delay`` seconds apart, first;
- ``die_at``: the event class name at which it closes the connection (``"Body"``: mid-body);
- ``hang_at``: the event class name at which it stops answering (a slow filter).

Every connection's events are recorded in order (``connections``; ``events(name)`` gives those
of one class across connections).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from kilter.protocol import messages as km
from kilter.protocol.buffer import SimpleBuffer

from tests.support.wait import wait_until

# The events that get no reply (and the negotiation, answered by the script's own rules).
_NO_REPLY = (km.Macro, km.Abort, km.Close)  # and QuitNewConnection (below)
# What a connection that only connected and left gets.
_CONNECTION_ONLY = (km.Negotiate, km.Connect, km.Macro, km.Close)
# Event class name → the ProtocolFlags bit that says "no reply" for it.
_NR = {
    "Connect": km.ProtocolFlags.NR_CONNECT,
    "Helo": km.ProtocolFlags.NR_HELO,
    "EnvelopeFrom": km.ProtocolFlags.NR_SENDER,
    "EnvelopeRecipient": km.ProtocolFlags.NR_RECIPIENT,
    "Data": km.ProtocolFlags.NR_DATA,
    "Unknown": km.ProtocolFlags.NR_UNKNOWN,
    "Header": km.ProtocolFlags.NR_HEADER,
    "EndOfHeaders": km.ProtocolFlags.NR_END_OF_HEADERS,
    "Body": km.ProtocolFlags.NR_BODY,
}


class TestMilter:
    __test__ = False  # not a pytest class

    def __init__(self, **behaviour: Any) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[list[km.Message]] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.stopping = False
        self.configure(**behaviour)

    def configure(
        self,
        *,
        actions: km.ActionFlags = km.ActionFlags.ALL,
        protocol: km.ProtocolFlags = km.ProtocolFlags.NONE,
        macros: dict[km.Stage, list[str]] | None = None,
        version: int = 6,
        replies: dict[str, Sequence[km.Message]] | None = None,
        rcpt_replies: dict[str, Sequence[km.Message]] | None = None,
        eom: Sequence[km.Message] = (),
        eom_verdict: km.Message | None = None,
        progress: int = 0,
        delay: float = 0.0,
        die_at: str | None = None,
        hang_at: str | None = None,
        script: Callable[[km.Message], Sequence[km.Message] | None] | None = None,
    ) -> TestMilter:
        """Behave as given from the next connection on (the rest as a plain filter that
        continues everywhere and accepts at the end), and forget what was seen."""
        self.negotiation = km.Negotiate(version, actions, protocol, macros or {})
        self.replies = replies or {}
        self.rcpt_replies = rcpt_replies or {}
        self.eom = list(eom)
        self.eom_verdict = eom_verdict or km.Accept()
        self.progress = progress
        self.delay = delay
        self.die_at = die_at
        self.hang_at = hang_at
        self.script = script
        with self.lock:
            self.connections.clear()
        return self

    @property
    def socket(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> TestMilter:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def stop(self) -> None:
        self.stopping = True
        with _quiet():
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with _quiet():
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for thread in self.threads:
            thread.join(5)

    def __enter__(self) -> TestMilter:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what it saw ------------------------------------------------------------------------------
    def _sessions(self) -> list[list[km.Message]]:
        """The connections of SMTP sessions that said something: not those of a bare
        connect-and-close (the test harness's probe that the daemon listens)."""
        with self.lock:
            conns = [list(c) for c in self.connections]
        return [c for c in conns if any(not isinstance(m, _CONNECTION_ONLY) for m in c)]

    def events(self, name: str | None = None) -> list[km.Message]:
        every = [m for conn in self._sessions() for m in conn]
        return [m for m in every if name is None or type(m).__name__ == name]

    def names(self, connection: int = -1) -> list[str]:
        """The class names of one session's events (the last by default), macros left out."""
        return [
            type(m).__name__ for m in self._sessions()[connection] if not isinstance(m, km.Macro)
        ]

    def macros(self, stage: bytes) -> dict[str, str]:
        """Every macro the gateway sent for the stage of command ``stage`` (b"C", b"M"...)."""
        out: dict[str, str] = {}
        for m in self.events("Macro"):
            assert isinstance(m, km.Macro)
            if m.stage == stage[0]:
                out.update(m.macros)
        return out

    def wait_connections(self, n: int, timeout: float = 10) -> None:
        wait_until(lambda: len(self.connections) >= n, f"{n} milter connection(s)", timeout)

    def wait_event(self, name: str, timeout: float = 10) -> None:
        wait_until(lambda: self.events(name), f"a {name} event at the test milter", timeout)

    # -- serving ----------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.sockets.append(conn)
                events: list[km.Message] = []
                self.connections.append(events)
            thread = threading.Thread(target=self._serve, args=(conn, events), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket, events: list[km.Message]) -> None:
        flags = self.negotiation.protocol_flags
        data = b""
        with conn, _quiet():
            while True:
                while len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
                    size = 4 + int.from_bytes(data[:4], "big")
                    packet, data = data[:size], data[size:]
                    message: Any = QuitNewConnection() if packet[4:5] == b"K" else _unpack(packet)
                    name = type(message).__name__
                    with self.lock:
                        events.append(message)
                    if name == self.die_at:
                        return
                    if name == self.hang_at:
                        while not self.stopping:
                            time.sleep(0.05)
                        return
                    for reply in self._answer(message, name, flags):
                        if isinstance(reply, km.Progress) and self.delay:
                            time.sleep(self.delay)
                        conn.sendall(_pack(reply))
                chunk = conn.recv(256 * 1024)
                if not chunk:
                    return
                data += chunk

    def _answer(
        self, message: km.Message, name: str, flags: km.ProtocolFlags
    ) -> Sequence[km.Message]:
        if isinstance(message, km.Negotiate):
            return [self.negotiation]
        if isinstance(message, (*_NO_REPLY, QuitNewConnection)):
            return []
        if self.script is not None:
            scripted = self.script(message)
            if scripted is not None:
                return scripted
        if isinstance(message, km.EndOfMessage):
            return [*[km.Progress()] * self.progress, *self.eom, self.eom_verdict]
        if name in _NR and flags & _NR[name]:
            return []
        if isinstance(message, km.EnvelopeRecipient):
            rcpt = bytes(message.recipient).decode()
            if rcpt in self.rcpt_replies:
                return self.rcpt_replies[rcpt]
        return self.replies.get(name, [km.Continue()])


class QuitNewConnection:
    """SMFIC_QUIT_NC, which kilter does not know: this session ends, another follows on the
    same connection (with CONNECT, not a new negotiation). Not answered."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuitNewConnection)

    __hash__ = object.__hash__


def _unpack(packet: bytes) -> km.Message:
    """One whole packet, read by kilter from a buffer of its own (kilter's messages keep
    views into the buffer they came from)."""
    buf = SimpleBuffer(len(packet))
    buf[:] = packet
    message, _ = km.Message.unpack(buf)
    message.freeze()
    return message


def _pack(message: km.Message) -> bytes:
    buf = SimpleBuffer(2 * 1024 * 1024)
    message.pack(buf)
    return bytes(buf[:])


class _quiet:
    """Suppress the socket errors of a peer that went away."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        return t is not None and issubclass(t, OSError)
