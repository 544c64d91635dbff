"""``mailgate check-dns`` against a DNS server on loopback serving a good zone and broken ones,
and a real gateway answering the banner check.

The gateway is gateway.example.com (its host name) and mx2.example.com (``--name``), both at
127.0.0.1, where it listens; it serves example.test (local-host-names) and relay.test (access
RELAY).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer, Records
from tests.support.gateway import GatewayProcess, free_port, mailgate_command
from tests.support.sink import SinkServer
from tests.support.world import GatewayFactory, SinkFactory, World

NAMES = "gateway.example.com, mx2.example.com"
GOOD: dict[str, list[tuple[str, str]]] = {
    "example.test": [("MX", "10 gateway.example.com."), ("MX", "10 mx2.example.com.")],
    "relay.test": [("MX", "10 gateway.example.com.")],
    "gateway.example.com": [("A", "127.0.0.1")],
    "mx2.example.com": [("A", "127.0.0.1")],
    "127.0.0.1": [("PTR", "gateway.example.com")],
}
SERVED = World(
    tables={"local-host-names": "example.test\n", "access": "To:relay.test RELAY\n"},
    settings='[smtp]\ngreet_pause = "0s"\n',
)


@pytest.fixture(scope="module")
def gateway(module_gateway: GatewayFactory) -> GatewayProcess:
    """The gateway whose banner is checked: it listens on 127.0.0.1."""
    return module_gateway(SERVED)


def zone(**changes: list[tuple[str, str]] | None) -> Records:
    """GOOD with some names' records replaced (None: the name is not in the zone)."""
    records: dict[str, list[tuple[str, str]]] = dict(GOOD)
    for name, value in changes.items():
        key = name.replace("_", ".")
        if value is None:
            del records[key]
        else:
            records[key] = value
    return records


