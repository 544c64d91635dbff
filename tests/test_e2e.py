"""End to end: the real daemon on loopback, smtplib clients from distinct 127.x addresses, sink
SMTP servers as next hops, a DNS server on loopback for MX/A/PTR, kill -9 and restart.

The set-up mirrors the Sendmail gateway of the issue: mailertable routes each target domain to
its own internal server, access lets the outside relay only to `To:` RELAY domains and lets the
listed internal hosts relay anywhere, local-host-names holds the locally delivered domain.
"""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess, free_port, run_cli
from tests.support.sink import SinkServer
from tests.support.world import (
    HOP1,
    MXHOST,
    OUTSIDE,
    SENDER_DNS,
    GatewayFactory,
    SinkFactory,
    World,
    issue_world,
    message,
    stays,
    wait_until,
)

INTERNAL = "127.0.0.3"  # listed in access by IP
INTERNAL_NET = "127.0.1.9"  # inside the listed prefix 127.0.1
HOP2 = "127.0.0.6"  # targetdomain2.com's server, found through MX of relay.test

DNS_RECORDS = {
    **SENDER_DNS,
    "example.net": [("MX", "10 mx.example.net.")],  # example.net's MX, for mail routed by MX
    "mx.example.net": [("A", MXHOST)],
    "relay.test": [("MX", "10 mx1.relay.test.")],
    "mx1.relay.test": [("A", HOP2)],
}


@pytest.fixture
def hop1(make_sink: SinkFactory) -> SinkServer:
    """targetdomain1.com's server, this test's own (tests stop it to play an outage)."""
    return make_sink(HOP1)


@pytest.fixture(scope="module")
def hop2_port() -> int:
    return free_port(HOP2)


@pytest.fixture
def world(hop1: SinkServer, hop2_port: int, mx_port: int) -> World:
    return issue_world(hop1.port, mx_port).but(
        tables={
            "mailertable": (
                f"targetdomain1.com   smtp:[{HOP1}]:{hop1.port}\n"
                f"targetdomain2.com   esmtp:relay.test:{hop2_port}\n"
                "refused.example    error:5.7.1:550 Mail for this domain is refused\n"
            ),
            "access": (
                "To:targetdomain1.com  RELAY\n"
                "To:targetdomain2.com  RELAY\n"
                "To:refused.example    RELAY\n"
                f"{INTERNAL}   RELAY\n"
                "127.0.1   RELAY\n"
            ),
        }
    )


@pytest.fixture
def gateway(make_gateway: GatewayFactory, world: World) -> GatewayProcess:
    return make_gateway(world)


def test_routed_domain_goes_to_its_mailertable_hop(
    gateway: GatewayProcess, hop1: SinkServer
) -> None:
    with gateway.smtp(OUTSIDE) as s:
        code, banner = s.ehlo()
        assert code == 250
        assert b"PIPELINING" in banner and b"8BITMIME" in banner and b"SIZE" in banner
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message())
    [msg] = hop1.wait_for(1, timeout=10)
    assert msg.mail_from == "alice@example.org"
    assert msg.rcpt_tos == ["bob@targetdomain1.com"]
    assert msg.data.startswith(
        b"Received: from client.example.net ([127.0.0.2])\r\n"
        b"\tby gateway.example.com (mailgate) with ESMTP id "
    )
    assert msg.data.endswith(message())
    log = gateway.wait_log("stat=Sent")
    assert "from=<alice@example.org>, size=" in log and "nrcpts=1" in log
    assert "msgid=<hello@example.org>" in log and "relay=[127.0.0.2]" in log
    assert "to=<bob@targetdomain1.com>" in log and "mailer=smtp" in log
    assert f"relay=[{HOP1}]" in log  # a bracketed host: no MX name to show
    wait_until(lambda: gateway.queued() == [], "the delivered message to leave the queue")


