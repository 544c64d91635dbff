"""`mailgate drain`: a node taken out of service under load loses and refuses nothing.

Two gateways are the two MX of a site: A is drained, B is the other node. Clients send to A
without pause; a message A does not take (its 421, or a closed port once it is gone) is sent
again to B, as a sending MTA moves to the next MX. Every message must have got 250 from one
of them, none a 5xx, and each must reach the internal server exactly once.
"""

from __future__ import annotations

import smtplib
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tests.support.gateway import GatewayProcess, free_port, mailgate_command, run_cli
from tests.support.sink import SinkServer
from tests.support.world import (
    HOP1,
    SENDER,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    issue_world,
    message,
    wait_until,
)

DNS_RECORDS = SENDER_DNS
NODE_B = "127.0.0.11"
DEAD = "127.0.0.12"  # deadend.test's server as A knows it: nothing listens there
CLIENTS = 4
PER_CLIENT = 3000  # messages each client sends at most (it stops soon after A turns it away)
SENDING_FOR = 90.0  # seconds a client sends at most
AFTER_DRAIN = 5  # messages each client still sends (to B) once A has turned it away


@pytest.fixture
def hop1(make_sink: SinkFactory) -> SinkServer:
    return make_sink(HOP1)


def node(hop1: SinkServer, mx_port: int, deadend: str) -> World:
    return issue_world(hop1.port, mx_port).but(
        tables={
            "mailertable": (
                f"targetdomain1.com   smtp:[{HOP1}]:{hop1.port}\ndeadend.test   smtp:{deadend}\n"
            ),
            "access": "To:targetdomain1.com  RELAY\nTo:deadend.test  RELAY\n",
        },
        settings='[queue]\nretry_min = "1s"\nrun_interval = "2s"\n',
    )


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def nodes(
    hop1: SinkServer, mx_port: int, make_gateway: GatewayFactory, workers: int
) -> tuple[GatewayProcess, GatewayProcess]:
    """A (drained; ``workers`` processes) and B, the other MX."""
    a_world = node(hop1, mx_port, f"[{DEAD}]:{free_port(DEAD)}")
    a = make_gateway(a_world.but(settings=f"workers = {workers}\n"))
    b = make_gateway(node(hop1, mx_port, f"[{HOP1}]:{hop1.port}"), host=NODE_B)
    return a, b


@dataclass
class Tally:
    at_a: list[str] = field(default_factory=list)  # subjects A took (250)
    at_b: list[str] = field(default_factory=list)  # turned away by A, then taken by B
    refusals: list[str] = field(default_factory=list)  # what A said when it turned one away
    errors: list[str] = field(default_factory=list)  # anything a test must not see
    lock: threading.Lock = field(default_factory=threading.Lock)


