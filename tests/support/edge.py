"""Shared set-up for the edge-defence tests (tests/test_edge.py, tests/test_access_stages.py).

One DNS server with the names those tests need, a builder for gateways with the domain-routing
tables of the issue plus a test-specific access table, and small helpers to watch the daemon
from outside (/proc) and to time replies on raw sockets.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess
from tests.support.rawsmtp import RawReply, RawSmtp
from tests.support.sink import SinkMessage, SinkServer

HOSTNAME = "gateway.example.com"
HOP1 = "127.0.0.5"  # targetdomain1.com's internal server
MXHOST = "127.0.0.7"  # MX of example.org / example.net (nothing listens: mail there waits)

# Forward-confirmed PTR names of some clients.
PTR_NAMES = {
    "127.0.0.34": "c34.fast.example.net",
    "127.0.0.40": "named.example.net",
    "127.0.0.67": "h67.bad.example",
    "127.0.0.68": "trusted.example",
    "127.0.0.69": "sub.trusted.example",
}


def make_dns() -> DnsServer:
    dns = DnsServer()
    dns.start()
    dns.add("example.org", "MX", "10 mx.example.org.")
    dns.add("mx.example.org", "A", MXHOST)
    dns.add("example.net", "MX", "10 mx.example.net.")
    dns.add("mx.example.net", "A", MXHOST)
    dns.add("skip.blocked.example", "MX", "10 mx.example.org.")
    dns.add("relayer.example", "A", "192.0.2.20")
    dns.add("nmap.scanme.org", "A", "192.0.2.50")  # nmap's sender domain resolves, as on the net
    dns.servfail("broken.example")
    dns.timeout("slow.example")
    for ip, name in PTR_NAMES.items():
        dns.add_ptr(ip, name)
        dns.add(name, "A", ip)
    return dns


def make_gateway(
    directory: Path,
    dns: DnsServer,
    hop1_port: int,
    mx_port: int,
    *,
    access: str,
    smtp: str,
    host: str = "127.0.0.1",
    extra: str = "",
) -> GatewayProcess:
    """A gateway with the issue's routing tables; ``smtp`` is the body of its [smtp] section."""
    tables = {
        "mailertable": f"targetdomain1.com   smtp:[{HOP1}]:{hop1_port}\n",
        "access": access,
        "local-host-names": "mail.example.org\n",
        "aliases": "postmaster: alice\nteam: alice, bob@targetdomain1.com\n",
    }
    settings = (
        '[queue]\nrun_interval = "2s"\nretry_min = "1s"\n'
        f'[delivery]\nport = {mx_port}\nconnect_timeout = "2s"\n'
        f"[smtp]\n{smtp}\n{extra}"
    )
    gw = GatewayProcess(directory, dns=dns.address, tables=tables, settings=settings, host=host)
    (gw.maildir / "alice").mkdir(parents=True)
    return gw


def message(
    subject: str,
    frm: str = "alice@example.org",
    to: str = "bob@targetdomain1.com",
    body: str = "Hi Bob.\r\n",
) -> bytes:
    return (
        f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 19:17:12 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\n\r\n{body}"
    ).encode()


def with_subject(sink: SinkServer, subject: str) -> list[SinkMessage]:
    needle = f"\r\nSubject: {subject}\r\n".encode()
    return [m for m in list(sink.messages) if needle in m.data]


def wait_subject(
    sink: SinkServer, subject: str, count: int = 1, timeout: float = 15.0
) -> list[SinkMessage]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = with_subject(sink, subject)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(
        f"sink got {len(with_subject(sink, subject))} of {count} messages with subject {subject!r}"
    )


def raw(gw: GatewayProcess, source: str, timeout: float = 10.0) -> RawSmtp:
    return RawSmtp(gw.host, gw.port, source=source, timeout=timeout)


def greet(
    gw: GatewayProcess, source: str, timeout: float = 10.0
) -> tuple[RawSmtp, RawReply, float]:
    """Connect from ``source``; (client, greeting, seconds from connect to the greeting)."""
    started = time.monotonic()
    c = raw(gw, source, timeout)
    reply = c.read_reply()
    return c, reply, time.monotonic() - started


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def log_lines(gw: GatewayProcess, *needles: str) -> list[str]:
    return [line for line in gw.log().splitlines() if all(n in line for n in needles)]


# -- the daemon seen from /proc ----------------------------------------------------------------
def proc_status(pid: int, key: str) -> int:
    """A number from /proc/PID/status, e.g. ``VmRSS`` (kB) or ``Threads``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def silent_connection(host: str, port: int, source: str) -> socket.socket:
    """A connected socket that never says anything (a "half-open" client)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((host, port))
    s.setblocking(False)
    return s


def received_nothing(s: socket.socket) -> bool:
    try:
        s.recv(4096)  # bytes, or b"" when the server closed: either way not silent
    except BlockingIOError:
        return True
    return False


def free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])
