"""A trusted proxy that is not on loopback may not name a loopback client.

The local host may relay ("loopback is local", policy.client_may_relay); a client on a remote
balancer's own loopback is not this host. So a PROXY header from a trusted peer that is not on
loopback, naming a loopback client, is refused before the greeting (smtp/listener.py,
``_read_header``), and the session that would have had relay rights never exists.

The remote peer is real: a network namespace joined by a veth pair (tests/support/netns.py),
the gateway's PROXY listeners on the host's end, ``proxy_trusted`` naming the namespace's end.
Clients run in the namespace (``ip netns exec``): raw headers for each form of a loopback
address, and Debian's HAProxy in the namespace with ``send-proxy-v2`` in front of a client on
its own loopback, the way it happens in life. The same peer naming an ordinary client is
served (and may not relay to the outside), so a refusal is not the namespace failing.
Skipped, with the reason, where namespaces cannot be made (not root).
"""

from __future__ import annotations

import ipaddress
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.gateway import GatewayProcess, free_port
from tests.support.haproxy import Haproxy, available
from tests.support.netns import Netns, Unavailable
from tests.support.sink import SinkServer
from tests.support.world import SENDER, SENDER_DNS, GatewayFactory, issue_world, wait_until

DNS_RECORDS = SENDER_DNS

# Runs in the namespace: connect, send the header, then each command; prints the first line
# of each reply as JSON, null where the server closed instead of answering.
CLIENT = r"""
import json, re, socket, sys
host, port, header, *commands = sys.argv[1:]
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(bytes.fromhex(header))
buf = b""
def reply():
    global buf
    while not (m := re.search(rb"(?:^|\r\n)(\d{3} [^\r\n]*)\r\n", buf)):
        data = s.recv(65536)
        if not data:
            return None
        buf += data
    buf = buf[m.end():]
    return m.group(1).decode()
out = [reply()]
for command in commands:
    if out[-1] is None:
        break
    s.sendall(command.encode() + b"\r\n")
    out.append(reply())
print(json.dumps(out))
"""
SESSION = ["EHLO ns.test", f"MAIL FROM:<{SENDER}>", "RCPT TO:<someone@example.net>", "QUIT"]
SERVED_NO_RELAY = ["220", "250", "250", "550", "221"]  # the reply codes of SESSION


def in_namespace(
    ns: Netns, host: str, port: int, header: bytes, *commands: str
) -> list[str | None]:
    """A client in the namespace: the first line of each reply, None once closed."""
    done = ns.run([sys.executable, "-c", CLIENT, host, str(port), header.hex(), *commands])
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def codes(replies: list[str | None]) -> list[str | None]:
    return [r[:3] if r else r for r in replies]


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    try:
        ns = Netns.create()
    except Unavailable as exc:
        pytest.skip(f"no network namespace can be made here: {exc}")
    with ns:
        yield ns


@dataclass
class Rig:
    ns: Netns
    gw: GatewayProcess
    v1: int  # the PROXY listeners' ports, on ns.host
    v2: int

    def client(self, port: int, header: bytes, *commands: str) -> list[str | None]:
        """A client in the namespace talking to a PROXY listener here."""
        return in_namespace(self.ns, self.ns.host, port, header, *commands)


@pytest.fixture(scope="module")
def rig(netns: Netns, module_gateway: GatewayFactory, hop1: SinkServer, mx_port: int) -> Rig:
    gw = module_gateway(issue_world(hop1.port, mx_port), start=False)
    v1, v2 = free_port(netns.host), free_port(netns.host)
    trusted = f'proxy_trusted = ["{netns.inside}"]\n'
    gw.config.write_text(
        gw.config.read_text()
        + f'[[listener]]\naddress = "{netns.host}:{v1}"\nproxy_protocol = "v1"\n{trusted}'
        + f'[[listener]]\naddress = "{netns.host}:{v2}"\nproxy_protocol = "v2"\n{trusted}'
    )
    gw.start()
    return Rig(netns, gw, v1, v2)


