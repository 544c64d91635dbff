"""PROXY listeners end to end: the real daemon behind Debian's real HAProxy (v1 `send-proxy`,
v2 `send-proxy-v2`, its health checks), and raw headers written by the test for what HAProxy
never sends (bad headers, silence, a remote proxy naming a loopback client).

The layout of the issue: HAProxy's frontends on 127.0.0.2, clients bound to 127.0.0.3 and
127.0.0.4, HAProxy connecting to the gateway from 127.0.0.1, the only trusted proxy. The
socket peer is therefore always 127.0.0.1, the local host, which may relay and is never
limited: every check below that a client is refused proves the gateway looked at the client
the header named, not at the socket.
"""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess, free_port
from tests.support.haproxy import Haproxy, available
from tests.support.rawsmtp import RawSmtp
from tests.support.sink import SinkServer
from tests.support.world import (
    SENDER,
    SENDER_DNS,
    GatewayFactory,
    World,
    issue_world,
    message,
    wait_until,
)

pytestmark = pytest.mark.skipif(not available(), reason="Debian's haproxy is not installed")

FRONT = "127.0.0.2"  # HAProxy's frontends
CLIENT = "127.0.0.3"  # the client the access table names
OTHER = "127.0.0.4"  # another client
STRANGER = "127.0.0.9"  # connects to the PROXY listener directly: not a trusted proxy

DNS_RECORDS = {
    **SENDER_DNS,
    "example.net": [("MX", "10 mx.example.net.")],
    "mx.example.net": [("A", "127.0.0.7")],
}


@dataclass
class Rig:
    gateway: GatewayProcess
    haproxy: Haproxy
    v1: int  # HAProxy's frontend ports
    v2: int
    direct_v1: int  # the gateway's PROXY listeners
    direct_v2: int

    def client(self, front: int, source: str) -> smtplib.SMTP:
        return smtplib.SMTP(
            FRONT, front, timeout=10, source_address=(source, 0), local_hostname="client.test"
        )


def proxy_listeners(v1: int, v2: int, extra: str = "") -> str:
    return (
        f'[[listener]]\naddress = "127.0.0.1:{v1}"\nproxy_protocol = "v1"\n'
        f'proxy_trusted = ["127.0.0.1"]\n{extra}'
        f'[[listener]]\naddress = "127.0.0.1:{v2}"\nproxy_protocol = "v2"\n'
        f'proxy_trusted = ["127.0.0.1/32", "::1"]\n{extra}'
    )


def start_with_listeners(gw: GatewayProcess, tables: str) -> GatewayProcess:
    # After the sections merge_settings writes: a [[listener]] table there would be merged.
    gw.config.write_text(gw.config.read_text() + tables)
    return gw.start()


@pytest.fixture
def world(hop1: SinkServer, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port).but(
        tables={
            "access": (
                "To:targetdomain1.com  RELAY\n"
                f"Connect:{CLIENT}  RELAY\n"  # may relay anywhere (access by IP)
                "Connect:127.0.0.8  REJECT\n"
            )
        }
    )


@pytest.fixture
def rig(world: World, make_gateway: GatewayFactory) -> Iterator[Rig]:
    direct_v1, direct_v2 = free_port(), free_port()
    gw = start_with_listeners(
        make_gateway(world, start=False), proxy_listeners(direct_v1, direct_v2)
    )
    v1, v2 = free_port(FRONT), free_port(FRONT)
    haproxy = Haproxy(
        f"frontend v1_in\n    bind {FRONT}:{v1}\n    default_backend v1\n"
        f"frontend v2_in\n    bind {FRONT}:{v2}\n    default_backend v2\n"
        f"backend v1\n    server mg 127.0.0.1:{direct_v1} send-proxy\n"
        f"backend v2\n    server mg 127.0.0.1:{direct_v2} send-proxy-v2\n",
        [(FRONT, v1), (FRONT, v2)],
    )
    with haproxy:
        yield Rig(gw, haproxy, v1, v2, direct_v1, direct_v2)


