"""The listening socket and its accept loop: connection-rate throttle, connection ceiling, and
on a PROXY listener the header that says who the client is.

We accept by hand (``sock_accept`` then ``connect_accepted_socket``) instead of letting
``create_server`` accept, so that throttling works as Sendmail's ConnectionRateThrottle does:
connections over the rate are not refused, they wait in the kernel's listen queue until the
next second (each worker holds the first of them accepted, and logs the deferral as Sendmail
does). The same holds for the global connection ceiling. Costs nothing per waiting client.

A PROXY listener (``[[listener]] proxy_protocol``) closes a connection whose peer is not in
``proxy_trusted`` at once, then reads the header (`smtp/proxy.py`) within ``proxy_timeout``
in a task of its own, before any session exists: the session is made with the client the
header names (`Arrival`), so everything per client (admission, access, relaying, logs) sees
that client and never the proxy, and its greet pause starts after the header. The rate
throttle is taken there too, after the header: in the accept loop it would count the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailgate import maillog
from mailgate.config import ListenerSettings, Network
from mailgate.smtp import proxy
from mailgate.smtp.limits import Admission, ConnectionRate, LocalCounts

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


class _Socket(socket.socket):
    """A ``socket.socket`` that makes the enums of its family and type once. The stock one
    makes each again at every access (``_intenum_converter``), and each connection accepted
    asks five times (``accept()`` for the new socket, uvloop's ``sock_accept`` and
    ``connect_accepted_socket``); a listening socket's connections are made of this class
    too. Only the two properties and ``accept`` differ, and only in that."""

    _kept_family: socket.AddressFamily | None = None
    _kept_type: socket.SocketKind | None = None

    @property
    def family(self) -> socket.AddressFamily:
        family = self._kept_family
        if family is None:
            family = self._kept_family = super().family
        return family

    @property
    def type(self) -> socket.SocketKind:
        kind = self._kept_type
        if kind is None:
            kind = self._kept_type = super().type
        return kind

    def accept(self) -> tuple[socket.socket, Any]:
        # socket.socket.accept, with the listener's enums handed on.
        fd, addr = self._accept()  # type: ignore[attr-defined]
        family, kind = self.family, self.type
        sock = _Socket(family, kind, self.proto, fileno=fd)
        sock._kept_family, sock._kept_type = family, kind
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr


def bind_socket(host: str, port: int, *, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _Socket(family, socket.SOCK_STREAM)
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


@dataclass(frozen=True, slots=True)
class Arrival:
    """What the listener knows of a connection before its session starts."""

    client: tuple[str, int] | None = None  # from a PROXY header; None: the socket's peer
    proxy: str | None = None  # the proxy's address, when the connection came through one
    early: bytes = b""  # what followed the PROXY header: the client spoke before the banner


DIRECT = Arrival()
MAX_HANDSHAKES = 1000  # PROXY headers awaited at once; beyond, new connections wait


def _plain_ip(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def trusted(ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(_plain_ip(ip))
    except ValueError:
        return False
    return any(addr in net for net in networks)


class Listener:
    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[Arrival], asyncio.Protocol],
        rate: Callable[[], int],
        admission: Admission,
        max_connections: Callable[[], int],
        settings: Callable[[], ListenerSettings] | None = None,
        throttle: ConnectionRate | None = None,
    ) -> None:
        sock.setblocking(False)  # run() tries accept() before it waits
        self.sock = sock
        self.factory = protocol_factory
        self.rate = rate  # the throttle's connections a second now (a reload may change it)
        self.throttle = throttle if throttle is not None else ConnectionRate(LocalCounts(), 0)
        self.admission = admission  # the ceiling: max_connections sessions, daemon-wide
        self.max_connections = max_connections  # now (a reload may change it)
        # The listener's settings in force now (a reload may change its PROXY trust).
        self.settings = settings or (lambda: ListenerSettings(address=("0.0.0.0", 0)))
        self.task: asyncio.Task[None] | None = None
        self.handshakes: set[asyncio.Task[None]] = set()  # PROXY headers awaited
        self.deferral_logged = 0  # the second of the last "deferring connections" line

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for task in list(self.handshakes):
            task.cancel()  # each closes its socket
        await asyncio.gather(*self.handshakes, return_exceptions=True)
        self.sock.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            settings = self.settings()
            # The rate counts clients: on a PROXY listener it is taken after the header.
            rate = self.rate() if settings.proxy_protocol is None else 0
            throttled = rate > 0
            # A place in this second's rate is taken before the accept while there is one
            # (a connection already queued then costs nothing more); without one, the
            # connection accepted waits for the next second's, and is logged as deferred.
            placed = throttled and self.throttle.take(rate, time.time()) == 0
            # Full: new connections wait in the kernel's listen queue, as Sendmail's do.
            while (
                not self.admission.has_room(self.max_connections())
                or len(self.handshakes) >= MAX_HANDSHAKES
            ):
                await asyncio.sleep(0.05)
            try:
                try:
                    # A connection already queued is taken at once: the event loop's
                    # sock_accept would watch the listening socket for it first (epoll_ctl
                    # add and delete, an ioctl: five system calls a connection under load).
                    conn, addr = self.sock.accept()
                except BlockingIOError:
                    if placed:  # the place goes back while nobody is waiting
                        self.throttle.give_back(time.time())
                        placed = False
                    conn, addr = await loop.sock_accept(self.sock)
                if throttled and not placed:
                    try:
                        await self._take_place()
                    except BaseException:
                        conn.close()
                        raise
            except OSError as exc:
                if placed:
                    self.throttle.give_back(time.time())
                if exc.errno in _TRANSIENT:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        maillog.accept_error(exc.strerror)
                        await asyncio.sleep(0.1)
                    continue
                raise
            # No TCP_NODELAY here: the transport sets it (uvloop's TCPTransport.new, asyncio's
            # selector transport), a second setsockopt per connection was for nothing.
            if settings.proxy_protocol is not None:
                task = loop.create_task(self._proxied(conn, _plain_ip(addr[0]), settings))
                self.handshakes.add(task)
                task.add_done_callback(self.handshakes.discard)
                continue
            await self._start_session(conn, DIRECT, loop)

    async def _take_place(self) -> None:
        """A place in the connection rate for a connection already accepted. Over the rate it
        waits for the next second and, as Sendmail, says so (once a second)."""
        while (wait := self.throttle.take(rate := self.rate(), now := time.time())) > 0:
            if int(now) != self.deferral_logged:
                self.deferral_logged = int(now)
                maillog.connections_deferred(rate)
            await asyncio.sleep(wait)

    async def _start_session(
        self,
        conn: socket.socket,
        arrival: Arrival,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """The session, once there is a place under the ceiling: the check before the
        accept keeps the excess in the listen queue, but another worker, or a PROXY header,
        may have taken the last place since."""
        if loop is None:  # asyncio.get_running_loop() costs a getpid() system call
            loop = asyncio.get_running_loop()
        try:
            while not self.admission.reserve(self.max_connections()):
                await asyncio.sleep(0.05)
        except BaseException:
            conn.close()
            raise
        try:
            # connection_made (the session counting itself) has run when this returns.
            await loop.connect_accepted_socket(lambda: self.factory(arrival), conn)
        except OSError:
            conn.close()
        finally:
            self.admission.unreserve()

    async def _proxied(self, conn: socket.socket, peer: str, settings: ListenerSettings) -> None:
        """A connection to a PROXY listener: from a trusted proxy, with a good header, it
        becomes a session of the client the header names; else it is closed unanswered."""
        try:
            if not trusted(peer, settings.proxy_trusted):
                maillog.proxy_untrusted(peer, settings.label)
                conn.close()
                return
            arrival = await self._read_header(conn, peer, settings)
            if arrival is None:
                conn.close()
                return
            await self._take_place()
        except BaseException:
            conn.close()
            raise
        await self._start_session(conn, arrival)

    async def _read_header(
        self, conn: socket.socket, peer: str, settings: ListenerSettings
    ) -> Arrival | None:
        loop = asyncio.get_running_loop()
        versions = settings.proxy_protocol
        assert versions is not None
        data = b""
        try:
            async with asyncio.timeout(settings.proxy_timeout):
                while (header := proxy.parse(data, versions)) is None:
                    chunk = await loop.sock_recv(conn, proxy.MAX_HEADER - len(data))
                    if not chunk:
                        if data:
                            raise proxy.ProxyError(f"closed after {len(data)} bytes of a header")
                        maillog.proxy_closed(peer)  # a proxy's TCP check: connect, close
                        return None
                    data += chunk
        except TimeoutError:
            maillog.proxy_timeout(peer, settings.proxy_timeout)
            return None
        except proxy.ProxyError as exc:
            maillog.proxy_bad_header(peer, str(exc))
            return None
        except OSError as exc:  # reset by the peer
            maillog.proxy_bad_header(peer, exc.strerror or repr(exc))
            return None
        early = data[header.size :]
        if header.source is None:
            maillog.proxy_local(peer, header.version)  # a health check: the proxy itself
            return Arrival(None, peer, early)
        client = header.source[0]
        if _is_loopback(client) and not _is_loopback(peer):
            # Only a proxy on this host can have a client on this host's loopback, and the
            # local host may relay: a remote proxy claiming one is not believed.
            maillog.proxy_bad_header(peer, f"a remote proxy names a loopback client ({client})")
            return None
        return Arrival(header.source, peer, early)


def _is_loopback(ip: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(ip).is_loopback
    return False
