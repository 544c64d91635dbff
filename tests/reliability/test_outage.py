"""Outage suite: every way the next hop can fail, against the real daemon.

The daemon (tests/support/gateway.py) relays for two domains: ``hop.test`` goes by mailertable to
one server (``smtp:[127.0.4.1]``), ``mx.test`` by its MX records (preference 10 and 20) served by
the DNS server on loopback. The next hops are test sinks (tests/support/sink.py) told to
misbehave: refuse connections, 421 at the greeting, 4xx/5xx at MAIL, RCPT or after the content,
hang, drop the connection in the middle of the content; or a black hole that never completes
the TCP handshake. Bounces go to the sender's MX, another sink.

Each case checks what Sendmail and Postfix do: what is deferred stays queued with a
``stat=Deferred`` maillog line and its error in the queue status, and is delivered exactly once
(per recipient, counted at the sink by Message-ID) when the hop is healthy again, by a queue
run (SIGUSR1) or by the retry timer; a permanent failure bounces to the sender with the
remote status in the DSN; an expired message (``[queue] max_age``) bounces with 4.4.7; the
next MX is tried when the first cannot take the transaction. Every case ends with an empty
queue.

Timeouts are short through the configuration: ``[delivery] command_timeout`` scales the SMTP
client's RFC 5321 timeouts (2 s gives a 2 s greeting/EHLO/MAIL wait, 0.8 s for the 354, 4 s
for the reply to the final dot), ``connect_timeout`` bounds the TCP handshake. Tests never
assert on durations: waits are hang guards.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
from collections import Counter
from collections.abc import Callable
from email.message import Message

import pytest

from mailgate.config import DeliverySettings
from mailgate.delivery.smtp import delivery_timeouts
from mailgate.dsn import interval_text
from mailgate.queue.spool import QueueStatus
from mailgate.smtp.client import Timeouts
from tests.support.blackhole import Blackhole
from tests.support.gateway import GatewayProcess, common_port, run_cli
from tests.support.sink import SinkMessage, SinkServer
from tests.support.world import (
    SENDER,
    GatewayFactory,
    SinkFactory,
    World,
    message,
    message_id,
    poll,
    stays,
    wait_until,
)

CLIENT = "127.0.4.20"  # an outside client: relays only to the To: RELAY domains
HOP = "127.0.4.1"  # hop.test's server (mailertable)
MX1 = "127.0.4.11"  # mx.test's MX, preference 10
MX2 = "127.0.4.12"  # mx.test's MX, preference 20
SENDER_MX = "127.0.4.3"  # example.org's MX: where the bounces go
DNS_RECORDS = {
    "example.org": [("MX", "10 mx.example.org.")],
    "mx.example.org": [("A", SENDER_MX)],
    "mx.test": [("MX", "10 mx1.mx.test."), ("MX", "20 mx2.mx.test.")],
    "mx1.mx.test": [("A", MX1)],
    "mx2.mx.test": [("A", MX2)],
}
# Seconds: the hang guard for anything that should happen soon (a shorter one makes a broken
# build fail faster: OUTAGE_GUARD=8).
GUARD = float(os.environ.get("OUTAGE_GUARD", "30"))

# Relaxed client timeouts for cases that do not wait on one: a slow test machine must not
# make a healthy hop look hung (a late 250 after the dot would mean a duplicate).
RELAXED = '[delivery]\ncommand_timeout = "60s"\nconnect_timeout = "10s"\n'
# Short ones for the cases that wait on a hung hop.
SHORT = '[delivery]\ncommand_timeout = "2s"\nconnect_timeout = "2s"\n'
# Only queue runs (SIGUSR1) retry: the deferred state can be looked at without a race.
MANUAL = '[queue]\nretry_min = "1h"\nrun_interval = "1h"\n'
# The retry timer: first retry after 0.3 s, then at least every second.
TIMER = '[queue]\nretry_min = "0.3s"\nrun_interval = "1s"\n'


# -- helpers -------------------------------------------------------------------------------------


def msgid_of(data: bytes) -> str | None:
    m = re.search(rb"^Message-ID: *(<[^>\r\n]+>)", data, re.MULTILINE | re.IGNORECASE)
    return m.group(1).decode() if m else None


def deliveries(sink: SinkServer, msgid: str) -> Counter[str]:
    """How often each recipient got the message ``msgid`` at ``sink``."""
    count: Counter[str] = Counter()
    for m in list(sink.messages):
        if msgid_of(m.data) == msgid:
            count.update(m.rcpt_tos)
    return count


def copies(sink: SinkServer, msgid: str) -> list[SinkMessage]:
    return [m for m in list(sink.messages) if msgid_of(m.data) == msgid]


def queue_status(gw: GatewayProcess) -> dict[str, QueueStatus]:
    """Each queued message's status file (empty before its first recorded attempt)."""
    out: dict[str, QueueStatus] = {}
    for qid in gw.queued():
        st = gw.spool / "queue" / f"{qid}.st"
        try:
            out[qid] = QueueStatus.from_json(st.read_bytes())
        except (FileNotFoundError, ValueError):
            out[qid] = QueueStatus()
    return out