def from_line(gw: GatewayProcess, subject: str) -> str:
    """The maillog from= line of the message with this subject."""
    msgid = f"msgid=<{subject.replace(' ', '-')}@example.org>"
    gw.wait_log(msgid)
    (line,) = gw.log_lines(msgid)
    return line


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_client_is_the_one_behind_haproxy(rig: Rig, hop1: SinkServer, version: str) -> None:
    front = rig.v1 if version == "v1" else rig.v2
    subject = f"through haproxy {version}"
    with rig.client(front, OTHER) as c:
        code, text = c.ehlo()
        assert code == 250 and f"[{OTHER}]" in text.decode()  # "Hello [127.0.0.4]"
        c.sendmail(SENDER, ["bob@targetdomain1.com"], message(subject))
    assert f"relay=[{OTHER}]" in from_line(rig.gateway, subject)
    (got,) = hop1.wait_subject(subject)
    received = got.data.split(b"\r\n\r\n")[0].decode()
    assert f"from client.test ([{OTHER}])" in received
    assert "127.0.0.1" not in received


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_connect_reject_names_the_proxied_client(rig: Rig, version: str) -> None:
    front = rig.v1 if version == "v1" else rig.v2
    with rig.client(front, "127.0.0.8") as c:  # Connect:127.0.0.8 REJECT
        c.ehlo()
        code, text = c.mail(SENDER)
        assert (code, text.decode()) == (550, "5.7.1 Access denied")
    with rig.client(front, OTHER) as c:
        c.ehlo()
        assert c.mail(SENDER)[0] == 250
    assert rig.gateway.log_lines("ruleset=check_relay", "127.0.0.8")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_relaying_follows_the_proxied_client(rig: Rig, version: str) -> None:
    front = rig.v1 if version == "v1" else rig.v2
    with rig.client(front, CLIENT) as c:  # Connect:127.0.0.3 RELAY
        c.ehlo()
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt("someone@example.net")[0] == 250
    with rig.client(front, OTHER) as c:  # an outside address, though the socket is 127.0.0.1
        c.ehlo()
        assert c.mail(SENDER)[0] == 250
        code, text = c.rcpt("someone@example.net")
        assert code == 550 and b"Relaying denied" in text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_untrusted_peer_is_dropped_before_the_banner(rig: Rig, version: str) -> None:
    port = rig.direct_v1 if version == "v1" else rig.direct_v2
    with socket.create_connection(("127.0.0.1", port), 5, source_address=(STRANGER, 0)) as s:
        s.settimeout(5)
        assert s.recv(100) == b""  # closed, and not a byte said
    line = rig.gateway.wait_log(f"connection from [{STRANGER}] to 127.0.0.1:{port} refused")
    assert "not a trusted proxy" in line


def test_a_listener_without_proxy_protocol_never_reads_a_header(rig: Rig) -> None:
    with RawSmtp(rig.gateway.host, rig.gateway.port, source=OTHER) as c:
        assert c.read_reply().code == 220
        reply = c.cmd("PROXY TCP4 127.0.0.3 127.0.0.1 40000 25")
        assert (reply.code, reply.enhanced) == (500, "5.5.1")  # an unknown command, no more
        c.cmd("EHLO client.test")
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<someone@example.net>").code == 550  # 127.0.0.4 may not relay


# -- health checks -----------------------------------------------------------------------------
def test_health_checks_leave_no_noise(world: World, make_gateway: GatewayFactory) -> None:
    """HAProxy's checks: v2 LOCAL then close (`check-send-proxy`), and `option smtpchk`
    (EHLO, QUIT) behind a v1 header. At the default level nothing is logged; at debug, one
    quiet line each."""
    direct_v1, direct_v2 = free_port(), free_port()
    gw = make_gateway(
        world.but(settings='[log]\nlevel = "debug"\njson = true\njson_file = "maillog.json"\n'),
        start=False,
    )
    start_with_listeners(gw, proxy_listeners(direct_v1, direct_v2))
    json_log = gw.dir / "maillog.json"
    front1, front2 = free_port(FRONT), free_port(FRONT)
    checks = Haproxy(
        f"frontend v1_in\n    bind {FRONT}:{front1}\n    default_backend v1\n"
        f"frontend v2_in\n    bind {FRONT}:{front2}\n    default_backend v2\n"
        "backend v1\n    option smtpchk EHLO haproxy.test\n"
        f"    server mg 127.0.0.1:{direct_v1} send-proxy check check-send-proxy inter 200ms\n"
        f"backend v2\n    server mg 127.0.0.1:{direct_v2} send-proxy-v2 check "
        "check-send-proxy inter 200ms\n",
        [(FRONT, front1), (FRONT, front2)],
    )
    with checks:
        # v2: LOCAL, then a close; v1: a header naming the check's own connection, then
        # the smtpchk dialogue (a session of the local host, which logs nothing).
        wait_until(lambda: len(of(events(json_log), "proxy_local")) >= 3, "LOCAL checks")
        wait_until(
            lambda: smtp_sessions(gw, events(json_log)) >= 3,
            lambda: f"smtpchk sessions: {gw.log()}",
            step=0.5,
        )
    seen = events(json_log)
    kinds = {e["event"] for e in seen} - {"worker_started"}  # with workers, each one's start
    assert kinds == {"daemon_started", "proxy_local", "statistics"}, gw.log()
    assert {e["level"] for e in of(seen, "proxy_local")} == {"debug"}  # below the default


def of(seen: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [e for e in seen if e["event"] == event]


def smtp_sessions(gw: GatewayProcess, seen: list[dict[str, object]]) -> int:
    """Sessions beyond the LOCAL checks, as the statistics line counts them (asked now)."""
    gw.signal(signal.SIGUSR2)
    stats = of(seen, "statistics")
    if not stats:
        return 0
    fields = stats[-1]["fields"]
    assert isinstance(fields, dict)
    return int(fields["counters"]["connections"]) - len(of(seen, "proxy_local"))


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- what HAProxy never sends: raw headers from the trusted address ----------------------------
def raw(gw_port: int, header: bytes, source: str = "127.0.0.1") -> RawSmtp:
    c = RawSmtp("127.0.0.1", gw_port, source=source)
    c.send(header)
    return c


def v2_header(client: str, port: int = 40000) -> bytes:
    body = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(body)) + body


