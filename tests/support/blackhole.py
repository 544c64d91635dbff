"""A next hop whose host is up but drops every new connection attempt (SYNs unanswered).

Linux drops a SYN when the listen queue is full: listen with a backlog of zero, fill the queue
with one connection of our own that is never accepted, and every further ``connect`` hangs as
it would to a host behind a firewall that drops packets, until the caller's connect timeout.
"""

from __future__ import annotations

import contextlib
import socket
from types import TracebackType


class Blackhole:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._filler: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(0)
        filler = socket.create_connection((self.host, self.port), timeout=5)
        self._listener, self._filler = listener, filler

    def stop(self) -> None:
        for s in (self._filler, self._listener):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._listener = self._filler = None

    def __enter__(self) -> Blackhole:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
