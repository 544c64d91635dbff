"""A small authoritative DNS server on loopback for tests (dnslib for the wire format).

UDP and TCP on the same ephemeral port of 127.0.0.1, served from one background thread.
Records are given as data and can be changed at any time from the test thread.

    records = {
        "example.com": [("MX", "10 mx.example.com.")],
        "mx.example.com": [("A", "127.0.0.2")],
        "127.0.0.2": [("PTR", "mx.example.com")],  # an address: its reverse name
        "broken.example": [("SERVFAIL", "")],
        "slow.example": [("TIMEOUT", "")],
    }
    with DnsServer(records) as dns:
        dns.add("other.example", "A", "127.0.0.3")
        resolver = Resolver([dns.address])
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

_RDATA = {
    "A": lambda v: A(v),
    "AAAA": lambda v: AAAA(v),
    "PTR": lambda v: PTR(v),
    "CNAME": lambda v: CNAME(v),
    "TXT": lambda v: TXT(v),
}


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _make_rdata(rtype: str, value: str) -> object:
    if rtype == "MX":
        pref, _, host = value.strip().partition(" ")
        return MX(host.strip(), int(pref))
    try:
        return _RDATA[rtype](value)
    except KeyError:
        raise ValueError(f"unsupported record type {rtype}") from None


def reverse_name(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address."""
    return ipaddress.ip_address(ip).reverse_pointer + "."


# name (or an IP address, for its PTR) -> (type, value): A, AAAA, MX, CNAME, TXT, PTR; and
# SERVFAIL or TIMEOUT (value ignored) for a name whose queries fail that way
Records = Mapping[str, Iterable[tuple[str, str]]]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class DnsServer:
    """Authoritative test DNS server: NXDOMAIN for unknown names, NODATA (with SOA) otherwise."""

    def __init__(self, records: Records | None = None, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []  # (lowercase name without dot, "MX")
        self._records: dict[str, list[tuple[str, object, int]]] = {}
        self._servfail: set[str] = set()
        self._timeout: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # lets stop() be quick
        self.load(records or {})

    # -- records -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, name: str, rtype: str, value: str, ttl: int = 60) -> None:
        rtype = rtype.upper()
        rdata = _make_rdata(rtype, value)
        with self._lock:
            self._records.setdefault(_norm(name), []).append((rtype, rdata, ttl))

    def load(self, records: Records) -> None:
        """Add ``records`` (see :data:`Records`)."""
        for name, entries in records.items():
            for rtype, value in entries:
                if rtype == "SERVFAIL":
                    self.servfail(name)
                elif rtype == "TIMEOUT":
                    self.timeout(name)
                elif rtype == "PTR" and _is_ip(name):
                    self.add_ptr(name, value)
                else:
                    self.add(name, rtype, value)

    def add_ptr(self, ip: str, name: str, ttl: int = 60) -> None:
        self.add(reverse_name(ip), "PTR", _norm(name), ttl)

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_norm(name))

    def timeout(self, name: str) -> None:
        with self._lock:
            self._timeout.add(_norm(name))

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._servfail.clear()
            self._timeout.clear()
            self.queries.clear()

    def query_count(self, name: str, rtype: str | None = None) -> int:
        """How many queries arrived for a name (and type)."""
        n = _norm(name).rstrip(".")
        with self._lock:
            return sum(1 for q, t in self.queries if q == n and (rtype is None or t == rtype))

    # -- answering -----------------------------------------------------------------------------

    def _answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None  # garbage: a real server would drop it too
        reply = request.reply()
        qname = _norm(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            self.queries.append((qname.rstrip("."), str(qtype)))
            if qname in self._timeout:
                return None
            if qname in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
            name = qname
            # Follow CNAME chains inside our own zone data, as a recursive server would.
            for _ in range(8):
                records = self._records.get(name)
                if records is None:
                    break
                cnames = [r for r in records if r[0] == "CNAME"]
                if cnames and qtype != "CNAME":
                    rtype, rdata, ttl = cnames[0]
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=rdata, ttl=ttl))
                    name = _norm(str(rdata.label))
                    continue
                break
            records = self._records.get(name)
            if records is None:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                    reply.add_auth(self._soa(qname))
                return reply.pack()
            matched = [r for r in records if r[0] == qtype or qtype == "ANY"]
            for rtype, rdata, ttl in matched:
                reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
            if not matched:
                reply.add_auth(self._soa(name))
        return reply.pack()

    @staticmethod
    def _soa(name: str) -> RR:
        # Negative answers carry the SOA so resolvers can cache them (RFC 2308); short TTL.
        return RR(
            name,
            QTYPE.SOA,
            rdata=SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 30)),
            ttl=30,
        )

    # -- server --------------------------------------------------------------------------------

    def start(self) -> None:
        self._bind()
        self._wake = socket.socketpair()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="DnsServer", daemon=True)
        self._thread.start()

    def _bind(self) -> None:
        # UDP and TCP must share one port: take an ephemeral UDP port, then try TCP on it.
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, self.port))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue
            tcp.listen(16)
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise RuntimeError("could not bind UDP and TCP on the same port")

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        self._udp.setblocking(False)
        self._tcp.setblocking(False)
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        assert self._wake is not None
        sel.register(self._wake[0], selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "wake":
                        break
                    if key.data == "udp":
                        try:
                            data, addr = self._udp.recvfrom(65535)
                        except OSError:
                            continue
                        out = self._answer(data)
                        if out is not None:
                            with contextlib.suppress(OSError):
                                self._udp.sendto(out, addr)
                    else:
                        try:
                            conn, _ = self._tcp.accept()
                        except OSError:
                            continue
                        threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()
        finally:
            sel.close()

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(2.0)  # bounded: a test client that never finishes cannot pin the thread
        with conn:
            try:
                while not self._stop.is_set():
                    head = self._recv_exact(conn, 2)
                    if head is None:
                        return
                    (length,) = struct.unpack("!H", head)
                    data = self._recv_exact(conn, length)
                    if data is None:
                        return
                    out = self._answer(data)
                    if out is None:
                        continue
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for s in (self._udp, self._tcp, *(self._wake or ())):
            if s is not None:
                s.close()
        self._udp = self._tcp = self._wake = None

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
