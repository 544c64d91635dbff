"""systemd's readiness protocol (``sd_notify(3)``), written by hand: one datagram of
``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``.

The protocol is a dozen lines; systemd-python would bring libsystemd, a C dependency for one
function that AIX does not have (there this module simply finds no socket). A name
starting with ``@`` is in Linux's abstract namespace (a NUL byte in front). A notification that
cannot be sent is dropped: the socket is the service manager's, and mail must not stop because
it went away.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import MutableMapping


def socket_address(name: str) -> str | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value; None for none we can use (empty,
    relative, or a ``vsock:`` address of a virtual machine's manager)."""
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: systemd 253's ``Type=notify-reload`` wants it with
    RELOADING=1, and older managers ignore it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The service manager's socket, taken from the environment once at start.

    ``from_environ`` removes ``NOTIFY_SOCKET`` from the environment, as ``sd_notify``'s
    ``unset_environment`` does: the programs the local mailer runs must not speak for us.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        return cls(socket_address(environ.pop("NOTIFY_SOCKET", "")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (``READY=1``, ``STATUS=…``); True when the datagram left.
        Values are one line each: a newline would start another field."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={' '.join(str(v).splitlines())}" for k, v in fields.items())
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            sock.connect(self.address)
            sock.sendall(text.encode("utf-8", "replace"))
            return True
        return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self, status: str) -> bool:
        return self.send(RELOADING=1, STATUS=status, MONOTONIC_USEC=monotonic_usec())

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)
