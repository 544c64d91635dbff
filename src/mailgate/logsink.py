"""Where maillog lines go: a file (or stderr), written one ``write(2)`` per line, or the local
syslog daemon's datagram socket, sent one datagram per line as glibc's ``syslog()`` does.

Neither buffers, blocks the event loop or raises: a line that cannot be written (a full disk,
a syslog daemon that is stopped or does not read) is dropped and the sink counts it, so the
log can never stall or stop the mail. ``check()``, called once a second before a line is
written, is where a sink heals itself: a file renamed or removed by logrotate is reopened
under its name, a syslog socket that went away is connected again.

Not ``logging.handlers.SysLogHandler``: its socket blocks (glibc's too), so a syslog daemon
that stops reading, with 10 datagrams queued (``net.unix.max_dgram_qlen``), would freeze the
whole gateway in ``send``; when it cannot reconnect it prints a traceback per line; and it
would wrap each of our lines in a ``LogRecord`` and a formatter for nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Literal, Protocol

Facility = Literal[
    "mail",
    "daemon",
    "user",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
]
"""The syslog facilities a mail gateway may log under (``mail``, as Sendmail and Postfix)."""

FACILITY_CODES: dict[Facility, int] = {
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}

# A connected datagram socket whose peer is gone: the syslog daemon restarted (it made a new
# socket under the same name) or stopped.
_PEER_GONE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE}


class Sink(Protocol):
    dropped: int  # lines lost since the count was last reported

    @property
    def name(self) -> str: ...

    def write(self, data: bytes) -> bool: ...

    def check(self) -> None: ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


class LineFile:
    """stderr (``path`` None) or a file opened ``O_APPEND``: one ``write`` per line, so the
    lines of several workers never interleave and none waits in a buffer (an admin tailing
    the log sees each at once). ``check`` reopens the path once it no longer names the open
    file (logrotate renamed or removed it); ``reopen`` does so at once (SIGHUP). A file
    truncated in place (logrotate's ``copytruncate``) needs nothing: with ``O_APPEND`` the next
    line starts at its new end, never behind a hole."""

    def __init__(self, path: Path | None) -> None:
        """Opens ``path`` (created 0640 if missing); OSError if it cannot be opened."""
        self.path = path
        self.dropped = 0
        self.fd = 2
        self.identity: tuple[int, int] | None = None
        if path is not None:
            self.fd, self.identity = _open_append(path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "stderr"

    def write(self, data: bytes) -> bool:
        try:
            written = os.write(self.fd, data)
        except OSError:
            self.dropped += 1
            return False
        if written < len(data):  # the disk filled up within the line: end it, count it lost
            with contextlib.suppress(OSError):
                os.write(self.fd, b"\n")
            self.dropped += 1
            return False
        return True

    def check(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                return
        except OSError:
            pass  # removed: made again by reopen
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        try:
            fd, identity = _open_append(self.path)
        except OSError:
            return  # lines go on into the file as it was, and the next second tries again
        old, self.fd, self.identity = self.fd, fd, identity
        os.close(old)

    def close(self) -> None:
        if self.path is not None and self.fd != 2:
            os.close(self.fd)
            self.fd = 2


def _open_append(path: Path) -> tuple[int, tuple[int, int]]:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


class SyslogSocket:
    """The local syslog daemon's socket (``/dev/log``), never blocking: a full socket (the
    daemon does not read) or a missing one (it is stopped) drops the line, counted. A send
    refused because the daemon restarted reconnects and sends again at once; while there is
    no socket, ``check`` tries to connect once a second. Datagram sockets only, which is what
    rsyslog, syslog-ng and systemd-journald create at ``/dev/log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0
        self.sock: socket.socket | None = None
        self.problem: str | None = None  # why the last connect failed
        self._connect()

    @property
    def name(self) -> str:
        return str(self.path)

    def _connect(self) -> socket.socket | None:
        self.close()
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            self.problem = exc.strerror or str(exc)
            return None
        self.sock, self.problem = sock, None
        return sock

    def write(self, data: bytes) -> bool:
        if self.sock is not None:
            try:
                self.sock.send(data)
                return True
            except BlockingIOError:
                pass  # its queue is full: the daemon is not reading; the socket stays
            except OSError as exc:
                # The daemon restarted (a new socket under the name): connect, send again.
                # If it stopped, the connect fails and check() tries again each second. Any
                # other error (EMSGSIZE: a line too long for it) loses this line only.
                if exc.errno in _PEER_GONE and (sock := self._connect()) is not None:
                    with contextlib.suppress(OSError):
                        sock.send(data)
                        return True
        self.dropped += 1
        return False

    def check(self) -> None:
        if self.sock is None:
            self._connect()

    def reopen(self) -> None:
        self._connect()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
