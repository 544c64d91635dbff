"""The listening socket and its accept loop: connection-rate throttle and connection ceiling.

We accept by hand (``sock_accept`` then ``connect_accepted_socket``) instead of letting
``create_server`` accept, so that throttling works as Sendmail's ConnectionRateThrottle does:
connections over the rate are not refused, they wait in the kernel's listen queue until the
next second. The same holds for the global connection ceiling. Costs nothing per waiting client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable

from mailgate import maillog

# Errors from accept() that concern one connection, not the listener.
_TRANSIENT = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,
    errno.ENOBUFS,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.EAGAIN,
}


def bind_socket(host: str, port: int, *, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RateLimiter:
    """At most ``rate`` events per wall-clock second (0 = unlimited), as Sendmail counts them."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.second = 0
        self.count = 0

    def delay(self, now: float) -> float:
        """Seconds to wait before the next event may happen (0 = now)."""
        if self.rate <= 0:
            return 0.0
        if int(now) > self.second or self.count < self.rate:
            return 0.0
        return (self.second + 1) - now

    def record(self, now: float) -> None:
        second = int(now)
        if second > self.second:
            self.second, self.count = second, 0
        self.count += 1


class Listener:
    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        rate: Callable[[], int],
        has_room: Callable[[], bool],
    ) -> None:
        self.sock = sock
        self.factory = protocol_factory
        self.limiter = RateLimiter(rate())
        self.rate = rate
        self.has_room = has_room
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.limiter.rate = self.rate()  # follows a reload
            wait = self.limiter.delay(time.time())
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            while not self.has_room():
                await asyncio.sleep(0.05)
            try:
                conn, _addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        maillog.accept_error(exc.strerror)
                        await asyncio.sleep(0.1)
                    continue
                raise
            self.limiter.record(time.time())
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.connect_accepted_socket(self.factory, conn)
            except OSError:
                conn.close()
