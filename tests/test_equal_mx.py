"""Two nodes behind two MX records of equal preference, as docs/scaling.md sets them up.

Nodes A and B (two mailgate daemons on 127.0.0.21 and 127.0.0.22, one port) are the MX hosts
of equal.test, both preference 10, in the loopback DNS server; each relays equal.test by its
mailertable to one sink, from its own address (``[delivery] bind_address``), so the sink
knows which node handed it each message. A third daemon, S, is the sending side: it has no
mailertable entry for equal.test, so it routes the domain by MX (routing.py's default), and
RFC 5321 5.1 says it must choose among equal preferences at random.

- 2,000 messages through S split between A and B within 15 % of half each, counted three
  ways: each node's maillog from= lines, S's to= lines (relay=), the sink's client address;
- with B stopped, everything goes through A on the first attempt, nothing bounced;
- with A's next hop down, A is killed (SIGKILL) holding deferred mail while S goes on
  sending (to B, A's port being closed); A comes back, its next hop too, and delivers what it
  held: every Message-ID at the sink exactly once.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from tests.support.gateway import GatewayProcess, common_port
from tests.support.rawsmtp import RawSmtp
from tests.support.sink import SinkServer
from tests.support.world import (
    HOP1,
    SENDER,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    message,
    message_id,
    wait_until,
)

NODE_A, NODE_B = "127.0.0.21", "127.0.0.22"
RCPT = "bob@equal.test"
DNS_RECORDS = {
    **SENDER_DNS,
    "equal.test": [("MX", "10 mx1.equal.test."), ("MX", "10 mx2.equal.test.")],
    "mx1.equal.test": [("A", NODE_A)],
    "mx2.equal.test": [("A", NODE_B)],
}
MESSAGES = 2000
SESSIONS = 4  # injecting sessions at once
SPREAD = 0.15  # each node's share may differ from half by this much (of half)
QUICK = '[queue]\nrun_interval = "2s"\nretry_min = "1s"\n[smtp]\ngreet_pause = "0s"\n'
MSGID = re.compile(r"msgid=(<[^>]*>)")


def node(name: str, address: str, sink: SinkServer) -> World:
    return World(
        hostname=f"{name}.equal.test",
        tables={
            "mailertable": f"equal.test   smtp:[{HOP1}]:{sink.port}\n",
            "access": "To:equal.test  RELAY\n",
        },
        settings=QUICK + f'[delivery]\nbind_address = "{address}"\nconnect_timeout = "2s"\n',
    )


@dataclass
class Site:
    a: GatewayProcess
    b: GatewayProcess
    sender: GatewayProcess  # S: routes equal.test by MX
    sink: SinkServer  # behind both nodes


@pytest.fixture
def site(make_gateway: GatewayFactory, make_sink: SinkFactory) -> Site:
    sink = make_sink(HOP1)
    # Senders deliver to one port (25 in life): the nodes share one, S's [delivery] port.
    port = common_port(NODE_A, NODE_B)
    a = make_gateway(node("mx1", NODE_A, sink), host=NODE_A, port=port)
    b = make_gateway(node("mx2", NODE_B, sink), host=NODE_B, port=port)
    sender = make_gateway(
        World(
            hostname="sender.example.com",
            settings=QUICK + f'[delivery]\nport = {port}\nconnect_timeout = "2s"\n',
        )
    )
    return Site(a, b, sender, sink)


def subjects(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {i}" for i in range(n)]


def inject(gw: GatewayProcess, batch: list[str]) -> None:
    """Send one message per subject to ``gw`` from SESSIONS pipelined sessions at once
    (MAIL, RCPT and DATA in one write, as RFC 2920 allows; the content after the 354)."""
    failures: list[str] = []

    def session(part: list[str]) -> None:
        with RawSmtp(gw.host, gw.port, timeout=30) as c:
            assert c.read_reply().code == 220
            assert c.cmd("EHLO client.example.net").code == 250
            for subject in part:
                c.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
                replies = [r.code for r in c.read_replies(3)]
                if replies != [250, 250, 354]:
                    failures.append(f"{subject}: {replies}")
                    return
                c.send(message(subject, to=RCPT) + b".\r\n")
                if (end := c.read_reply()).code != 250:
                    failures.append(f"{subject}: {end.first}")
                    return
            c.cmd("QUIT")

    threads = [
        threading.Thread(target=session, args=(batch[n::SESSIONS],)) for n in range(SESSIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)


def received(gw: GatewayProcess) -> list[str]:
    """The Message-IDs of the mail ``gw`` took, from its maillog's from= lines."""
    return [
        m.group(1)
        for line in gw.log_lines(f"from=<{SENDER}>", "relay=")
        for m in [MSGID.search(line)]
        if m
    ]