def test_the_smtp_mailer_says_helo_to_a_greeting_without_esmtp(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, hop2_port: int
) -> None:
    """As Sendmail's: mailertable smtp: says EHLO only when the greeting has the word ESMTP
    (targetdomain1.com), esmtp: always (targetdomain2.com); both next hops greet without it."""
    hop2 = make_sink(HOP2, hop2_port)
    for hop in (hop1, hop2):
        hop.greeting = "220 internal.example SMTP service ready"
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message(subject="by smtp"))
        s.sendmail("alice@example.org", ["carol@targetdomain2.com"], message(subject="by esmtp"))
    [by_smtp] = hop1.wait_for(1, timeout=10)
    [by_esmtp] = hop2.wait_for(1, timeout=10)
    assert hop1.commands[0].startswith("HELO ") and by_smtp.mail_options == []
    assert hop2.commands[0].startswith("EHLO ") and "SIZE" in " ".join(by_esmtp.mail_options)


def test_a_message_is_delivered_while_its_session_stays_open(
    gateway: GatewayProcess, hop1: SinkServer
) -> None:
    """The first attempt waits for the client's next command (smtp/session.py, data_end),
    but not for long: a client that says nothing more after the 250 still has its message
    delivered, and the from= line comes before the to= line."""
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("first"))
        [first] = hop1.wait_for(1, timeout=10)  # no QUIT, no further command
        assert b"Subject: first" in first.data
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("second"))
        assert len(hop1.wait_for(2, timeout=10)) == 2
        assert s.noop()[0] == 250
    log = gateway.wait_log("stat=Sent")
    assert log.index("from=<alice@example.org>") < log.index("to=<bob@targetdomain1.com>")


def test_foreign_domain_refused_from_outside(gateway: GatewayProcess, hop1: SinkServer) -> None:
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        assert s.mail("alice@example.org")[0] == 250
        code, text = s.rcpt("victim@example.net")
        assert code == 550
        assert text.startswith(b"5.7.1 <victim@example.net>... Relaying denied")
        # the subdomain of a RELAY domain is not relayed under relay_hosts_only
        code, text = s.rcpt("x@sub.targetdomain1.com")
        assert (code, text[:5]) == (550, b"5.7.1")
        # percent hack and bang paths are resolved before the relay check
        assert s.rcpt("victim%example.net@gateway.example.com")[0] == 550
        assert s.rcpt("example.net!victim")[0] == 550
        assert s.rcpt("bob%targetdomain1.com@gateway.example.com")[0] == 250
        # the address is quoted as written: brackets only if the client used them
        code, text = s.docmd("RCPT", "TO:victim@example.net")
        assert code == 550 and text.startswith(b"5.7.1 victim@example.net... Relaying denied")
    assert "reject=550 5.7.1 <victim@example.net>... Relaying denied" in gateway.log()


def test_listed_client_may_relay_anywhere_by_mx(
    gateway: GatewayProcess, make_sink: SinkFactory, mx_port: int
) -> None:
    mx = make_sink(MXHOST, mx_port)
    for source in (INTERNAL, INTERNAL_NET, "127.0.0.1"):
        with gateway.smtp(source) as s:
            s.sendmail(
                "it@example.org",
                ["someone@example.net"],
                message(f"from {source}", to="someone@example.net"),
            )
    msgs = mx.wait_for(3, timeout=15)
    # the kernel's source address for loopback (no [delivery] bind_address)
    assert [m.peer for m in msgs] == ["127.0.0.1"] * 3
    assert all(m.rcpt_tos == ["someone@example.net"] for m in msgs)


def test_mx_routed_mailertable_entry_with_port(
    gateway: GatewayProcess, make_sink: SinkFactory, hop2_port: int
) -> None:
    hop2 = make_sink(HOP2, hop2_port)
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail(
            "alice@example.org",
            ["carol@targetdomain2.com", "dave@targetdomain2.com"],
            message(to="carol@targetdomain2.com"),
        )
    [msg] = hop2.wait_for(1, timeout=10)
    # one transaction carries both recipients of the hop
    assert sorted(msg.rcpt_tos) == ["carol@targetdomain2.com", "dave@targetdomain2.com"]
    assert msg.pipelined