def sender(n: int, a: GatewayProcess, b: GatewayProcess, tally: Tally) -> None:
    """One client: a session to A, message after message; a message A turns away goes to B,
    and so does everything after it (a real MTA would try A again later; B takes it now)."""
    session: smtplib.SMTP | None = None
    turned_away = 0
    until = time.monotonic() + SENDING_FOR
    for i in range(PER_CLIENT):
        if time.monotonic() > until:
            with tally.lock:
                tally.errors.append(f"client {n}: A still took mail after {SENDING_FOR:g} s")
            break
        subject = f"load {n}-{i}"
        if turned_away == 0:
            try:
                if session is None:
                    session = a.smtp(timeout=20)
                session.sendmail(SENDER, ["bob@targetdomain1.com"], message(subject))
                with tally.lock:
                    tally.at_a.append(subject)
                continue
            except smtplib.SMTPResponseException as exc:
                code, text = exc.smtp_code, exc.smtp_error.decode(errors="replace")
                with tally.lock:
                    (tally.refusals if code // 100 == 4 else tally.errors).append(f"{code} {text}")
            except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                with tally.lock:
                    tally.refusals.append(repr(exc))
            session = None
        turned_away += 1
        try:
            with b.smtp(timeout=20) as other:
                other.sendmail(SENDER, ["bob@targetdomain1.com"], message(subject))
            with tally.lock:
                tally.at_b.append(subject)
        except (smtplib.SMTPException, OSError) as exc:
            with tally.lock:
                tally.errors.append(f"B refused {subject}: {exc!r}")
        if turned_away >= AFTER_DRAIN:
            break
    if session is not None:
        session.close()


def test_drain_under_load_loses_and_refuses_nothing(
    nodes: tuple[GatewayProcess, GatewayProcess], hop1: SinkServer
) -> None:
    a, b = nodes
    tally = Tally()
    clients = [threading.Thread(target=sender, args=(n, a, b, tally)) for n in range(CLIENTS)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: len(tally.at_a) >= 3 * CLIENTS, "mail flowing through A", 30)
        drain = subprocess.run(
            [*mailgate_command("drain", "-c", str(a.config), "--deadline", "60s")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        for t in clients:
            t.join(120)
    assert not tally.errors, tally.errors
    assert drain.returncode == 0, drain.stdout + drain.stderr
    assert "drained: queue delivered, daemon stopped" in drain.stdout
    assert "the queue is empty" in drain.stdout
    assert tally.at_a and tally.at_b  # both sides of the drain were seen
    assert any("4.3.2" in r and "Service shutting down" in r for r in tally.refusals), (
        tally.refusals
    )
    assert a.proc is not None and a.proc.wait(10) == 0
    subjects = tally.at_a + tally.at_b
    wait_until(
        lambda: all(hop1.with_subject(s) for s in subjects),
        lambda: f"{len(subjects)} messages at the sink (got {len(hop1.messages)})",
        60,
    )
    wait_until(lambda: not b.queued(), "B's queue to empty", 30)
    arrived = Counter(
        line.split(": ", 1)[1]
        for m in hop1.messages
        for line in m.data.decode(errors="replace").split("\r\n")
        if line.startswith("Subject: load ")
    )
    assert sorted(arrived) == sorted(subjects)
    assert set(arrived.values()) == {1}, [s for s, n in arrived.items() if n > 1]
    assert not a.queued()
    log = a.log()
    assert "draining (mailgate drain)" in log and "drained: no session in a transaction" in log


def test_what_is_left_at_the_deadline_is_reported_then_handed_over(
    nodes: tuple[GatewayProcess, GatewayProcess], hop1: SinkServer
) -> None:
    a, b = nodes
    with a.smtp() as c:
        c.sendmail(SENDER, ["carol@deadend.test"], message("stuck"))
    (qid,) = wait_until(a.queued, "the message queued at A")
    a.wait_log("stat=Deferred")
    first = run_cli("drain", "-c", str(a.config), "--deadline", "2s")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "deadline of 2 s reached: daemon stopped" in first.stdout
    assert f"1 message(s) left in {a.spool / 'queue'}" in first.stderr and qid in first.stderr
    assert a.queued() == [qid]  # kept, not lost
    # The node is down now; its queue is handed over to the other one.
    second = run_cli("drain", "-c", str(a.config), "--handover", f"{NODE_B}:{b.port}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "not running" in second.stdout
    assert f"handed over 1 message(s) to {NODE_B}:{b.port}" in second.stdout
    assert not a.queued()
    (got,) = hop1.wait_subject("stuck")
    assert got.rcpt_tos == ["carol@deadend.test"] and got.mail_from == SENDER
    lines = a.log_lines(qid, "to=<carol@deadend.test>", f"relay=[{NODE_B}]", "stat=Sent")
    assert len(lines) == 1
    assert a.log_lines(f"{qid}: removed")
    assert a.log_lines(f"handover to [{NODE_B}]:{b.port}: 1 messages handed over, 0 still")


def test_a_handover_the_other_node_refuses_keeps_the_mail(
    nodes: tuple[GatewayProcess, GatewayProcess], hop1: SinkServer
) -> None:
    a, b = nodes
    with a.smtp() as c:
        c.sendmail(SENDER, ["carol@deadend.test", "bob@targetdomain1.com"], message("half"))
    hop1.wait_subject("half")  # bob's part went; carol's waits
    (qid,) = wait_until(a.queued, "the message queued at A")
    b.stop()
    refused = run_cli(
        "drain", "-c", str(a.config), "--deadline", "1s", "--handover", f"{NODE_B}:{b.port}"
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "handed over 0 message(s)" in refused.stdout and "1 could not be" in refused.stdout
    assert a.queued() == [qid]
    assert len(hop1.with_subject("half")) == 1  # bob was not sent again