def at_sink(sink: SinkServer) -> Counter[str]:
    """Message-ID -> how many times the sink got it."""
    ids: Counter[str] = Counter()
    for m in list(sink.messages):
        head = m.data.split(b"\r\n\r\n", 1)[0].decode()
        found = re.search(r"^Message-ID: (<[^>]*>)", head, re.MULTILINE)
        assert found, head
        ids[found.group(1)] += 1
    return ids


def ids(batch: Iterable[str]) -> set[str]:
    return {message_id(s) for s in batch}


def all_arrived(sink: SinkServer, want: int) -> None:
    wait_until(
        lambda: len(sink.messages) >= want,
        lambda: f"{want} messages at the sink (got {len(sink.messages)})",
        60,
    )


def no_reports(*gws: GatewayProcess) -> None:
    """Every queue empty (each message's to= line logged before its removal), and no
    bounce, delay warning or postmaster notify anywhere."""
    for gw in gws:
        wait_until(lambda gw=gw: not gw.queued(), f"{gw.dir.name}'s queue to empty", 15)
        assert not gw.log_lines("DSN:"), gw.log_lines("DSN:")
        assert not gw.log_lines("postmaster notify")


def test_equal_preference_mx_spreads_the_mail_over_both_nodes(site: Site) -> None:
    batch = subjects("equal", MESSAGES)
    inject(site.sender, batch)
    all_arrived(site.sink, MESSAGES)
    arrived = at_sink(site.sink)
    assert set(arrived) == ids(batch) and set(arrived.values()) == {1}
    no_reports(site.sender, site.a, site.b)

    by_node = {"A": received(site.a), "B": received(site.b)}
    assert set(by_node["A"]).isdisjoint(by_node["B"])
    assert set(by_node["A"]) | set(by_node["B"]) == ids(batch)
    half = MESSAGES / 2
    for got in by_node.values():
        assert abs(len(got) - half) <= SPREAD * half, {k: len(v) for k, v in by_node.items()}
    # The same split as S logged it and as the sink saw it.
    relays = Counter(
        "A" if f"[{NODE_A}]" in line else "B"
        for line in site.sender.log_lines(f"to=<{RCPT}>", "stat=Sent")
    )
    assert relays == {"A": len(by_node["A"]), "B": len(by_node["B"])}
    peers = Counter(m.peer for m in site.sink.messages)
    assert peers == {NODE_A: len(by_node["A"]), NODE_B: len(by_node["B"])}


def test_with_one_node_stopped_all_mail_goes_through_the_other(site: Site) -> None:
    site.b.stop()
    batch = subjects("one down", 200)
    inject(site.sender, batch)
    all_arrived(site.sink, len(batch))
    arrived = at_sink(site.sink)
    assert set(arrived) == ids(batch) and set(arrived.values()) == {1}
    assert {m.peer for m in site.sink.messages} == {NODE_A}
    assert set(received(site.a)) == ids(batch)
    no_reports(site.sender, site.a)
    # Each on its first attempt: S moved on to mx1 in the same attempt when mx2 refused.
    sent = site.sender.log_lines(f"to=<{RCPT}>", "stat=Sent")
    assert len(sent) == len(batch) and all(f"relay=mx1.equal.test. [{NODE_A}]" in s for s in sent)
    assert not site.sender.log_lines("stat=Deferred")


def test_a_node_killed_with_deferred_mail_delivers_it_when_it_is_back(site: Site) -> None:
    a, sink = site.a, site.sink
    sink.greeting_for[NODE_A] = "421 4.4.2 sink.test: A's way here is down"
    first = subjects("before the kill", 100)
    inject(site.sender, first)
    # B delivered its share; A holds the rest, deferred (S's queue is empty: A took it).
    wait_until(
        lambda: len(sink.messages) + len(a.queued()) == len(first) and not site.sender.queued(),
        lambda: f"A holding what B did not deliver (sink {len(sink.messages)}, A {a.queued()})",
        30,
    )
    held = a.queued()
    assert held and len(received(a)) == len(held)
    wait_until(
        lambda: all(a.log_lines(qid, "stat=Deferred: 421 4.4.2") for qid in held),
        "A's first attempt at each message it holds",
        15,
    )
    a.kill9()
    assert a.queued() == held  # on A's disk, nobody delivering it

    second = subjects("after the kill", 100)
    inject(site.sender, second)  # S: A's port is closed, so B takes everything now
    all_arrived(sink, len(first) + len(second) - len(held))
    assert {m.peer for m in sink.messages} == {NODE_B}

    sink.greeting_for.clear()  # A's next hop is back, and so is A, on the same spool
    a.start()
    all_arrived(sink, len(first) + len(second))
    arrived = at_sink(sink)
    assert set(arrived) == ids(first + second)
    assert set(arrived.values()) == {1}, [m for m, n in arrived.items() if n > 1]
    assert sum(1 for m in sink.messages if m.peer == NODE_A) == len(held)
    no_reports(site.sender, a, site.b)  # and A logged each message sent before removing it
    assert [len(a.log_lines(qid, f"to=<{RCPT}>", "stat=Sent")) for qid in held] == [1] * len(held)