def test_local_user_gets_maildir_and_unknown_user_is_refused(
    gateway: GatewayProcess, hop1: SinkServer
) -> None:
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        s.mail("bob@example.org")
        code, text = s.rcpt("nobody-here@mail.example.org")
        assert (code, text) == (550, b"5.1.1 <nobody-here@mail.example.org>... User unknown")
        s.rset()
        s.sendmail("bob@example.org", ["alice@mail.example.org"], message("local", to="alice"))
        # an alias that fans out to a local user and a routed domain
        s.sendmail("bob@example.org", ["team@gateway.example.com"], message("team", to="team"))
    new = gateway.maildir / "alice" / "new"
    # The Maildir is made at the first delivery: until then there is no new/ to list.
    wait_until(
        lambda: new.is_dir() and len(list(new.iterdir())) >= 2, "two messages in alice's Maildir"
    )
    files = sorted(new.iterdir())
    assert len(files) == 2
    texts = [f.read_bytes() for f in files]
    assert all(t.startswith(b"Return-Path: <bob@example.org>\n") for t in texts)
    # the local message and the alias's local copy
    assert sorted(t.split(b"\nSubject: ")[1].split(b"\n")[0] for t in texts) == [b"local", b"team"]
    assert all(b"\r\n" not in t for t in texts)
    [routed] = hop1.wait_for(1, timeout=10)
    assert routed.rcpt_tos == ["bob@targetdomain1.com"]


def test_mailertable_error_refused_at_rcpt(gateway: GatewayProcess) -> None:
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        s.mail("bob@example.org")
        code, text = s.rcpt("x@refused.example")
        assert (code, text) == (
            550,
            b"5.7.1 <x@refused.example>... Mail for this domain is refused",
        )


def test_smtp_smuggling_is_refused(gateway: GatewayProcess, hop1: SinkServer) -> None:
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        s.mail("alice@example.org")
        s.rcpt("bob@targetdomain1.com")
        code, _ = s.docmd("DATA")
        assert code == 354
        s.send(
            b"Subject: a\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<x@y>\r\n"
            b"\r\n.\r\n"
        )
        code, text = s.getreply()
        assert code == 550 and text.startswith(b"5.6.11")
        assert s.noop()[0] == 250  # still in sync
    stays(lambda: hop1.messages == [], "nothing delivered", 0.5)


def test_kill_9_after_250_then_restart_delivers(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    hop1.stop()
    gw = make_gateway(world)
    with gw.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("survivor"))
    # The next hop is down: the message is acknowledged and waits in the queue.
    gw.wait_log("stat=Deferred")
    assert len(gw.queued()) == 1
    gw.kill9()
    hop1.start()
    gw.start()
    [msg] = hop1.wait_for(1, timeout=15)
    assert b"Subject: survivor" in msg.data
    wait_until(lambda: gw.queued() == [], "the delivered message to leave the queue", 5)


def test_kill_9_during_delivery(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    hop1.delays["greeting"] = 30.0  # the delivery hangs right after the 250 to our client
    gw = make_gateway(world)
    with gw.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("inflight"))
    wait_until(lambda: hop1.connections, "the delivery to connect", 5)
    assert hop1.connections == 1
    gw.kill9()
    hop1.delays.clear()
    gw.start()
    [msg] = hop1.wait_for(1, timeout=15)
    assert b"Subject: inflight" in msg.data


