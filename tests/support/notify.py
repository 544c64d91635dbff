"""systemd's end of ``sd_notify``: a real AF_UNIX datagram socket to give the daemon as
``NOTIFY_SOCKET``, each datagram read back as its ``KEY=value`` fields.

    with NotifySocket(tmp_path / "notify") as systemd:
        env["NOTIFY_SOCKET"] = systemd.address
        ... start the daemon ...
        assert systemd.next_state()["READY"] == "1"
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

STATES = ("READY", "RELOADING", "STOPPING")  # the fields that change the unit's state


class NotifySocket:
    def __init__(self, path: Path | None = None, *, abstract: str | None = None) -> None:
        """A socket at ``path``, or ``abstract`` in Linux's abstract namespace (``@name``)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(os.fspath(path))
            self.address = os.fspath(path)
        self.received: list[dict[str, str]] = []  # every datagram, in order

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.received.append(fields)
        return fields

    def next_state(self, timeout: float = 20.0) -> dict[str, str]:
        """The next datagram that changes state (READY/RELOADING/STOPPING), skipping the
        STATUS-only updates between them."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next(max(0.01, deadline - time.monotonic()))
            if any(key in fields for key in STATES):
                return fields

    def next_status(self, text: str, timeout: float = 20.0) -> dict[str, str]:
        """The next datagram whose STATUS contains ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.next(max(0.01, deadline - time.monotonic()))
            if text in fields.get("STATUS", ""):
                return fields

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