@dataclass
class RawRig:
    gw: GatewayProcess
    v1: int  # its PROXY listeners
    v2: int

    def wait_log(self, text: str) -> str:
        return self.gw.wait_log(text)


@pytest.fixture
def raw_gw(world: World, make_gateway: GatewayFactory) -> RawRig:
    """A gateway whose PROXY listeners the test writes headers to itself, from 127.0.0.1:
    a greet pause, a short header timeout, two sessions per client."""
    gw = make_gateway(
        world.but(settings='[smtp]\ngreet_pause = "1s"\nmax_connections_per_ip = 2\n'),
        start=False,
    )
    v1, v2 = free_port(), free_port()
    start_with_listeners(gw, proxy_listeners(v1, v2, 'proxy_timeout = "3s"\n'))
    return RawRig(gw, v1, v2)


def closed_silently(c: RawSmtp) -> bool:
    return c.pending(5) == b"" and c.eof


@pytest.mark.parametrize(
    "header, why",
    [
        (b"PROXY TCP4 127.0.0.3 127.0.0.1 01111 25\r\n", "v1: bad port b'01111'"),
        (b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 25\n", "v1: a bare LF ends the line"),
        (b"PROXY TCP6 127.0.0.3 ::1 40000 25\r\n", "is not an IPv6 address as TCP6 needs"),
        (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "v1: no CRLF within 107 bytes"),
        (b"EHLO client.test\r\n", "a PROXY v1 line was expected, got b'EHLO"),
    ],
)
def test_a_malformed_header_closes_the_connection(raw_gw: RawRig, header: bytes, why: str) -> None:
    with raw(raw_gw.v1, header) as c:
        assert closed_silently(c)
    line = raw_gw.wait_log("bad header from proxy [127.0.0.1]: ")
    assert why in line


def test_a_truncated_v2_header_closes_the_connection(raw_gw: RawRig) -> None:
    with raw(raw_gw.v2, v2_header(CLIENT)[:20]) as c:
        c.sock.shutdown(socket.SHUT_WR)
        assert closed_silently(c)
    assert raw_gw.wait_log("bad header from proxy [127.0.0.1]: closed after 20 bytes of a header")


def test_the_header_must_come_within_proxy_timeout(raw_gw: RawRig) -> None:
    with raw(raw_gw.v2, b"") as c:
        assert wait_until(lambda: c.pending(1) == b"" and c.eof, "the close", 10)
    assert raw_gw.wait_log("no header from proxy [127.0.0.1] within 3 s; connection closed")


def test_the_greet_pause_starts_after_the_header(raw_gw: RawRig) -> None:
    """Header bytes are not early talk; what the client sends behind the header is."""
    with raw(raw_gw.v2, v2_header(CLIENT)) as c:
        assert c.read_reply().code == 220
    with raw(raw_gw.v1, b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 25\r\nEHLO x\r\n") as c:
        assert c.read_reply().code == 554
    assert raw_gw.wait_log(f"rejecting commands from [{CLIENT}] [{CLIENT}] due to pre-greeting")


def test_the_per_ip_limit_counts_the_proxied_client(raw_gw: RawRig) -> None:
    port = raw_gw.v2
    held = [raw(port, v2_header(CLIENT, 40000 + n)) for n in range(2)]
    try:
        for c in held:
            assert c.read_reply().code == 220
        with raw(port, v2_header(CLIENT)) as third:
            reply = third.read_reply()
            assert reply.first == "421 4.3.2 Too many open connections."
        with raw(port, v2_header(OTHER)) as other:
            assert other.read_reply().code == 220
    finally:
        for c in held:
            c.close()


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"  # HAProxy's check-send-proxy


@pytest.mark.parametrize(
    "listener, header", [("v2", V2_LOCAL), ("v1", b"PROXY UNKNOWN\r\n")], ids=["LOCAL", "UNKNOWN"]
)
def test_a_connection_that_names_no_client_never_relays(
    raw_gw: RawRig, listener: str, header: bytes
) -> None:
    """v2 LOCAL and v1 UNKNOWN are the proxy's own connection: served (a health check may
    talk SMTP), but the proxy's address is no client's: a proxy on this host must not lend
    such a session the local host's right to relay anywhere (nor its per-IP exemption)."""
    port = raw_gw.v2 if listener == "v2" else raw_gw.v1
    with raw(port, header) as c:
        assert c.read_reply().code == 220
        assert c.cmd("EHLO haproxy.test").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        reply = c.cmd("RCPT TO:<victim@example.net>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert "Relaying denied" in reply.text
        assert c.cmd("RCPT TO:<bob@targetdomain1.com>").code == 250  # a relayed domain is
        assert c.cmd("QUIT").code == 221
    line = raw_gw.wait_log("Relaying denied")
    assert "victim@example.net" in line and "[127.0.0.1]" in line