def _spare_inodes(gw: GatewayProcess, count: int) -> list[int]:
    """The inodes in spare/ once it holds ``count`` files and the queue is empty."""

    def settled() -> list[int] | None:
        spares = list((gw.spool / "spare").iterdir())
        if len(spares) == count and not gw.queued():
            return sorted(p.stat().st_ino for p in spares)
        return None

    return wait_until(
        settled,
        lambda: (
            f"{count} file(s) in spare/ ({list((gw.spool / 'spare').iterdir())}) and an "
            f"empty queue ({gw.queued()})"
        ),
    )


def test_delivered_files_are_reused_and_never_resent(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """One file serves message after message (no inode allocated per message); after a
    kill -9 the kept files, whose messages were delivered, are dropped, not sent again."""
    gw = make_gateway(world)
    seen = []
    with gw.smtp(OUTSIDE) as s:
        for i in range(5):
            s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message(f"reuse {i}"))
            hop1.wait_for(i + 1, timeout=10)
            seen.append(_spare_inodes(gw, 1))
    assert seen == [seen[0]] * 5
    gw.kill9()
    gw.start()
    assert not any((gw.spool / "spare").iterdir())
    stays(lambda: len(hop1.messages) == 5, "nothing sent again after the restart", 1.0)
    assert [m.data.split(b"Subject: ")[1][:7] for m in hop1.messages] == [
        f"reuse {i}".encode() for i in range(5)
    ]
    assert gw.queued() == []


HOURLY = '[queue]\nrun_interval = "1h"\nretry_min = "1h"\n'  # deferred mail waits


def test_etrn_retries_the_domain_now(
    make_gateway: GatewayFactory, world: World, hop1: SinkServer
) -> None:
    """ETRN makes mail waiting for that domain due at once, long before its retry time;
    mail for other domains keeps waiting."""
    hop1.stop()
    gw = make_gateway(world.but(settings=HOURLY))
    assert 'run_interval = "1h"\nretry_min = "1h"' in gw.config.read_text()
    with gw.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("etrn one"))
        s.sendmail("alice@example.org", ["carol@targetdomain2.com"], message("etrn two"))
    wait_until(lambda: gw.log().count("stat=Deferred") >= 2, "both messages deferred")
    assert gw.log().count("stat=Deferred") == 2
    hop1.start()
    with gw.smtp(OUTSIDE) as s:
        assert s.docmd("ETRN", "targetdomain1.com")[0] == 250
    [msg] = hop1.wait_for(1, timeout=10)
    assert b"Subject: etrn one" in msg.data
    # the sink has it; the queue file goes right after
    wait_until(lambda: len(gw.queued()) <= 1, "the delivered message to leave the queue", 5)
    assert len(gw.queued()) == 1  # targetdomain2.com's waits for its retry time


def test_retry_when_next_hop_comes_back_and_mailq(
    gateway: GatewayProcess, hop1: SinkServer
) -> None:
    hop1.stop()
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("later"))
    gateway.wait_log("stat=Deferred")
    out = run_cli("mailq", "-c", str(gateway.config))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("\t\t") and lines[0].endswith("(1 request)")
    assert lines[1].startswith("-----Q-ID----- --Size-- -----Q-Time-----")
    assert "<alice@example.org>" in lines[2] and len(lines[2].split()[0]) == 14
    assert "\t\t\t\t\t <bob@targetdomain1.com>" in out.stdout
    assert "Deferred" in out.stdout
    assert lines[-1] == "\t\tTotal requests: 1"
    hop1.start()
    [msg] = hop1.wait_for(1, timeout=15)
    assert b"Subject: later" in msg.data
    assert "stat=Sent" in gateway.wait_log("stat=Sent")