def recorded_attempts(gw: GatewayProcess) -> int:
    return sum(st.attempts for st in queue_status(gw).values())


def last_errors(st: QueueStatus) -> dict[str, str]:
    """The last error of each recipient still pending (none once it is done)."""
    return {a: r.last_error for a, r in st.recipients.items() if r.last_error is not None}


def done_recipients(st: QueueStatus) -> set[str]:
    return {a for a, r in st.recipients.items() if not st.is_pending(a)}


def deferred_lines(gw: GatewayProcess) -> list[str]:
    return [line for line in gw.log().splitlines() if "stat=Deferred" in line]


def to_lines(gw: GatewayProcess, rcpt: str, stat: str) -> list[str]:
    """The to= lines that list ``rcpt`` (a line lists every recipient of its transaction
    that had its outcome, as Sendmail's) and say ``stat``."""
    return [
        line
        for line in gw.log().splitlines()
        if " to=" in line
        and f"<{rcpt}>" in line.split(", delay=")[0].split(" to=", 1)[1].split(",")
        and f"stat={stat}" in line
    ]


def wait_deferred(gw: GatewayProcess, attempts: int = 1) -> dict[str, QueueStatus]:
    """Wait until the queue records ``attempts`` attempts; return the status files. A queue
    that empties first means the mail was delivered or bounced instead of deferred."""

    def deferred_or_gone() -> bool:
        if not gw.queued():
            raise AssertionError(f"the queue is empty: not deferred. maillog:\n{gw.log()}")
        return recorded_attempts(gw) >= attempts

    wait_until(deferred_or_gone, f"{attempts} recorded attempt(s)", GUARD)
    return queue_status(gw)


def kick_until(gw: GatewayProcess, cond: Callable[[], object], what: str) -> None:
    """Queue runs (SIGUSR1, Sendmail's ``-q``) until ``cond``: a run that comes while the
    message's previous attempt is still finishing skips it, as Sendmail skips a locked
    message, so one signal alone could be missed."""

    def kicked() -> object:
        if cond():
            return True
        gw.signal(signal.SIGUSR1)
        return poll(cond, 0.5)

    wait_until(kicked, what, GUARD, step=0)


def wait_queue_empty(gw: GatewayProcess) -> None:
    wait_until(lambda: not gw.queued(), lambda: f"an empty queue (left: {gw.queued()})", GUARD)


def parse(msg: SinkMessage) -> Message:
    return email.message_from_bytes(msg.data, policy=email.policy.compat32)


def dsn_fields(msg: SinkMessage) -> tuple[str, list[dict[str, str]]]:
    """The subject of a DSN and its per-recipient fields (RFC 3464), keys lower-case."""
    parsed = parse(msg)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2  # per-message block, then recipients
    recipients = [
        {k.lower(): " ".join(str(v).split()) for k, v in b.items()}
        for b in blocks[1:]
        if isinstance(b, Message)
    ]
    assert len(recipients) == len(blocks) - 1
    return str(parsed["Subject"]), recipients


def bounces_for(bounces: SinkServer, msgid: str) -> list[SinkMessage]:
    """DSNs at the sender's MX that return ``msgid`` (their part 3 holds its header)."""
    return [m for m in list(bounces.messages) if m.mail_from == "" and msgid.encode() in m.data]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def port() -> int:
    """The next hops' port, free on all their addresses (MX hosts share ``[delivery] port``)."""
    return common_port(HOP, MX1, MX2, SENDER_MX)


@pytest.fixture
def bounces(make_sink: SinkFactory, port: int) -> SinkServer:
    """The sender's mail server, always up."""
    return make_sink(SENDER_MX, port, hostname="mx.example.org")