def check_dns(tmp_path: Path, dns: DnsServer, port: int, *args: str) -> tuple[int, list[str]]:
    """``mailgate check-dns`` for the served domains' config asking ``dns``: its status and
    its lines, the SMTP line's date cut off."""
    cfg = SERVED.but(
        settings=f'listen = ["127.0.0.1:25"]\n[dns]\nnameservers = ["{dns.address}"]\n'
        'timeout = "2s"\n'
    ).write(tmp_path)
    done = subprocess.run(
        mailgate_command(
            "check-dns", "-c", str(cfg), "--name", "mx2.example.com", "--port", str(port), *args
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stderr == ""
    return done.returncode, [line.split("; ")[0] for line in done.stdout.splitlines()]


def banner(port: int) -> str:
    return f"OK   SMTP 127.0.0.1:{port}: 220 gateway.example.com ESMTP mailgate ready"


MakeDns = Callable[[Records], DnsServer]
MX_EXAMPLE = "OK   MX example.test: gateway.example.com (10), mx2.example.com (10)"
EQUAL = "OK   MX example.test preference: equal (10) for all"
MX_RELAY = "OK   MX relay.test: gateway.example.com (10)"
A_GATEWAY = "OK   A gateway.example.com: 127.0.0.1"
A_MX2 = "OK   A mx2.example.com: 127.0.0.1"
PTR = "OK   PTR 127.0.0.1: gateway.example.com, which resolves back to 127.0.0.1"
BANNER = "SMTP"  # stands for banner(port)


def test_a_good_zone_passes_every_check(
    tmp_path: Path, make_dns: MakeDns, gateway: GatewayProcess
) -> None:
    status, lines = check_dns(tmp_path, make_dns(GOOD), gateway.port)
    assert (status, lines) == (
        0,
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            A_GATEWAY,
            A_MX2,
            PTR,
            banner(gateway.port),
            "check-dns: 7 OK, 0 WARN, 0 FAIL",
        ],
    )


def test_domains_named_are_the_only_ones_checked(
    tmp_path: Path, make_dns: MakeDns, gateway: GatewayProcess
) -> None:
    _, lines = check_dns(tmp_path, make_dns(GOOD), gateway.port, "relay.test")
    assert [line for line in lines if line.startswith(("OK   MX", "FAIL MX"))] == [
        "OK   MX relay.test: gateway.example.com (10)"
    ]


# Each broken zone, and check-dns's whole output for it (its status follows: 1 on a FAIL).
BROKEN: Mapping[str, tuple[Records, list[str]]] = {
    "missing PTR": (
        zone(**{"127.0.0.1": None}),
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            A_GATEWAY,
            A_MX2,
            "FAIL PTR 127.0.0.1: no PTR record",
            BANNER,
            "check-dns: 6 OK, 0 WARN, 1 FAIL",
        ],
    ),
    "PTR to another name": (
        zone(**{"127.0.0.1": [("PTR", "other.example.net")]}),
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            A_GATEWAY,
            A_MX2,
            f"FAIL PTR 127.0.0.1: other.example.net: not one of this gateway's names ({NAMES})",
            BANNER,
            "check-dns: 6 OK, 0 WARN, 1 FAIL",
        ],
    ),
    "PTR to a name that does not resolve back": (
        zone(
            **{"127.0.0.1": [("PTR", "mx2.example.com")], "mx2_example_com": [("A", "127.0.0.9")]}
        ),
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            A_GATEWAY,
            "FAIL A mx2.example.com: 127.0.0.9: not an address this gateway listens on (127.0.0.1)",
            "FAIL PTR 127.0.0.1: mx2.example.com does not resolve back to 127.0.0.1 (127.0.0.9)",
            BANNER,
            "check-dns: 5 OK, 0 WARN, 2 FAIL",
        ],
    ),
    "MX to a name with no address": (
        zone(mx2_example_com=[("TXT", "no address here")]),
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            A_GATEWAY,
            "FAIL A mx2.example.com: no A/AAAA record",
            PTR,
            BANNER,
            "check-dns: 6 OK, 0 WARN, 1 FAIL",
        ],
    ),
    "MX to a name that does not exist, beside ours": (
        zone(relay_test=[("MX", "10 gateway.example.com."), ("MX", "5 backup.example.net.")]),
        [
            MX_EXAMPLE,
            EQUAL,
            MX_RELAY,
            "WARN MX relay.test: also backup.example.net (5), not this gateway: it must "
            "relay to it and gets the mail first",
            "FAIL A backup.example.net: no such name (NXDOMAIN)",
            A_GATEWAY,
            A_MX2,
            PTR,
            BANNER,
            "check-dns: 7 OK, 1 WARN, 1 FAIL",
        ],
    ),
    "MX to another host only": (
        zone(relay_test=[("MX", "10 mx.elsewhere.net.")], mx_elsewhere_net=[("A", "127.0.0.44")]),
        [
            MX_EXAMPLE,
            EQUAL,
            f"FAIL MX relay.test: mx.elsewhere.net (10): none is this gateway ({NAMES})",
            A_GATEWAY,
            A_MX2,
            PTR,
            BANNER,
            "check-dns: 6 OK, 0 WARN, 1 FAIL",
        ],
    ),
    "no MX": (
        zone(relay_test=[("A", "127.0.0.1")]),
        [
            MX_EXAMPLE,
            EQUAL,
            "FAIL MX relay.test: no MX record: mail would go to the domain's address",
            A_GATEWAY,
            A_MX2,
            PTR,
            BANNER,
            "check-dns: 6 OK, 0 WARN, 1 FAIL",
        ],
    ),
    "unequal preferences": (
        zone(example_test=[("MX", "10 gateway.example.com."), ("MX", "20 mx2.example.com.")]),
        [
            "OK   MX example.test: gateway.example.com (10), mx2.example.com (20)",
            "WARN MX example.test preference: unequal: gateway.example.com (10), "
            "mx2.example.com (20): the lowest gets all the mail while it answers",
            MX_RELAY,
            A_GATEWAY,
            A_MX2,
            PTR,
            BANNER,
            "check-dns: 6 OK, 1 WARN, 0 FAIL",
        ],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_zone_is_spotted(
    tmp_path: Path, make_dns: MakeDns, gateway: GatewayProcess, case: str
) -> None:
    records, expected = BROKEN[case]
    status, lines = check_dns(tmp_path, make_dns(records), gateway.port)
    assert lines == [banner(gateway.port) if line == BANNER else line for line in expected]
    assert status == (1 if any(line.startswith("FAIL") for line in expected) else 0)


def test_an_mx_host_that_does_not_answer_or_is_another_server_fails(
    tmp_path: Path, make_dns: MakeDns, make_sink: SinkFactory
) -> None:
    dns = make_dns(GOOD)
    closed = free_port("127.0.0.1")
    status, lines = check_dns(tmp_path / "closed", dns, closed)
    assert status == 1
    assert lines[-2:] == [
        f"FAIL SMTP 127.0.0.1:{closed}: Connection refused",
        "check-dns: 6 OK, 0 WARN, 1 FAIL",
    ]
    other: SinkServer = make_sink("127.0.0.1", hostname="sink.test")
    status, lines = check_dns(tmp_path / "other", dns, other.port)
    assert status == 1
    assert lines[-2].startswith(f"FAIL SMTP 127.0.0.1:{other.port}: 220 sink.test") and lines[
        -2
    ].endswith("not this gateway's banner (220 gateway.example.com …)")