def v1_header(client: str, server: str) -> bytes:
    if ":" not in client:
        return f"PROXY TCP4 {client} {server} 40000 25\r\n".encode()
    return f"PROXY TCP6 {client} ::ffff:{server} 40000 25\r\n".encode()  # both IPv6


def v2_header(client: str, server: str) -> bytes:
    src, dst = ipaddress.ip_address(client), ipaddress.ip_address(server)
    if src.version == 4:
        family, body = 0x11, src.packed + dst.packed
    else:  # both as IPv6 (a v4 server address mapped)
        mapped = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
        family, body = 0x21, src.packed + mapped.packed
    body += struct.pack("!HH", 40000, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21" + bytes([family]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    "version, client",
    [
        ("v1", "127.0.0.1"),
        ("v1", "127.0.0.2"),  # any of 127/8, not only the local host's address
        ("v1", "::1"),
        ("v1", "::ffff:127.0.0.1"),  # IPv4-mapped: the policy would take it for 127.0.0.1
        ("v2", "127.0.0.1"),
        ("v2", "::1"),
        ("v2", "::ffff:127.0.0.1"),
    ],
)
def test_a_remote_proxy_naming_a_loopback_client_is_refused(
    rig: Rig, version: str, client: str
) -> None:
    header = (v1_header if version == "v1" else v2_header)(client, rig.ns.host)
    port = rig.v1 if version == "v1" else rig.v2
    address = ipaddress.ip_address(client)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # the header's parser unmaps it
    refusals = refused(rig, str(address))
    assert rig.client(port, header, *SESSION) == [None]  # closed, no banner: no session at all
    wait_until(lambda: refused(rig, str(address)) > refusals, f"the refusal of {client}")
    assert refused(rig, str(address)) == refusals + 1


def refused(rig: Rig, client: str) -> int:
    """How often the gateway has refused the namespace's proxy for naming ``client``."""
    return len(
        rig.gw.log_lines(
            f"bad header from proxy [{rig.ns.inside}]: a remote proxy names a loopback client "
            f"({client}); connection closed"
        )
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_same_proxy_naming_an_outside_client_is_served_without_relay(
    rig: Rig, version: str
) -> None:
    outside = "198.51.100.7"  # TEST-NET-2: an ordinary Internet client, named only
    header = (v1_header if version == "v1" else v2_header)(outside, rig.ns.host)
    replies = rig.client(rig.v1 if version == "v1" else rig.v2, header, *SESSION)
    assert codes(replies) == SERVED_NO_RELAY, replies
    assert "Relaying denied" in str(replies[3])
    assert rig.gw.log_lines("ruleset=check_rcpt", f"relay=[{outside}]", "Relaying denied")


@pytest.mark.skipif(not available(), reason="Debian's haproxy is not installed")
def test_haproxy_on_another_host_passes_on_its_own_loopback_client(rig: Rig) -> None:
    """A client on the balancer's host, connecting to it over that host's loopback: HAProxy
    sends 127.0.0.1 as the client, and the gateway must not take it for its own."""
    front = free_port()  # any port: the namespace is new, nothing there has one
    with Haproxy(
        f"frontend smtp_in\n    bind *:{front}\n    default_backend mailgate\n"
        f"backend mailgate\n    server mg {rig.ns.host}:{rig.v2} send-proxy-v2\n",
        [(rig.ns.inside, front)],
        netns=rig.ns,
    ):
        refusals = refused(rig, "127.0.0.1")
        assert in_namespace(rig.ns, "127.0.0.1", front, b"", *SESSION) == [None]
        wait_until(lambda: refused(rig, "127.0.0.1") > refusals, "the refusal of 127.0.0.1")
        assert refused(rig, "127.0.0.1") == refusals + 1
        # The same balancer, a client on its other address: served, no relay.
        replies = in_namespace(rig.ns, rig.ns.inside, front, b"", *SESSION)
        assert codes(replies) == SERVED_NO_RELAY, replies
        assert rig.gw.log_lines("ruleset=check_rcpt", f"relay=[{rig.ns.inside}]")