# The next hops, not started: each test starts them (or not) with their behaviour set.
@pytest.fixture
def hop(make_sink: SinkFactory, port: int) -> SinkServer:
    return make_sink(HOP, port, hostname="hop.test", start=False)


@pytest.fixture
def mx1(make_sink: SinkFactory, port: int) -> SinkServer:
    return make_sink(MX1, port, hostname="mx1.mx.test", start=False)


@pytest.fixture
def mx2(make_sink: SinkFactory, port: int) -> SinkServer:
    return make_sink(MX2, port, hostname="mx2.mx.test", start=False)


@pytest.fixture
def gateway(make_gateway: GatewayFactory, port: int, bounces: SinkServer) -> GatewayFactory:
    """``gateway(MANUAL, SHORT, ...)``: a started daemon with these settings sections."""
    world = World(
        tables={
            "mailertable": f"hop.test   smtp:[{HOP}]:{port}\n",
            "access": "To:hop.test   RELAY\nTo:mx.test   RELAY\n",
        },
        settings=f'[smtp]\ngreet_pause = "0s"\n[delivery]\nport = {port}\n',
    )
    return lambda *sections: make_gateway(world.but(settings="\n".join(sections)))


def send(gw: GatewayProcess, rcpts: list[str], tag: str, body: bytes = b"Hello.\r\n") -> str:
    """Submit one message from the outside client; the gateway must take it (250)."""
    with gw.smtp(CLIENT, timeout=GUARD) as s:
        refused = s.sendmail(SENDER, rcpts, message(tag, to=None, body=body))
    assert refused == {}
    return message_id(tag)


# -- the next hop refuses connections --------------------------------------------------------


