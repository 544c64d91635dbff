"""A raw-socket SMTP client for tests that must see the exact bytes (smtplib hides too much).

with RawSmtp(host, port, source="127.0.0.2") as c:
    greeting = c.read_reply()
    assert c.cmd("EHLO client.example.net").code == 250
    c.send(b"MAIL FROM:<a@b>\\r\\nRCPT TO:<c@d>\\r\\n")   # a pipelined group in one write
    replies = c.read_replies(2)
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class RawReply:
    code: int
    lines: list[str]  # text of each line after "NNN-" / "NNN ", without CRLF
    raw: bytes  # the reply exactly as received, CRLFs included

    @property
    def text(self) -> str:
        """The last line's text, e.g. ``"2.0.0 OK"``."""
        return self.lines[-1]

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code of the first line, if it has one."""
        head = self.lines[0].split(" ", 1)[0]
        parts = head.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return head
        return None

    @property
    def first(self) -> str:
        """The first line exactly as sent, without CRLF (``"250 2.0.0 OK"``)."""
        return self.raw.split(b"\r\n", 1)[0].decode("utf-8", "surrogateescape")


class ConnectionClosedByPeer(Exception):
    """The server closed the connection (EOF) before a complete reply arrived."""


class RawSmtp:
    def __init__(
        self, host: str, port: int, *, source: str | None = None, timeout: float = 10.0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.eof = False

    # -- sending ---------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def dribble(self, data: bytes, wait: float) -> bool:
        """One more piece of a line that never ends, then ``wait`` seconds of listening (a
        slow client's pace): True once the server has answered or closed."""
        try:
            self.send(data)
        except OSError:
            return True
        return self.pending(wait) != b""

    def cmd(self, line: str | bytes) -> RawReply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.read_reply()

    # -- receiving -------------------------------------------------------------------------------
    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[: i + 2])
                del self.buf[: i + 2]
                return line
            if not self._fill():
                raise ConnectionClosedByPeer(bytes(self.buf))

    def read_reply(self) -> RawReply:
        raw = bytearray()
        lines: list[str] = []
        code = 0
        while True:
            line = self.read_line()
            raw += line
            text = line[:-2].decode("utf-8", "surrogateescape")
            if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                raise AssertionError(f"not an SMTP reply line: {text!r}")
            if code and int(text[:3]) != code:
                raise AssertionError(f"reply code changed inside a multi-line reply: {raw!r}")
            code = int(text[:3])
            lines.append(text[4:])
            if text[3:4] != "-":
                return RawReply(code, lines, bytes(raw))

    def read_replies(self, n: int) -> list[RawReply]:
        return [self.read_reply() for _ in range(n)]

    def pending(self, wait: float = 0.2) -> bytes:
        """Whatever arrives within ``wait`` seconds without sending anything."""
        deadline = time.monotonic() + wait
        old = self.sock.gettimeout()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    if not self._fill():
                        break
                except (TimeoutError, BlockingIOError):
                    break
        finally:
            self.sock.settimeout(old)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; return what arrived. AssertionError if it stays open."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            raise AssertionError(
                f"server kept the connection open; got {bytes(self.buf)!r}"
            ) from None
        finally:
            self.sock.settimeout(old)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