def test_permanent_failure_bounces_to_sender(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
    mx = make_sink(MXHOST, mx_port)
    with gateway.smtp(INTERNAL) as s:
        s.sendmail(
            "alice@example.org",
            ["gone@targetdomain1.com", "bob@targetdomain1.com"],
            message("doomed"),
        )
    [delivered] = hop1.wait_for(1, timeout=10)
    assert delivered.rcpt_tos == ["bob@targetdomain1.com"]
    [dsn] = mx.wait_for(1, timeout=15)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@example.org"]
    assert b"multipart/report" in dsn.data and b"Status: 5.1.1" in dsn.data
    assert b"gone@targetdomain1.com" in dsn.data
    log = gateway.wait_log("DSN: ")
    assert "stat=User unknown" in log


def test_bounce_of_internationalised_mail_is_internationalised(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    """RFC 6533: a DSN about a UTF-8 recipient is a message/global-delivery-status report
    (Final-Recipient of type utf-8), sent with SMTPUTF8, and with BODY=8BITMIME since it
    carries 8-bit text."""
    hop1.smtputf8 = True
    hop1.rcpt_reply["jörg@targetdomain1.com"] = "550 5.1.1 No such user here"
    mx = make_sink(MXHOST, mx_port)
    mx.smtputf8 = True
    with gateway.smtp(OUTSIDE) as s:
        s.ehlo()
        s.sendmail(
            "alice@example.org",
            ["jörg@targetdomain1.com"],
            message("grüße"),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    [dsn] = mx.wait_for(1, timeout=15)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@example.org"]
    assert "SMTPUTF8" in dsn.mail_options and "BODY=8BITMIME" in dsn.mail_options
    data = dsn.data
    assert b"Content-Type: message/global-delivery-status\r\n" in data
    assert "Final-Recipient: utf-8; jörg@targetdomain1.com\r\n".encode() in data
    assert b"Content-Type: message/global\r\n" in data
    assert b"message/delivery-status" not in data and b"message/rfc822" not in data


def test_bounce_of_plain_mail_stays_plain(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
    mx = make_sink(MXHOST, mx_port)
    mx.smtputf8 = True
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["gone@targetdomain1.com"], message("plain"))
    [dsn] = mx.wait_for(1, timeout=15)
    assert "SMTPUTF8" not in dsn.mail_options and "BODY=8BITMIME" not in dsn.mail_options
    assert b"Content-Type: message/delivery-status\r\n" in dsn.data
    assert b"Final-Recipient: rfc822; gone@targetdomain1.com\r\n" in dsn.data


def test_dsn_parameters_go_to_a_dsn_aware_hop(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    """RFC 3461 5.2: a next hop that offers DSN gets RET, ENVID, NOTIFY and ORCPT (added when
    the client gave none) and answers for the receipts: we send none."""
    mx = make_sink(MXHOST, mx_port)
    hop1.extra_extensions = ["DSN"]
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail(
            "alice@example.org",
            ["bob@targetdomain1.com", "carol@targetdomain1.com"],
            message("dsn aware"),
            mail_options=["RET=HDRS", "ENVID=QQ+2B314159"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE"],
        )
    hop1.wait_for(1, timeout=10)
    gateway.wait_log("stat=Sent")
    [mail] = [c for c in hop1.commands if c.startswith("MAIL")]
    assert mail.endswith(" RET=HDRS ENVID=QQ+2B314159")
    rcpts = [c for c in hop1.commands if c.startswith("RCPT")]
    assert rcpts == [
        f"RCPT To:<{r}@targetdomain1.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{r}@targetdomain1.com"
        for r in ("bob", "carol")
    ]
    stays(lambda: mx.messages == [], "no return receipt from us", 0.5)


def test_return_receipt_when_the_hop_has_no_dsn(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    mx = make_sink(MXHOST, mx_port)
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail(
            "alice@example.org",
            ["bob@targetdomain1.com"],
            message("receipt"),
            mail_options=["ENVID=QQ1"],
            rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+2BX@TargetDomain1.com"],
        )
    hop1.wait_for(1, timeout=10)
    assert [c for c in hop1.commands if c.startswith("RCPT")] == [
        "RCPT To:<bob@targetdomain1.com>"
    ]  # nothing DSN to a hop that does not offer it
    [receipt] = mx.wait_for(1, timeout=15)
    assert receipt.mail_from == "" and receipt.rcpt_tos == ["alice@example.org"]
    data = receipt.data
    assert b"Subject: Return receipt\r\n" in data
    assert b"Auto-Submitted: auto-generated (return-receipt)" in data
    assert b"successful delivery notifications" in data
    assert b"(relayed to non-DSN-aware mailer)" in data
    assert b"Original-Envelope-Id: QQ1\r\n" in data
    assert b"Original-Recipient: rfc822;Bob+X@TargetDomain1.com\r\n" in data
    assert b"Action: relayed\r\n" in data and b"Status: 2.0.0" in data
    # Without RET, a receipt carries the headers only.
    assert b"Content-Type: text/rfc822-headers" in data
    assert b"Subject: receipt" in data and b"Hi Bob." not in data
    assert "DSN: Return receipt" in gateway.wait_log("DSN: Return receipt")


def test_notify_never_and_ret_hdrs_on_failures(
    gateway: GatewayProcess, hop1: SinkServer, make_sink: SinkFactory, mx_port: int
) -> None:
    hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
    hop1.rcpt_reply["lost@targetdomain1.com"] = "550 5.1.1 No such user here"
    mx = make_sink(MXHOST, mx_port)
    with gateway.smtp(OUTSIDE) as s:
        s.sendmail(
            "alice@example.org",
            ["gone@targetdomain1.com"],
            message("quiet"),
            rcpt_options=["NOTIFY=NEVER"],
        )
        s.sendmail(
            "alice@example.org",
            ["lost@targetdomain1.com"],
            message("headers"),
            mail_options=["RET=HDRS", "ENVID=QQ2"],
        )
    [bounce] = mx.wait_for(1, timeout=15)
    stays(lambda: len(mx.messages) == 1, "no bounce for NOTIFY=NEVER", 0.5)
    assert b"lost@targetdomain1.com" in bounce.data and b"gone@" not in bounce.data
    assert b"Original-Envelope-Id: QQ2\r\n" in bounce.data
    assert b"Content-Type: text/rfc822-headers" in bounce.data
    assert b"Subject: headers" in bounce.data and b"Hi Bob." not in bounce.data


def test_sighup_reloads_tables_and_keeps_old_on_error(
    gateway: GatewayProcess, hop1: SinkServer
) -> None:
    with gateway.smtp("127.0.0.4") as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("y@example.net")[0] == 550
    access = gateway.dir / "access"
    access.write_text(access.read_text() + "127.0.0.4 RELAY\n")
    gateway.signal(signal.SIGHUP)
    gateway.wait_log("configuration reloaded")
    with gateway.smtp("127.0.0.4") as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("y@example.net")[0] == 250
    # A broken table is refused and the running rules stay.
    access.write_text(access.read_text() + "127.0.0.8 MAYBE\n")
    gateway.signal(signal.SIGHUP)
    log = gateway.wait_log("reload refused")
    assert "access:7" in log
    with gateway.smtp("127.0.0.4") as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("y@example.net")[0] == 250


def test_flush_verbose_and_route(gateway: GatewayProcess, hop1: SinkServer) -> None:
    hop1.stop()
    gw = gateway
    with gw.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["bob@targetdomain1.com"], message("flushme"))
    gw.wait_log("stat=Deferred")
    gw.stop()
    hop1.start()
    out = run_cli("flush", "-v", "-c", str(gw.config))
    assert out.returncode == 0, out.stderr
    assert ">>> MAIL From:<alice@example.org>" in out.stdout
    assert "<<< 250" in out.stdout
    assert len(hop1.wait_for(1, timeout=5)) == 1
    # As sendmail -q -v: what it logs is shown on the terminal and is in the maillog too.
    sent = [line for line in gw.log_lines("to=<bob@targetdomain1.com>") if "stat=Sent" in line]
    assert len(sent) == 1, gw.log()
    assert sent[0].split("mailgate[", 1)[1].split(": ", 1)[1] in out.stderr
    out = run_cli(
        "route",
        "-c",
        str(gw.config),
        "bob@TargetDomain1.COM.",
        "x@example.net",
        "alice@mail.example.org",
        "u@[192.0.2.1]",
    )
    assert f"mailer smtp, host [{HOP1}]:{hop1.port}, user bob@targetdomain1.com" in out.stdout
    assert "mailer esmtp, host example.net, user x@example.net" in out.stdout
    assert "mailer local, host local, user alice" in out.stdout
    assert "mailer esmtp, host [192.0.2.1], user u@[192.0.2.1]" in out.stdout


def test_queue_run_takes_on_entries_another_process_queued(
    make_gateway: GatewayFactory,
    world: World,
    hop1: SinkServer,
    make_sink: SinkFactory,
    mx_port: int,
) -> None:
    """A bounce that ``mailgate flush`` queued while the daemon runs is unknown to the daemon's
    runner; SIGUSR1 (and every run_interval) reads the queue folder and takes it on."""
    hop1.stop()
    gw = make_gateway(world.but(settings=HOURLY))
    with gw.smtp(OUTSIDE) as s:
        s.sendmail("alice@example.org", ["gone@targetdomain1.com"], message("flushed"))
    gw.wait_log("stat=Deferred")
    hop1.rcpt_reply["gone@targetdomain1.com"] = "550 5.1.1 No such user here"
    hop1.start()
    out = run_cli("flush", "-c", str(gw.config))
    assert out.returncode == 0, out.stderr
    hop1.stop()
    # The bounce went to the sender's MX, which is down: it waits in the queue.
    assert len(gw.queued()) == 1
    mx = make_sink(MXHOST, mx_port)
    gw.signal(signal.SIGUSR1)
    [dsn] = mx.wait_for(1, timeout=15)
    assert dsn.mail_from == "" and b"gone@targetdomain1.com" in dsn.data
    assert "that no runner here had" in gw.wait_log("queue run: 1 message(s) found")


def test_greeting_and_refused_commands(gateway: GatewayProcess) -> None:
    with gateway.smtp(OUTSIDE) as s:
        # smtplib read the greeting on connect
        assert s.docmd("VRFY", "alice")[0] == 252
        assert s.docmd("EXPN", "team")[0] == 502
        assert s.docmd("EHLO")[0] == 501
        s.ehlo()
        assert s.docmd("RCPT", "TO:<a@targetdomain1.com>")[0] == 503
        assert s.docmd("DATA")[0] == 503
    with smtplib.SMTP() as raw:
        raw.connect(gateway.host, gateway.port)
        assert raw.docmd("NOOP")[0] == 250


def test_check_command_reports_errors_with_lines(tmp_path: Path) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "mailgate.toml").write_text('hostname = "gw.example.com"\n')
    (d / "access").write_text("192.168.0.   RELAY\n10.1.2.3 RELAY\n")
    (d / "local-host-names").write_text("targetdomain1.com\n")
    (d / "mailertable").write_text("targetdomain1.com   smtp:[192.0.2.1]\n")
    out = run_cli("check", "-c", str(d / "mailgate.toml"))
    assert out.returncode == 0, out.stderr
    assert "access:1" in out.stdout and "192.168.0" in out.stdout
    assert "mailertable:1" in out.stdout  # the mailertable line a local name makes unused
    (d / "mailertable").write_text("targetdomain1.com   smtp:[192.0.2.1]\nbad.example  smtp:\n")
    out = run_cli("check", "-c", str(d / "mailgate.toml"))
    assert out.returncode != 0
    assert "mailertable:2" in out.stderr
    (d / "mailgate.toml").write_text('hostname = "gw.example.com"\n[queue]\nrun_interval = "x"\n')
    out = run_cli("check", "-c", str(d / "mailgate.toml"))
    assert out.returncode != 0 and "mailgate.toml:3" in out.stderr