@pytest.mark.parametrize("retry", ["queue run", "retry timer"])
def test_refused_connection_defers_then_delivers_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer, retry: str
) -> None:
    """Nothing listens at the hop: every message is deferred (Sendmail's ``stat=Deferred:
    Connection refused by``), kept in the queue, delivered once when the server is back, in
    one transaction per message with all its recipients; no bounce."""
    gw = gateway(MANUAL if retry == "queue run" else TIMER, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test"]
    msgids = [send(gw, rcpts, f"refused {i}") for i in range(3)]
    status = wait_deferred(gw, attempts=3)
    assert len(status) == 3
    for qid, st in status.items():
        assert set(last_errors(st)) == set(rcpts)
        assert last_errors(st)["bob@hop.test"] == (f"Deferred: Connection refused by [{HOP}]")
        for rcpt in rcpts:
            line = next(x for x in to_lines(gw, rcpt, "Deferred") if f"{qid}:" in x)
            assert "mailer=smtp" in line and f"relay=[{HOP}]" in line and "dsn=4.4.1" in line
            assert line.endswith(f"stat=Deferred: Connection refused by [{HOP}]")
    if retry == "queue run":
        out = run_cli("mailq", "-c", str(gw.config))
        assert out.returncode == 0, out.stderr
        assert all(qid in out.stdout for qid in status) and "(3 requests)" in out.stdout
        assert out.stdout.count("Deferred: Connection refused") == 3
        assert out.stdout.count("<carol@hop.test>") == 3
        # nothing retries by itself within the hour
        # (one line a message and attempt: both its recipients)
        stays(lambda: len(deferred_lines(gw)) == 3, "no retry before the queue run", 0.5)

    hop.start()
    if retry == "queue run":
        kick_until(gw, lambda: len(hop.messages) >= 3, "the deliveries after the queue run")
    else:
        hop.wait_for(3, timeout=GUARD)
    wait_queue_empty(gw)
    for msgid in msgids:
        assert deliveries(hop, msgid) == Counter(rcpts)
        assert len(copies(hop, msgid)) == 1  # one transaction with both recipients
    assert len(hop.messages) == 3
    assert all(len(to_lines(gw, r, "Sent")) == 3 for r in rcpts)
    assert bounces.messages == []


def test_hop_goes_down_while_a_connection_to_it_is_cached(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    """The idle connection kept for the next message is dead: the next message is tried on
    a fresh one, refused, deferred, and delivered once when the hop is back."""
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    first = send(gw, ["bob@hop.test"], "before the outage")
    hop.wait_for(1, timeout=GUARD)
    wait_queue_empty(gw)
    hop.stop()  # closes the listener and the cached connection
    second = send(gw, ["bob@hop.test"], "during the outage")
    [(_qid, st)] = wait_deferred(gw).items()
    assert last_errors(st)["bob@hop.test"].startswith("Deferred: Connection refused")
    hop.start()
    kick_until(gw, lambda: copies(hop, second), "the delivery after the queue run")
    wait_queue_empty(gw)
    assert len(copies(hop, first)) == len(copies(hop, second)) == 1
    assert bounces.messages == []


# -- 421 at the greeting ---------------------------------------------------------------------


def test_421_greeting_defers_then_delivers_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    hop.greeting = "421 4.3.2 hop.test Service not available, closing channel"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    msgid = send(gw, ["bob@hop.test"], "greeting 421")
    [(_qid, st)] = wait_deferred(gw).items()
    assert last_errors(st)["bob@hop.test"].startswith(
        "Deferred: 421 4.3.2 hop.test Service not available"
    )
    [line] = to_lines(gw, "bob@hop.test", "Deferred")
    assert f"relay=[{HOP}]" in line and "dsn=4.3.2" in line
    assert hop.commands == []  # no transaction on a 421 greeting (the sink reads nothing more)
    hop.normal()
    kick_until(gw, lambda: copies(hop, msgid), "the delivery after the queue run")
    wait_queue_empty(gw)
    assert deliveries(hop, msgid) == Counter(["bob@hop.test"])
    assert bounces.messages == []


# -- 4xx to RCPT -----------------------------------------------------------------------------


def test_4xx_to_some_recipients_delivers_the_others_and_retries_only_those(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    """As Sendmail and Postfix: the accepted recipients get the message at once; only the
    deferred one is in the retry's transaction, so nobody gets it twice."""
    hop.rcpt_reply["carol@hop.test"] = "452 4.2.2 Mailbox full, try later"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test", "dave@hop.test"]
    msgid = send(gw, rcpts, "rcpt 4xx some")
    [(qid, st)] = wait_deferred(gw).items()
    [first] = hop.wait_for(1, timeout=GUARD)
    assert first.rcpt_tos == ["bob@hop.test", "dave@hop.test"]
    assert list(last_errors(st)) == ["carol@hop.test"]
    assert last_errors(st)["carol@hop.test"].startswith("Deferred: 452 4.2.2 Mailbox full")
    assert done_recipients(st) == {"bob@hop.test", "dave@hop.test"}
    [deferred] = to_lines(gw, "carol@hop.test", "Deferred")
    assert "dsn=4.2.2" in deferred and f"{qid}:" in deferred
    assert len(to_lines(gw, "bob@hop.test", "Sent")) == 1
    assert len(to_lines(gw, "dave@hop.test", "Sent")) == 1
    out = run_cli("mailq", "-c", str(gw.config))
    assert "<carol@hop.test>" in out.stdout and "<bob@hop.test>" not in out.stdout

    hop.normal()
    kick_until(gw, lambda: len(hop.messages) >= 2, "the retry for the deferred recipient")
    wait_queue_empty(gw)
    assert [m.rcpt_tos for m in copies(hop, msgid)] == [
        ["bob@hop.test", "dave@hop.test"],
        ["carol@hop.test"],
    ]
    assert deliveries(hop, msgid) == Counter(rcpts)
    assert bounces.messages == []


def test_4xx_to_all_recipients_defers_all_then_one_transaction(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    hop.rcpt_default_reply = "451 4.3.0 Temporary lookup failure"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test", "dave@hop.test"]
    msgid = send(gw, rcpts, "rcpt 4xx all")
    [(_qid, st)] = wait_deferred(gw).items()
    assert set(last_errors(st)) == set(rcpts)
    assert done_recipients(st) == set()
    for rcpt in rcpts:
        [line] = to_lines(gw, rcpt, "Deferred")
        assert "dsn=4.3.0" in line and "451 4.3.0 Temporary lookup failure" in line
    # The hop saw one transaction, all recipients refused, and no content (PIPELINING's
    # DATA got 554 "no valid recipients").
    [t] = hop.transactions
    assert t.rcpt_tos == [] and t.rcpt_refused == rcpts and not t.completed
    assert hop.messages == []

    hop.normal()
    kick_until(gw, lambda: copies(hop, msgid), "the delivery after the queue run")
    wait_queue_empty(gw)
    [msg] = copies(hop, msgid)
    assert msg.rcpt_tos == rcpts
    assert bounces.messages == []


# -- the hop hangs ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "content", "data_end"])
def test_hang_defers_after_the_timeout_then_delivers_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer, stage: str
) -> None:
    """The hop accepts and goes silent: before the greeting, after 220 (EHLO unanswered),
    after EHLO (the pipelined MAIL/RCPT/DATA unanswered), in the middle of the content (it
    stops reading an 8 MiB message: our writes block), or after the whole content (the dot
    unanswered). Each is a timeout, logged as one, the message kept and sent once later."""
    body = b"Hello.\r\n"
    if stage == "content":
        hop.stall_in_data = 64 * 1024
        body = b"x" * 998 + b"\r\n"
        body *= 8 * 1024 * 1024 // len(body)
    else:
        hop.hang(stage)
    hop.start()
    gw = gateway(MANUAL, SHORT)
    msgid = send(gw, ["bob@hop.test"], f"hang {stage}", body)
    [(_qid, st)] = wait_deferred(gw).items()
    timed_out = f"Deferred: Connection timed out with [{HOP}]"
    assert last_errors(st)["bob@hop.test"] == timed_out
    [line] = to_lines(gw, "bob@hop.test", "Deferred")
    assert f"relay=[{HOP}]" in line and line.endswith(f"stat={timed_out}")
    assert hop.messages == []
    hop.normal()
    kick_until(gw, lambda: copies(hop, msgid), "the delivery after the queue run")
    wait_queue_empty(gw)
    assert deliveries(hop, msgid) == Counter(["bob@hop.test"])
    [msg] = copies(hop, msgid)
    assert msg.data.endswith(body)
    assert bounces.messages == []


# -- the connection drops during the content -------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["after 100 bytes", "after 300 KiB of 1 MiB", "before the reply", "on a reused connection"],
)
def test_drop_mid_data_defers_then_delivers_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer, where: str
) -> None:
    """The connection breaks in the content, or after it before the reply: nothing was
    delivered (no 250), so the message stays queued for both recipients and is sent once
    later. On a connection kept from an earlier message the attempt is repeated once at
    once on a fresh connection (it may only have gone stale), which breaks too."""
    body = b"".join(
        b"line %06d of a long message to be cut short\r\n" % i for i in range(1024 * 1024 // 48)
    )
    hop.start()
    # A kept connection is its worker's own: one process, so the warm-up's is the one reused.
    one = "workers = 1\n" if where == "on a reused connection" else ""
    gw = gateway(one, MANUAL, RELAXED)
    if where == "on a reused connection":
        send(gw, ["bob@hop.test"], "warm-up")
        hop.wait_for(1, timeout=GUARD)
        wait_queue_empty(gw)
        hop.clear()
    if where in ("after 100 bytes", "on a reused connection"):
        hop.close_in_data = 100
    elif where.startswith("after 300"):
        hop.close_in_data = 300 * 1024
    else:
        hop.close_at = "data_end"  # the whole content read, the connection closed unanswered
    msgid = send(gw, ["bob@hop.test", "carol@hop.test"], f"drop {where}", body)
    [(qid, st)] = wait_deferred(gw).items()
    assert set(last_errors(st)) == {"bob@hop.test", "carol@hop.test"}
    [deferred] = deferred_lines(gw)  # the transaction's line, both recipients on it
    assert f"{qid}: to=<bob@hop.test>,<carol@hop.test>, " in deferred
    assert hop.messages == []
    wait_until(lambda: hop.transactions, "the cut transaction's record", GUARD)
    cuts = list(hop.transactions)
    assert len(cuts) == (2 if where == "on a reused connection" else 1)
    assert len({t.connection for t in cuts}) == len(cuts)
    assert all(not t.completed and t.data_size > 0 for t in cuts)
    cut = cuts[-1]
    hop.normal()
    kick_until(gw, lambda: copies(hop, msgid), "the delivery after the queue run")
    wait_queue_empty(gw)
    [msg] = copies(hop, msgid)
    assert msg.rcpt_tos == ["bob@hop.test", "carol@hop.test"]
    assert msg.data.endswith(body)
    if where == "before the reply":
        assert cut.data_size == msg.size  # it had it all, but never said 250
    else:
        assert cut.data_size < msg.size
    assert bounces.messages == []


def test_4xx_after_the_content_defers_then_delivers_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    hop.data_reply = "451 4.3.0 Queue file write error, try again"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test"]
    msgid = send(gw, rcpts, "data 4xx")
    [(_qid, st)] = wait_deferred(gw).items()
    assert set(last_errors(st)) == set(rcpts)
    for rcpt in rcpts:
        [line] = to_lines(gw, rcpt, "Deferred")
        assert "dsn=4.3.0" in line and "Queue file write error" in line
    assert hop.messages == []
    hop.normal()
    kick_until(gw, lambda: copies(hop, msgid), "the delivery after the queue run")
    wait_queue_empty(gw)
    [msg] = copies(hop, msgid)
    assert msg.rcpt_tos == rcpts
    assert bounces.messages == []


# -- 5xx: bounces ----------------------------------------------------------------------------


def test_5xx_at_mail_bounces_every_recipient(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    hop.mail_reply = "553 5.1.8 <alice@example.org>... Domain of sender address does not exist"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test"]
    msgid = send(gw, rcpts, "mail 5xx")
    wait_until(lambda: bounces_for(bounces, msgid), "the bounce", GUARD)
    wait_queue_empty(gw)
    [dsn] = bounces_for(bounces, msgid)
    assert dsn.rcpt_tos == [SENDER]
    subject, fields = dsn_fields(dsn)
    assert subject == "Returned mail: see transcript for details"
    assert [f["final-recipient"] for f in fields] == [f"rfc822; {r}" for r in rcpts]
    for f in fields:
        assert f["action"] == "failed" and f["status"] == "5.1.8"
        assert f["remote-mta"] == f"dns; [{HOP}]"
        assert f["diagnostic-code"].startswith("smtp; 553 5.1.8 <alice@example.org>")
    assert hop.messages == []
    assert deferred_lines(gw) == []
    assert all(len(to_lines(gw, r, "553 5.1.8")) == 1 for r in rcpts)
    assert "DSN: 553 5.1.8" in gw.log()


def test_5xx_at_rcpt_bounces_that_recipient_and_delivers_the_others(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    hop.rcpt_reply["carol@hop.test"] = "550 5.1.1 <carol@hop.test>... User unknown"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    msgid = send(gw, ["bob@hop.test", "carol@hop.test"], "rcpt 5xx")
    wait_until(lambda: bounces_for(bounces, msgid), "the bounce", GUARD)
    wait_queue_empty(gw)
    [msg] = copies(hop, msgid)
    assert msg.rcpt_tos == ["bob@hop.test"]
    [dsn] = bounces_for(bounces, msgid)
    _subject, [field] = dsn_fields(dsn)
    assert field["final-recipient"] == "rfc822; carol@hop.test"
    assert field["action"] == "failed" and field["status"] == "5.1.1"
    assert field["diagnostic-code"] == "smtp; 550 5.1.1 <carol@hop.test>... User unknown"
    assert len(to_lines(gw, "carol@hop.test", "User unknown")) == 1
    assert len(to_lines(gw, "bob@hop.test", "Sent")) == 1
    assert deferred_lines(gw) == []


def test_bounce_waits_for_the_senders_server_and_is_sent_once(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    """The bounce is mail like any other: deferred while the sender's MX is down, sent once
    when it is back; the original, delivered to the others, is not sent again."""
    bounces.stop()
    hop.rcpt_reply["carol@hop.test"] = "550 5.1.1 <carol@hop.test>... User unknown"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    msgid = send(gw, ["bob@hop.test", "carol@hop.test"], "bounce deferred")
    [(qid, st)] = wait_deferred(gw).items()  # the original is gone, the bounce waits
    assert last_errors(st)[SENDER].startswith("Deferred: Connection refused")
    assert f"{qid}: to=<{SENDER}>" in deferred_lines(gw)[0]
    assert [m.rcpt_tos for m in copies(hop, msgid)] == [["bob@hop.test"]]
    bounces.start()
    kick_until(gw, lambda: bounces_for(bounces, msgid), "the bounce after the queue run")
    wait_queue_empty(gw)
    [dsn] = bounces_for(bounces, msgid)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    _subject, [field] = dsn_fields(dsn)
    assert field["final-recipient"] == "rfc822; carol@hop.test" and field["status"] == "5.1.1"
    assert [m.rcpt_tos for m in copies(hop, msgid)] == [["bob@hop.test"]]


def test_5xx_after_the_content_bounces_each_recipient(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    """The end-of-data reply speaks for every accepted recipient: the bounce reports each."""
    hop.data_reply = "554 5.6.0 Message content rejected"
    hop.start()
    gw = gateway(MANUAL, RELAXED)
    rcpts = ["bob@hop.test", "carol@hop.test", "dave@hop.test"]
    msgid = send(gw, rcpts, "data 5xx")
    wait_until(lambda: bounces_for(bounces, msgid), "the bounce", GUARD)
    wait_queue_empty(gw)
    [dsn] = bounces_for(bounces, msgid)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    _subject, fields = dsn_fields(dsn)
    assert [f["final-recipient"] for f in fields] == [f"rfc822; {r}" for r in rcpts]
    assert {(f["action"], f["status"], f["diagnostic-code"]) for f in fields} == {
        ("failed", "5.6.0", "smtp; 554 5.6.0 Message content rejected")
    }
    assert msgid.encode() in dsn.data  # the original comes back
    [t] = hop.transactions
    assert t.rcpt_tos == rcpts and not t.completed
    assert hop.messages == []
    assert deferred_lines(gw) == []
    assert all(len(to_lines(gw, r, "554 5.6.0")) == 1 for r in rcpts)


# -- too long in the queue -------------------------------------------------------------------


def test_delay_warning_then_max_age_bounce_for_the_deferred_recipient(
    gateway: GatewayFactory, hop: SinkServer, bounces: SinkServer
) -> None:
    """Sendmail's queuewarn / queuereturn: a warning once ``warn_after`` has passed, a
    bounce with 4.4.7 once ``max_age`` has; only the recipient still deferred is reported, the
    one delivered at the first attempt is not."""
    hop.rcpt_reply["carol@hop.test"] = "451 4.2.1 Mailbox temporarily unavailable"
    hop.start()
    gw = gateway(TIMER, '[queue]\nwarn_after = "1s"\nmax_age = "1h"\n', RELAXED)
    msgid = send(gw, ["bob@hop.test", "carol@hop.test"], "expiry")
    wait_until(lambda: bounces_for(bounces, msgid), "the delay warning", GUARD)
    [warning] = bounces_for(bounces, msgid)
    subject, [field] = dsn_fields(warning)
    assert subject.startswith("Warning: could not send message for past")
    assert b"THIS IS A WARNING MESSAGE ONLY" in warning.data
    assert field["final-recipient"] == "rfc822; carol@hop.test"
    assert field["action"] == "delayed" and field["status"] == "4.4.7"
    assert "451 4.2.1 Mailbox temporarily unavailable" in field["diagnostic-code"]
    assert gw.queued()  # still trying

    # max_age shortened by a reload (SIGHUP): the next retry finds the message too old.
    text = gw.config.read_text()
    gw.config.write_text(text.replace('max_age = "1h"', 'max_age = "1s"'))
    gw.signal(signal.SIGHUP)
    wait_until(lambda: len(bounces_for(bounces, msgid)) >= 2, "the expiry bounce", GUARD)
    wait_queue_empty(gw)
    assert len(bounces_for(bounces, msgid)) == 2  # one warning, one bounce
    bounce = bounces_for(bounces, msgid)[1]
    subject, [field] = dsn_fields(bounce)
    assert subject == "Returned mail: see transcript for details"
    assert field["final-recipient"] == "rfc822; carol@hop.test"
    assert field["action"] == "failed" and field["status"] == "4.4.7"
    assert "451 4.2.1 Mailbox temporarily unavailable" in field["diagnostic-code"]
    assert [m.rcpt_tos for m in copies(hop, msgid)] == [["bob@hop.test"]]
    [expired] = to_lines(gw, "carol@hop.test", "Cannot send message for 1 second")
    assert "dsn=4.4.7" in expired
    assert "DSN: Cannot send message for 1 second" in gw.log()
    # every try before that was a deferral; how many the retry timer made is timing
    assert len(deferred_lines(gw)) >= 2


def test_max_age_bounce_when_the_hop_never_answers(
    gateway: GatewayFactory, bounces: SinkServer
) -> None:
    gw = gateway(TIMER, '[queue]\nwarn_after = "0s"\nmax_age = "2s"\n', RELAXED)
    msgid = send(gw, ["bob@hop.test"], "never")
    wait_until(lambda: bounces_for(bounces, msgid), "the expiry bounce", GUARD)
    wait_queue_empty(gw)
    [bounce] = bounces_for(bounces, msgid)
    _subject, [field] = dsn_fields(bounce)
    assert field["action"] == "failed" and field["status"] == "4.4.7"
    # No peer ever answered: no Diagnostic-Code (RFC 3464: the remote MTA's words); the
    # reason is in the text part, as Sendmail's.
    assert "diagnostic-code" not in field
    assert f"(reason: Deferred: Connection refused by [{HOP}])" in bounce.data.decode()
    assert deferred_lines(gw)
    [expired] = to_lines(gw, "bob@hop.test", "Cannot send message for 2 seconds")
    assert "dsn=4.4.7" in expired


# -- MX fallback -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        "refuses",
        "421 greeting",
        "554 greeting",
        "hangs after accepting",
        "black hole",
        "4xx at MAIL",
    ],
)
def test_first_mx_fails_second_receives(
    gateway: GatewayFactory,
    mx1: SinkServer,
    mx2: SinkServer,
    bounces: SinkServer,
    port: int,
    failure: str,
) -> None:
    """RFC 5321 5.1: the next MX by preference when the first cannot take the transaction;
    delivered once, at once, nothing deferred. (Sendmail and Postfix do the same for a 4xx or
    5xx greeting, and Postfix for a 4xx to MAIL.)"""
    hole = Blackhole(MX1, port)
    if failure == "421 greeting":
        mx1.greeting = "421 4.3.2 mx1.mx.test Too busy, try another server"
    elif failure == "554 greeting":
        mx1.greeting = "554 5.3.2 mx1.mx.test No SMTP service here"
    elif failure == "hangs after accepting":
        mx1.hang("greeting")
    elif failure == "4xx at MAIL":
        mx1.mail_reply = "451 4.3.5 System not accepting mail now"
    if failure == "black hole":
        hole.start()
    elif failure != "refuses":
        mx1.start()
    mx2.start()
    try:
        gw = gateway(
            MANUAL, SHORT if failure in ("hangs after accepting", "black hole") else RELAXED
        )
        rcpts = ["bob@mx.test", "carol@mx.test"]
        msgid = send(gw, rcpts, f"mx fallback {failure}")
        [msg] = mx2.wait_for(1, timeout=GUARD)
        wait_queue_empty(gw)
    finally:
        hole.stop()
    assert msgid_of(msg.data) == msgid and msg.rcpt_tos == rcpts
    assert mx1.messages == []
    if failure not in ("refuses", "black hole"):
        assert mx1.connections == 1  # the preferred MX was tried first, once
    for rcpt in rcpts:
        [line] = to_lines(gw, rcpt, "Sent")
        assert f"relay=mx2.mx.test. [{MX2}]" in line
    assert deferred_lines(gw) == []
    assert bounces.messages == []


def test_both_mx_down_defers_then_the_preferred_one_gets_it_once(
    gateway: GatewayFactory, mx1: SinkServer, mx2: SinkServer, bounces: SinkServer
) -> None:
    mx2.greeting = "421 4.3.2 mx2.mx.test Not now"
    mx2.start()  # MX1 refuses connections, MX2 421s
    gw = gateway(MANUAL, RELAXED)
    msgid = send(gw, ["bob@mx.test"], "both down")
    [(_qid, st)] = wait_deferred(gw).items()
    # The last address tried speaks for the attempt, as in Sendmail's log.
    assert last_errors(st)["bob@mx.test"].startswith("Deferred: 421 4.3.2 mx2.mx.test Not now")
    [line] = to_lines(gw, "bob@mx.test", "Deferred")
    assert f"relay=mx2.mx.test. [{MX2}]" in line
    assert mx2.connections == 1
    mx1.start()
    mx2.normal()
    kick_until(gw, lambda: copies(mx1, msgid) or copies(mx2, msgid), "the delivery")
    wait_queue_empty(gw)
    assert deliveries(mx1, msgid) == Counter(["bob@mx.test"])  # the preferred MX
    assert copies(mx2, msgid) == []
    assert bounces.messages == []


# -- the settings behind the timeouts ----------------------------------------------------------


def test_connect_timeout_is_not_scaled_by_command_timeout() -> None:
    """``[delivery] connect_timeout`` is per address tried, whatever ``command_timeout``
    does to the SMTP stages (it was scaled with them: 2 s and 2 s gave 13 ms)."""
    t = delivery_timeouts(DeliverySettings(connect_timeout=2.0, command_timeout=2.0))
    assert t.connect == 2.0
    assert (t.greeting, t.mail, t.rcpt, t.command) == (2.0, 2.0, 2.0, 2.0)
    assert t.data_init == pytest.approx(0.8) and t.data_end == pytest.approx(4.0)
    assert delivery_timeouts(DeliverySettings()) == Timeouts(connect=30.0)


def test_expiry_text_is_sendmails() -> None:
    assert interval_text(5 * 86400) == "5 days"
    assert interval_text(4 * 3600) == "4 hours"
    assert interval_text(5400) == "1 hour, 30 minutes"
    assert interval_text(1) == "1 second"
