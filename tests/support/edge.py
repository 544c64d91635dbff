"""Shared set-up for the edge-defence tests (tests/test_edge.py, tests/test_access_stages.py,
tests/reliability/test_abuse.py).

The DNS records those tests need (clients with forward-confirmed PTR names, a sender domain
that fails, one that times out), and small helpers to watch the daemon from outside (/proc)
and to time replies on raw sockets.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.dnsserver import Records
from tests.support.gateway import GatewayProcess
from tests.support.rawsmtp import RawReply, RawSmtp
from tests.support.world import MXHOST, SENDER_DNS, wait_until

# Forward-confirmed PTR names of some clients.
PTR_NAMES = {
    "127.0.0.34": "c34.fast.example.net",
    "127.0.0.40": "named.example.net",
    "127.0.0.67": "h67.bad.example",
    "127.0.0.68": "trusted.example",
    "127.0.0.69": "sub.trusted.example",
}

EDGE_DNS: Records = {
    **SENDER_DNS,
    "example.net": [("MX", "10 mx.example.net.")],
    "mx.example.net": [("A", MXHOST)],
    "skip.blocked.example": [("MX", "10 mx.example.org.")],
    "relayer.example": [("A", "192.0.2.20")],
    "nmap.scanme.org": [("A", "192.0.2.50")],  # nmap's sender domain resolves, as on the net
    "broken.example": [("SERVFAIL", "")],
    "slow.example": [("TIMEOUT", "")],
    **{ip: [("PTR", name)] for ip, name in PTR_NAMES.items()},
    **{name: [("A", ip)] for ip, name in PTR_NAMES.items()},
}


def greet(
    gw: GatewayProcess, source: str, timeout: float = 10.0
) -> tuple[RawSmtp, RawReply, float]:
    """Connect from ``source``; (client, greeting, seconds from connect to the greeting)."""
    started = time.monotonic()
    c = gw.raw(source, timeout)
    reply = c.read_reply()
    return c, reply, time.monotonic() - started


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# -- the daemon seen from /proc ----------------------------------------------------------------
def proc_status(pid: int, key: str) -> int:
    """A number from /proc/PID/status, e.g. ``VmRSS`` (kB) or ``Threads``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pid: int, timeout: float = 60.0, quiet: float = 0.5) -> None:
    """Wait until ``pid`` used no CPU for ``quiet`` seconds (it has done what it was given)."""
    ticks: list[int] = []

    def quiet_since_last() -> bool:
        ticks.append(cpu_ticks(pid))
        return len(ticks) > 1 and ticks[-1] == ticks[-2]

    wait_until(quiet_since_last, f"process {pid} to be idle", timeout, step=quiet)


@contextlib.contextmanager
def silent_sockets(host: str, port: int, sources: list[str]) -> Iterator[list[socket.socket]]:
    """Connected sockets, one per entry of ``sources``, that never send anything (half-open
    clients)."""
    socks: list[socket.socket] = []
    try:
        for source in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((source, 0))
            s.connect((host, port))
            s.setblocking(False)
        yield socks
    finally:
        for s in socks:
            s.close()


def received_nothing(s: socket.socket) -> bool:
    try:
        s.recv(4096)  # bytes, or b"" when the server closed: either way not silent
    except BlockingIOError:
        return True
    return False
